"""Forge / reForge adapter: install PLADIS on a clone of ``p.sd_model.forge_objects.unet``.

Called from the shared script's ``process_before_every_sampling`` (and from ``on_cfg_denoiser`` when
the SDXL refiner switch brings in another model). Forge's convention is followed instead of patching
modules: clone the UNet patcher (the clone deep-copies ``model_options``), add attn2 replacements to
the clone, and put the clone back. Forge re-assigns ``forge_objects`` from its clean copy before
every sampling pass, so nothing needs restoring and an exception cannot leak a patch into later
generations; a refiner switched in mid-sampling is the exception, put back by the controller
(``pladis.webui.controller._remember_switched``). The original patcher is never modified.

* SD1.x / SD2.x / SDXL UNets: one replacement per attn2 site of the selected layer groups
  (down = ``input``, mid = ``middle``, up = ``output``), keyed ``(block, number, transformer_index)``
  like the host's own lookup (3-tuple first, then 2-tuple), chained with whatever was found there;
  none on a UNet compiled with Forge Neo's ``guard_filter_fn`` preset (see :mod:`.forge_compile`).
* Flux / Chroma (Forge ``backend.nn``): a chained UNet function wrapper, see :mod:`pladis.hosts.flux`.

No WebUI module is imported here at import time; host modules are looked up lazily.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pladis.params import PladisParams

from . import flux, forge_compile
from .forge_attn2 import (
    FORGE_HOST,
    REFORGE_HOST,
    Window,
    is_ours,
    make_attn2_replacement,
    unwrap,
)

log = logging.getLogger("pladis")

GROUP_TO_BLOCK: dict[str, str] = {"down": "input", "mid": "middle", "up": "output"}
"""PLADIS layer groups → Forge/ComfyUI UNet block names used in patch keys."""

# input_blocks.4.1.transformer_blocks.0 / middle_block.1.transformer_blocks.3 / output_blocks.2.1.…
_SITE_NAME = re.compile(
    r"^(?:(?P<io>input|output)_blocks\.(?P<number>\d+)|middle_block)\.\d+\.transformer_blocks\.(?P<index>\d+)$"
)

Site = tuple[str, int, int]


def apply(p: Any, params: PladisParams) -> None:
    """Install PLADIS on a clone of ``p.sd_model.forge_objects.unet`` and put the clone back.

    Does nothing when ``params.changes_attention`` is False, nor on a UNet when no layer group is
    chosen (Flux has no layer choice: every block is used). Safe to call several times per generation
    (hires fix calls the hook two or three times): a clone that already carries our patches is
    re-patched in place of them, never wrapped twice.
    """
    if not params.changes_attention:
        return
    forge_objects = p.sd_model.forge_objects
    unet = forge_objects.unet.clone()
    diffusion_model = unet.model.diffusion_model

    def warn(message: str) -> None:
        _warn_once(p, message)

    try:
        sigma_hi, sigma_lo = sigma_window(unet, params)
    except RuntimeError as error:
        warn(f"{error}; skipped")
        return
    window = live_sigma_window(unet.model, params, fallback=(sigma_hi, sigma_lo))
    sites = list(attn2_sites(diffusion_model))
    if sites and forge_compile.guard_filtered(unet.model):
        warn(forge_compile.SKIPPED)
        return
    if sites:
        chosen = [site for site in sites if _group_of(site[0]) in params.layers]
        if not chosen:
            warn("PLADIS is enabled but changes nothing: no layer group is ticked")
            return
        install_attn2(unet, chosen, params, sigma_hi, sigma_lo, host_of(diffusion_model), window)
        if _hypernetworks_bypassed(diffusion_model):
            warn(HYPERNETWORK_WARNING)
    elif flux.is_joint_model(diffusion_model):
        if not flux.install(unet, params, sigma_hi, sigma_lo, warn=warn, window=window):
            return
    else:
        warn(f"PLADIS: no cross-attention found in {type(diffusion_model).__name__}; skipped")
        return
    forge_objects.unet = unet


HYPERNETWORK_WARNING = (
    "PLADIS: a hypernetwork is loaded, and this WebUI applies it inside CrossAttention.forward, which "
    "Forge's attn2 replacement bypasses: the layers PLADIS patches run without it (also outside the "
    "start/end window)"
)


def _hypernetworks_bypassed(diffusion_model: Any) -> bool:
    """Whether a loaded hypernetwork would be skipped on the layers PLADIS patches.

    Why: some reForge ``backend/`` builds apply ``shared.loaded_hypernetworks`` to the text inside
    ``CrossAttention.forward``; an attn2 replacement is called with the block's own projections
    instead, so those layers lose the hypernetwork. Stock Forge has no such step (nothing to say).
    """
    shared = sys.modules.get("modules.shared")
    if not getattr(shared, "loaded_hypernetworks", None):
        return False
    for _name, block in _attn2_blocks(diffusion_model):
        code = getattr(type(block.attn2).forward, "__code__", None)
        return code is not None and "loaded_hypernetworks" in code.co_names
    return False


WARNED_ATTR = "_pladis_forge_warned"
"""Attribute of a processing object: the warnings :func:`apply` already gave for it."""


def _warn_once(p: Any, message: str) -> None:
    """Log ``message`` once per processing object.

    Why: :func:`apply` runs for every sampling pass (each batch of ``n_iter``, hires fix), so a
    model PLADIS cannot change said so again and again in one generation.
    """
    said = getattr(p, WARNED_ATTR, None)
    if not isinstance(said, set):
        said = set()
        with contextlib.suppress(AttributeError, TypeError):
            setattr(p, WARNED_ATTR, said)
    if message not in said:
        said.add(message)
        log.warning(message)


def host_of(diffusion_model: Any) -> str:
    """``"reforge"`` for ldm_patched (ComfyUI-derived) UNets, else ``"forge"`` (``backend.nn``)."""
    for module in diffusion_model.modules():
        if type(module).__name__ == "BasicTransformerBlock":
            return REFORGE_HOST if type(module).__module__.startswith("ldm_patched") else FORGE_HOST
    return FORGE_HOST


def _attn2_blocks(diffusion_model: Any) -> Iterator[tuple[str, Any]]:
    """(name, module) of every ``BasicTransformerBlock`` with an attn2, a compiled model read through
    the module it wraps (see :func:`attn2_sites`)."""
    original = getattr(diffusion_model, "_orig_mod", None)
    if isinstance(original, torch.nn.Module):
        diffusion_model = original
    for name, module in diffusion_model.named_modules():
        if type(module).__name__ == "BasicTransformerBlock" and getattr(module, "attn2", None) is not None:
            yield name, module


def attn2_sites(diffusion_model: Any) -> Iterator[Site]:
    """Patch keys ``(block, number, transformer_index)`` of every ``BasicTransformerBlock`` with attn2.

    A ``torch.compile``d model (reForge's ``--torch-compile`` sets ``diffusion_model`` to the
    ``OptimizedModule``) is read through the module it wraps: its names carry an ``_orig_mod.``
    prefix the patch keys do not have, and PLADIS found no site and did nothing there.
    """
    for name, _block in _attn2_blocks(diffusion_model):
        match = _SITE_NAME.match(name)
        if match is None:
            continue
        block = match.group("io") or "middle"
        number = int(match.group("number") or 0)
        yield block, number, int(match.group("index"))


def _group_of(block: str) -> str:
    return {block_name: group for group, block_name in GROUP_TO_BLOCK.items()}[block]


def install_attn2(
    unet: Any,
    sites: list[Site],
    params: PladisParams,
    sigma_hi: float,
    sigma_lo: float,
    host: str,
    window: Window | None = None,
) -> None:
    """Set our replacement on every site, chained with the replacement already found there."""
    for block, number, index in sites:
        prior = existing_attn2(unet, (block, number, index))
        patch = make_attn2_replacement(
            alpha=params.alpha,
            lam=params.lam,
            sigma_hi=sigma_hi,
            sigma_lo=sigma_lo,
            host=host,
            prior=prior,
            window=window,
        )
        unet.set_model_attn2_replace(patch, block, number, index)


def existing_attn2(unet: Any, site: Site) -> Any:
    """The replacement the host would call for ``site`` without us (3-tuple key first, then 2-tuple).

    Our own replacements (from an earlier call on the same patcher) are unwrapped, so re-applying
    never stacks PLADIS twice.
    """
    table = unet.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    found = unwrap(table.get(site))
    if found is None:
        found = unwrap(table.get(site[:2]))
    return found


def sigma_window(unet: Any, params: PladisParams) -> tuple[float, float]:
    """``(sigma_hi, sigma_lo)``: PLADIS acts iff ``sigma_lo < sigma <= sigma_hi``.

    Uses the host's own schedule (Forge ``model.predictor``, reForge ``model.model_sampling``).
    ``start == 0`` has no upper bound and ``end == 1`` reaches down to sigma 0 inclusive.
    """
    if params.start <= 0.0 and params.end >= 1.0:
        return math.inf, -math.inf
    return _window_on(percent_to_sigma_function(unet), params)


def _window_on(to_sigma: Callable[[float], float], params: PladisParams) -> tuple[float, float]:
    sigma_hi = math.inf if params.start <= 0.0 else float(to_sigma(params.start))
    sigma_lo = -math.inf if params.end >= 1.0 else float(to_sigma(params.end))
    return sigma_hi, sigma_lo


def live_sigma_window(model: Any, params: PladisParams, fallback: tuple[float, float]) -> Window:
    """The window on the schedule the loaded ``model`` denoises with, read when it is asked for.

    Why: object patches (a schedule swapped in by reForge's Advanced Model Sampling or a
    ComfyUI-style node) are set on the shared model only when a patcher is loaded for sampling
    (``forge_patch_model``), and taken off when another clone is loaded. At apply time the clone's
    own patches are known (:func:`sigma_window`), but not one that an extension adds to a clone of
    it after PLADIS, and the model may still carry an earlier generation's patch that loading will
    undo. During sampling the model carries exactly the schedule it denoises with. The window is
    kept for as long as the model's schedule object stays the same (one attribute read per call). A
    closure over the model (a reference: Forge's deep copies of ``model_options`` keep functions as
    they are). ``fallback`` (the apply-time window) answers if the model has no schedule then, or if
    reading the window on it fails: this runs mid-sampling, where an error would end the generation.

    Upstream caveat: Forge's sampler takes the range of the σ it steps through from the schedule on
    the model when the sampler is created, before this generation's clone loads (reForge from its denoiser
    wrapper of the checkpoint). So after a schedule swap the σ stepped may follow another schedule
    than the one the model denoises with; the window follows the latter, as the model's own
    ``timestep(sigma)`` does.
    """
    kept: list[Any] = [None, fallback]  # the schedule object the window was read on, the window

    def window() -> tuple[float, float]:
        owner = _schedule_of(model)
        if owner is None:
            return fallback
        if owner is not kept[0]:
            try:
                bounds = _window_on(owner.percent_to_sigma, params)
            except Exception as error:  # any failure of a foreign schedule: keep sampling
                log.warning(
                    "PLADIS: cannot read the start/end window on %s (%r); using the one read at apply time",
                    type(owner).__name__,
                    error,
                )
                bounds = fallback
            kept[:] = [owner, bounds]
        return kept[1]

    return window


def percent_to_sigma_function(unet: Any) -> Callable[[float], float]:
    """The host's ``percent_to_sigma`` for this UNet, or ``RuntimeError`` when there is none.

    Asked of the patcher first (``get_model_object``): an extension that swaps the schedule (reForge's
    built-in Advanced Model Sampling, ComfyUI-style ``ModelSamplingDiscrete``/EDM nodes) records it as
    an object patch of the clone, which reaches ``unet.model`` only when the patcher is loaded for
    sampling, after this runs; read from the model, the window was on the previous schedule. This is
    the apply-time read (it checks there is a schedule at all); during sampling
    :func:`live_sigma_window` reads the loaded model.
    """
    getter = getattr(unet, "get_model_object", None)
    owners = []
    for name in _SCHEDULE_NAMES:
        if callable(getter):
            with contextlib.suppress(AttributeError, KeyError):  # upstream's get_attr: AttributeError
                owners.append(getter(name))
        owners.append(getattr(unet.model, name, None))
    return _first_percent_to_sigma(owners)


_SCHEDULE_NAMES = ("predictor", "model_sampling")  # Forge's name, then reForge's (ldm_patched)


def _schedule_of(model: Any) -> Any:
    """The schedule set on the model itself (object patches included once loaded), or None."""
    for name in _SCHEDULE_NAMES:
        owner = getattr(model, name, None)
        if callable(getattr(owner, "percent_to_sigma", None)):
            return owner
    return None


def _first_percent_to_sigma(owners: list[Any]) -> Callable[[float], float]:
    for owner in owners:
        function = getattr(owner, "percent_to_sigma", None)
        if callable(function):
            return function
    raise RuntimeError(
        "PLADIS: this model has no percent_to_sigma (model.predictor / model.model_sampling); "
        "cannot apply a start/end window"
    )


def installed_sites(unet: Any) -> dict[tuple, Any]:
    """Our replacements on ``unet`` by key (diagnostics and tests)."""
    table = unet.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    return {key: patch for key, patch in table.items() if is_ours(patch)}
