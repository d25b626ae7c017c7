"""Stand-in ``LatentDiffusion`` → ``.model`` (DiffusionWrapper) → ``.diffusion_model`` (UNetModel)."""

import torch
from torch import nn

from ldm.modules.diffusionmodules.openaimodel import UNetModel


class DiffusionWrapper(nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.conditioning_key = "crossattn"


class LatentDiffusion(nn.Module):
    is_sd1 = True
    is_sd2 = False
    is_sdxl = False
    is_sd3 = False

    def __init__(self, seed=0, name="sd15", **unet_kwargs):
        super().__init__()
        torch.manual_seed(seed)
        self.model = DiffusionWrapper(UNetModel(**unet_kwargs))
        self.sd_checkpoint_info = name

    def apply_model(self, x, t, cond):
        return self.model.diffusion_model(x, timesteps=t, context=cond)
