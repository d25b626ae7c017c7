"""Stand-in ``modules.sd_samplers_common`` (sd_samplers_common.py:142-288): a first-order sampler.

``launch_sampling`` sets ``CFGDenoiser.total_steps`` and ``state.sampling_steps``; the sampler
callback updates ``state.sampling_step`` *after* each step; ``apply_refiner`` swaps the model
mid-sampling through ``reload_model_weights``; ``InterruptedException`` returns the last latent.
"""

import torch

from modules import sd_models, shared
from modules.sd_samplers_cfg_denoiser import CFGDenoiser


class InterruptedException(BaseException):
    pass


def apply_refiner(cfg_denoiser, sigma=None):
    completed_ratio = cfg_denoiser.step / cfg_denoiser.total_steps
    p = cfg_denoiser.p
    refiner_checkpoint_info = getattr(p, "refiner_checkpoint_info", None)
    refiner_switch_at = getattr(p, "refiner_switch_at", None)

    if refiner_switch_at is not None and completed_ratio < refiner_switch_at:
        return False
    if refiner_checkpoint_info is None or shared.sd_model.sd_checkpoint_info == refiner_checkpoint_info:
        return False

    p.extra_generation_params["Refiner"] = refiner_checkpoint_info
    p.extra_generation_params["Refiner switch at"] = refiner_switch_at
    with sd_models.SkipWritingToConfig():
        sd_models.reload_model_weights(info=refiner_checkpoint_info)
    p.setup_conds()
    cfg_denoiser.update_inner_model()
    return True


class Sampler:
    def __init__(self):
        self.model_wrap_cfg = CFGDenoiser(self)
        self.model_wrap = self.model_wrap_cfg.inner_model  # as KDiffusionSampler.__init__
        self.p = None
        self.last_latent = None

    def callback_state(self, d):
        shared.state.sampling_step = d["i"]

    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = steps  # first-order: config.total_steps(steps) == steps
        shared.state.sampling_steps = steps
        shared.state.sampling_step = 0
        try:
            return func()
        except InterruptedException:
            return self.last_latent

    def initialize(self, p):
        self.p = p
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.step = 0

    def _euler(self, x, sigmas, cond, uncond, cond_scale):
        for i in range(len(sigmas) - 1):
            self.last_latent = x
            sigma = sigmas[i].expand(x.shape[0])
            denoised = self.model_wrap_cfg(x, sigma, uncond=uncond, cond=cond, cond_scale=cond_scale)
            x = x + (denoised - x) * (sigmas[i] - sigmas[i + 1])
            self.callback_state({"i": i})
        return x

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None):
        steps = steps or p.steps
        self.initialize(p)
        sigmas = torch.linspace(1.0, 0.0, steps + 1)
        return self.launch_sampling(
            steps, lambda: self._euler(x, sigmas, conditioning, unconditional_conditioning, p.cfg_scale)
        )

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None):
        steps = steps or p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
        sigma_sched = torch.linspace(1.0, 0.0, steps + 1)[steps - t_enc - 1 :]
        self.initialize(p)
        xi = x + noise * sigma_sched[0]
        return self.launch_sampling(
            t_enc + 1,
            lambda: self._euler(xi, sigma_sched, conditioning, unconditional_conditioning, p.cfg_scale),
        )
