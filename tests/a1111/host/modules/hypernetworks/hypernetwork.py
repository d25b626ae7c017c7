"""Stand-in ``modules.hypernetworks.hypernetwork`` (hypernetwork.py:358-407 of v1.10.1).

A hypernetwork maps context feature size → (module for k, module for v); ``apply_hypernetworks``
chains every loaded one over the context, picking modules by ``context.shape[2]``.
"""

import torch
from torch import einsum, nn

from modules import devices, shared


class HypernetworkModule(nn.Module):
    def __init__(self, dim, seed):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.linear = nn.Linear(dim, dim)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(dim, dim, generator=generator) * 0.3)
            self.linear.bias.copy_(torch.randn(dim, generator=generator) * 0.3)
        self.multiplier = 1.0

    def forward(self, x):
        return x + self.linear(x) * self.multiplier


class Hypernetwork:
    def __init__(self, name="hn", enable_sizes=(), seed=0):
        self.name = name
        self.layers = {
            size: (HypernetworkModule(size, seed + 2 * i), HypernetworkModule(size, seed + 2 * i + 1))
            for i, size in enumerate(enable_sizes)
        }

    def set_multiplier(self, multiplier):
        for layers in self.layers.values():
            for layer in layers:
                layer.multiplier = multiplier


def apply_single_hypernetwork(hypernetwork, context_k, context_v, layer=None):
    hypernetwork_layers = (hypernetwork.layers if hypernetwork is not None else {}).get(
        context_k.shape[2], None
    )

    if hypernetwork_layers is None:
        return context_k, context_v

    if layer is not None:
        layer.hyper_k = hypernetwork_layers[0]
        layer.hyper_v = hypernetwork_layers[1]

    context_k = devices.cond_cast_unet(hypernetwork_layers[0](devices.cond_cast_float(context_k)))
    context_v = devices.cond_cast_unet(hypernetwork_layers[1](devices.cond_cast_float(context_v)))
    return context_k, context_v


def apply_hypernetworks(hypernetworks, context, layer=None):
    context_k = context
    context_v = context
    for hypernetwork in hypernetworks:
        context_k, context_v = apply_single_hypernetwork(hypernetwork, context_k, context_v, layer)

    return context_k, context_v


def attention_CrossAttention_forward(self, x, context=None, mask=None, **kwargs):
    """The forward ``SdOptimization.undo`` puts back on both ldm and sgm CrossAttention."""
    h = self.heads

    q = self.to_q(x)
    context = x if context is None else context

    context_k, context_v = apply_hypernetworks(shared.loaded_hypernetworks, context, self)
    k = self.to_k(context_k)
    v = self.to_v(context_v)

    q, k, v = (
        t.reshape(t.shape[0], t.shape[1], h, -1).transpose(1, 2).reshape(-1, t.shape[1], t.shape[2] // h)
        for t in (q, k, v)
    )

    sim = einsum("b i d, b j d -> b i j", q, k) * self.scale

    if mask is not None:
        raise NotImplementedError("the UNet never passes a mask to attn2")

    attn = sim.softmax(dim=-1)

    out = einsum("b i j, b j d -> b i d", attn, v)
    b = x.shape[0]
    out = out.reshape(b, h, out.shape[1], out.shape[2]).transpose(1, 2).reshape(b, out.shape[1], -1)
    return self.to_out(out)
