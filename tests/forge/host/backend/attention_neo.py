"""Stand-in for Forge Neo's ``backend/attention.py`` (Haoming02/sd-webui-forge-classic, neo branch).

Neo's attention back-ends share one signature, ``(q, k, v, heads, mask=None, attn_precision=None,
skip_reshape=False, skip_output_reshape=False, **kwargs)``: its Flux calls ``attention_function``
with ``transformer_options=`` among the keywords, which the back-ends take in ``**kwargs``. A 2-D or
3-D mask gets its batch and head dimensions added before SDPA. Forge's stand-in
(``backend.attention``) keeps Forge's narrower signature; this module has its own name so both hosts
can be loaded at once.
"""

import torch.nn.functional as F

from backend.attention import heads_first


def attention_pytorch(
    q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs
):
    b, dim_head, q, k, v = heads_first(q, k, v, heads, skip_reshape)
    if mask is not None and mask.ndim == 2:
        mask = mask.unsqueeze(0)  # batch
    if mask is not None and mask.ndim == 3:
        mask = mask.unsqueeze(1)  # heads
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(b, -1, heads * dim_head)


attention_function = attention_pytorch
