"""Stand-in for Forge ``backend/modules/k_prediction.py``: the schedule's ``percent_to_sigma``."""

import torch


class Prediction:
    """Discrete 1000-step schedule (scaled-linear betas, as SD uses) with Forge's percent_to_sigma."""

    def __init__(self, beta_start=0.00085, beta_end=0.012, timesteps=1000):
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.sigmas = sigmas.float()
        self.log_sigmas = self.sigmas.log()
        self.calls = []

    def sigma(self, timestep):
        t = torch.clamp(timestep.float(), min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def percent_to_sigma(self, percent):
        self.calls.append(percent)
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()


class PredictionFlux:
    """Flux: sigma in [0, 1]; percent_to_sigma is ``1 − percent`` with the same end conventions."""

    def __init__(self):
        self.calls = []

    def percent_to_sigma(self, percent):
        self.calls.append(percent)
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return 1.0 - percent
