"""Stand-in for Forge ``backend/nn/chroma.py``: imports Flux's ``attention`` *by name* and calls its own
global, so a swap of ``backend.nn.flux.attention`` alone does not reach Chroma's blocks."""

from backend.nn import flux
from backend.nn.flux import attention


def _call_attention(self, q, k, v, pe):
    return attention(q, k, v, pe=pe)


class DoubleStreamBlock(flux.DoubleStreamBlock):
    call_attention = _call_attention


class SingleStreamBlock(flux.SingleStreamBlock):
    call_attention = _call_attention


class IntegratedChromaTransformer2DModel(flux.IntegratedFluxTransformer2DModel):
    double_class = DoubleStreamBlock
    single_class = SingleStreamBlock
