"""Fast float32 exponentials, logarithms and powers on CPU (numpy or torch, whichever is faster here)."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ..env import env_flag
from ._common import _LOG2_E, _LOG_FLOOR, _SAMPLED_ROW_STEP, cpu_variant

NUMPY_LOG2_ENV = "PLADIS_NUMPY_LOG2"
"""Set to 1 or 0 to force numpy's ``log2`` on or off on CPU (default: whichever is faster, timed once)."""

_MAX_WHOLE_EXPONENT = 32


def softmax_centred_(centred: Tensor, scale: float = 1.0) -> Tensor:
    """``scale·softmax`` in place on rows whose maximum is 0; rows with no finite key give zeros.

    ``exp(0) = 1`` is in every row with a finite key, so its sum is ≥ 1; clamping the sum at 1 only
    changes fully masked rows (sum 0), which then get zeros instead of NaN.
    """
    dense = _exp_into(centred, centred)
    norm = dense.sum(-1, keepdim=True).clamp_min_(1.0).reciprocal_()
    return dense.mul_(norm.mul_(scale) if scale != 1.0 else norm)


def _exp_into(x: Tensor, out: Tensor) -> Tensor:
    """``exp(x)`` into ``out`` (may be ``x``).

    On CPU it is taken as ``2^(x·log₂e)`` where that is faster (:func:`exp2_is_faster`): on some
    CPUs ``torch.exp2`` was 2–3× faster than ``torch.exp`` (0.15 against 0.45–0.6 ms per 2^20
    floats), on others ``exp`` is twice as fast as the product and ``exp2`` (0.22 against 0.49 ms
    per 1.26·2^20 floats). The rounding of ``x·log₂e`` costs at most ``|x|·6e-8`` relative, below
    2e-6 for the keys that carry weight. On GPUs, where the torch path is bound by kernel launches,
    it stays one ``exp``.
    """
    if cpu_variant(x):
        slow = _mostly_slow_for_exp(x, _EXP_SLOW_BELOW)
        if slow or exp2_is_faster():
            return _exp2_flushed_(torch.mul(x, _LOG2_E, out=out), slow)
    return torch.exp(x, out=out)


def _mostly_slow_for_exp(x: Tensor, below: float) -> bool:
    """Whether more than ``_EXP_SLOW_SHARE`` of every 8th row of ``x`` is below ``below``
    (``_EXP_SLOW_BELOW`` for ``exp``'s input, times log₂e for ``exp2``'s).

    Why a sample: the check must cost little where nothing is that low (the common case: the
    sample's minimum, ~0.07 ms a chunk, 1 % of the α = 1.5 attention); a few low scores are cheaper
    through ``exp``'s slow path than three passes (see ``_EXP_SLOW_SHARE``).
    """
    sample = x[::_SAMPLED_ROW_STEP]
    if sample.numel() == 0 or not float(sample.amin()) < below:  # NaN: not slow
        return False
    # A float comparison is several times faster on CPU than a bool-valued one.
    low = torch.lt(sample, below, out=torch.empty(sample.shape, dtype=x.dtype, device=x.device))
    return float(low.sum()) > _EXP_SLOW_SHARE * sample.numel()


_EXP_SLOW_SHARE = 1 / 256
"""About where three passes cost what ``exp``'s slow path does (~50–100 ns per element in a chunk,
~0.3 ns on the fast path): σ = 20 scores, 4.6 % of them below −87, took 5.7 ms a chunk by ``exp``
against 1.0 flushed through ``exp2``; σ = 10 scores, a handful below, 0.49 against 0.98."""

_EXP_SLOW_BELOW = -87.0
"""Below this, torch's CPU ``exp`` takes a slow path (AVX-512 build, torch 2.13: ~17× per element for
every input ≤ −87.5, −∞ included), and ``exp2`` below the matching −125.5 for results under 2^-126
(but not for −∞).

Why it matters: centred scores reach it with large logits (an attention sink 100 above the other
keys) or masked keys: at score σ ≈ 20 the α = 1.5 attention took 53 ms instead of 22. A chunk where
many scores are below it (:func:`_mostly_slow_for_exp`) takes ``2^(x·log₂e)`` with 2^-126 and below
flushed to 0 (exactly 0 for −∞, as before; the others are under float32's normal range), three
passes instead of one."""


def _exp2_flushed_(y: Tensor, flush: bool) -> Tensor:
    """``2^y`` in place; with ``flush``, values at or below −126 are made −∞ first (``_EXP_SLOW_BELOW``).

    ``flush`` comes from :func:`_mostly_slow_for_exp`: a few such values cost less through ``exp2``'s
    slow path than a look at every value would.
    """
    if flush:
        torch.nn.functional.threshold_(y, -126.0, -math.inf)
    return y.exp2_()


EXP2_ENV = "PLADIS_EXP2"
"""Set to 1 or 0 to force ``2^(x·log₂e)`` or ``exp`` on CPU (default: whichever is faster, timed once)."""


@functools.cache
def exp2_is_faster() -> bool:
    """Whether ``2^(x·log₂e)`` (two passes) beats ``torch.exp`` (one) on this CPU.

    Timed once per process, best of 5 each, on 2^20 floats in [−8, 0] (centred scores, about a
    chunk's worth), written into a second buffer. Where the two are close the choice may differ
    from one process to the next, which moves results by float32 rounding only (see
    :func:`_exp_into`); ``PLADIS_EXP2`` = 1 or 0 pins it.
    """
    forced = env_flag(EXP2_ENV)
    if forced is not None:
        return forced
    values = torch.linspace(-8.0, 0.0, 1 << 20)
    out = torch.empty_like(values)

    def with_exp2() -> None:
        torch.mul(values, _LOG2_E, out=out).exp2_()

    return _best_time(with_exp2) < _best_time(lambda: torch.exp(values, out=out))


def _best_time(run: Callable[[], object], repeats: int = 5) -> float:
    """The best of ``repeats`` wall times of ``run()``, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def _power(t: Tensor, exponent: float, out: Tensor) -> Tensor:
    """``t^exponent`` (``t ≥ 0``, exponent ≥ 0) into ``out`` (not ``t``); whole exponents by multiplications.

    Why: ``torch.pow`` takes its general, ~10× slower path for any exponent but 2 and 3, and whole
    exponents are common here — α = 1.1, 1.2, 1.25 give β = 10, 5, 4. On CPU a fractional exponent
    is taken as ``2^(e·log₂ t)`` (:func:`_log2`, :func:`_exp2_scaled_`), 1.5–3× faster than
    ``torch.pow``, whose error is ``|ln t|``-fold float32 rounding (relative) at worst. ``log₂ 0``
    takes a slow path on CPU (7× slower), so zeros enter as ``2^-126`` (smallest normal float32,
    ``log₂`` exactly −126), and come out exactly 0. Other devices keep one ``torch.pow`` launch.
    """
    if not _is_whole(exponent):
        if exponent <= 0.0 or not cpu_variant(t):
            return torch.pow(t, exponent, out=out)
        return _exp2_scaled_(_log2(torch.clamp_min(t, _LOG_FLOOR, out=out), out), exponent)
    whole = round(exponent)
    if whole == 0:
        # 0^0 = 1 (as torch.pow); an exponent within 1e-9 above 0 (β − 1 for α within 1e-9 of 2)
        # keeps 0 at 0, as 0^e for e > 0: a fill with ones counted the keys off the support in the
        # slope (review helper-74: Newton crept, and α = 2 − 1e-10 came out 3.6e-4 off sparsemax).
        return out.fill_(1.0) if exponent == 0.0 else torch.gt(t, 0.0, out=out)
    if whole == 1:
        return out.copy_(t)
    bits = bin(whole)[3:]  # left-to-right binary powering: square, then times t on a 1 bit
    torch.mul(t, t, out=out)
    if bits[0] == "1":
        out.mul_(t)
    for bit in bits[1:]:
        out.square_()
        if bit == "1":
            out.mul_(t)
    return out


def _row_power(values: Tensor, exponent: float) -> Tensor:
    """``values^exponent`` (values ≥ 0) as a new tensor: for the small per-row tensors of the steps.

    Why: torch's CPU ``pow`` with a fractional exponent costs ~40 µs per 13616 rows (2^20 scores
    at K = 77), as much as multiplying those scores; ``log₂`` (:func:`_log2`: numpy's where faster)
    and torch's ``exp2`` take half of that. 0 gives 0 (∞ for e < 0), as ``pow`` does. Relative error
    about ``|e·log₂ v|·2^-24``: these feed steps, which the solvers check, and are near 1 at the root.
    """
    out = torch.empty_like(values)
    if values.dtype == torch.float32 and cpu_variant(values):
        with np.errstate(divide="ignore", invalid="ignore"):  # 0 → −∞, as intended
            return _log2(values, out).mul_(exponent).exp2_()
    return torch.pow(values, exponent, out=out)


_FAST_UNDERFLOW = 600.0
"""Floored keys' ``e·log₂ t`` is kept at about −this (:func:`_underflow_floor`): ``2^x`` underflows to
0 there, on torch's fast path.

Why: torch's CPU ``exp2`` (AVX-512 build, torch 2.13) took ~12× its usual time for inputs in
[−159, −126.5] (subnormal results) and again in [−671, −638.5], [−1183, −1150], … (every 512),
while −600 … −170 and −∞ were fast: with the floor at 2^-126, α = 1.19 (β = 5.26, −663) cost 1.6×
α = 1.16 (β = 6.25, −787.5). Any floor whose power underflows gives the same result."""


def _underflow_floor(exponent: float) -> float:
    """``2^-k`` with ``k·e ≈ _FAST_UNDERFLOW`` (k ≤ 126, a normal float32): its power e ≥ 2 is 0.

    ``k ≥ 30`` for the exponents taken here (e ≤ 20): keys at or below the floor weigh at most
    ``2^(−k·e)``, about ``2^-600`` (k = 126 below e ≈ 4.8: ``2^-252`` at e = 2), zero in float32
    whatever the floor.
    """
    return 2.0 ** -min(126, math.floor(_FAST_UNDERFLOW / exponent))


def _exp2_scaled_(logs: Tensor, exponent: float, floored: bool = True) -> Tensor:
    """``2^(e·logs)`` in place, for ``logs = log₂ t`` of ``t`` floored at ``2^-126`` and e > 0.

    Only floored zeros are at or below −125.5: they become −∞, so their power is exactly 0. For
    e ≥ 2 that pass is not needed (``floored=False``, with ``t`` floored at :func:`_underflow_floor`):
    the floor's power underflows to 0 by itself.
    """
    if floored:
        torch.nn.functional.threshold_(logs, -125.5, -math.inf)
    return logs.mul_(exponent).exp2_()


def _log2(t: Tensor, out: Tensor) -> Tensor:
    """``log₂ t`` into ``out`` (may be ``t``), by numpy where numpy is faster on this machine.

    Why: numpy's float32 ``log2`` is vectorised with SVML on AVX-512 CPUs, and was ~5× faster per
    thread than torch's on one (0.21 against 1.0 ms per 2^20 floats); on another of the same kind,
    with torch 2.13, torch's (both threads) is twice as fast. Elsewhere numpy's may be scalar.
    :func:`numpy_log2_is_faster` decides once per process, by timing both.

    numpy works in place in ``out``, into which torch first copies ``t`` (both threads, each its
    own half, as in every other pass). Why: numpy runs on the calling thread only; when it merely
    *read* the half of ``t`` that torch's other thread had written, that thread's next write to
    it became up to 10× slower in some time windows of the benchmark VM (the two vCPUs then
    apparently far apart in the host: cache lines shared between them must be invalidated one by
    one), and α = 1.3 ran 2.1–2.3× α = 1.5 instead of ~1.3×. Reading and writing the same lines
    moves them whole; the copy costs ~0.04 ms per 2^20 floats.
    """
    if (
        t.device.type == "cpu"
        and t.dtype == torch.float32
        and _numpy_viewable(t, out)
        and numpy_log2_is_faster()
    ):
        if out.data_ptr() != t.data_ptr():
            out.copy_(t)
        np.log2(out.numpy(), out=out.numpy())
        return out
    return torch.log2(t, out=out)


def _numpy_viewable(t: Tensor, out: Tensor) -> bool:
    """Whether both tensors can be handed to numpy as plain arrays (no copy, no autograd)."""
    return t.is_contiguous() and out.is_contiguous() and not (t.requires_grad or out.requires_grad)


@functools.cache
def numpy_log2_is_faster() -> bool:
    """Whether numpy's float32 ``log2`` beats torch's (at torch's thread count) on this machine.

    Timed once per process as :func:`_log2` runs it, on a block of 2^20 floats (about a chunk's size),
    best of 5 each: numpy with the copy it needs against torch. Why this size: on 2^16 floats the
    two tied on an AVX-512 VM where, at a chunk's size, torch (both threads) took 0.2 ms and numpy
    0.45 ms with its copy, so the choice was a coin toss that made α ≠ 1.5 up to 25 % slower.
    ``PLADIS_NUMPY_LOG2`` = 1 or 0 forces it. Both are accurate to about one float32 ulp, so the
    choice changes speed, not results (beyond rounding). The timing inputs are not random: the
    global RNG (the user's seed) stays untouched.
    """
    forced = env_flag(NUMPY_LOG2_ENV)
    if forced is not None:
        return forced
    values = torch.linspace(1e-3, 1.0, 1 << 20)
    out = torch.empty_like(values)
    out_numpy = out.numpy()

    def with_numpy() -> None:
        out.copy_(values)
        np.log2(out_numpy, out=out_numpy)

    return _best_time(with_numpy) < _best_time(lambda: torch.log2(values, out=out))


def _is_whole(exponent: float) -> bool:
    """Whether ``exponent`` is a whole number that :func:`_power` raises to by multiplications."""
    return abs(exponent - round(exponent)) <= 1e-9 and 0 <= round(exponent) <= _MAX_WHOLE_EXPONENT
