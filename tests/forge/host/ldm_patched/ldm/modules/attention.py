"""Stand-in for reForge ``ldm_patched/ldm/modules/attention.py``.

reForge's CrossAttention calls the module-level ``optimized_attention(q, k, v, heads,
attn_precision=...)`` (looked up at call time) and its BasicTransformerBlock adds
``attn_precision`` to ``extra_options``. Everything else follows the Forge stand-in.
"""

from backend.attention import attention_pytorch
from backend.nn import unet as forge_unet


def optimized_attention(
    q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False
):
    return attention_pytorch(q, k, v, heads, mask=mask, skip_reshape=skip_reshape)


class CrossAttention(forge_unet.CrossAttention):
    attn_precision = None

    def attend(self, q, k, v, mask):
        return optimized_attention(q, k, v, self.heads, attn_precision=self.attn_precision)


class BasicTransformerBlock(forge_unet.BasicTransformerBlock):
    attention_class = CrossAttention
    attn_precision = None

    def extra_options(self, transformer_options):
        extra = super().extra_options(transformer_options)
        extra["attn_precision"] = self.attn_precision
        return extra


class SpatialTransformer(forge_unet.SpatialTransformer):
    block_class = BasicTransformerBlock


class UNetModel(forge_unet.IntegratedUNet2DConditionModel):
    transformer_class = SpatialTransformer


class ModelSampling:
    """reForge keeps the schedule on ``model.model_sampling`` (no ``predictor``)."""

    def __init__(self):
        from backend.modules.k_prediction import Prediction

        self._schedule = Prediction()
        self.calls = self._schedule.calls

    def percent_to_sigma(self, percent):
        return self._schedule.percent_to_sigma(percent)


class BaseModel:
    def __init__(self, diffusion_model):
        self.diffusion_model = diffusion_model
        self.model_sampling = ModelSampling()

    def apply_model(self, x, t, c_crossattn=None, transformer_options={}, **kwargs):  # noqa: B006
        return self.diffusion_model(
            x, t, context=c_crossattn, transformer_options=transformer_options, **kwargs
        )
