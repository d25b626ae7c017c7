"""Stand-in ``modules.processing`` (processing.py:261-1463 of v1.10.1), the order that matters here.

``process_images``: ``before_process`` → ``process_images_inner``: ``process`` hooks →
``p.init`` (unwrapped, :921) → per batch: back to the main model (:941), ``process_batch``,
``p.sample`` (``process_before_every_sampling`` before each pass, hires pass with ``before_hr``)
→ ``postprocess`` (:1147, skipped when anything above raised). ``p.sd_model`` is ``shared.sd_model``.
"""

import torch

from modules import infotext_utils, sd_models, shared
from modules.sd_samplers_common import Sampler


class StableDiffusionProcessing:
    def __init__(
        self,
        cond,
        uncond,
        noise,
        steps=4,
        n_iter=1,
        cfg_scale=5.0,
        scripts=None,
        script_args=(),
        is_api=False,
        refiner_checkpoint_info=None,
        refiner_switch_at=None,
        refiner_cond=None,
        refiner_uncond=None,
    ):
        self.cond = cond
        self.uncond = uncond
        self.noise = noise  # tensor, or list of tensors per batch iteration
        self.steps = steps
        self.n_iter = n_iter
        self.cfg_scale = cfg_scale
        self.scripts = scripts
        self.script_args = tuple(script_args)
        self.is_api = is_api
        self.extra_generation_params = {}
        self.override_settings = {}
        self.refiner_checkpoint_info = refiner_checkpoint_info
        self.refiner_switch_at = refiner_switch_at
        self.refiner_cond = refiner_cond
        self.refiner_uncond = refiner_uncond
        self.iteration = 0
        self.is_hr_pass = False
        self.enable_hr = False
        self.all_prompts = self.all_seeds = self.all_subseeds = []
        self.initialized = False

    @property
    def sd_model(self):
        return shared.sd_model

    def init(self, all_prompts, all_seeds, all_subseeds):
        self.initialized = True

    def setup_conds(self):
        pass

    def noise_for(self, iteration):
        return self.noise[iteration] if isinstance(self.noise, (list, tuple)) else self.noise

    def sample(self, conditioning, unconditional_conditioning):
        raise NotImplementedError()


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    def __init__(
        self,
        *args,
        enable_hr=False,
        hr_second_pass_steps=3,
        hr_checkpoint_info=None,
        hr_noise=None,
        denoising_strength=0.6,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.enable_hr = enable_hr
        self.hr_second_pass_steps = hr_second_pass_steps
        self.hr_checkpoint_info = hr_checkpoint_info
        self.hr_noise = hr_noise
        self.denoising_strength = denoising_strength

    def sample(self, conditioning, unconditional_conditioning):
        self.sampler = Sampler()
        x = self.noise_for(self.iteration)
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(
                self, x=x, noise=x, c=conditioning, uc=unconditional_conditioning
            )
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning)
        if not self.enable_hr:
            return samples
        if self.hr_checkpoint_info is not None:
            with sd_models.SkipWritingToConfig():
                sd_models.reload_model_weights(info=self.hr_checkpoint_info)
        return self.sample_hr_pass(samples, conditioning, unconditional_conditioning)

    def sample_hr_pass(self, samples, conditioning, unconditional_conditioning):
        if shared.state.interrupted:
            return samples
        self.is_hr_pass = True
        self.sampler = Sampler()
        noise = self.hr_noise if self.hr_noise is not None else torch.zeros_like(samples)
        if self.scripts is not None:
            self.scripts.before_hr(self)
            self.scripts.process_before_every_sampling(
                self, x=samples, noise=noise, c=conditioning, uc=unconditional_conditioning
            )
        samples = self.sampler.sample_img2img(
            self, samples, noise, conditioning, unconditional_conditioning, steps=self.hr_second_pass_steps
        )
        self.is_hr_pass = False
        return samples


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    def __init__(self, *args, init_latent=None, denoising_strength=0.75, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_latent = init_latent
        self.denoising_strength = denoising_strength

    def init(self, all_prompts, all_seeds, all_subseeds):
        super().init(all_prompts, all_seeds, all_subseeds)
        # As upstream (StableDiffusionProcessingImg2Img.init): one sampler for every batch.
        self.sampler = Sampler()

    def sample(self, conditioning, unconditional_conditioning):
        x = self.noise_for(self.iteration)
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(
                self, x=self.init_latent, noise=x, c=conditioning, uc=unconditional_conditioning
            )
        return self.sampler.sample_img2img(
            self, self.init_latent, x, conditioning, unconditional_conditioning
        )


class Processed:
    def __init__(self, p, images, infotexts):
        self.images = images
        self.infotexts = infotexts
        # As upstream (processing.py Processed.__init__): the same dict, not a copy. X/Y/Z cells are
        # shallow copies of one p, so every cell's Processed shows the dict as the last cell left it;
        # each cell's own values are in its infotexts.
        self.extra_generation_params = p.extra_generation_params


def create_infotext(p):
    generation_params = {"Steps": p.steps, "CFG scale": p.cfg_scale, **p.extra_generation_params}
    generation_params_text = ", ".join(
        [
            k if k == v else f"{k}: {infotext_utils.quote(v)}"
            for k, v in generation_params.items()
            if v is not None
        ]
    )
    return f"a prompt\nNegative prompt: a negative prompt\n{generation_params_text}".strip()


def process_images(p):
    if p.scripts is not None:
        p.scripts.before_process(p)
    try:
        return process_images_inner(p)
    finally:
        pass  # upstream restores overridden opts here; scripts get no finally


def process_images_inner(p):
    if p.scripts is not None:
        p.scripts.process(p)

    images, infotexts = [], []
    with torch.no_grad():
        p.init(p.all_prompts, p.all_seeds, p.all_subseeds)
        for n in range(p.n_iter):
            p.iteration = n
            if shared.state.interrupted:
                break
            sd_models.reload_model_weights()
            if p.scripts is not None:
                p.scripts.process_batch(p, batch_number=n)
            samples = p.sample(conditioning=p.cond, unconditional_conditioning=p.uncond)
            images.append(samples)
            infotexts.append(create_infotext(p))

    res = Processed(p, images, infotexts)
    if p.scripts is not None:
        p.scripts.postprocess(p, res)
    return res
