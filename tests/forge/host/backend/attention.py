"""Stand-in for Forge ``backend/attention.py``: the module-level ``attention_function``.

Same signature and layout contract as Forge: ``(B, N, H·D)`` in, or ``(B, H, N, D)`` with
``skip_reshape=True``; output always ``(B, N, H·D)``. Implemented with PyTorch SDPA like Forge's
default backend.
"""

import torch.nn.functional as F


def heads_first(q, k, v, heads, skip_reshape):
    """``(B, H, N, D)`` views of ``(B, N, H·D)`` inputs (as they are with ``skip_reshape``), with ``B``
    and ``D``: the layout step Forge's back-ends (and Neo's, ``backend.attention_neo``) share."""
    if skip_reshape:
        b, _, _, dim_head = q.shape
        return b, dim_head, q, k, v
    b, _, inner = q.shape
    dim_head = inner // heads
    return b, dim_head, *(t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))


def attention_pytorch(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False):
    b, dim_head, q, k, v = heads_first(q, k, v, heads, skip_reshape)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, -1, heads * dim_head)


attention_function = attention_pytorch
