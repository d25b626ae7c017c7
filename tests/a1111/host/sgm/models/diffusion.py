"""Stand-in ``DiffusionEngine`` → ``.model`` (OpenAIWrapper) → ``.diffusion_model`` (sgm UNetModel)."""

import torch
from torch import nn

from sgm.modules.diffusionmodules.openaimodel import UNetModel


class OpenAIWrapper(nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model


class DiffusionEngine(nn.Module):
    is_sd1 = False
    is_sd2 = False
    is_sdxl = True
    is_sd3 = False

    def __init__(self, seed=0, name="sdxl", **unet_kwargs):
        super().__init__()
        torch.manual_seed(seed)
        self.model = OpenAIWrapper(UNetModel(**unet_kwargs))
        self.sd_checkpoint_info = name

    def apply_model(self, x, t, cond):
        context = cond["crossattn"] if isinstance(cond, dict) else cond
        return self.model.diffusion_model(x, timesteps=t, context=context)
