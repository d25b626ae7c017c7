"""The attn2 replacement installed on Forge / reForge UNets (``patches_replace["attn2"]``).

Forge's ``BasicTransformerBlock`` calls a replacement as ``fn(q, k, v, extra_options)`` with the
already projected ``q`` ``(B, N, heads·dim_head)`` and ``k``/``v`` ``(B, K, heads·dim_head)``, and
expects ``(B, N, heads·dim_head)`` back. Everything here is a plain closure over floats, strings and
other functions, because Forge deep-copies ``model_options`` on every ``clone()`` (closures are
copied by reference; bound methods and objects would be duplicated with their tensors).

Why the per-row key lengths: Forge batches cond and uncond chunks and, when their contexts differ in length,
repeats the shorter one up to the LCM (``ConditionCrossAttn.concat``). Softmax does not notice the
repeat; α-entmax does (m-fold repetition sharpens it like scaling the logits). Each chunk's keys are
therefore cut back to their un-repeated length before PLADIS is computed, so that a batched run
gives the same answer as running each prompt alone.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pladis.attention import pladis_attention_packed, pladis_weights
from pladis.eager import not_traced

MARK = "pladis_attn2"
"""Attribute set (to ``True``) on every replacement made here; lets a re-apply recognise its own."""

PRIOR = "pladis_prior"
"""Attribute holding the replacement that was in the slot before ours (or ``None``)."""

FORGE_HOST = "forge"
REFORGE_HOST = "reforge"

_HOST_ATTENTION: dict[str, tuple[tuple[str, str], ...]] = {
    FORGE_HOST: (("backend.nn.unet", "attention_function"), ("backend.attention", "attention_function")),
    REFORGE_HOST: (("ldm_patched.ldm.modules.attention", "optimized_attention"),),
}
"""The host's own attention as its stock ``CrossAttention.forward`` calls it: (module, attribute),
first found wins; looked up at call time, never copied.

Why ``backend.nn.unet`` first on Forge: that module imports ``attention_function`` *by name*, and
its ``CrossAttention.forward`` calls that copy, so an extension that rebinds it there (attention
back-end switchers walk ``sys.modules`` and rebind every copy) changes what stock attn2 runs; the
pass-through must run the same function to stay bit-identical. ``backend.attention`` is the fallback
for forks whose UNet module does not hold the name. reForge's ``CrossAttention`` calls the global of
its own module, ``ldm_patched.ldm.modules.attention``.
"""

CLIP_CHUNK = 77
"""Tokens per CLIP chunk: SD/SDXL contexts are multiples of it, and so is any period of a repeat."""

AttnReplacement = Callable[[Tensor, Tensor, Tensor, dict], Tensor]
Window = Callable[[], tuple[float, float]]
"""``(sigma_hi, sigma_lo)`` on the schedule the model denoises with, asked for at call time (see
:func:`pladis.hosts.forge.live_sigma_window`)."""


def host_attention(host: str, q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
    """Call the host's own attention exactly as its stock ``CrossAttention.forward`` does.

    Forge: ``attention_function(q, k, v, heads, mask)`` with the mask ``None`` passed positionally,
    as stock does (a function an extension rebinds there may not default it). reForge:
    ``optimized_attention(q, k, v, heads, attn_precision=...)``, the value its transformer block also
    puts in ``extra_options``;
    pre-August-2024 Forge has the same ``ldm_patched`` function without that parameter and without
    the key, so it is passed only when the host provided it. Using the host function (not a
    re-implementation) keeps the pass-through bit-identical to a stock run.
    """
    function = _host_function(host)
    heads = int(extra_options["n_heads"])
    if host == FORGE_HOST:
        return function(q, k, v, heads, None)
    if "attn_precision" in extra_options:
        return function(q, k, v, heads, attn_precision=extra_options["attn_precision"])
    return function(q, k, v, heads)


def _host_function(host: str) -> Callable[..., Tensor]:
    """The first of the host's attention entry points (``_HOST_ATTENTION``) that exists."""
    entries = _HOST_ATTENTION[host]
    for module_name, attr in entries[:-1]:
        try:
            function = getattr(importlib.import_module(module_name), attr, None)
        except ImportError:
            continue
        if callable(function):
            return function
    module_name, attr = entries[-1]
    return getattr(importlib.import_module(module_name), attr)


def first_sigma(sigmas: Any) -> float | None:
    """The current noise level from ``extra_options["sigmas"]`` (all rows share it), or ``None``."""
    if sigmas is None:
        return None
    if isinstance(sigmas, Tensor):
        if sigmas.numel() == 0:
            return None
        return float(sigmas.reshape(-1)[0])
    if isinstance(sigmas, (list, tuple)):
        return float(sigmas[0]) if sigmas else None
    return float(sigmas)


def in_window(sigma: float | None, sigma_hi: float, sigma_lo: float) -> bool:
    """Active iff ``sigma_lo < sigma <= sigma_hi``; an unknown sigma counts as active."""
    if sigma is None:
        return True
    return sigma_lo < sigma <= sigma_hi


def is_full_window(sigma_hi: float, sigma_lo: float) -> bool:
    """True when the window covers every sigma, so no per-call check (and no GPU sync) is needed."""
    return sigma_hi == math.inf and sigma_lo == -math.inf


REPEAT_TOLERANCE_EPS = 8.0
"""Keys count as repeated when each key vector matches its counterpart within this many ulps (of the
dtype) of the larger of the two vectors' largest entries.

Forge projects the repeated context with one GEMM, which normally gives bit-identical rows; the
tolerance only absorbs kernels that round rows differently. Different prompt chunks differ by O(1)
at their token positions, far above it. Per key vector, not per row: one large entry anywhere in a
row (CLIP's start token has some) made a row-wide tolerance of several units in bf16, under which two
different 77-token chunks counted as a repeat and PLADIS dropped the second.
"""


def _rows_shift_equal(t: Tensor, period: int) -> Tensor:
    """Per row (bool ``(B,)``): whether ``t[b, j] == t[b, j + period]`` for all ``j``, up to a few ulps.

    One batched comparison for all rows, so the caller syncs once per period, not once per row.
    """
    ahead, behind = t[:, period:], t[:, :-period]
    if not t.is_floating_point():
        return (ahead == behind).flatten(1).all(1)
    ahead, behind = ahead.float().flatten(2), behind.float().flatten(2)  # float32: fp16 could overflow
    diff = (ahead - behind).abs_().amax(2)  # (B, keys): per key vector
    scale = torch.maximum(ahead.abs().amax(2), behind.abs().amax(2))
    # NaN compares False: not a repeat
    return (diff <= scale.mul_(REPEAT_TOLERANCE_EPS * torch.finfo(t.dtype).eps)).all(1)


def repeat_periods(length: int) -> list[int]:
    """Candidate periods of a repeated context of ``length`` keys, shortest first.

    Forge repeats whole contexts (factor ``LCM/length``: up to 4 when it batches cond and uncond, any
    factor when Forge Couple tiles its regions), so a period divides the length. An SD/SDXL context
    is made of 77-token CLIP chunks, so when the length is a multiple of 77 only multiples of 77 are
    candidates: a 77-key context has none, and costs no check (nor a GPU sync).
    """
    unit = CLIP_CHUNK if length % CLIP_CHUNK == 0 else 1
    chunks = length // unit
    return [unit * d for d in range(1, chunks) if chunks % d == 0]


def untiled_lengths(k: Tensor, v: Tensor) -> list[int]:
    """Per row, the shortest length its keys/values are an exact repeat of (``K`` when not repeated).

    All candidate periods are compared on the device first, then read back at once (one GPU sync
    per call). A context that is genuinely made of identical chunks is indistinguishable from a
    repeated one and is treated as repeated: PLADIS of ``[c, c]`` is PLADIS of ``c``, as softmax is.
    """
    rows, length = k.shape[0], k.shape[1]
    periods = repeat_periods(length)
    if not periods or rows == 0:
        return [length] * rows
    flags = torch.stack([_rows_shift_equal(k, p) & _rows_shift_equal(v, p) for p in periods]).tolist()
    return [
        next((p for p, same in zip(periods, flags, strict=True) if same[row]), length) for row in range(rows)
    ]


def untiled_length(k: Tensor, v: Tensor) -> int:
    """The un-repeated length shared by all rows of ``k``/``v`` (``K`` unless every row has the same)."""
    lengths = set(untiled_lengths(k, v))
    return lengths.pop() if len(lengths) == 1 else k.shape[1]


def rows_by_untiled_length(k: Tensor, v: Tensor) -> dict[int, list[int]]:
    """Map each un-repeated key length to the batch rows that have it.

    Every row is checked on its own: rows are independent, a chunk's rows are not always contiguous
    (Forge's MultiDiffusion stacks tiles as ``[uncond, cond | uncond, cond]``), and a lone chunk can
    be repeated too (an ``attn2_patch`` before ours: Forge Couple tiles each region's context to the
    LCM of their lengths, also with CFG 1, where nothing is batched).
    """
    by_length: dict[int, list[int]] = {}
    for row, length in enumerate(untiled_lengths(k, v)):
        by_length.setdefault(length, []).append(row)
    return by_length


def per_untiled_length(k: Tensor, v: Tensor, compute: Callable[[Tensor | None, int], Tensor]) -> Tensor:
    """``compute(index, length)`` for each set of rows sharing an un-repeated length, in row order.

    ``index`` selects the rows (:func:`rows_of`); it is None when all rows share one length, so the
    common case gathers nothing.
    """
    by_length = rows_by_untiled_length(k, v)
    if len(by_length) <= 1:
        return compute(None, next(iter(by_length), k.shape[1]))
    out: Tensor | None = None
    for length, rows in by_length.items():
        index = torch.tensor(rows, device=k.device)
        part = compute(index, length)
        if out is None:
            out = part.new_empty((k.shape[0], *part.shape[1:]))
        out[index] = part
    assert out is not None
    return out


def rows_of(t: Tensor, index: Tensor | None) -> Tensor:
    """The rows of ``t`` selected by ``index`` (all of them for None)."""
    return t if index is None else t[index]


def _scores(q: Tensor, k: Tensor, heads: int) -> tuple[Tensor, int]:
    """float32 logits ``(B, H, N, K)`` of packed ``q``/``k`` and the head size."""
    b, n, inner = q.shape
    dim = inner // heads
    qh = q.reshape(b, n, heads, dim).transpose(1, 2).float()
    kh = k.reshape(k.shape[0], k.shape[1], heads, dim).transpose(1, 2).float()
    return (qh @ kh.transpose(-1, -2)) * (dim**-0.5), dim


def pladis_delta_packed(q: Tensor, k: Tensor, v: Tensor, heads: int, alpha: float, lam: float) -> Tensor:
    """float32 ``(W_pladis − softmax) @ V = λ·(entmax − softmax) @ V``, packed ``(B, N, heads·d)``.

    Used to add PLADIS on top of another replacement's output (e.g. IP-Adapter's text + image
    attention): the other replacement keeps its own dense text attention and we add the change.
    """
    scores, dim = _scores(q, k, heads)
    weights = pladis_weights(scores, alpha, lam) - torch.softmax(scores, dim=-1)
    vh = v.reshape(v.shape[0], v.shape[1], heads, dim).transpose(1, 2).float()
    out = weights @ vh
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], heads * dim)


@not_traced
def pladis_untiled(q: Tensor, k: Tensor, v: Tensor, heads: int, alpha: float, lam: float) -> Tensor:
    """PLADIS cross-attention with each row's keys cut back to their un-repeated length."""

    def compute(index: Tensor | None, length: int) -> Tensor:
        keys, values = rows_of(k, index)[:, :length], rows_of(v, index)[:, :length]
        return pladis_attention_packed(rows_of(q, index), keys, values, heads, alpha=alpha, lam=lam)

    return per_untiled_length(k, v, compute)


@not_traced
def delta_untiled(q: Tensor, k: Tensor, v: Tensor, heads: int, alpha: float, lam: float) -> Tensor:
    """:func:`pladis_delta_packed` with each row's keys cut back to their un-repeated length."""

    def compute(index: Tensor | None, length: int) -> Tensor:
        keys, values = rows_of(k, index)[:, :length], rows_of(v, index)[:, :length]
        return pladis_delta_packed(rows_of(q, index), keys, values, heads, alpha, lam)

    return per_untiled_length(k, v, compute)


def make_attn2_replacement(
    *,
    alpha: float,
    lam: float,
    sigma_hi: float = math.inf,
    sigma_lo: float = -math.inf,
    host: str = FORGE_HOST,
    prior: AttnReplacement | None = None,
    window: Window | None = None,
) -> AttnReplacement:
    """Build the attn2 replacement for one slot.

    Inside the sigma window it returns PLADIS attention (or ``prior``'s output plus the PLADIS change
    when chaining); outside it returns exactly what the slot would give without us: ``prior``'s output,
    or the host's own attention function. The window is ``(sigma_hi, sigma_lo)``, or what ``window()``
    answers at call time where given (the same schedule positions, read on the sampled schedule);
    whether there is a window at all is decided by the two numbers (±inf: none).
    """
    alpha, lam = float(alpha), float(lam)
    sigma_hi, sigma_lo = float(sigma_hi), float(sigma_lo)
    if host not in _HOST_ATTENTION:
        raise ValueError(f"PLADIS: unknown host {host!r}; expected one of {sorted(_HOST_ATTENTION)}")
    check_window = not is_full_window(sigma_hi, sigma_lo)

    def pladis_attn2(q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
        active = lam != 0.0 and (
            not check_window
            or in_window(
                first_sigma(extra_options.get("sigmas")), *(window() if window else (sigma_hi, sigma_lo))
            )
        )
        if not active:
            if prior is not None:
                return prior(q, k, v, extra_options)
            return host_attention(host, q, k, v, extra_options)
        heads = int(extra_options["n_heads"])
        if prior is None:
            return pladis_untiled(q, k, v, heads, alpha, lam)
        base = prior(q, k, v, extra_options)
        delta = delta_untiled(q, k, v, heads, alpha, lam)
        return (base.float() + delta).to(base.dtype)

    setattr(pladis_attn2, MARK, True)
    setattr(pladis_attn2, PRIOR, prior)
    # Forge's IP-Adapter adds a condition to the patch already in its slot by calling that patch's
    # set_new_condition (set_model_patch_replace in its lib_ipadapter/IPAdapterPlus.py), e.g. on hires
    # fix's first hook call, which runs on the first pass's patched model. Chained on top of its patch,
    # we hand that call down to it.
    if callable(getattr(prior, "set_new_condition", None)):
        pladis_attn2.set_new_condition = prior.set_new_condition  # type: ignore[attr-defined, union-attr]
    elif prior is None:
        pladis_attn2.set_new_condition = _ip_adapter_after_pladis  # type: ignore[attr-defined]
    # For logs/tests; plain values only. With a ``window``, sigma_hi/sigma_lo are its apply-time
    # fallback: the bounds in force are read during sampling (live_sigma_window).
    pladis_attn2.pladis_settings = {  # type: ignore[attr-defined]
        "alpha": alpha,
        "lam": lam,
        "sigma_hi": sigma_hi,
        "sigma_lo": sigma_lo,
        "host": host,
    }
    return pladis_attn2


IP_ADAPTER_ORDER_MESSAGE = (
    "PLADIS: IP-Adapter ran after PLADIS and found PLADIS's cross-attention replacement where it "
    "expected its own; run ControlNet (IP-Adapter) before PLADIS (the default order; on reForge check "
    "the callback order for process_before_every_sampling in Settings)"
)


def _ip_adapter_after_pladis(*args: Any, **kwargs: Any) -> None:
    """``set_new_condition`` of a replacement with nothing under it: IP-Adapter ran after PLADIS.

    Why: IP-Adapter adds its condition to the patch already in its slot by calling this method
    (``set_model_patch_replace``); on ours it failed with a bare AttributeError. Ours cannot hold an
    image prompt, so the order has to change: say so. SD 1.x is not covered: its IP-Adapter keys are 2-tuples,
    which our 3-tuple keys shadow without IP-Adapter ever finding ours (its effect is lost silently;
    README). Installing ours under 2-tuple keys there would let a later extension that chains on
    3-tuple keys shadow PLADIS instead, so the default order (ControlNet first) is the fix.
    """
    raise RuntimeError(IP_ADAPTER_ORDER_MESSAGE)


def is_ours(patch: Any) -> bool:
    """Whether ``patch`` is a replacement made by :func:`make_attn2_replacement`."""
    return getattr(patch, MARK, False) is True


def unwrap(patch: Any) -> Any:
    """The first non-PLADIS replacement under ``patch`` (``None`` when ours sat on an empty slot)."""
    while patch is not None and is_ours(patch):
        patch = getattr(patch, PRIOR, None)
    return patch
