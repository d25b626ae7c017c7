"""Builders and independent oracles for the Forge adapter tests (test code, not a host stand-in).

The oracles are written from the method's definition with ``torch.softmax`` and the reference
``entmax`` package (deep-spin), never with pladis code.
"""

from types import SimpleNamespace

import entmax as entmax_package
import torch
from backend.diffusion_engine.base import ForgeObjects
from backend.modules.k_model import KModel
from backend.modules.k_prediction import Prediction, PredictionFlux
from backend.nn.chroma import IntegratedChromaTransformer2DModel
from backend.nn.flux import IntegratedFluxTransformer2DModel, apply_rope
from backend.nn.unet import IntegratedUNet2DConditionModel
from backend.patcher.unet import UnetPatcher
from backend.sampling.sampling_function import calc_cond_uncond_batch

DIM, HEADS, DIM_HEAD, CONTEXT_DIM = 8, 2, 4, 6


# ----------------------------------------------------------------------------------- builders
def unet_patcher(seed=0):
    torch.manual_seed(seed)
    model = KModel(IntegratedUNet2DConditionModel(DIM, HEADS, DIM_HEAD, CONTEXT_DIM).eval(), Prediction())
    return UnetPatcher(model)


def reforge_patcher(seed=0):
    from ldm_patched.ldm.modules.attention import BaseModel, UNetModel

    torch.manual_seed(seed)
    return UnetPatcher(BaseModel(UNetModel(DIM, HEADS, DIM_HEAD, CONTEXT_DIM).eval()))


def flux_patcher(seed=0, chroma=False, neo=False):
    """Forge's Flux (or Chroma, or Forge Neo's Flux, whose attention takes ``mask`` and
    ``transformer_options``)."""
    from backend.nn.flux_neo import IntegratedFluxTransformer2DModel as NeoFlux

    torch.manual_seed(seed)
    cls = (
        NeoFlux if neo else IntegratedChromaTransformer2DModel if chroma else IntegratedFluxTransformer2DModel
    )
    return UnetPatcher(KModel(cls(in_channels=4, context_dim=CONTEXT_DIM).eval(), PredictionFlux()))


def inputs(seed=7):
    """``(x, cond, uncond)`` for the stand-in UNet: latents (2, 6, 8) and two text contexts (2, 4, 6)."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 6, 8, generator=g),
        torch.randn(2, 4, 6, generator=g),
        torch.randn(2, 4, 6, generator=g),
    )


def processing(patcher):
    """``p`` with Forge's forge_objects (+ the clean copy Forge re-assigns before each sampling pass)."""
    objects = ForgeObjects(patcher)
    original = ForgeObjects(patcher)
    return SimpleNamespace(
        sd_model=SimpleNamespace(forge_objects=objects, forge_objects_after_applying_lora=original)
    )


def first_pass(script, patcher, args, x, cond, uncond):
    """A generation on ``patcher`` in Forge's order up to its first sampling pass: ``process`` → reset
    → ``process_before_every_sampling``. Returns ``p``."""
    p = processing(patcher)
    p.extra_generation_params = {}
    script.process(p, *args)
    reset(p)
    script.process_before_every_sampling(p, *args, x=x, noise=x, c=cond, uc=uncond)
    return p


def reset(p):
    """What Forge's processing does before every ``process_before_every_sampling`` call."""
    p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()


_loaded = {}  # id(model) -> the patcher loaded on it (memory_management's current_loaded_models)


def load(patcher):
    """What sampling does first (``load_models_gpu``): nothing when this patcher is loaded already;
    else unload another clone of the same model (``unload_model_clones``: its object patches come
    off), move the patches to the device and dtype (``LoadedModel.model_load``: ``model_patches_to``
    twice), then set this patcher's object patches."""
    previous = _loaded.get(id(patcher.model))
    if previous is patcher:
        return
    if previous is not None:
        previous.forge_unpatch_model()
    patcher.model_patches_to(torch.device("cpu"))
    patcher.model_patches_to(torch.float32)
    patcher.forge_patch_model()
    _loaded[id(patcher.model)] = patcher


def denoise(patcher, x, sigma, cond, uncond=None, batch_together=True):
    """One model evaluation through Forge's cond/uncond batching, the patcher loaded first; returns
    (cond_pred, uncond_pred)."""
    load(patcher)
    with torch.no_grad():
        sigmas = torch.full((x.shape[0],), float(sigma))
        return calc_cond_uncond_batch(
            patcher.model,
            [cond],
            None if uncond is None else [uncond],
            x,
            sigmas,
            patcher.model_options,
            batch_together=batch_together,
        )


def attn2_table(patcher):
    return patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})


# ------------------------------------------------------------------------------------ oracles
def sparse(scores, alpha):
    """Reference α-entmax from the ``entmax`` package, in float64."""
    s = scores.double()
    if alpha == 1.5:
        return entmax_package.entmax15(s, dim=-1)
    if alpha == 2.0:
        return entmax_package.sparsemax(s, dim=-1)
    return entmax_package.entmax_bisect(s, alpha=alpha, dim=-1, n_iter=200)


def oracle_weights(scores, alpha, lam):
    """PLADIS weights ``(1 − λ)·softmax + λ·entmax_α`` in float64."""
    s = scores.double()
    return (1.0 - lam) * torch.softmax(s, dim=-1) + lam * sparse(s, alpha)


def split(t, heads):
    b, n, inner = t.shape
    return t.double().reshape(b, n, heads, inner // heads).transpose(1, 2)


def merge(t):
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def oracle_attn2(q, k, v, heads, alpha, lam):
    """PLADIS cross-attention on packed ``(B, N, H·D)`` tensors, float64."""
    qh, kh, vh = split(q, heads), split(k, heads), split(v, heads)
    scores = qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5
    return merge(oracle_weights(scores, alpha, lam) @ vh)


def oracle_dense(q, k, v, heads):
    qh, kh, vh = split(q, heads), split(k, heads), split(v, heads)
    return merge(torch.softmax(qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5, dim=-1) @ vh)


def oracle_site(alpha, lam, prior=None):
    """A test-side attn2 replacement computing PLADIS with the float64 oracle (on top of ``prior``)."""

    def fn(q, k, v, extra_options):
        heads = extra_options["n_heads"]
        if prior is None:
            return oracle_attn2(q, k, v, heads, alpha, lam).to(q.dtype)
        delta = oracle_attn2(q, k, v, heads, alpha, lam) - oracle_dense(q, k, v, heads)
        return (prior(q, k, v, extra_options).double() + delta).to(q.dtype)

    return fn


def with_oracle(patcher, sites, alpha, lam, priors=None):
    """A clone of ``patcher`` with :func:`oracle_site` on ``sites`` (chained on ``priors[site]``)."""
    patched = patcher.clone()
    for site in sites:
        prior = (priors or {}).get(site)
        patched.set_model_attn2_replace(oracle_site(alpha, lam, prior), *site)
    return patched


def sites_of(*groups):
    """The attn2 sites of the stand-in UNet's block groups, in order."""
    from backend.nn.unet import EXPECTED_SITES

    return [site for group in groups for site in EXPECTED_SITES[group]]


def oracle_joint_weights(q, k, pe, text_len, alpha, lam):
    """Full joint attention weights ``(B, H, L, L)`` with the official Flux PLADIS text block, float64.

    Image-query rows: text block ``m·((1−λ)softmax + λ·entmax)(S_text)`` with ``m`` the dense mass on
    the text keys; image block dense. Text-query rows: dense.
    """
    q, k = apply_rope(q, k, pe)
    s = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    dense = torch.softmax(s, dim=-1)
    weights = dense.clone()
    image_text = s[:, :, text_len:, :text_len]
    mass = dense[:, :, text_len:, :text_len].sum(-1, keepdim=True)
    weights[:, :, text_len:, :text_len] = mass * oracle_weights(image_text, alpha, lam)
    return weights
