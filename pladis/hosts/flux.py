"""PLADIS for Flux / Chroma on Forge (joint text+image attention, no attn2 to replace).

Forge's Flux blocks concatenate ``[text; image]`` tokens and call the module-level function
``attention(q, k, v, pe)`` of ``backend.nn.flux`` (Chroma: ``backend.nn.chroma``, imported by name;
Forge Neo adds ``mask`` and ``transformer_options``).
The model has no patch points, so PLADIS goes in through a chained UNet function wrapper
(``model_options["model_function_wrapper"]``) that swaps that module-level function for the length
of one model call and always puts it back (``try/finally``).

The blend follows the official Flux formulation: only the image-query × text-key block of each
joint attention map changes, to ``m · ((1−λ)·softmax + λ·entmax)`` of the text logits, where ``m``
is the mass the dense softmax gives the text keys. Every row still sums to 1, text-query rows and
image keys keep their dense weights, and λ = 0 returns the host's output untouched. In code: the
host's dense output plus ``m · λ · (entmax − softmax) @ V_text`` on the image rows, in float32.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pladis.attention import pladis_weights
from pladis.eager import not_traced
from pladis.params import PladisParams

from .forge_attn2 import Window, first_sigma, in_window, is_full_window, per_untiled_length, rows_of

log = logging.getLogger("pladis")

MARK = "pladis_flux_wrapper"
PRIOR = "pladis_prior"
ROPE_MODULE = "backend.nn.flux"
"""Where Forge's ``apply_rope`` lives (Chroma imports Flux's)."""

CHUNK_ELEMENTS = 1 << 25
"""float32 logits per chunk of image queries (128 MiB) when computing the text-block correction."""

UnetWrapper = Callable[[Callable, dict], Tensor]


def is_joint_model(diffusion_model: Any) -> bool:
    """Flux-like: double- and single-stream blocks over a joint ``[text; image]`` sequence."""
    return hasattr(diffusion_model, "double_blocks") and hasattr(diffusion_model, "single_blocks")


def attention_modules(diffusion_model: Any) -> tuple[str, ...]:
    """Names of the modules whose global ``attention`` the model's blocks call (Forge only)."""
    names: list[str] = []
    for blocks in (diffusion_model.double_blocks, diffusion_model.single_blocks):
        for block in list(blocks)[:1]:
            name = type(block).__module__
            if name not in names:
                names.append(name)
    return tuple(names)


def install(
    unet: Any,
    params: PladisParams,
    sigma_hi: float,
    sigma_lo: float,
    warn: Callable[[str], None] = log.warning,
    window: Window | None = None,
) -> bool:
    """Chain our wrapper in front of any UNet function wrapper; False, said by ``warn``, if unsupported."""
    modules = attention_modules(unet.model.diffusion_model)
    if not modules or not all(name.startswith("backend.") for name in modules):
        warn(f"PLADIS: joint-attention model outside Forge's backend ({', '.join(modules)}); skipped")
        return False
    for name in modules:
        if not callable(getattr(importlib.import_module(name), "attention", None)):
            warn(f"PLADIS: {name} has no attention function; skipped")
            return False
    # Looked up by the replacement when the wrapper first runs: missing, every step would raise.
    if not callable(getattr(importlib.import_module(ROPE_MODULE), "apply_rope", None)):
        warn(f"PLADIS: {ROPE_MODULE} has no apply_rope function; skipped")
        return False
    if any(getattr(block, "flipped_img_txt", False) for block in unet.model.diffusion_model.double_blocks):
        # Image tokens first: the text block PLADIS changes is not at the start of the sequence.
        warn("PLADIS: joint-attention model with image tokens before text tokens; skipped")
        return False
    prior = unwrap(unet.model_options.get("model_function_wrapper"))
    wrapper = make_wrapper(
        alpha=params.alpha,
        lam=params.lam,
        sigma_hi=sigma_hi,
        sigma_lo=sigma_lo,
        modules=modules,
        prior=prior,
        window=window,
    )
    unet.set_model_unet_function_wrapper(wrapper)
    return True


def is_ours(wrapper: Any) -> bool:
    return getattr(wrapper, MARK, False) is True


def unwrap(wrapper: Any) -> Any:
    """The first non-PLADIS wrapper under ``wrapper`` (so a re-apply never nests ours twice)."""
    while wrapper is not None and is_ours(wrapper):
        wrapper = getattr(wrapper, PRIOR, None)
    return wrapper


def make_wrapper(
    *,
    alpha: float,
    lam: float,
    sigma_hi: float,
    sigma_lo: float,
    modules: tuple[str, ...],
    prior: UnetWrapper | None = None,
    window: Window | None = None,
) -> UnetWrapper:
    """UNet function wrapper: inside the sigma window, run the model with PLADIS joint attention.

    The window is ``(sigma_hi, sigma_lo)``, or ``window()`` at call time where given (as for
    :func:`pladis.hosts.forge_attn2.make_attn2_replacement`)."""
    alpha, lam = float(alpha), float(lam)
    sigma_hi, sigma_lo = float(sigma_hi), float(sigma_lo)
    modules = tuple(str(name) for name in modules)
    check_window = not is_full_window(sigma_hi, sigma_lo)

    def pladis_flux_wrapper(apply_model: Callable, args: dict) -> Tensor:
        def run() -> Tensor:
            if prior is not None:
                return prior(apply_model, args)
            return apply_model(args["input"], args["timestep"], **args["c"])

        if lam == 0.0:
            return run()
        if check_window and not in_window(
            first_sigma(args.get("timestep")), *(window() if window else (sigma_hi, sigma_lo))
        ):
            return run()
        context = args.get("c", {}).get("c_crossattn")
        if context is None:
            return run()
        text_len = int(context.shape[1])
        targets = [importlib.import_module(name) for name in modules]
        originals = [target.attention for target in targets]
        try:
            for target, original in zip(targets, originals, strict=True):
                target.attention = make_joint_attention(original, text_len, alpha, lam)
            return run()
        finally:
            for target, original in zip(targets, originals, strict=True):
                target.attention = original

    setattr(pladis_flux_wrapper, MARK, True)
    setattr(pladis_flux_wrapper, PRIOR, prior)
    return pladis_flux_wrapper


def make_joint_attention(original: Callable, text_len: int, alpha: float, lam: float) -> Callable:
    """Replacement for the host's ``attention(q, k, v, pe, ...)`` with the text-block PLADIS blend.

    The host's function is called exactly as the block called ours, whatever its signature: Forge's
    is ``attention(q, k, v, pe)``; Forge Neo's is ``attention(q, k, v, pe, mask=None,
    transformer_options={})``, called with ``pe=``, ``mask=`` and ``transformer_options=`` (a fixed
    ``(q, k, v, pe)`` signature made every Neo step inside the window a ``TypeError``). Neo skips RoPE
    for ``pe=None``, and so does the correction. A call with an attention mask is left as the host
    computed it (said once per process): the correction's softmax and text mass would ignore the mask.
    """

    # Looked up here, once: an import inside the attention was one more graph break per call in a
    # compiled model (review helper-86: 36 against 32 breaks per step).
    rope = importlib.import_module(ROPE_MODULE).apply_rope

    def attention(q: Tensor, k: Tensor, v: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        out = original(q, k, v, *args, **kwargs)
        if lam == 0.0 or not 0 < text_len < q.shape[2]:
            return out
        pe = kwargs["pe"] if "pe" in kwargs else (args[0] if args else None)
        mask = kwargs["mask"] if "mask" in kwargs else (args[1] if len(args) > 1 else None)
        if mask is not None:
            _warn_once(MASKED_WARNING)
            return out
        if pe is None:
            q_rot, k_rot = q, k
        else:
            q_rot, k_rot = rope(q, k, pe)
        correction = text_block_correction(q_rot, k_rot, v, text_len, alpha, lam)
        image = (out[:, text_len:].float() + correction).to(out.dtype)
        return torch.cat((out[:, :text_len], image), dim=1)

    return attention


MASKED_WARNING = (
    "PLADIS: this model's joint attention runs with an attention mask (e.g. padded text on Forge "
    "Neo); those calls are left unchanged"
)
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """Log ``message`` the first time only: it would otherwise repeat for every block of every step."""
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


@not_traced
def text_block_correction(q: Tensor, k: Tensor, v: Tensor, text_len: int, alpha: float, lam: float) -> Tensor:
    """``m · (W_pladis − softmax)(S_text) @ V_text`` for the image queries, float32 ``(B, N_img, H·D)``.

    ``q``/``k``/``v`` are ``(B, H, L, D)`` with RoPE already applied to ``q`` and ``k``; tokens
    ``[0, text_len)`` are text. ``m = Σ_text softmax(S)`` over all keys, computed per chunk of image
    queries so the ``N_img × L`` logits never exist at once.

    A row whose text is a repeat of a shorter text (Forge batches a Chroma prompt with a negative of
    another length by repeating the shorter one, as for SD; Flux.1 and Chroma text tokens carry no
    RoPE position, so the copies stay identical through the blocks) gets its change from the
    un-repeated text keys, with ``m`` from all keys as the host computed it: α-entmax, unlike
    softmax, is changed by the repeat (the keys look sharper), and the prompt alone would not have
    it. Flux.2 on Forge Neo gives text tokens positions: the copies then differ, no repeat is found,
    and the change comes from all the text keys (its strength can depend on the batch).
    """
    b, h, length, dim = q.shape

    def compute(index: Tensor | None, period: int) -> Tensor:
        q_rows, k_rows, v_rows = (rows_of(t, index) for t in (q, k, v))
        return _text_change(q_rows, k_rows, v_rows, text_len, period, alpha, lam)

    correction = per_untiled_length(_packed(k[:, :, :text_len]), _packed(v[:, :, :text_len]), compute)
    return correction.transpose(1, 2).reshape(b, length - text_len, h * dim)


def _packed(t: Tensor) -> Tensor:
    """``(B, H, L, D)`` as ``(B, L, H·D)``: the layout :func:`untiled_lengths` compares."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], t.shape[1] * t.shape[3])


def _text_change(
    q: Tensor, k: Tensor, v: Tensor, text_len: int, period: int, alpha: float, lam: float
) -> Tensor:
    """``m · (W_pladis − softmax)`` over the first ``period`` text keys, ``@ V``: ``(B, H, N_img, D)``."""
    b, h, length, dim = q.shape
    scale = dim**-0.5
    keys = k.float()
    text_values = v[:, :, :period].float()
    queries = q[:, :, text_len:]
    step = max(1, CHUNK_ELEMENTS // max(1, b * h * length))
    parts = []
    for start in range(0, queries.shape[2], step):
        logits = (queries[:, :, start : start + step].float() @ keys.transpose(-1, -2)) * scale
        mass = torch.exp(
            torch.logsumexp(logits[..., :text_len], -1, keepdim=True)
            - torch.logsumexp(logits, -1, keepdim=True)
        )
        text_logits = logits[..., :period]
        change = pladis_weights(text_logits, alpha, lam) - torch.softmax(text_logits, dim=-1)
        parts.append((mass * change) @ text_values)
    return torch.cat(parts, dim=2)
