"""Stand-in ``modules.sd_hijack_optimizations`` (sd_hijack_optimizations.py:25-48, 508-546).

Optimisations replace ``CrossAttention.forward`` at *class* level on ldm and sgm at once; every
optimised forward applies hypernetworks to the context first. ``sdp`` is the one modelled here.
"""

import ldm.modules.attention
import sgm.modules.attention
import torch.nn.functional as F

from modules import devices, shared
from modules.hypernetworks import hypernetwork


def scaled_dot_product_attention_forward(self, x, context=None, mask=None, **kwargs):
    batch_size, _sequence_length, inner_dim = x.shape

    if mask is not None:
        raise NotImplementedError("ldm/sgm have no prepare_attention_mask")

    h = self.heads
    q_in = self.to_q(x)
    context = x if context is None else context

    context_k, context_v = hypernetwork.apply_hypernetworks(shared.loaded_hypernetworks, context)
    k_in = self.to_k(context_k)
    v_in = self.to_v(context_v)

    head_dim = inner_dim // h
    q = q_in.view(batch_size, -1, h, head_dim).transpose(1, 2)
    k = k_in.view(batch_size, -1, h, head_dim).transpose(1, 2)
    v = v_in.view(batch_size, -1, h, head_dim).transpose(1, 2)

    del q_in, k_in, v_in

    dtype = q.dtype
    if shared.opts.upcast_attn:
        q, k, v = q.float(), k.float(), v.float()

    hidden_states = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)

    hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, h * head_dim)
    hidden_states = hidden_states.to(dtype)

    hidden_states = self.to_out[0](hidden_states)
    hidden_states = self.to_out[1](hidden_states)
    return hidden_states


def apply(forward=scaled_dot_product_attention_forward):
    ldm.modules.attention.CrossAttention.forward = forward
    sgm.modules.attention.CrossAttention.forward = forward


def undo():
    apply(hypernetwork.attention_CrossAttention_forward)


_ = devices
