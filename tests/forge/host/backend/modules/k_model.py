"""Stand-in for Forge ``backend/modules/k_model.py``: ``KModel.apply_model`` → diffusion_model."""

import torch


class KModel(torch.nn.Module):
    def __init__(self, diffusion_model, predictor):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.predictor = predictor

    def apply_model(self, x, t, c_crossattn=None, transformer_options={}, **kwargs):  # noqa: B006 (Forge's)
        return self.diffusion_model(
            x, t, context=c_crossattn, transformer_options=transformer_options, **kwargs
        )
