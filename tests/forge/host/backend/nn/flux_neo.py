"""Stand-in for Forge Neo's ``backend/nn/flux.py`` (Haoming02/sd-webui-forge-classic, neo branch).

What differs from Forge's, as in Neo: the module-level ``attention(q, k, v, pe, mask=None,
transformer_options={})`` applies RoPE only when ``pe`` is not None and passes ``mask`` on to
``attention_function``; blocks call it as ``attention(q, k, v, pe=pe, mask=attn_mask,
transformer_options=transformer_options)``, and the model's ``forward`` takes the mask from its
``attention_mask`` keyword. Forge's stand-in (``backend.nn.flux``) supplies the rest; the module has
its own name here so both hosts can be loaded at once (PLADIS resolves the module from the blocks).
"""

from backend.attention import attention_function
from backend.nn import flux
from backend.nn.flux import apply_rope


def attention(q, k, v, pe, mask=None, transformer_options={}):  # noqa: B006 (Neo's signature)
    if pe is not None:
        q, k = apply_rope(q, k, pe)
    return attention_function(q, k, v, q.shape[1], mask, skip_reshape=True)


def _call_attention(self, q, k, v, pe):
    return attention(q, k, v, pe=pe, mask=self.attn_mask, transformer_options={})


class DoubleStreamBlock(flux.DoubleStreamBlock):
    attn_mask = None
    call_attention = _call_attention


class SingleStreamBlock(flux.SingleStreamBlock):
    attn_mask = None
    call_attention = _call_attention


class IntegratedFluxTransformer2DModel(flux.IntegratedFluxTransformer2DModel):
    double_class = DoubleStreamBlock
    single_class = SingleStreamBlock

    def forward(self, x, timestep, context, y=None, guidance=None, **kwargs):
        # Neo hands ``attn_mask=kwargs.get("attention_mask")`` to every block call.
        for block in [*self.double_blocks, *self.single_blocks]:
            block.attn_mask = kwargs.get("attention_mask")
        return super().forward(x, timestep, context, y, guidance)
