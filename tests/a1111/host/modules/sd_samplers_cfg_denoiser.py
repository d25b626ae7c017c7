"""Stand-in ``modules.sd_samplers_cfg_denoiser.CFGDenoiser`` (sd_samplers_cfg_denoiser.py:156-310).

Per call: interrupt check → ``apply_refiner`` → rows ``[cond | uncond]`` → ``on_cfg_denoiser``
(:211-217, after the refiner switch) → one UNet call when cond/uncond token lengths match and
``batch_cond_uncond`` (default), else separate calls → CFG combine → ``step += 1`` (:310).
"""

import torch

from modules import script_callbacks, shared


class ModelWrap:
    """k-diffusion's ``CompVisDenoiser`` reduced to what is observed: the model it was built on."""

    def __init__(self, inner_model):
        self.inner_model = inner_model

    def apply_model(self, *args):
        return self.inner_model.apply_model(*args)


class CFGDenoiser:
    def __init__(self, sampler):
        self.sampler = sampler
        self.model_wrap = None
        self.p = None
        self.step = 0
        self.steps = None
        self.total_steps = None

    @property
    def inner_model(self):
        # As upstream (sd_samplers_kdiffusion.py CFGDenoiserKDiffusion.inner_model): built once on the
        # model loaded then, and kept until update_inner_model (the refiner switch) drops it. A sampler
        # reused across batches (img2img builds it in p.init) keeps calling the model it was built on.
        if self.model_wrap is None:
            self.model_wrap = ModelWrap(shared.sd_model)
        return self.model_wrap

    def update_inner_model(self):
        self.model_wrap = None

    def __call__(self, x, sigma, uncond, cond, cond_scale):
        return self.forward(x, sigma, uncond, cond, cond_scale)

    def forward(self, x, sigma, uncond, cond, cond_scale):
        from modules import sd_samplers_common

        if shared.state.interrupted or shared.state.skipped:
            raise sd_samplers_common.InterruptedException

        if sd_samplers_common.apply_refiner(self, sigma):
            cond, uncond = self.p.refiner_cond, self.p.refiner_uncond

        batch_size = x.shape[0]
        x_in = torch.cat([x, x])
        sigma_in = torch.cat([sigma, sigma])

        denoiser_params = script_callbacks.CFGDenoiserParams(
            x_in, None, sigma_in, shared.state.sampling_step, shared.state.sampling_steps, cond, uncond, self
        )
        script_callbacks.cfg_denoiser_callback(denoiser_params)
        x_in, sigma_in = denoiser_params.x, denoiser_params.sigma
        cond, uncond = denoiser_params.text_cond, denoiser_params.text_uncond

        if cond.shape[1] == uncond.shape[1]:
            cond_in = torch.cat([cond, uncond])
            if shared.opts.batch_cond_uncond:
                x_out = self.inner_model.apply_model(x_in, sigma_in, cond_in)
            else:
                x_out = torch.cat(
                    [
                        self.inner_model.apply_model(
                            x_in[a : a + batch_size],
                            sigma_in[a : a + batch_size],
                            cond_in[a : a + batch_size],
                        )
                        for a in range(0, x_in.shape[0], batch_size)
                    ]
                )
        else:
            x_out = torch.cat(
                [
                    self.inner_model.apply_model(x_in[:-batch_size], sigma_in[:-batch_size], cond),
                    self.inner_model.apply_model(x_in[-batch_size:], sigma_in[-batch_size:], uncond),
                ]
            )

        cond_out, uncond_out = x_out[:-batch_size], x_out[-batch_size:]
        denoised = uncond_out + (cond_out - uncond_out) * cond_scale
        self.step += 1
        return denoised
