"""Stand-in ``ldm.modules.attention`` (Stability-AI/stablediffusion@cf1d67a, attention.py:145-340).

``CrossAttention`` has the upstream attributes (``scale = dim_head ** -0.5``, ``heads``, bias-free
``to_q/to_k/to_v``, ``to_out = Sequential(Linear, Dropout)``, no ``dim_head``) and maths.
``SpatialTransformer`` works on token sequences [B, HW, C] here (no conv/reshape) but keeps the
upstream names ``transformer_blocks.N.attn1/attn2``.
"""

import torch
from torch import einsum, nn


def exists(val):
    return val is not None


def default(val, d):
    return val if exists(val) else d


class CrossAttention(nn.Module):
    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = default(context_dim, query_dim)

        self.scale = dim_head**-0.5
        self.heads = heads

        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)

        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None, mask=None):
        h = self.heads

        q = self.to_q(x)
        context = default(context, x)
        k = self.to_k(context)
        v = self.to_v(context)

        def split(t):
            b, n, _ = t.shape
            return t.reshape(b, n, h, -1).transpose(1, 2).reshape(b * h, n, -1)

        q, k, v = split(q), split(k), split(v)
        with torch.autocast(enabled=False, device_type="cuda"):
            q, k = q.float(), k.float()
            sim = einsum("b i d, b j d -> b i j", q, k) * self.scale

        if exists(mask):
            raise NotImplementedError("mask handling is not modelled")

        sim = sim.softmax(dim=-1)
        out = einsum("b i j, b j d -> b i d", sim, v)
        bh, n, d = out.shape
        out = out.reshape(bh // h, h, n, d).transpose(1, 2).reshape(bh // h, n, h * d)
        return self.to_out(out)


MemoryEfficientCrossAttention = CrossAttention  # A1111 aliases it (sd_hijack.py:29-30)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, d_head, context_dim=None):
        super().__init__()
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context=None):
        return self._forward(x, context)

    def _forward(self, x, context=None):
        x = self.attn1(self.norm1(x), context=None) + x
        x = self.attn2(self.norm2(x), context=context) + x
        x = self.ff(self.norm3(x)) + x
        return x


class SpatialTransformer(nn.Module):
    def __init__(self, in_channels, n_heads, d_head, depth=1, context_dim=None):
        super().__init__()
        inner_dim = n_heads * d_head
        self.norm = nn.LayerNorm(in_channels)
        self.proj_in = nn.Linear(in_channels, inner_dim)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner_dim, n_heads, d_head, context_dim=context_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(inner_dim, in_channels)

    def forward(self, x, context=None):
        x_in = x
        x = self.proj_in(self.norm(x))
        for block in self.transformer_blocks:
            x = block(x, context=context)
        return self.proj_out(x) + x_in
