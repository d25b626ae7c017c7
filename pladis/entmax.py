"""Exact α-entmax for α ∈ [1, 2], sort-free, computed in float32.

α-entmax maps scores ``s`` to ``p_i = [(α−1)(s_i − max s) − τ]₊^β`` with ``β = 1/(α−1)`` and the
threshold ``τ`` chosen so that ``Σ p = 1`` (α → 1 is softmax, α = 2 is sparsemax, α = 1.5 entmax15).

Why not sort: the textbook solvers (and the reference ``entmax`` package) sort every row, which
dominates the cost of a cross-attention layer, and their float32 cumulative sums lose precision in
``mean_sq − mean²``. Here τ is found by Newton's method on ``h(τ) = ‖(X − τ)₊‖_β − 1``:

* ``h`` is convex and decreasing, so Newton started below the root climbs monotonically and never
  overshoots; and ``h`` is close to linear (exactly linear for one dominant key or for all-equal
  keys), so three steps from a good lower bound land on the final support.
* Then an exact step on the support of the last iterate: for α = 2 ``τ = (Σ_S x − 1)/|S|``; for
  α = 1.5 the smaller root of the support quadratic, written without cancellation, with ``|S|``
  counted (GPU) or read off the slope of ``Σt`` between the last two iterates (CPU: no count pass;
  :func:`_entmax15_solve`). Both are the closed-form thresholds of the sort-based algorithms,
  evaluated on that support. Other α have no closed form; their Newton iterate is renormalised.
* Rows whose weights do not sum to 1 within ``ROW_SUM_TOL`` (support not settled yet, or a slope
  that was not the support's size) are gathered and finished by more steps in float64
  (:func:`_settle_rows`); the rows that did settle pay nothing for them.
* A fractional power is ``2^(e·log₂ t)`` (:func:`_power`), still ~10× a multiplication: ``log₂`` comes
  from numpy where its vectorised float32 ``log2`` is faster than torch's (timed once per process).
* For 1.5 < α < 2 on CPU, each step needs ``t^(β−1)`` with a fractional exponent, yet few keys can
  be in the support: those keys (above the ℓ2 bound, taken on the unscaled scores) are gathered
  once into buffers kept from chunk to chunk, Newton runs on them only, from a start mapped from
  that bound, and the few rows still unsettled after three or four evaluations are finished in
  numpy float64 (:func:`_solve_on_candidates`); the result is :class:`SparseRows`. Narrow rows, with
  more than ``CANDIDATE_FRACTION`` of their keys above the bound, take the same steps on whole rows
  (:func:`_whole_row_newton`). Large whole β (α ≤ 1.125) take Halley's steps below, like fractional β.
* For 1.05 ≤ α < 1.5 with a fractional β the support is too dense for gathering to pay, so the
  fractional powers themselves are the cost: Halley steps from a pow-free start, and the weights by
  a second-order expansion in the last step, take two such powers per key instead of four; rows
  whose last Newton step is small enough finish to first order, with no curvature (:func:`_halley_solve`).
  The scores are read as ``(α − 1)·S − τ`` in one op (:class:`ScaledScores`), never scaled first.
* Just above α = 1 (α < 1.05), ``x − τ`` is close to 1 and float32 rounding raised to the power β
  would break the result: there the weights are written as ``exp(u + β·log1p(v))`` around the
  softmax and Halley steps find ``u`` (:func:`_near_softmax_solve`); within ``SOFTMAX_LIMIT`` of 1
  the result is softmax.

Masked (−inf) keys get exactly 0. A row whose keys are all −inf gets all zeros (softmax would give
NaN); the attention blend relies on this.
"""

from __future__ import annotations

import functools
import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .env import env_flag

ROW_SUM_TOL = 1e-6
"""A row whose unnormalised weights sum to 1 within this is accepted (then renormalised)."""

NEWTON_STEPS = 3
"""Newton steps before the exact step and the row-sum check (all α but a fractional β > 2).

Measured on iid Gaussian scores (σ 0.3–100, K = 77, 154, 231) from :func:`_lower_bound`: α = 2
leaves no row unsettled after 3 steps, nor does α = 1.5 with a counted support (GPU); on CPU α = 1.5
takes one more evaluation and the support size from its slope, which sends up to 4 % of rows at
K = 154–231, σ 0.3–0.6 (none at K = 77) to the float64 finish (:func:`_entmax15_solve`). Other α
leave 0–20 % of rows, which the gathered finish handles more cheaply than a fourth full-size step
with its ``pow`` (measured both ways). Attention's scores (q·kᵀ, one key set for every query) can
leave far more: see ``_RETRY_SHARE``, and ``GPU_NEWTON_STEPS`` for the GPU variant.
"""

GPU_NEWTON_STEPS = 4
"""``NEWTON_STEPS`` for the GPU variant (:func:`_dense_solve`) but at α = 1.5, where every op is a
kernel launch and host time per launch dominates.

Why one more: the rows a third step leaves unsettled go to the float64 finish (:func:`_settle_rows`),
~50 launches and 3 host syncs however few they are. Measured with the GPU variant on CPU (81920 rows
of scores q·kᵀ with one shared key set, σ 0.3–2, K 77–231): after three steps α = 1.75 and 1.9 left
rows unsettled in every case (1–19569 rows), α = 2 in 7 of 12, α = 1.25 at K ≥ 154 (up to 26723, a
third of them, in float64); after four none did but α = 1.9 at σ ≤ 0.5 (3–652) and α 1.75–2 at
σ = 0.3 (1–39). A step costs 8–13 launches and no sync. α = 1.5 (its exact step counts the support)
left rows only at K ≥ 154 with σ ≤ 0.5, or 6 rows at K = 231, σ = 1: it keeps three steps, the eight
launches of a fourth being more than the finish costs on average (``_RETRY_SHARE`` covers the worst)."""

_RETRY_SHARE = 1 / 16
"""When more than this share of a chunk's rows is unsettled after the Newton steps and the exact
step, every row takes one more step (:func:`_dense_solve`, :func:`_entmax15_solve`); fewer take it
alone (on CPU), and the float64 finish the rest (:func:`_finish_rows`).

Why: wide, flat rows (K = 231, σ ≤ 1) can leave most of a chunk unsettled after three steps, and
the float64 finish costs ~3.5 µs per such row on CPU against ~0.2 µs for a step of every row.
Measured per 1.5·2^20-score chunk (q·kᵀ scores, one shared key set): α = 1.5 at K = 231, σ = 0.5
left 84 % of the rows to the float64 finish (27 ms against 6 for the chunk with a fourth step);
α = 1.25 at K = 231, σ = 1 a third (12.6 against 9.3 ms). Where few rows are unsettled, finishing
them alone stays cheaper than a step for all (α = 2, K = 77: 3 steps 8.6 ms, 4 steps 9.1)."""

SOFTMAX_LIMIT = 1e-7
"""α − 1 at or below this gives softmax: α-entmax differs from it by about 2·(α − 1), which the blend
multiplies by λ (up to 10): 2e-6 at this limit. Above it the float32 near-softmax solver is exact to
~2e-7 (measured down to α − 1 = 1.01e-7)."""

FLOAT32_MAX_BETA = 20.0
"""Above this β = 1/(α − 1) (α < 1.05) a threshold search on ``(x − τ)^β`` is not exact in float32:
``x − τ`` is close to 1 and its rounding, raised to the power β, grows β-fold (measured: 6e-6 at
α = 1.001, garbage below α = 1 + 1e-7). There :func:`_near_softmax_solve` takes over."""


def is_softmax(alpha: float) -> bool:
    """Whether α-entmax is softmax for this α (within ``SOFTMAX_LIMIT`` of 1)."""
    return alpha - 1.0 <= SOFTMAX_LIMIT


def float32_exact(alpha: float) -> bool:
    """Whether a float32 search on τ is exact for this α (all but 1 + SOFTMAX_LIMIT < α < 1.05).

    Elsewhere both the torch path (:func:`_near_softmax_solve`) and the fused GPU kernel solve for
    the log-weight of the largest key instead of τ.
    """
    return is_softmax(alpha) or alpha - 1.0 >= 1.0 / FLOAT32_MAX_BETA


CANDIDATE_FRACTION = 0.125
"""For 1.5 < α < 2 on CPU, the keys above the lower bound are solved on their own unless they exceed
this fraction of all keys; then whole rows are (:func:`_whole_row_newton`).

Measured per 1.5·2^20-score chunk: on the benchmark shapes (σ = 1) 9–14 % of the keys are above the
bound at α 1.52–1.9 (K = 77), 3–6 % at K = 231; narrow rows have more (σ = 0.5, K = 77: 16–30 %).
Gathering took 12–16 against 9.3–10 ms for whole rows at 17–30 %: the per-key indexing grows with
the keys' number, a whole-row pass does not (``nonzero`` costs the same at 4 and 14 %). Since whole
rows take ``t^β`` first (``_TOP_FIRST_MIN_EXPONENT``), at K = 77, σ = 1: 13.6 % (α = 1.52) 9.4
against 9.8 ms gathered, 12.7 % even, 11.4 % (α = 1.6) 10.1 against 9.5; at K = 231 the break-even
is lower (11.3 %: whole rows 4 % faster), which this single limit leaves to gathering."""
_SAMPLED_ROW_STEP = 8  # the candidate share is estimated on every 8th row (1/8 of a counting pass)
_CANDIDATE_ROUNDS = 30  # evaluations per row: 3 for most, 4–5 for a few; the bound is never reached
_FIRST_CHECK = 2  # gathered rows are checked from the 3rd evaluation on (see _newton_on_segments)
_FLOAT32_ROW_KEYS = 96
"""Rows of up to this many keys keep their float32 ``index_add_`` sums; longer rows are summed again
in float64 (:func:`_newton_on_segments`).

``index_add_`` adds a row's terms one after another, so each term below half an ulp of the running
sum (6e-8 next to a weight near 1) can be lost: up to 95 of them move a row's sum by at most ~6e-6,
within the issue's 1e-5 but over ``ROW_SUM_TOL``. Measured (review helper-54): 76 keys tied 3e-7
inside the support edge next to the maximum key, α = 1.9, summed to 1 + 4.3e-6 after normalising,
with weights within 3.1e-7 of float64 (α 1.51–1.99: up to 1.9e-6). Re-summing every chunk in
float64 costs 0.39 ms (~5 % of the α = 1.75 solve), for Gaussian scores nothing."""
_FINISH_SHARE = 1 / 16
"""Unsettled rows are gathered and finished alone once they are at most this share of the rows.

Why not more: gathering a row's keys again costs about a whole evaluation of all the candidates'
(measured at α = 1.75, σ = 1: 19 % of the rows unsettled after three evaluations, 0.02 % after
four; one more evaluation for all rows, then a finish of a few rows, was 3–6 % faster per chunk than
finishing the 19 % at once). Rows within the linear finish's limit do not count: they need no
further evaluation (at α = 1.6, σ = 1 all of the 3 % left; see :func:`_linear_rows_limit`)."""
_SUBSET_SHARE = 1 / 2
"""Whole rows still moving after a check go on alone (when they are more than ``_FINISH_SHARE`` of
the first call's rows) once they are at most this share of the rows; the others are finished
(:func:`_whole_row_newton`).

Why: keys tied just inside the support edge (a prompt's padding tokens, ~65 near-equal keys) make
Newton's steps short and slow the rows they sit in: on such scores 7–34 % of the rows were still
moving after three evaluations and every row took 4–6 (one evaluation of every row takes ~2 ms
per 1.5·2^20-score chunk). Rows alone: α 1.6–1.9 12–26 % faster per chunk there (e.g. α = 1.9
16.3 → 12.1 ms). Whole rows only: gathered keys evaluate about four times as fast, and setting
a few rows' keys apart cost more than one more evaluation of all (α = 1.75, σ = 1, 19 % of the
rows moving: 8.7 → 9.8 ms)."""
_FALLBACK_ROUNDS = 50  # bound for the rare unsettled rows (2 Newton steps a round); never reached.
_LINEAR_FINISH_SHARE = 1 / 16
"""Rows whose last Newton step is over the linear finish's limit are finished alone while they are at
most this share (:func:`_finish_far_rows`); beyond it every row takes the curvature and the
second-order finish."""
_HALLEY_ROUNDS = 12  # evaluations per row for fractional β > 2: 2 for most, 3 for a few; never reached
_HALLEY_MIN_WHOLE_BETA = 8.0
"""From this whole β = 1/(α − 1) on (α ≤ 1.125), the CPU solver takes Halley's steps on a fractional
power, as for fractional β, rather than Newton's on a power by multiplications (:func:`_dense_solve`).

Why: Newton from the power-mean bound leaves more rows unsettled the larger β is, and those go to
the float64 finish. Measured per 1.5·2^20-score chunk (σ 0.3–3, K = 77): β = 20 (α = 1.05)
12.5–13.8 ms against 8.8–9.3 with Halley, β = 10 9.5–10.3 against 8.3–9.2, β = 8 9.5–9.9 against
8.2–9.2; at β = 4–6 multiplications stay as fast or faster (8.2–9.2 against 8.1–10.1 ms)."""
_TOP_FIRST_MIN_EXPONENT = 160.0
"""Whole-row Newton (:func:`_whole_row_newton`) takes ``t^β`` first, and ``t^(β−1)`` as ``t^β/t``,
where the floor's power ``2^(−126β)`` underflows to 0 (β·126 ≥ 149) and ``exp2``'s input stays below
its slow window [−159, −126.5] (see ``_FAST_UNDERFLOW``): β ≥ 1.27, α ≤ 1.787. Why: no pass then
sets the floored keys' ``t^(β−1)`` to 0. Measured per 1.5·2^20-score chunk (σ = 0.5, K = 77, whole
rows): α 1.52–1.75 3–5 % faster."""
_THIRD_ORDER_MIN_BETA = 4.0
"""From this β on (α ≤ 1.25), the CPU Halley solver may finish rows to third order in its last step
(:func:`_third_order_weights`), whose tolerance (:func:`_third_order_tolerance`) is 5–7× the
second-order one's (K 77–231), when that lets all but a quarter of the rows finish after the evaluation.

Why: at α 1.16–1.25 the interpolated start (:func:`_interpolated_start`) lands 1–3e-3 from the root
on σ = 1 scores, beyond the second-order tolerance (5–8e-4) for 91–96 % of the rows, so every row
took a second evaluation (eight passes) and α = 1.19 cost 1.6× α = 1.5; the third-order finish costs
at most two passes more than the second-order one (and no mask for leaving keys). Measured per
1.5·2^20-score chunk (K = 77): α 1.17–1.19 9.3 → 8.3 ms at σ = 1, α 1.21 2–6 % faster, elsewhere
within noise; at K = 231, σ = 1 most rows stay beyond it (no change). Below β = 4 (the mapped ℓ2
start) 4–35 % of the rows were within it (float64, σ 0.5–2)."""
_THIRD_ORDER_SHARE = 0.75  # of the remainder bound's step (see _third_order_tolerance)
_L2_START_MAX_BETA = 2.35  # below it (α > 1.4255) _halley_solve starts from the mapped ℓ2 bound
_L2_START_MAX_BETA_CPU = 4.0
"""The same limit for the CPU variant (α > 1.25), whose ℓ2 bound works in place (:func:`_l2_bound_in_place`).

Measured per 1.5·2^20-score chunk (σ 0.5–3): at K = 77 the mapped ℓ2 start was 0–25 % faster than
the interpolated one at every α in 1.28–1.42 (e.g. α = 1.4: 6.9–8.1 against 7.9–9.3 ms), even where
some rows then need a third evaluation; at K = 231 within ±4 % at α 1.27–1.35 and 7–16 % faster at
α 1.4–1.42. At α 1.05–1.15 the interpolated start stays faster (up to 10 %)."""
_TINY = 1e-30
_LEAVING_MASS = 1e-9  # weight a row may keep on keys a last Taylor step takes out (see _taylor_weights)
_LOG2_E = 1.0 / math.log(2.0)
_LOG_FLOOR = 2.0**-126  # smallest normal float32: log₂ of it is exactly −126
_FLOAT64_NORMAL = 2.0**-1022  # smallest normal float64
NUMPY_LOG2_ENV = "PLADIS_NUMPY_LOG2"
"""Set to 1 or 0 to force numpy's ``log2`` on or off on CPU (default: whichever is faster, timed once)."""
_MAX_WHOLE_EXPONENT = 32


def gathers_keys(alpha: float) -> bool:
    """Whether the CPU solver for this α gathers the keys above a bound (1.5 < α < 2, 1 < β < 2)."""
    return 1.5 < alpha < 2.0


def check_alpha(alpha: float) -> float:
    """Validate α: the mapping is defined here for 1 ≤ α ≤ 2."""
    return check_real("entmax alpha", alpha, 1, 2)


def check_real(label: str, value: float, low: float, high: float) -> float:
    """``value`` as a float if it is a real number (int, float, numpy scalar) in [low, high], else raise.

    The range is compared before ``float()``: huge ints and Fractions overflow there; NaN fails it.
    """
    bounds = f"[{low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"{label}: expected a real number (int, float, numpy scalar) in {bounds}, "
            f"got {value!r} of type {type(value).__name__}"
        )
    if not (low <= value <= high):
        raise ValueError(f"{label}: {value!r} is outside the allowed range {bounds}")
    return float(value)


def check_scores(function: str, scores: Any, dim: Any = -1, *, keys_dim: bool = False) -> None:
    """Refuse what is not a floating-point tensor (or, with ``keys_dim``, one with no dims), or a
    ``dim`` it does not have, naming them.

    Why: an int or bool tensor would be taken as scores silently (and a complex one lose its
    imaginary part), a list fail with an AttributeError and a bad ``dim`` with an IndexError.
    """
    is_tensor = isinstance(scores, Tensor)
    if not is_tensor or not scores.dtype.is_floating_point or (keys_dim and scores.dim() == 0):
        got = f"shape {tuple(scores.shape)}, {scores.dtype}" if is_tensor else type(scores).__name__
        raise ValueError(f"{function}: scores must be a floating-point tensor (..., keys), got {got}")
    ndim = max(scores.dim(), 1)
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not -ndim <= dim < ndim:
        raise ValueError(
            f"{function}: dim must be an int in [{-ndim}, {ndim - 1}] for scores of shape "
            f"{tuple(scores.shape)}, got {dim!r}"
        )


def check_no_grad(function: str, **tensors: Tensor | None) -> None:
    """Refuse inputs that ask for gradients: the solvers work in place and have no backward.

    Without this, autograd would fail deep inside with a message about ``out=`` arguments.
    """
    if not torch.is_grad_enabled():
        return
    asking = [name for name, tensor in tensors.items() if tensor is not None and tensor.requires_grad]
    if asking:
        raise ValueError(
            f"{function}: {', '.join(asking)} require grad, but PLADIS is inference-only (no backward); "
            "call it under torch.no_grad() or torch.inference_mode()"
        )


def entmax(scores: Tensor, alpha: float, dim: int = -1) -> Tensor:
    """α-entmax of ``scores`` along ``dim``.

    Returns a **float32** tensor whatever the input dtype: half-precision inputs are upcast first,
    because the threshold search in fp16/bf16 arithmetic is unreliable. Exact up to float32 rounding
    for every α (agrees with a float64 sort-based solve to ~1e-6). Inference only: there is no
    backward, so ``scores`` that require grad (with grad enabled) raise ``ValueError``. Scores must
    not be NaN or +∞ (−∞ masks a key): such a row comes back as NaN on most paths but as zeros on
    the CPU path for 1.5 < α < 2; checking every row would cost a pass over the scores, and a model
    producing NaN is caught by the host's own NaN check (the softmax term of the blend is NaN).
    """
    alpha = check_alpha(alpha)
    check_scores("entmax", scores, dim)
    check_no_grad("entmax", scores=scores)
    if scores.dim() == 0:  # one key, as torch.softmax takes it: weight 1 (0 when masked)
        return entmax(scores.reshape(1), alpha).reshape(())
    x = scores.to(torch.float32).movedim(dim, -1)
    if x.numel() == 0:
        return x.clone().movedim(-1, dim)
    shape = x.shape
    rows = x.reshape(-1, shape[-1]).clone(memory_format=torch.contiguous_format)  # row-major blocks
    centred = rows.sub_(row_max(rows))
    out = softmax_centred_(centred) if is_softmax(alpha) else entmax_centred(centred, alpha)
    return out.reshape(shape).movedim(-1, dim)


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


def cpu_variant(t: Tensor) -> bool:
    """Whether the CPU-tuned variants apply to ``t``: fewer passes and cheap transcendentals there.

    Elsewhere (GPUs) the torch path is bound by kernel launches, so each step stays one op. Tests
    patch this to run the GPU variants on CPU tensors.
    """
    return t.device.type == "cpu"


def row_max(rows: Tensor) -> Tensor:
    """Row maxima (keepdim); a fully masked row gets the lowest finite float, so ``rows − max`` has no
    NaN (its keys stay −∞)."""
    return rows.amax(dim=-1, keepdim=True).clamp_min_(torch.finfo(rows.dtype).min)


class Workspace:
    """Score-sized float32 buffers reused across chunks: large temporaries are allocated once per call.

    On CPU a fresh multi-megabyte temporary per elementwise op costs page faults that can exceed the
    arithmetic itself; on GPU it costs allocator traffic.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def buffer(
        self,
        name: str,
        shape: tuple[int, ...],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        capacity: int = 0,
    ) -> Tensor:
        """A buffer of ``shape`` (contents undefined), reusing the storage of ``name``.

        A new storage holds at least ``capacity`` elements: for buffers whose size varies from
        chunk to chunk (gathered keys), so that they are allocated once, not a little larger each time.
        """
        n = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.device != device or buf.dtype != dtype:
            buf = torch.empty(max(n, capacity), dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:n].view(shape)

    def get(self, name: str, like: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """A buffer shaped like ``like`` (float32 unless ``dtype`` says otherwise)."""
        return self.buffer(name, tuple(like.shape), like.device, dtype)


@dataclass(frozen=True)
class SparseRows:
    """Weights of a ``(rows, keys)`` block given by their nonzero entries only (the rest is 0).

    ``index`` holds flat positions in the row-major block, ``values`` the weights there.
    """

    index: Tensor
    values: Tensor

    def to_dense(self, out: Tensor) -> Tensor:
        """The weights written into ``out`` (the block's shape)."""
        out.zero_().view(-1).index_copy_(0, self.index, self.values)
        return out


@dataclass(frozen=True)
class UnnormalisedRows:
    """Weights of a ``(rows, keys)`` block as ``values / total``, one total per row ``(rows, 1)``.

    Why: the normalisation is then folded into the blend's one pass (``addcdiv_``) instead of a
    division pass of its own (~2 % of the attention on CPU, one launch fewer on GPUs). Rows with
    no finite key have values 0 and a total clamped above 0.
    """

    values: Tensor
    total: Tensor

    def normalised_(self) -> Tensor:
        """The weights, in place in ``values``."""
        return self.values.div_(self.total)


def entmax_centred(centred: Tensor, alpha: float, workspace: Workspace | None = None) -> Tensor:
    """α-entmax (1 ≤ α ≤ 2) of float32 rows (keys last) whose maximum is 0, as a dense tensor.

    ``centred`` is not modified. The result lives in a workspace buffer when one is given.
    """
    ws = workspace or Workspace()
    weights = entmax_rows(centred.contiguous(), alpha, ws)  # the solvers index a row-major block
    if isinstance(weights, SparseRows):
        return weights.to_dense(ws.get("t", centred))
    return weights.normalised_() if isinstance(weights, UnnormalisedRows) else weights


def entmax_rows(centred: Tensor, alpha: float, ws: Workspace) -> Tensor | SparseRows | UnnormalisedRows:
    """α-entmax (1 ≤ α ≤ 2) of float32 rows (keys last) whose maximum is 0: dense, or its nonzeros.

    This is the entry point of the attention blend, which already computed ``S − max S`` for the
    softmax. ``centred`` is not modified. For 1.5 < α < 2 the result is usually :class:`SparseRows`
    (see :func:`_solve_on_candidates`); otherwise the weights and their row sums
    (:class:`UnnormalisedRows`), or normalised weights (α near 1). Either lives in workspace
    buffers: valid until the next call with the same workspace.
    """
    if is_softmax(alpha):
        return softmax_centred_(ws.get("t", centred).copy_(centred))
    beta = 1.0 / (alpha - 1.0)
    if beta > FLOAT32_MAX_BETA:
        return _near_softmax_solve(centred, alpha, ws)
    gathers, halley = gathers_keys(alpha), beta > 2.0 and not _is_whole(beta)
    if gathers and cpu_variant(centred):
        # On GPUs the dense passes are cheap and gathering would cost a host synchronisation. On
        # CPU the ℓ2 bound is taken on the centred scores themselves, sparing the pass that scales
        # them: ‖((α − 1)·S − τ)₊‖₂ = 1 where ‖(S − τ/(α − 1))₊‖₂ = 1/(α − 1).
        bound, above = _candidate_bound(centred, ws, radius=beta)
        sparse = _solve_on_candidates(centred, bound, above, alpha - 1.0, beta, ws)
        if sparse is not None:
            return sparse
        start = _equal_keys_start(bound.view(-1).mul(alpha - 1.0), beta)
        return _whole_row_newton(centred, start, alpha - 1.0, beta, ws)
    # On CPU, large whole β also take Halley's steps (see _HALLEY_MIN_WHOLE_BETA).
    if cpu_variant(centred) and (halley or beta >= _HALLEY_MIN_WHOLE_BETA):
        return _halley_solve(ScaledScores(centred, alpha - 1.0), beta, ws)
    # X = (α − 1)·(S − max S); sparsemax (α = 2) uses the scores as they are. On CPU X is never
    # written out (see ScaledScores: a pass and a buffer less, ~14 % of the α = 1.5 solve); on GPUs
    # each shift by τ would take a launch more (−τ), which costs more than the pass.
    if alpha == 2.0:
        x: Tensor | ScaledScores = centred
    elif cpu_variant(centred):
        x = ScaledScores(centred, alpha - 1.0)
    else:
        x = torch.mul(centred, alpha - 1.0, out=ws.get("x", centred))
    if gathers:
        # Whole rows on GPUs: Newton from the mapped start, which also spares the unsettled-row
        # finish.
        return _dense_solve(x, beta, ws, _equal_keys_start(_lower_bound(x, beta, ws), beta))
    if halley:
        return _halley_solve(x, beta, ws)
    return _dense_solve(x, beta, ws)


class ScaledScores:
    """The scores ``X = scale·centred`` of a row block, never written out as a whole.

    Why: the CPU solvers (Halley's, and the dense ones for whole β and α = 1.5) read X only as
    ``X − τ`` (one op either way: ``torch.add(−τ, centred, alpha=scale)`` runs as fast as a
    subtraction), so scaling every score first was a pass of its own, and a buffer: ~3 % of the
    Halley solve, ~14 % of the α = 1.5 one. Offers what the solvers use of a tensor.
    """

    __slots__ = ("centred", "scale")

    def __init__(self, centred: Tensor, scale: float) -> None:
        self.centred, self.scale = centred, scale

    @property
    def shape(self) -> torch.Size:
        return self.centred.shape

    @property
    def device(self) -> torch.device:
        return self.centred.device

    @property
    def dtype(self) -> torch.dtype:
        return self.centred.dtype

    def mean(self, dim: int, keepdim: bool = False) -> Tensor:
        return self.centred.mean(dim, keepdim=keepdim).mul_(self.scale)

    def index_select(self, dim: int, index: Tensor) -> ScaledScores:
        return ScaledScores(self.centred.index_select(dim, index), self.scale)


def _empty_like(x: Tensor | ScaledScores) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _dense_solve(
    x: Tensor | ScaledScores, beta: float, ws: Workspace | None, tau: Tensor | None = None
) -> UnnormalisedRows:
    """Newton from the lower bound (or a start ``tau``) and the exact step; when many rows are left
    unsettled, one more of each for every row (``_RETRY_SHARE``); the rest finished alone
    (:func:`_finish_rows`)."""
    if beta == 2.0 and tau is None and cpu_variant(x):
        return _entmax15_solve(x, ws)
    if tau is None:
        tau = _lower_bound(x, beta, ws)
    out, scratch = (_empty_like(x), _empty_like(x)) if ws is None else (ws.get("t", x), ws.get("p", x))
    first = NEWTON_STEPS if cpu_variant(x) or beta == 2.0 else GPU_NEWTON_STEPS
    for steps in (first, 1):  # the second round: one more step for every row (_RETRY_SHARE)
        tau = _newton(x, tau, beta, steps, ws)
        weights, total = _exact_step(x, tau, beta, out, scratch)
        # A total of 0 means a row with no finite key: nothing to settle, its weights stay 0.
        unsettled = _settled(total).logical_not_()
        count = int(unsettled.sum())
        if count <= _RETRY_SHARE * unsettled.numel():
            break
    if count:
        _finish_rows(x, tau, beta, weights, total, unsettled.squeeze(-1))
    return UnnormalisedRows(weights, total.clamp_min_(_TINY))


def _finish_rows(
    x: Tensor | ScaledScores, tau: Tensor, beta: float, weights: Tensor, total: Tensor, rows: Tensor
) -> None:
    """Finish the few ``rows`` left unsettled by :func:`_dense_solve` or :func:`_entmax15_solve`
    (α = 1.5, 2 and whole β) from their last ``tau``, writing ``weights`` and ``total`` in place.

    On CPU they first take one more Newton and exact step alone, in float32; only rows still
    unsettled then go to the float64 finish (:func:`_settle_rows`). Why: one more step settles
    nearly all of them (keys tied near the support edge, as a prompt's padding tokens give, left
    2–6 % of the rows at α = 1.5, K = 77; none after it), and the float64 finish costs 0.5–1 ms per
    chunk however few its rows (~60 small float64 ops), against ~0.2 ms for the step. The GPU
    variant keeps the float64 finish alone (not measured there).
    """
    if not cpu_variant(weights):
        _settle_rows(x, tau, beta, weights, total, rows)
        return
    index = rows.nonzero().squeeze(-1)
    picked = x.index_select(0, index)
    picked_tau = _newton(picked, tau.index_select(0, index), beta, 1, None)
    picked_weights, picked_total = _exact_step(
        picked, picked_tau, beta, _empty_like(picked), _empty_like(picked)
    )
    left = _settled(picked_total).logical_not_().squeeze(-1)
    if bool(left.any()):
        _settle_rows(picked, picked_tau, beta, picked_weights, picked_total, left)
    weights.index_copy_(0, index, picked_weights)
    total.index_copy_(0, index, picked_total)


def _entmax15_solve(x: Tensor | ScaledScores, ws: Workspace | None) -> UnnormalisedRows:
    """α = 1.5 (β = 2): Newton on ``‖(x − τ)₊‖₂ = 1`` from −1, then the support quadratic.

    The quadratic ``Σ_S (t − δ)² = 1`` on the support S found at the last iterate gives the exact
    threshold (the closed form of the sort-based entmax15, evaluated on that support), but needs
    ``|S|``, and counting it is two passes (a comparison and a sum, ~1/8 of the solve). On a support
    that did not change between the last two iterates ``|S|`` is exactly the slope of ``Σt``:
    ``(Σt(τ₂) − Σt(τ₃))/(τ₃ − τ₂)``, which costs nothing. Where keys still left the support between
    them this is too large, the step overshoots, and the row sum check sends the row to the float64
    finish (:func:`_settle_rows`), like a row whose support had not settled. Measured on Gaussian
    scores σ 0.1–100: no row at K = 77, up to 4 % at K = 154–231 for σ 0.3–0.6 (the count: 0.2 %);
    on attention's scores (one key set for all rows) up to 84 % at K = 231, σ 0.5: when more than
    ``_RETRY_SHARE`` of the rows are left, every row takes one more step and quadratic first.
    ``s2`` is taken as a norm (one pass, not a product and a sum). Newton's iterates only rise, so
    the weights are the last ``t`` shifted by δ ≥ 0 in place. Normalisation is left to the caller.
    """
    t = _empty_like(x) if ws is None else ws.get("t", x)
    tau = torch.full((*x.shape[:-1], 1), -1.0, dtype=x.dtype, device=x.device)
    norm, s1 = _l2_moments(x, tau, t)
    for steps in (NEWTON_STEPS, 1):  # the second round: one more step for every row (_RETRY_SHARE)
        for _ in range(steps):
            step = norm.sub(1.0).mul_(norm).div_(s1.clamp_min(_TINY))
            tau, s1_previous = tau + step, s1
            norm, s1 = _l2_moments(x, tau, t)
        weights, total = _support_quadratic(t, norm, s1, s1_previous, step)  # t is consumed
        unsettled = _settled(total).logical_not_()  # a total of 0: no finite key, weights stay 0
        count = int(unsettled.sum())
        if count <= _RETRY_SHARE * unsettled.numel():
            break
    if count:
        _finish_rows(x, tau, 2.0, weights, total, unsettled.squeeze(-1))
    return UnnormalisedRows(weights, total.clamp_min_(_TINY))


def _l2_moments(x: Tensor | ScaledScores, tau: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``‖t‖₂`` and ``Σt`` of ``t = (x − τ)₊``, written into ``t``."""
    _shifted(x, tau, t)
    return torch.linalg.vector_norm(t, dim=-1, keepdim=True), t.sum(-1, keepdim=True)


def _support_quadratic(
    t: Tensor, norm: Tensor, s1: Tensor, s1_previous: Tensor, step: Tensor
) -> tuple[Tensor, Tensor]:
    """The weights ``(t − δ)₊²`` (in place in ``t``) and their row sums, δ from the support quadratic.

    ``t = (x − τ)₊`` at the last iterate, ``norm`` and ``s1`` its ‖t‖₂ and Σt, ``s1_previous`` Σt at
    the iterate before, ``step`` the Newton step between them (:func:`_entmax15_solve`).
    """
    count = (s1_previous - s1).div_(step.clamp_min(_TINY)).clamp_(0.0, t.shape[-1])
    s2m1 = (norm - 1.0).mul_(norm + 1.0)
    # Σ_S (t − δ)² = s2 − 2δ·s1 + |S|·δ² = 1: the smaller root, free of cancellation.
    root = torch.addcmul(s1 * s1, count, s2m1, value=-1.0).clamp_min_(0.0).sqrt_()
    delta = s2m1.div_(root.add_(s1).clamp_min_(_TINY)).clamp_min_(0.0)
    weights = t.sub_(delta).clamp_min_(0.0).square_()
    return weights, weights.sum(-1, keepdim=True)


def _candidate_bound(centred: Tensor, ws: Workspace, radius: float) -> tuple[Tensor, Tensor]:
    """The ℓ2 bound of :func:`_l2_bound_in_place` on ``centred``, and the keys above it as a float
    0/1 mask (in the workspace buffer ``"t"``).

    The keys above ``τ₂ = τ₁ + δ₂`` are those with ``t = (s − τ₁)₊ > δ₂``: compared in place, not
    against the scores in a second buffer (an in-place pass takes about half the time on CPU).
    """
    bound, t, last_step = _l2_bound_in_place(centred, ws.get("t", centred), radius)
    return bound, torch.gt(t, last_step, out=t)


def _l2_bound_in_place(centred: Tensor, t: Tensor, radius: float) -> tuple[Tensor, Tensor, Tensor]:
    """Two pow-free Newton steps from −radius towards the root of ``‖(s − τ)₊‖₂ = radius``: a bound
    τ₂ at or below it (a new tensor), ``t`` (a buffer shaped like ``centred``) left holding
    ``(s − τ₁)₊`` of the first step's ``τ₁``, and the second step ``δ₂`` (so ``τ₂ = τ₁ + δ₂``).

    Why: the second step shifts the first step's ``t`` in place (``(t − δ₁)₊ = (s − τ₁)₊`` for
    δ₁ ≥ 0) instead of writing ``s − τ₁`` into a second buffer, a pass that took about twice the
    time of an in-place one on CPU. Newton's steps from below are ≥ 0; rounding that makes one
    negative is clamped to 0, which keeps τ at or below the root.
    """
    t = torch.add(centred, radius, out=t).clamp_min_(0.0)
    steps: list[Tensor] = []
    for _ in range(2):
        if steps:
            t.sub_(steps[-1]).clamp_min_(0.0)
        # ‖t‖₂ = sqrt(Σt²) and d‖t‖₂/dτ = −Σt/‖t‖₂: the step is (‖t‖₂ − radius)·‖t‖₂/Σt.
        norm = torch.linalg.vector_norm(t, dim=-1, keepdim=True)
        total = t.sum(-1, keepdim=True).clamp_min_(_TINY)
        steps.append(norm.sub(radius).mul_(norm).div_(total).clamp_min_(0.0))
    return steps[0].add(steps[1]).sub_(radius), t, steps[1]


def _solve_on_candidates(
    centred: Tensor, bound: Tensor, above: Tensor, scale: float, beta: float, ws: Workspace
) -> SparseRows | None:
    """Newton for 1 < β < 2 on the keys above the lower bound only; None when they are too many.

    The keys are ``x = scale·centred`` (scale = α − 1) and ``bound`` is a lower bound on the root
    in units of ``centred`` (τ/scale), ``above`` the float 0/1 mask of the keys above it
    (:func:`_candidate_bound`): only the gathered keys are scaled.

    Why: every Newton step needs ``t^(β−1)`` with a fractional exponent, ~10× the cost of a
    multiplication even as ``2^(e·log₂ t)``, yet only the keys above ``tau`` (a lower bound, so a
    superset of the support) can get weight — typically under a tenth of the row. Gathering them
    once makes each step cost a tenth. See :func:`_newton_on_segments` for the steps.
    """
    rows, keys = centred.shape
    # The share is estimated on a sample of rows before the costly nonzero (a full count was ~1.5 %
    # of the solve); nonzero() counts the keys itself, and gathers unless they are twice as many.
    sample = above[::_SAMPLED_ROW_STEP]
    if float(sample.sum()) > CANDIDATE_FRACTION * sample.numel():
        return None
    limit = int(2 * CANDIDATE_FRACTION * centred.numel())
    # The float 0/1 mask seen as int32 (0.0 and 1.0 are 0 and nonzero bit patterns): nonzero() runs
    # as fast on it as on a bool mask, which took a conversion pass (~0.13 ms per chunk, ~1.5 %).
    mask = above.view(-1).view(torch.int32)
    # The out buffer holds as many keys as may be gathered, and grows beyond (then unused).
    room = ws.buffer("gathered-index", (limit + 1,), centred.device, torch.int64)[:0].view(0, 1)
    index = torch.nonzero(mask, out=room).squeeze(1)
    n = index.numel()
    if n > limit:
        return None
    gathered = _GatheredBuffers(ws, centred.device, n)
    # take() gathers on both threads; index_select from a source this large ran on one (~1.5× the time).
    values = torch.take(centred, index, out=gathered.get("values", n)).mul_(scale)
    row = _row_of(index, keys, centred.numel(), out=gathered.get("row", n, torch.int64))
    start = _equal_keys_start(bound.view(-1).mul(scale), beta)
    weights = _newton_on_segments(values, row, start, rows, beta, buffers=gathered, keys=keys)
    return SparseRows(index, weights)


def _whole_row_newton(
    centred: Tensor,
    tau: Tensor,
    scale: float,
    beta: float,
    ws: Workspace | None,
    finish_rows: float | None = None,
) -> UnnormalisedRows:
    """Newton for 1 < β < 2 on whole rows (CPU), where too many keys are above the bound to gather.

    The steps of :func:`_newton_on_segments` (from the same mapped start, checked from the same
    evaluation on, with the same per-row arithmetic, :class:`_RowSteps`) on every key of the rows:
    each evaluation's ``t^β`` are the weights when the row settles, so no evaluation is spent on
    them alone (:func:`_dense_solve`, the GPU variant, spends one). ``tau`` is the start, in units
    of ``x = scale·centred``, and moves. Rows left unsettled are finished to first order where
    their last step allows (:func:`_linear_rows_limit`); rows still moving go on alone when they
    are more than ``finish_rows`` (``_SUBSET_SHARE``); the rest is finished in float64
    (:func:`_settle_rows`). ``finish_rows`` is given for such continued rows (their start is below
    the root, so their first evaluation is checked): ``_FINISH_SHARE`` of the first call's rows.
    """
    rows = centred.shape[0]
    x = ScaledScores(centred, scale)
    if ws is None:
        t, powered = torch.empty_like(centred), torch.empty_like(centred)
    else:
        t, powered = ws.get("t", centred), ws.get("p", centred)
    sums = torch.empty(2, rows, dtype=centred.dtype, device=centred.device)

    top_first = -beta * math.log2(_LOG_FLOOR) >= _TOP_FIRST_MIN_EXPONENT  # α ≤ 1.787

    def evaluate() -> None:
        # Keys off the support sit at 2^-126 instead of 0: their power is exactly 0 (see _moments).
        _shifted(x, tau.view(-1, 1), t, _LOG_FLOOR)
        if top_first:
            # t^β first: the floor's power underflows to 0 by itself, so no pass sets it to 0, and
            # t^(β−1) = t^β/t in place in t (which the next evaluation shifts anew).
            weights = _exp2_scaled_(_log2(t, powered), beta, floored=False)
            torch.sum(weights, -1, out=sums[1])
            torch.sum(torch.div(weights, t, out=t), -1, out=sums[0])
            return
        lower = _exp2_scaled_(_log2(t, powered), beta - 1.0)
        torch.sum(lower, -1, out=sums[0])
        torch.sum(lower.mul_(t), -1, out=sums[1])  # t^β: the weights

    # t^(β−1) is left in t only when t^β is taken first: otherwise no row is finished linearly.
    steps = _RowSteps(sums, tau, beta, _linear_rows_limit(beta, centred.shape[1]) if top_first else 0.0)
    continued = finish_rows is not None
    finish_rows = _FINISH_SHARE * rows if finish_rows is None else finish_rows
    settled = steps.iterate(evaluate, 0 if continued else _FIRST_CHECK, finish_rows, subsets=True)
    linear, moving = steps.linear_rows(), steps.moving_rows()
    total = sums[1].clone().view(-1, 1)
    count = int(linear.sum())
    if count:
        # (t − δ)₊^β ≈ max(t^β − βδ·t^(β−1), 0) on the linear rows (see _linear_rows_limit), whose
        # sums are F − βδ·D; all rows at once (βδ = 0 elsewhere) unless they are few (the share
        # below which Halley's far rows are finished alone too).
        shift = torch.from_numpy(steps.step).mul(beta).masked_fill_(linear.logical_not(), 0.0).view(-1, 1)
        if count <= _LINEAR_FINISH_SHARE * rows:
            index = linear.nonzero().squeeze(1)
            near = powered.index_select(0, index).addcmul_(t.index_select(0, index), shift[index], value=-1.0)
            powered.index_copy_(0, index, near.clamp_min_(0.0))
        else:
            powered.addcmul_(t, shift, value=-1.0).clamp_min_(0.0)
        total.addcmul_(shift, sums[0].view(-1, 1), value=-1.0)
    pending = settled.logical_or_(linear).logical_not_()
    if int(moving.sum()) > finish_rows:
        index = moving.nonzero().squeeze(1)
        start = tau.index_select(0, index).add_(torch.from_numpy(steps.step).index_select(0, index))
        sub = _whole_row_newton(centred.index_select(0, index), start, scale, beta, None, finish_rows)
        powered.index_copy_(0, index, sub.values)
        total.index_copy_(0, index, sub.total)
        pending.logical_and_(moving.logical_not_())
    if bool(pending.any()):
        _settle_rows(x, tau.view(-1, 1), beta, powered, total, pending)
    return UnnormalisedRows(powered, total.clamp_min_(_TINY))


class _GatheredBuffers:
    """Workspace buffers for the gathered keys of one chunk, kept from chunk to chunk (and call to call).

    Why: fresh arrays of a few hundred kilobytes per chunk land on memory that is not in cache; at
    α = 1.75 on 2^20-score chunks the gathered solve took 20 % longer with them. The count varies
    a little from chunk to chunk, so a buffer is made a quarter larger than the first need.
    """

    def __init__(self, ws: Workspace, device: torch.device, count: int) -> None:
        self._ws, self._device = ws, device
        self._capacity = count + count // 4 + 64

    def get(self, name: str, n: int, dtype: torch.dtype = torch.float32, lead: int = 1) -> Tensor:
        """A ``(lead, n)`` buffer (``(n,)`` for lead 1) of ``dtype`` named ``gathered-<name>``."""
        shape = (n,) if lead == 1 else (lead, n)
        capacity = lead * self._capacity
        return self._ws.buffer("gathered-" + name, shape, self._device, dtype, capacity=capacity)


def _equal_keys_start(tau: Tensor, beta: float) -> Tensor:
    """``−(−τ)^(2/β)``: a start for Newton on ``‖(x − τ)₊‖_β = 1`` from the ℓ2 bound ``tau`` (new tensor).

    Why: the ℓ2 root is systematically below the ℓβ root (by up to 0.15 at α = 1.75), which costs
    Newton an evaluation. For m keys equal to the maximum (0) the two roots are ``−m^(−1/2)`` and
    ``−m^(−1/β)``, so this map is exact there; on Gaussian scores it brings the median distance to
    the root from 0.12 to 0.013 (α = 1.75; max 0.15 → 0.05), for one small per-row op.
    The start may lie above the root (a quarter of the rows at σ = 1): the first Newton step then
    lands below it, ``h`` being convex. The gathered keys stay a superset of the support because
    they were chosen at ``tau``, not here; and the start stays below the maximum key (``τ < 0``).
    For 2 < β < ``_L2_START_MAX_BETA`` (:func:`_halley_start`) the ℓ2 root lies above the β root and
    the map lowers it.
    """
    return _row_power(tau.neg(), 2.0 / beta).neg_()


def _row_of(index: Tensor, keys: int, numel: int, out: Tensor | None = None) -> Tensor:
    """``index // keys`` for flat indices into a block of ``numel`` elements, by multiply and shift.

    Why: int64 division is ~3× the cost of a multiplication and a shift (0.10 against 0.03 ms per
    10^5 indices). With ``M = ⌈2^s/keys⌉`` and ``2^s > numel·keys``, ``(i·M) >> s = ⌊i/keys⌋`` for
    every ``i < numel``, and ``i·M < 2^63`` while ``numel < 2^31``; larger blocks divide.
    """
    if numel >= 1 << 31:
        return torch.div(index, keys, rounding_mode="floor", out=out)
    shift = (numel * keys).bit_length()
    return torch.mul(index, -(-(1 << shift) // keys), out=out).bitwise_right_shift_(shift)


def _newton_on_segments(
    values: Tensor,
    row: Tensor,
    tau: Tensor,
    rows: int,
    beta: float,
    buffers: _GatheredBuffers,
    keys: int,
) -> Tensor:
    """Normalised weights of gathered keys (``values``, their ``row``) by Newton from ``tau``.

    ``tau`` is at or below the root, or above it with the gathered keys chosen below it (then the
    first step lands below the root, ``h`` being convex). Each row is evaluated until its sum is
    within ``ROW_SUM_TOL`` (or τ stops moving); the weights of that evaluation are the result, so
    no separate final pass is needed. Rows are checked from evaluation ``_FIRST_CHECK + 1`` on (by
    then every row is below the root, so a step ≤ 0 means τ no longer moves). When a check leaves
    at most ``_FINISH_SHARE`` of the rows unsettled (measured from :func:`_equal_keys_start` at the
    3rd evaluation: 0–24 % at α 1.55–1.9, σ 1–3; after a 4th, 0–0.2 %), those rows are gathered
    and go on alone (:func:`_finish_unsettled`, once), instead of every row paying for the one or
    two more evaluations a few need.

    Rows whose last Newton step is within :func:`_linear_rows_limit` (``keys``: the rows' length)
    need neither: they are finished to first order from the last evaluation
    (:func:`_finish_linear_rows`). A row that stops with a wrong sum (τ no longer moves in float32)
    is finished in float64 too, whatever the share. Rows of more than ``_FLOAT32_ROW_KEYS`` keys:
    the final sums are taken again in float64, and the checks and steps with them. The key-sized
    arrays come from ``buffers`` (the result is one of them).
    """
    n = values.numel()
    sums = torch.empty(2, rows, dtype=values.dtype, device=values.device)
    parts = buffers.get("parts", n, values.dtype, lead=2)  # t^(β−1), t^β
    shifted, gathered = buffers.get("shifted", n, values.dtype), buffers.get("tau", n, values.dtype)

    def evaluate() -> None:
        # Keys off the support sit at 2^-126 instead of 0: their power is exactly 0 (see _moments).
        _shifted(values, torch.index_select(tau, 0, row, out=gathered), shifted, _LOG_FLOOR)
        lower = _exp2_scaled_(_log2(shifted, parts[0]), beta - 1.0)
        torch.mul(lower, shifted, out=parts[1])
        sums.zero_().index_add_(1, row, parts)

    # The per-row arithmetic is numpy's, on views of these tensors (see _RowSteps).
    limit = _linear_rows_limit(beta, keys)
    steps = _RowSteps(sums, tau, beta, limit)
    steps.iterate(evaluate)
    settled, linear, step = steps.settled, steps.linear, steps.step  # numpy, one value per row
    if keys > _FLOAT32_ROW_KEYS and values.dtype == torch.float32:
        # float64 row sums: index_add_ adds a row's terms one after the other, and in float32 terms
        # below half an ulp of the running sum vanish (a weight ~1 then 2047 tied keys of 4e-8 summed
        # to the first alone: the row looked settled, and was 8e-5 off once normalised). The checks
        # and the linear rows' steps are taken again on them.
        sums = torch.zeros(2, rows, dtype=torch.float64, device=values.device).index_add_(
            1, row, parts.double()
        )
        exact = _RowSteps(sums, tau, beta, limit)
        exact.newton()
        exact.check()
        settled = settled & exact.settled
        linear, step = exact.linear & ~settled, exact.step
    weights = _finish_linear_rows(parts, row, sums, step, linear, beta, gathered)
    pending = ~(settled | linear)
    if pending.any():
        start = tau.numpy().astype(np.float64) + step  # of the float64 finish: not rounded to float32
        return _finish_unsettled(values, row, start, pending, weights, beta)
    return weights


def _finish_linear_rows(
    parts: Tensor,
    row: Tensor,
    sums: Tensor,
    step: np.ndarray,
    linear: np.ndarray,
    beta: float,
    scratch: Tensor,
) -> Tensor:
    """Normalised weights of gathered keys from an evaluation (``parts``: ``t^(β−1)``, ``t^β``; its
    row ``sums``), the ``linear`` rows' advanced by their Newton ``step`` to first order (see
    :func:`_linear_rows_limit`), in place in ``parts[1]`` (``scratch``: a key-sized buffer).

    Why: a row whose last step is within the limit needs no further evaluation. Every key is
    normalised, by ``F − βδ·D`` on the linear rows, whose keys then lose ``βδ·t^(β−1)/(F − βδ·D)``
    (0 elsewhere): a gather and two passes more than normalising. Finishing only the linear rows'
    runs of keys, in numpy, was no faster even for 8 rows of 20k (per-op costs).
    """
    if not linear.any():
        return parts[1].div_(torch.index_select(sums[1].to(parts.dtype), 0, row, out=scratch))
    # βδ per row, 0 where the row is not finished linearly; the sum F − βδ·D of the expansion.
    shift = torch.from_numpy(np.where(linear, step * beta, 0.0)).to(sums.dtype)
    exact = torch.addcmul(sums[1], shift, sums[0], value=-1.0).clamp_min_(_TINY)
    weights = parts[1].div_(torch.index_select(exact.to(parts.dtype), 0, row, out=scratch))
    drop = torch.index_select(shift.div_(exact).to(parts.dtype), 0, row, out=scratch)
    return weights.addcmul_(parts[0], drop, value=-1.0).clamp_min_(0.0)


def _runs_of_rows(row: np.ndarray, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The keys of the ``chosen`` rows (sorted) in gathered keys whose ``row`` is sorted: each key's
    position in ``chosen`` (0 … len − 1) and its index.

    Each row's keys are one contiguous run (the keys come from a row-major ``nonzero``), found by
    binary search instead of a pass over all the keys: the j-th chosen key is key j − offset[r] of
    its row r's run, offset being the runs' exclusive sums.
    """
    first = np.searchsorted(row, chosen)
    counts = np.searchsorted(row, chosen, side="right") - first
    sub_row = np.repeat(np.arange(chosen.size), counts)
    return sub_row, np.arange(sub_row.size) + np.repeat(first - (np.cumsum(counts) - counts), counts)


class _RowSteps:
    """The per-row part of Newton for 1 < β < 2 (:func:`_newton_on_segments`, :func:`_whole_row_newton`),
    in numpy: the steps, the checks and the loop that runs the evaluations.

    Why numpy: these are ~20 small ops per evaluation on arrays of one value per row (~20k per
    chunk), where torch's per-op cost (dispatch, a fresh tensor each) dominated: 0.28 ms per
    evaluation against 0.16 ms in numpy, out of ~0.55 ms for the whole evaluation. ``sums``
    (``Σt^(β−1)``, ``Σt^β`` per row) and ``tau`` are CPU tensors seen through numpy views, so
    ``tau`` moves in place for the next evaluation.
    """

    def __init__(self, sums: Tensor, tau: Tensor, beta: float, linear_limit: float = 0.0) -> None:
        self._slope, self._total = sums.numpy()
        self._tau = tau.numpy()
        dtype = self._total.dtype.type
        self._exponent, self._tiny, self._tol = dtype(1.0 - 1.0 / beta), dtype(_TINY), dtype(ROW_SUM_TOL)
        self._limit = dtype(linear_limit)
        self.step = np.empty_like(self._total)
        self._settled = np.empty(self._total.shape, dtype=bool)
        self._linear = np.empty(self._total.shape, dtype=bool)
        self._done = np.empty(self._total.shape, dtype=bool)
        self._off = np.empty_like(self._total)

    def newton(self) -> None:
        """Newton on ‖t‖_β − 1 with F = Σt^β = ‖t‖_β^β and D = Σt^(β−1): δ = (F − F^(2−α))/D.

        A row with no key (F = 0) gets δ = 0 (log 0 = −∞, whose exp is 0).
        """
        step, total = self.step, self._total
        with np.errstate(divide="ignore"):
            np.log(total, out=step)
        step *= self._exponent
        np.exp(step, out=step)
        np.subtract(total, step, out=step)
        step /= np.maximum(self._slope, self._tiny)

    def check(self) -> tuple[int, int]:
        """How many rows still move (neither settled nor within the linear finish's limit, step > 0),
        and how many are not finished: neither settled nor within that limit (``linear_limit``, see
        :func:`_linear_rows_limit`).

        Rows that stopped (step ≤ 0) have their step set to 0, so that they stay where they are if
        the others take another evaluation; rows within the linear limit take their step then.
        """
        settled, linear, done, off = self._settled, self._linear, self._done, self._off
        np.abs(np.subtract(self._total, 1, out=off), out=off)
        np.less_equal(off, self._tol, out=settled)
        settled |= np.equal(self._total, 0, out=done)
        rows, count = settled.size, int(np.count_nonzero(settled))
        if count == rows:  # the usual last check: every row settled
            done.fill(True)
            linear.fill(False)
            return 0, 0
        np.less_equal(self.step, 0, out=done)
        done |= settled
        np.less_equal(self.step, self._limit, out=linear)
        np.greater(linear, done, out=linear)  # 0 < step ≤ limit, not settled
        np.putmask(self.step, done, 0)
        lin = int(np.count_nonzero(linear))
        return rows - int(np.count_nonzero(done)) - lin, rows - count - lin

    def iterate(
        self,
        evaluate: Callable[[], None],
        first_check: int = _FIRST_CHECK,
        finish_rows: float | None = None,
        subsets: bool = False,
    ) -> Tensor:
        """Evaluate (``evaluate`` fills the sums at the current τ) and step, until every row stops or
        the rows that are neither settled nor within the linear finish's limit are few enough
        (``finish_rows``, by default ``_FINISH_SHARE`` of the rows) to be finished alone, or, with
        ``subsets``, the rows still moving are few enough (``_SUBSET_SHARE``) to go on alone.

        Rows are checked from evaluation ``first_check + 1`` on: by then every row is below the
        root, so a step ≤ 0 means τ no longer moves at this precision and the row stops either way.
        Rows that stopped with a wrong sum are left to the caller's float64 finish, whatever their
        share (float32 τ steps can move a large tie group's mass by more than ``ROW_SUM_TOL``).
        Returns the settled rows of the last check; the last evaluation was at ``tau``, and its
        Newton step is in ``step`` (not added).
        """
        rows = self._total.size
        finish_rows = _FINISH_SHARE * rows if finish_rows is None else finish_rows
        go_on_alone = _SUBSET_SHARE * rows if subsets else 0
        for step_number in range(_CANDIDATE_ROUNDS):
            evaluate()
            self.newton()
            if step_number >= first_check:
                moving, wrong = self.check()
                if moving <= go_on_alone or 0 < wrong <= finish_rows:
                    return self.settled_rows()
            self._tau += self.step
        self.step.fill(0.0)  # never reached (see _CANDIDATE_ROUNDS); the last step is already in tau
        self._linear.fill(False)
        self._done.fill(True)
        return self.settled_rows()

    def settled_rows(self) -> Tensor:
        """The settled rows of the last check, as a new bool tensor."""
        return torch.from_numpy(self._settled.copy())

    @property
    def settled(self) -> np.ndarray:
        """The settled rows of the last check (a view, valid until the next check)."""
        return self._settled

    @property
    def linear(self) -> np.ndarray:
        """The rows of the last check to finish linearly (a view, valid until the next check)."""
        return self._linear

    def moving_rows(self) -> Tensor:
        """The rows of the last check that still move (neither settled nor within the linear limit,
        step > 0), as a new bool tensor."""
        return torch.from_numpy(~(self._done | self._linear))

    def linear_rows(self) -> Tensor:
        """The rows of the last check to finish linearly with their ``step`` (not settled, 0 < step ≤
        ``linear_limit``), as a new bool tensor."""
        return torch.from_numpy(self._linear.copy())


def _linear_rows_limit(beta: float, keys: int) -> float:
    """Largest Newton step δ > 0 after which a row of ``keys`` keys (1 < β < 2) may be finished to
    first order, ``(t − δ)₊^β ≈ max(t^β − βδ·t^(β−1), 0)`` (:func:`_finish_linear_rows`), instead of
    by another evaluation: ``K·δ^β ≤ ROW_SUM_TOL/4``.

    Why this bound: per key, the expansion is off by at most ``δ^β``. Keys with ``t ≥ 2δ`` by
    ``β(β−1)/2·δ²·ξ^(β−2)`` with ``ξ ≥ t − δ ≥ δ``; keys with ``δ ≤ t < 2δ`` weigh at most ``δ^β``
    either way (the expansion ``t^(β−1)(t − βδ) ≤ (2δ)^(β−1)(2 − β)δ``); keys with ``t < δ`` leave
    the support and come out exactly 0 (their expansion is negative: clamped). The clamp takes at
    most ``(β−1)^(β−1)·δ^β ≤ δ^β`` per key off the row sum ``F − βδ·D`` taken for the weights, so
    rows still sum to 1 within ``ROW_SUM_TOL``/4.

    Measured on q·kᵀ scores (σ 0.5–2, K 77–231): after the third evaluation every row that is not
    settled is within it at α 1.52–1.6, and most at 1.65–1.7, where 2–10 % of the rows were left to
    the float64 finish or (wide rows: 70–98 %) to a fourth evaluation; at α ≥ 1.8 it is below
    float32's resolution of the steps and finishes nothing.
    """
    return (ROW_SUM_TOL / (4.0 * keys)) ** (1.0 / beta)


def _settled(total: Tensor) -> Tensor:
    """Rows whose sum is within ``ROW_SUM_TOL`` of 1, or 0 (no finite key: nothing to settle)."""
    return ((total - 1.0).abs_() <= ROW_SUM_TOL).logical_or_(total == 0)


def _finish_unsettled(
    values: Tensor, row: Tensor, tau: np.ndarray, pending: np.ndarray, weights: Tensor, beta: float
) -> Tensor:
    """The ``pending`` rows' keys gathered and solved on in float64; their weights written into
    ``weights`` (normalised, the other rows' from the last evaluation), which is returned.

    The pending rows are few (at most ``_FINISH_SHARE`` of the rows, or rows float32 could not
    settle): their runs of keys are found by binary search (:func:`_runs_of_rows`). ``tau`` is the
    float64 start of their float64 Newton (:func:`_float64_segments`). The gathered path runs on
    CPU only, so this is numpy: the pending keys number from a handful to a few thousand, where
    torch's per-op overhead made a three-row finish cost 6 % of a chunk.
    """
    pending_rows = np.flatnonzero(pending)
    sub_row, keys = _runs_of_rows(row.numpy(), pending_rows)
    # float64, as in _settle_rows (tied keys at the edge)
    sub_weights = _float64_segments(values.numpy()[keys].astype(np.float64), sub_row, tau[pending_rows], beta)
    return weights.index_copy_(0, torch.from_numpy(keys), torch.from_numpy(sub_weights.astype(np.float32)))


def _float64_segments(values: np.ndarray, row: np.ndarray, tau: np.ndarray, beta: float) -> np.ndarray:
    """Normalised weights of a few gathered rows' keys by float64 Newton from ``tau`` (``row`` sorted).

    One step from any start lands below the root (h is convex), so rows are checked from the second
    evaluation on: settled when the sum is within ``ROW_SUM_TOL`` (or 0: no key), or when τ no
    longer moves (step ≤ 0), within ``_FALLBACK_ROUNDS`` evaluations (never reached).

    Key-sized arrays are allocated once; ``t^(β−1)`` is taken of ``t`` floored at the smallest
    normal float64, then zeroed off the support; row sums are ``reduceat`` over the runs. Why:
    numpy's float64 ``pow`` of 0 (and its masked loop) took 4× the time with a quarter of the keys
    off the support (0.64 against 0.16 ms on 70k keys: a padded prompt's pending rows at α = 1.8),
    ``bincount`` 9× that of ``reduceat`` (0.21 against 0.024 ms), and fresh arrays of this size
    cost a page fault per page: 2.5–3× faster in all (α = 1.8 there: 4.0 → 1.6 ms per chunk).
    """
    count, exponent = tau.size, 1.0 - 1.0 / beta
    tau = tau.copy()
    t, lower, inside = np.empty_like(values), np.empty_like(values), np.empty(values.shape, dtype=bool)
    # Each row's keys are one run (row is sorted): its sum by reduceat; rows with no key sum to 0.
    runs = np.bincount(row, minlength=count)
    starts = np.minimum(np.cumsum(runs) - runs, max(row.size - 1, 0))
    empty = np.flatnonzero(runs == 0)

    def row_sums(x: np.ndarray) -> np.ndarray:
        if not x.size:
            return np.zeros(count)
        sums = np.add.reduceat(x, starts)
        sums[empty] = 0.0
        return sums

    for evaluation in range(_FALLBACK_ROUNDS):
        np.take(tau, row, out=t, mode="clip")  # rows are in range: no bounds check
        np.maximum(np.subtract(values, t, out=t), 0.0, out=t)
        np.greater(t, 0.0, out=inside)
        if beta == 1.0:
            lower[...] = inside  # t⁰ on the support only
        else:
            np.power(np.maximum(t, _FLOAT64_NORMAL, out=lower), beta - 1.0, out=lower)
            lower *= inside
        powered = np.multiply(lower, t, out=t)
        total, slope = row_sums(powered), row_sums(lower)
        step = (total - np.power(total, exponent)) / np.maximum(slope, _TINY)
        if evaluation > 0:
            done = (np.abs(total - 1.0) <= ROW_SUM_TOL) | (total == 0.0) | (step <= 0.0)
            if done.all():
                break
            step[done] = 0.0
        tau += step
    return np.divide(powered, np.maximum(total, _TINY)[row], out=powered)


def _halley_solve(
    x: Tensor | ScaledScores,
    beta: float,
    ws: Workspace | None,
    tau: Tensor | None = None,
    robust: bool = False,
) -> UnnormalisedRows:
    """α-entmax for a fractional β > 2 (1.05 ≤ α < 1.5): Halley steps, then a second-order finish.

    Why: each evaluation of ``Σ(x − τ)₊^β`` needs a fractional power of every key (~10× a
    multiplication), so the number of evaluations is the cost. Gathering the keys that can get
    weight, as for α > 1.5, does not pay here: on the benchmark's scores 25–100 % of the keys are
    in the support (α 1.4 → 1.1), and the gathering alone costs about one such power pass.
    One evaluation of ``t^(β−2)`` (``t = (x − τ)₊``) gives ``Σt^β``, ``Σt^(β−1)`` and ``Σt^(β−2)``:
    enough for a Halley step (cubic convergence) on ``h(τ) = ‖t‖_β``, and for the weights at the
    stepped τ by a Taylor expansion in the step (:func:`_taylor_weights`), with no further power.
    From :func:`_halley_start`, at most two evaluations bring nearly every row to a step within
    :func:`_step_tolerance` (rows of wide scores: one). After each evaluation, while more than a
    quarter of the rows still step further, all rows go on; otherwise the few left go on alone.
    On CPU an evaluation after the first takes ``t^β`` and ``t^(β−1)`` first (:func:`_top_moments`):
    rows whose Newton step from there is within :func:`_linear_step_limit` are finished to first
    order (:func:`_linear_weights`), which spares the curvature's two passes and a pass of the
    finish (~10 % of the solve). When those are all but at most ``_LINEAR_FINISH_SHARE`` of the rows,
    it is the last evaluation, and the other rows alone take the curvature and the second-order
    finish (:func:`_finish_far_rows`); otherwise every row does. Measured on Gaussian scores at
    K = 77: every row within the limit at α 1.3 and 1.45, 2–3 % of them beyond it at α 1.4, more
    around α 1.42 and at K = 231 (there every row takes the curvature). Newton's own error there
    moves the sum by at most ``β(β−1)/2·Σt^(β−2)·δ² ≤ ROW_SUM_TOL/4`` (``Σt^(β−2) ≤ K`` for β > 2,
    t ≤ 1), the same bound. Not within ``_step_tolerance``: that bound is for Halley's (cubically
    exact) step; Newton's step there was up to 1e-5 off with many keys at the edge.

    Safeguards: iterates stay in the root's bracket ``[−1, −K^(−1/β)]`` (the maximum key alone gives
    Σ ≥ 1 at −1, and K keys ≤ 0 give Σ ≤ 1 at −K^(−1/β)); from the start, Halley's steps went past
    the maximum key on a cluster of tied keys, and a row with no key left above τ got zero weights.
    After the first evaluation, a row above the root (sum below 1) takes Newton's step, which lands
    below it, so that its last step is rarely negative. From the start it takes Halley's step like
    every row (on CPU): Newton's error there is quadratic, and after it 8 % of the rows at α = 1.45
    stepped beyond the linear finish's limit in the next evaluation (Halley's: one in 10^4).
    Rows where Halley and Newton still cycle around a kink (tied keys
    entering the support) are left unsettled and go on alone, ``robust``: with Newton's steps for
    good once they overshoot (:func:`_safeguarded_step`).

    ``tau`` (a start) is for those gathered rows. Returns the weights and their row sums (fully
    masked rows: zeros), in a workspace buffer when one is given.
    """
    if ws is None:
        t, powered, weights = _empty_like(x), _empty_like(x), _empty_like(x)
    else:
        t, powered, weights = ws.get("t", x), ws.get("p", x), ws.get("l", x)
    rows, keys = x.shape
    tolerance = _step_tolerance(beta, keys)
    upper = -(keys ** (-1.0 / beta))
    if tau is None:
        tau = _halley_start(x, beta, ws, t, powered, weights)
    tau.clamp_(-1.0, upper)
    flags = torch.zeros((rows, 2), dtype=torch.bool, device=x.device) if robust else None
    pending, third_order = None, False
    on_cpu, linear_limit = cpu_variant(x), _linear_step_limit(beta, keys)
    for evaluation in range(1, _HALLEY_ROUNDS + 1):
        if not on_cpu:
            moments = _moments(x, tau, beta - 2.0, t, powered, weights)
        else:
            # The power first, its two sums, then (not in a last evaluation) the curvature's sum.
            total, first = _top_moments(x, tau, beta, t, powered)
            if evaluation > 1:
                newton = _newton_step(total, first, beta)
                far = torch.le(newton.abs(), linear_limit).logical_not_().squeeze(-1)  # NaN: far
                count = int(far.sum())
                if count == 0 or (not robust and count <= _LINEAR_FINISH_SHARE * rows):
                    newton.masked_fill_(far.unsqueeze(-1), 0.0)
                    # In place in t when no far row needs it later: an in-place pass takes about
                    # half the time on CPU, and the weights buffer is then never touched.
                    out = t if count == 0 else weights
                    finished = _linear_weights(t, powered, newton, beta, out)
                    # Σ(t^β − βδ·t^(β−1)) = F − βδ·M1: no pass for the row sums. The clamp of
                    # keys leaving the support takes at most ~K·((β−1)δ)^(β−1)·δ from a row, under
                    # 2e-7 within the linear finish's limit.
                    sums = torch.addcmul(total, newton, first, value=-beta)
                    if count:
                        _finish_far_rows(
                            x, tau, t, powered, (total, first), far, beta, tolerance, finished, sums
                        )
                    return UnnormalisedRows(finished, sums.clamp_min_(_TINY))
            moments = total, first, powered.div_(t).sum(-1, keepdim=True)
        step, halley = _safeguarded_step(flags, *moments, beta)
        if on_cpu and flags is None and evaluation == 1:
            # From the start, Halley's step for every row, above the root too: its error is cubic,
            # so nearly every row's next Newton step is within the linear finish's limit (measured at
            # α = 1.45, σ = 1: 1 row in 10^4 over it, against 8.5 % after Newton's step from above).
            step = halley
        # Settled rows finish with Halley's step (the more accurate one), so it is the one checked.
        unsettled = halley.abs().squeeze(-1) > tolerance
        _flag_crossing_keys(x, tau, halley, beta, unsettled)
        count = int(unsettled.sum())
        if on_cpu and flags is None and 4 * count > rows and beta >= _THIRD_ORDER_MIN_BETA:
            # A third-order finish, if it lets all but a quarter of the rows finish now.
            wider = halley.abs().squeeze(-1) > _third_order_tolerance(beta, keys)
            _flag_crossing_keys(x, tau, halley, beta, wider)
            wider_count = int(wider.sum())
            if 4 * wider_count <= rows:
                third_order, unsettled, count = True, wider, wider_count
        if count == 0 or (robust and evaluation == _HALLEY_ROUNDS):
            break
        if 4 * count <= rows or evaluation == _HALLEY_ROUNDS:
            pending = unsettled.nonzero().squeeze(-1)
            break
        tau.add_(step).clamp_(-1.0, upper)
    finish = _third_order_weights if third_order else _taylor_weights
    out = finish(t, powered, halley, beta, weights)
    if pending is not None:
        start = tau.index_select(0, pending).add_(step.index_select(0, pending))
        sub = _halley_solve(x.index_select(0, pending), beta, None, start, robust=True)
        out.index_copy_(0, pending, sub.normalised_())
    return UnnormalisedRows(out, out.sum(-1, keepdim=True).clamp_min_(_TINY))


def _finish_far_rows(
    x: Tensor | ScaledScores,
    tau: Tensor,
    t: Tensor,
    lower: Tensor,
    moments: tuple[Tensor, Tensor],
    far: Tensor,
    beta: float,
    tolerance: float,
    out: Tensor,
    sums: Tensor,
) -> None:
    """The ``far`` rows of ``out`` (Newton step over the linear finish's limit) by Halley's step and
    the second-order finish, as every row took before; rows even that cannot finish are solved on alone.

    Why: one row over the limit used to send every row through the curvature's two passes and the
    second-order finish (~10 % of the solve at α = 1.45); now only the far rows (at most
    ``_LINEAR_FINISH_SHARE``) are gathered for them. ``t``, ``lower`` (``t^(β−1)``) and ``moments``
    (``Σt^β``, ``Σt^(β−1)``) are this evaluation's, at ``tau``; ``out`` is normalised afterwards,
    by ``sums``, whose far rows are written here.
    """
    index = far.nonzero().squeeze(-1)
    t_far = t.index_select(0, index)
    lowest = lower.index_select(0, index).div_(t_far)  # t^(β−2); floored keys: 0/t = 0
    total, first = moments[0].index_select(0, index), moments[1].index_select(0, index)
    step, halley = _safeguarded_step(None, total, first, lowest.sum(-1, keepdim=True), beta)
    weights = _taylor_weights(t_far, lowest, halley, beta, torch.empty_like(t_far))
    unsettled = halley.abs().squeeze(-1) > tolerance
    _flag_crossing_keys(x, tau, halley, beta, unsettled, rows=index)
    if bool(unsettled.any()):
        pending = unsettled.nonzero().squeeze(-1)
        start = tau.index_select(0, index).index_select(0, pending).add_(step.index_select(0, pending))
        rows = index.index_select(0, pending)
        sub = _halley_solve(x.index_select(0, rows), beta, None, start, robust=True)
        weights.index_copy_(0, pending, sub.normalised_())
    out.index_copy_(0, index, weights)
    sums.index_copy_(0, index, weights.sum(-1, keepdim=True))


def _flag_crossing_keys(
    x: Tensor | ScaledScores,
    tau: Tensor,
    step: Tensor,
    beta: float,
    unsettled: Tensor,
    rows: Tensor | None = None,
) -> None:
    """Mark unsettled (in place) the rows a final step ``δ`` would finish wrongly: keys that cross
    τ in it, entering the support (in ``(τ + δ, τ]``, δ < 0) or leaving it (in ``(τ, τ + δ]``, δ > 0).

    Why: the sums have a kink where a key crosses τ, so Halley's step across it is only first-order
    exact, and the second-order finish is wrong there too: entering keys, each owed up to
    ``|δ|^β``, get 0. Measured: a step just within :func:`_step_tolerance` from a start above the
    root left a tie group just below it at 0 (1.3e-5 off at α = 1.49, K = 77, 75 tied keys); one
    from below stepped over 150 tied keys just below the root (4.2e-5 off at α = 1.4999, K = 158:
    the row summed to 1 − 1.5e-4 before it was renormalised). Only rows whose step exceeds
    ``(ROW_SUM_TOL/4K)^(1/β)`` in size, where a crossing could matter, are looked at (few rows on
    Gaussian scores; the final steps are usually ~1e-6); the rows marked go on like any unsettled
    row. ``rows``: the rows of ``x`` and ``tau`` that ``step`` and ``unsettled`` are about (all
    when None), so that only candidates are gathered.
    """
    limit = (ROW_SUM_TOL / (4.0 * x.shape[-1])) ** (1.0 / beta)
    candidates = ((step.squeeze(-1).abs() > limit) & ~unsettled).nonzero().squeeze(-1)
    if candidates.numel() == 0:
        return
    source = candidates if rows is None else rows.index_select(0, candidates)
    picked = x.index_select(0, source)
    scores = picked.centred * picked.scale if isinstance(picked, ScaledScores) else picked
    tau_c, step_c = tau.index_select(0, source), step.index_select(0, candidates)
    low, high = torch.minimum(tau_c, tau_c + step_c), torch.maximum(tau_c, tau_c + step_c)
    crossing = ((scores > low) & (scores <= high)).any(-1)
    unsettled.index_fill_(0, candidates[crossing], True)


def _near_softmax_solve(
    centred: Tensor, alpha: float, ws: Workspace | None, u: Tensor | None = None
) -> Tensor:
    """α-entmax for β = 1/(α − 1) > ``FLOAT32_MAX_BETA`` (1 < α < 1.05) in float32: Halley on ``u``.

    Why: there ``x − τ`` is close to 1, so τ would need ~log10(β) more digits than float32 has
    (the former float64 search cost 3.5× the α = 1.5 attention). Instead the weights are
    ``p = exp(u + β·log1p(v))`` with ``v = (α − 1)·s·e^(−(α−1)u)`` (``s`` the centred scores,
    ``u = log p_max``; ``v ≤ −1`` gives 0): every quantity keeps float32 relative precision,
    because u is O(log K), ``log1p`` is exact for small arguments and ``β·log1p(v) ≈ s``.
    ``Φ(u) = Σp`` increases with u; Halley on ``log Φ`` (:func:`_near_softmax_step`) from
    ``u = −logsumexp(s)`` (the root as α → 1) settles nearly every row at the second evaluation
    (measured: α 1.0001–1.049, σ 1–10; 20 % of the rows at α = 1.049, σ = 1, need a third), and
    an evaluation that only checks needs no derivatives. While more than a quarter of the rows
    are unsettled all rows go on; otherwise the rest go on alone. ``u`` (a start) is for those.
    Returns normalised weights (fully masked rows: zeros), in a workspace buffer when one is given.
    """
    if ws is None:
        v, p, q = torch.empty_like(centred), torch.empty_like(centred), torch.empty_like(centred)
    else:
        v, p, q = ws.get("x", centred), ws.get("t", centred), ws.get("p", centred)
    a, beta = alpha - 1.0, 1.0 / (alpha - 1.0)
    if u is None:  # −log Σ exp(s); fully masked rows get 0
        u = _exp_into(centred, q).sum(-1, keepdim=True).log_().neg_().clamp_max_(0.0)
    rows = centred.shape[0]
    # Rows whose u no longer moves (float32 has converged) count as settled, whatever their sum.
    stuck = torch.zeros_like(u, dtype=torch.bool)
    pending = None
    for evaluation in range(1, _HALLEY_ROUNDS + 1):
        total = _near_softmax_weights(centred, u, a, beta, v, p, q)
        if evaluation > 1:
            # Φ = 0: no finite key, nothing to settle (its weights stay 0).
            unsettled = ((total - 1.0).abs_() > ROW_SUM_TOL).logical_and_(total > 0).logical_and_(~stuck)
            count = int(unsettled.sum())
            if count == 0 or evaluation == _HALLEY_ROUNDS:
                break
            if 4 * count <= rows:
                pending = unsettled.squeeze(-1).nonzero().squeeze(-1)
                break
        step = _near_softmax_step(p, v, q, total, beta)
        stepped = u + step
        stuck = stepped == u
        u = stepped.clamp_max_(0.0)
    out = p.div_(total.clamp_min_(_TINY))
    if pending is not None:
        sub = _near_softmax_solve(centred.index_select(0, pending), alpha, None, u.index_select(0, pending))
        out.index_copy_(0, pending, sub)
    return out


def _near_softmax_weights(
    centred: Tensor, u: Tensor, a: float, beta: float, v: Tensor, p: Tensor, scratch: Tensor
) -> Tensor:
    """``p = exp(u + β·log1p(v))`` into ``p`` (``v = max(a·s·e^(−a·u), −1)`` into ``v``); returns Σp."""
    torch.mul(centred, torch.mul(u, -a).exp_().mul_(a), out=v).clamp_min_(-1.0)
    log_w = torch.log1p(v, out=scratch)
    if cpu_variant(centred) and exp2_is_faster():  # as in _exp_into; log₂e folded into the add
        y = torch.add(u * _LOG2_E, log_w, alpha=beta * _LOG2_E, out=p)
        _exp2_flushed_(y, _mostly_slow_for_exp(y, _EXP_SLOW_BELOW * _LOG2_E))
    else:
        _exp_into(torch.add(u, log_w, alpha=beta, out=p), p)
    return p.sum(-1, keepdim=True)


def _near_softmax_step(p: Tensor, v: Tensor, scratch: Tensor, total: Tensor, beta: float) -> Tensor:
    """Halley's step on ``log Φ(u)`` from the weights ``p`` and ``v`` of one evaluation (``v`` consumed).

    ``Φ' = Σ p/w`` and ``Φ'' = Σ p·(1 + v/β)/w²`` with ``w = 1 + v`` (``dv/du = −v/β``); with
    ``f = log Φ``, ``f' = Φ'/Φ`` and ``f'' = Φ''/Φ − f'²``, the step is ``−(f/f')/(1 − f·f''/(2f'²))``,
    the correction kept in [1/2, 2] as in :func:`_halley_step`. Rows with Φ = 0 get 0.
    """
    w = v.add_(1.0).clamp_min_(_TINY)  # keys with v = −1 have p = 0: their p/w is 0, not 0/0
    first = torch.div(p, w, out=scratch).sum(-1, keepdim=True)
    # Φ'' = Σ (p/w²)·(1 − 1/β + w/β) = (1 − 1/β)·Σ p/w² + Φ'/β.
    second = scratch.div_(w).sum(-1, keepdim=True).mul_(1.0 - 1.0 / beta).add_(first, alpha=1.0 / beta)
    norm = total.clamp_min(_TINY)
    f = norm.log()
    slope = first.div_(norm).clamp_min_(1.0)  # Σ(p/w)/Σp ≥ 1 as w ≤ 1; rows with Φ = 0 get 1, not 0/0
    curvature = second.div_(norm).sub_(slope * slope)
    newton = f.div(slope).neg_()
    correction = (f * curvature).div_(slope * slope).mul_(-0.5).add_(1.0).clamp_(0.5, 2.0)
    return newton.div_(correction).mul_(total > 0)


def _linear_step_limit(beta: float, keys: int) -> float:
    """Largest Newton step |δ| whose first-order finish (:func:`_linear_weights`) keeps a row's sum
    within ``ROW_SUM_TOL``/4 (β > 2).

    The remainder of ``(t − δ)^β`` after ``t^β − βδ·t^(β−1)`` is ``β(β−1)/2·δ²·ξ^(β−2)`` with
    ``ξ ≤ 1 + |δ|`` (t ≤ 1), so at most ``K·β(β−1)/2·δ²`` per row. Measured on Gaussian scores
    (σ 0.5–2), with Halley's step from the start: the second evaluation's Newton steps are at most
    4e-6 at α = 1.3 (limit 2.9e-5 at K = 77) and within the limit for all but ~1 row in 10^4 at
    α = 1.45 (limit 4.9e-5); rows over it take the curvature (:func:`_finish_far_rows`).
    """
    return math.sqrt(ROW_SUM_TOL / (2.0 * beta * (beta - 1.0) * keys))


def _top_moments(
    x: Tensor | ScaledScores, tau: Tensor, beta: float, t: Tensor, lower: Tensor
) -> tuple[Tensor, Tensor]:
    """``Σt^β`` and ``Σt^(β−1)`` of ``t = (x − τ)₊`` (β > 2, CPU), keeping ``t``, and ``t^(β−1)`` in
    ``lower``.

    The highest power first, summed, then divided by t in place (an in-place pass takes about half
    the time of one into a second buffer on CPU): keys floored at :func:`_underflow_floor` give
    exactly 0 at the power β > 2, so no pass is needed to zero them, and 0/t is 0.
    """
    _exp2_scaled_(_log2(_shifted(x, tau, t, _underflow_floor(beta)), lower), beta, floored=False)
    total = lower.sum(-1, keepdim=True)
    return total, lower.div_(t).sum(-1, keepdim=True)


def _linear_weights(t: Tensor, lower: Tensor, step: Tensor, beta: float, out: Tensor) -> Tensor:
    """``(t − δ)₊^β`` to first order, ``t^β − βδ·t^(β−1) = (t − βδ)·t^(β−1)``, into ``out``.

    For the last evaluation, whose steps are within :func:`_linear_step_limit`: two passes instead
    of the curvature's two and the second-order finish's three. A key with ``t < βδ`` would come
    out negative (by at most ``(βδ)^β``): such keys leave the support, so they are clamped to 0,
    which costs a pass only when some step is positive. Keys off the support (``t^(β−1) = 0``) get 0.
    """
    out = torch.sub(t, step * beta, out=out).mul_(lower)
    return out.clamp_min_(0.0) if float(step.max()) > 0.0 else out


def _step_tolerance(beta: float, keys: int) -> float:
    """Largest final Halley step |δ| whose second-order finish keeps a row's sum within ROW_SUM_TOL/4.

    The third-order remainder of ``(t − δ)^β`` is ``β(β−1)(β−2)/6·δ³·ξ^(β−3)``: at most ``C·δ³`` per
    key for β ≥ 3 (``t ≤ 1``), and ``C·δ^β`` for 2 < β < 3 (keys with ``t < 2δ`` weigh ``O(δ^β)``
    whatever the expansion). Measured: 1e-7 against a float64 oracle at this bound. A final δ < 0
    also lets keys enter the support with weight 0 (off by up to ``|δ|^β`` each, with no factor
    ``C``); a bound for that alone (``(ROW_SUM_TOL/4K)^(1/β)``) sent 7 % of the rows at α = 1.49 to
    another evaluation (+12 % time), although most have no key there. Instead, rows with a step
    beyond that bound, of either sign, are checked for keys it carries across τ
    (:func:`_flag_crossing_keys`): a tie group just below a start above the root was left at 0,
    1.3e-5 off at α = 1.49, and one just below the root, stepped over from below, 4.2e-5 off at
    α = 1.4999 (the kink makes Halley's step there only first-order exact).
    """
    remainder = beta * (beta - 1.0) * (beta - 2.0) / 6.0
    return (ROW_SUM_TOL / (4.0 * keys * max(remainder, 1e-3))) ** (1.0 / min(beta, 3.0))


def _halley_start(
    x: Tensor | ScaledScores, beta: float, ws: Workspace | None, t: Tensor, powered: Tensor, scratch: Tensor
) -> Tensor:
    """A pow-free start for :func:`_halley_solve`: mapped from the ℓ2 root near α = 1.5, else interpolated.

    For β < ``_L2_START_MAX_BETA`` (α > 1.4255) the β root is close to the ℓ2 one, and the ℓ2 bound
    mapped as for equal keys (:func:`_equal_keys_start`) lands nearer to it (median 6e-3 against
    2e-2 at α = 1.45, σ = 1) for fewer passes than :func:`_interpolated_start`. Measured at K 77
    and 231, σ 0.3–10: from α 1.43 on, no row then needs a third evaluation at σ ≤ 1 (interpolated:
    up to 900 rows of 4096 at α = 1.49); below α 1.42 the interpolated start needs fewer. On CPU,
    where the ℓ2 bound costs fewer passes, the mapped start pays down to α = 1.25 even so
    (``_L2_START_MAX_BETA_CPU``). ``t`` and ``powered`` are the workspace's "t" and "p" buffers (or
    scratch when ``ws`` is None).
    """
    if beta < (_L2_START_MAX_BETA_CPU if cpu_variant(x) else _L2_START_MAX_BETA):
        return _equal_keys_start(_l2_bound(x, ws), beta)
    return _interpolated_start(x, beta, t, powered, scratch)


def _interpolated_start(
    x: Tensor | ScaledScores, beta: float, t: Tensor, powered: Tensor, scratch: Tensor
) -> Tensor:
    """A pow-free start for fractional β > 2 from the whole norms on either side, n = ⌊β⌋ and n + 1.

    One pass of whole powers ``t^(n−2) … t^(n+1)`` at the power-mean bound gives a Halley step
    towards the root of ``‖(x − τ)₊‖_n = 1`` and one towards that of ``‖·‖_(n+1)``; the β root lies
    between those roots (``‖·‖_p`` decreases in p), and interpolating the two steps in 1/p lands
    within ~1e-2 of it on unit-variance Gaussian scores (~1e-3 on wider ones). Measured: no row then
    needs a third evaluation with a fractional power at α 1.26–1.48, K 77–231 (a step towards the
    ⌈β⌉ root alone: up to all rows near α = 1.5), and with wide scores most rows need only one.
    The CPU variant (which takes this start for β ≥ 4, α ≤ 1.25) interpolates in 1/√p instead: on
    scores of σ ≤ 1 the start then lands within the one-evaluation tolerance (:func:`_step_tolerance`)
    for 93–100 % of the rows at α 1.13–1.15 (1/p: 4–93 %; σ = 0.5: up to 99 % at α 1.19, against
    0 %), for a few percent fewer at σ = 3. Measured per chunk: up to 20 % faster at σ = 0.5, 5–10 %
    at σ = 1, α 1.13–1.15, within ±4 % elsewhere.
    """
    low = math.floor(beta)
    tau = _power_mean_bound(x, low + 1)
    total, first, second = _moments(x, tau, low - 2.0, t, powered, scratch)  # Σt^n, Σt^(n−1), Σt^(n−2)
    above = scratch.mul_(t).sum(-1, keepdim=True)  # Σt^(n+1): scratch held t^n
    step_low = _halley_step(total, first, second, float(low))
    step_high = _halley_step(above, total, first, float(low + 1))
    if cpu_variant(x):  # in 1/√p: see the docstring
        share = (low**-0.5 - beta**-0.5) / (low**-0.5 - (low + 1) ** -0.5)
    else:
        share = (1.0 / low - 1.0 / beta) * low * (low + 1)  # (1/n − 1/β)/(1/n − 1/(n+1))
    return tau.add_(step_low.lerp_(step_high, share))


def _moments(
    x: Tensor | ScaledScores, tau: Tensor, exponent: float, t: Tensor, powered: Tensor, scratch: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``Σt^(e+2), Σt^(e+1), Σt^e`` of ``t = (x − τ)₊`` with one power.

    ``t`` and ``t^e`` are kept (in ``t`` and ``powered``) and ``scratch`` is left holding ``t^(e+2)``.
    For e = 0, ``t⁰`` is 1 on the support only, so ``Σt⁰`` counts the keys in it. A fractional e is
    the GPU variant's (one ``pow`` launch): on CPU :func:`_halley_solve` takes :func:`_top_moments`.
    """
    if exponent == 0.0:  # t⁰ is 1 on the support: its sum counts the support, and t·t⁰ is t
        _shifted(x, tau, t)
        count = _support(t, powered).sum(-1, keepdim=True)
        return torch.mul(t, t, out=scratch).sum(-1, keepdim=True), t.sum(-1, keepdim=True), count
    if _is_whole(exponent):
        _shifted(x, tau, t)
        powered = t if exponent == 1.0 else _power(t, exponent, powered)  # no copy for t¹
    else:  # one launch instead of four: GPUs are launch-bound here, not bound by pow
        powered = torch.pow(_shifted(x, tau, t), exponent, out=powered)
    product = torch.mul(powered, t, out=scratch)
    first = product.sum(-1, keepdim=True)
    return product.mul_(t).sum(-1, keepdim=True), first, powered.sum(-1, keepdim=True)


def _halley_step(total: Tensor, first: Tensor, second: Tensor, beta: float) -> Tensor:
    """Halley step on ``h(τ) = (Σt^β)^(1/β) − 1`` from ``F = Σt^β``, ``M1 = Σt^(β−1)``, ``M2 = Σt^(β−2)``.

    ``h' = −h·M1/F`` and ``h'' = (β − 1)·h/F·(M2 − M1²/F) ≥ 0``. The step is Newton's,
    ``δ = (h − 1)·F^(1 − 1/β)/M1``, times ``1/(1 − ε)`` with ``ε = δ·h''/(2|h'|)``, kept in [1/2, 2]
    so a poor curvature estimate cannot run away. Rows with no finite key (F = M1 = 0) get 0.
    """
    return _halley_and_newton_steps(total, first, second, beta)[0]


def _newton_step(total: Tensor, first: Tensor, beta: float) -> Tensor:
    """Newton's step on ``h(τ) = (Σt^β)^(1/β) − 1`` from ``F = Σt^β`` and ``M1 = Σt^(β−1)`` (new tensor).

    ``δ = (h − 1)·F^(1−1/β)/M1 = (1 − F^(−1/β))·F/M1``, with ``F^(−1/β)`` by one :func:`_row_power`;
    F and M1 are clamped in the power and the division only, so rows with F = 0 get 0.
    """
    return (
        _row_power(total.clamp_min(_TINY), -1.0 / beta)
        .neg_()
        .add_(1.0)
        .mul_(total)
        .div_(first.clamp_min(_TINY))
    )


def _halley_and_newton_steps(
    total: Tensor, first: Tensor, second: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """:func:`_halley_step` and the Newton step it corrects (:func:`_newton_step`; new tensors).

    Halley's is Newton's divided by ``1 − ε`` with ``ε = (M2/M1 − M1/F)·δ·(β − 1)/2``.
    """
    newton = _newton_step(total, first, beta)
    eps = torch.div(second, first.clamp_min(_TINY)).sub_(first.div(total.clamp_min(_TINY)))
    eps.mul_(newton).mul_((beta - 1.0) / 2.0)
    return newton.div(eps.clamp_(-1.0, 0.5).neg_().add_(1.0)), newton


def _safeguarded_step(
    flags: Tensor | None, total: Tensor, first: Tensor, second: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """The step to take (Newton's where Halley's could cycle) and Halley's step.

    ``h`` is convex and decreasing, so Newton's step from either side lands at or below the root, and
    from below it climbs monotonically, while Halley's (up to twice Newton's) can overshoot. Around
    a kink (tied keys entering the support) the two cycled: up past the root by Halley, back below
    it by Newton, for ever (measured: integer-valued scores at α 1.48–1.4999).
    Without ``flags``, a row above the root (sum below 1) takes Newton's step. With ``flags`` (bool,
    rows × 2, updated: "was below", "overshot"), a row whose sum went from above 1 to below 1 takes
    Newton's steps from then on, which cannot cycle. Halley's step is returned too: once the steps
    are small it is the more accurate finish.
    """
    halley, newton = _halley_and_newton_steps(total, first, second, beta)
    above_now = total < 1.0
    if flags is None:
        return torch.where(above_now, newton, halley), halley
    below, overshot = flags.unbind(-1)
    overshot.logical_or_(above_now.squeeze(-1) & below)
    below.logical_or_(~above_now.squeeze(-1))
    return torch.where(overshot.unsqueeze(-1), newton, halley), halley


def _taylor_weights(t: Tensor, powered: Tensor, step: Tensor, beta: float, out: Tensor) -> Tensor:
    """``(t − δ)₊^β`` to second order in δ from ``t^(β−2)``, with no power (``powered`` consumed).

    ``(t − δ)^β ≈ t^(β−2)·(t² − βδt + β(β−1)δ²/2)`` for the keys that stay in the support (t > δ);
    keys leaving it get exactly 0. Keys outside the evaluated support (``t^(β−2) = 0``, whatever
    ``t`` holds there) stay at 0: for δ < 0 their true weight is < |δ|^β. Five passes over the keys,
    three when no key can leave by more than ``_LEAVING_MASS``: unmasked, a key with ``0 < t ≤ δ``
    gets at most ``(1 + β(β−1)/2)·δ^β`` (the quadratic is positive for β > 2 and at most
    ``(1 + β(β−1)/2)·δ²`` there), so when ``K`` times that is below ``_LEAVING_MASS`` for the
    largest δ the mask changes nothing a float32 sum resolves. The final steps are usually ~1e-6.
    """
    if not cpu_variant(t) or _keys_may_leave(step, beta, t.shape[-1]):  # GPUs: no sync for the test
        powered.mul_(torch.gt(t, step, out=out))
    return _taylor_quadratic(t, step, beta, out).mul_(powered)


def _taylor_quadratic(t: Tensor, step: Tensor, beta: float, out: Tensor) -> Tensor:
    """``t² − βδt + β(β−1)/2·δ²`` into ``out`` (two passes): ``(t − δ)^β/t^(β−2)`` to second order."""
    linear = torch.sub(t, step * beta, out=out)  # t − βδ
    return torch.addcmul(step.square().mul_(beta * (beta - 1.0) / 2.0), linear, t, out=out)


def _keys_may_leave(step: Tensor, beta: float, keys: int) -> bool:
    """Whether keys leaving the support could weigh ``_LEAVING_MASS`` in some row (NaN steps: yes)."""
    largest = float(step.max()) if step.numel() else 0.0
    return (
        not largest <= 0.0 and not keys * (1.0 + beta * (beta - 1.0) / 2.0) * largest**beta <= _LEAVING_MASS
    )


def _third_order_weights(t: Tensor, powered: Tensor, step: Tensor, beta: float, out: Tensor) -> Tensor:
    """``(t − δ)₊^β`` to third order in δ from ``t^(β−2)`` (CPU, β ≥ 3; ``powered`` consumed), into ``out``.

    ``(t − δ)^β ≈ t^(β−2)·(t² − βδt + β(β−1)/2·δ² − β(β−1)(β−2)/6·δ³/t)``, for a step tolerance 5–7×
    that of :func:`_taylor_weights` at K 77–231 (:func:`_third_order_tolerance`). ``t`` is floored
    above 0 on CPU (:func:`_top_moments`), so ``δ³/t`` is finite, and keys off the support
    (``t^(β−2) = 0``) stay 0. Keys leaving the support (``0 < t ≤ δ``) need no mask: the cubic is ≤ 0
    there for β ≥ 3 (``u³ − βu² + β(β−1)/2·u − β(β−1)(β−2)/6 ≤ 0`` for ``u = t/δ ≤ 1``, checked for
    β 3–20), so the clamp that a positive step brings zeroes them. Four passes, five with the clamp
    (:func:`_taylor_weights`: three, five when keys may leave).
    """
    cubic = step.pow(3).mul_(-beta * (beta - 1.0) * (beta - 2.0) / 6.0)
    weights = _taylor_quadratic(t, step, beta, out).addcdiv_(cubic, t).mul_(powered)
    # For δ > 0 the cubic is ≤ 0 on keys leaving the support (0 < t ≤ δ), and can dip below 0 (by at
    # most the remainder, ~C·δ^β) just above t = δ, where (t − δ)^β is about 0 itself: the clamp
    # zeroes both. For δ ≤ 0 every term is ≥ 0.
    return weights.clamp_min_(0.0) if float(step.max()) > 0.0 else weights


def _third_order_tolerance(beta: float, keys: int) -> float:
    """Largest final Halley step |δ| whose third-order finish keeps a row's sum within ROW_SUM_TOL/4.

    The fourth-order remainder of ``(t − δ)^β`` is ``C·δ⁴·ξ^(β−4)``, ``C = β(β−1)(β−2)(β−3)/24``,
    ξ between ``t − δ`` and ``t``: at most ``(1 + |δ|)^(β−4)·C·δ⁴`` per key for β ≥ 4
    (``_THIRD_ORDER_MIN_BETA``; ``t ≤ 1``; the factor is below 1.01 here). Keys a step carries
    across τ are flagged as for the second-order tolerance (:func:`_flag_crossing_keys`).
    ``_THIRD_ORDER_SHARE`` of that step is taken: Halley's own error (cubic in the step) adds to the
    finish's, and at the whole bound it moved weights by up to 4.9e-7 (α = 1.2499, K = 231,
    σ = 0.5); at 3/4 of it by 2.1e-7, as after a second evaluation (2.0e-7).
    """
    remainder = beta * (beta - 1.0) * (beta - 2.0) * (beta - 3.0) / 24.0
    return _THIRD_ORDER_SHARE * (ROW_SUM_TOL / (4.0 * keys * remainder)) ** 0.25


def _support(t: Tensor, out: Tensor) -> Tensor:
    """1.0 where ``t > 0``, else 0.0, into ``out`` (a float comparison: ~1.5× faster than ``sign``)."""
    return torch.gt(t, 0.0, out=out)


def _shifted(x: Tensor | ScaledScores, tau: Tensor, out: Tensor, floor: float = 0.0) -> Tensor:
    """``max(x − τ, floor)`` into ``out``: ``(x − τ)₊``, or floored at ``2^-126`` before a ``log₂``."""
    if isinstance(x, ScaledScores):
        return torch.add(tau.neg(), x.centred, alpha=x.scale, out=out).clamp_min_(floor)
    return torch.sub(x, tau, out=out).clamp_min_(floor)


def _lower_bound(x: Tensor | ScaledScores, beta: float, ws: Workspace) -> Tensor:
    """A starting τ at or below the root, as close as cheaply (without ``pow``) possible.

    τ = −1 always qualifies (the maximum of ``x`` is 0). For β ≤ 2 the ℓ2 norm bounds the ℓβ norm
    from below, so a τ where ``‖(x − τ)₊‖₂ ≥ 1`` — two pow-free Newton steps on that equation from
    −1 — is also below the root. For β > 2 the power-mean inequality gives
    ``‖(x − τ)₊‖_β ≥ K^(1/β − 1)·Σ(x − τ)``, so ``mean(x) − K^(−1/β)`` qualifies.
    (A sharper guess from the exact ℓ1 and ℓ2 roots was measured: fewer pow steps, but its extra
    passes cost more than they save.)
    """
    if beta > 2.0:
        return _power_mean_bound(x, beta)
    if beta == 2.0:
        return torch.full((*x.shape[:-1], 1), -1.0, dtype=x.dtype, device=x.device)
    return _l2_bound(x, ws)


def _l2_bound(x: Tensor | ScaledScores, ws: Workspace | None) -> Tensor:
    """Two pow-free Newton steps from −1 towards the root of ``‖(x − τ)₊‖₂ = 1``: at or below it.

    :func:`_l2_bound_in_place` on the scores as they are held (for :class:`ScaledScores`, the centred
    scores with radius 1/scale, the bound scaled back), in the workspace's ``"t"`` buffer.
    """
    centred, scale = (x.centred, x.scale) if isinstance(x, ScaledScores) else (x, 1.0)
    t = _empty_like(centred) if ws is None else ws.get("t", centred)
    bound = _l2_bound_in_place(centred, t, 1.0 / scale)[0]
    return bound if scale == 1.0 else bound.mul_(scale)


def _power_mean_bound(x: Tensor | ScaledScores, p: float) -> Tensor:
    """``max(−1, mean(x) − K^(−1/p))``, at or below the root of ``‖(x − τ)₊‖_p = 1`` (p ≥ 1).

    The power-mean inequality gives ``‖(x − τ)₊‖_p ≥ K^(1/p − 1)·Σ(x − τ)``, which is 1 there.
    Rows with a masked (−inf) key get −1.
    """
    bound = x.mean(-1, keepdim=True).sub_(x.shape[-1] ** (-1.0 / p))
    return bound.nan_to_num_(nan=-1.0, neginf=-1.0).clamp_min_(-1.0)


def _newton(x: Tensor | ScaledScores, tau: Tensor, beta: float, steps: int, ws: Workspace | None) -> Tensor:
    """``steps`` Newton steps on ``h(τ) = ‖(x − τ)₊‖_β − 1`` from below (monotone, no overshoot).

    A start above the root (:func:`_equal_keys_start`) lands below it in one step, ``h`` being convex.
    """
    t_buf = _empty_like(x) if ws is None else ws.get("t", x)
    scratch = t_buf  # β = 2 takes norms and sums of t only: no second buffer (kept memory, cache)
    if beta != 2.0:
        scratch = _empty_like(x) if ws is None else ws.get("p", x)
    for _ in range(steps):
        t = _shifted(x, tau, t_buf)
        # Each branch gives the step (‖t‖_β − 1)/|d‖t‖_β/dτ| as numerator/denominator, for one addcdiv.
        if beta == 1.0:
            numerator = t.sum(-1, keepdim=True).sub_(1.0)
            denominator = _support(t, scratch).sum(-1, keepdim=True)
        elif beta == 2.0:
            # ‖t‖₂ = sqrt(Σt²); d‖t‖₂/dτ = −Σt/‖t‖₂, so the step is (‖t‖₂ − 1)·‖t‖₂/Σt: two small
            # ops fewer than dividing by the slope (GPUs are launch-bound here).
            norm = torch.linalg.vector_norm(t, dim=-1, keepdim=True)
            numerator = norm.sub(1.0).mul_(norm)
            denominator = t.sum(-1, keepdim=True)
        else:
            # ‖t‖_β = (Σt^β)^(1/β); d‖t‖_β/dτ = −‖t‖_β^(1−β)·Σt^(β−1).
            lower = _power(t, beta - 1.0, scratch)
            lower_sum = lower.sum(-1, keepdim=True)
            norm = lower.mul_(t).sum(-1, keepdim=True).pow_(1.0 / beta)
            # Iterates stay below the root, where the norm is ≥ 1; the clamp matters for rows with
            # no finite key (norm 0), whose weights are 0 whatever τ is, for rounding, and for a
            # first step from a start above the root, which it lengthens: still landing below it.
            numerator = norm - 1.0
            denominator = lower_sum.mul_(norm.clamp_min(1.0).pow(1.0 - beta))
        tau = torch.addcdiv(tau, numerator, denominator.clamp_min_(_TINY))
    return tau


def _exact_step(
    x: Tensor | ScaledScores, tau: Tensor, beta: float, out: Tensor, scratch: Tensor
) -> tuple[Tensor, Tensor]:
    """Closed-form τ on the support found at ``tau`` (α = 1.5, 2); weights ``(x − τ)₊^β`` and their sum.

    ``tau`` is updated in place. Other α have no closed form: the weights at ``tau`` are returned.
    ``out`` receives the weights; ``scratch`` (same shape) is overwritten.
    """
    if beta in (1.0, 2.0):
        t = _shifted(x, tau, out)
        count = _support(t, scratch).sum(-1, keepdim=True)
        s1 = t.sum(-1, keepdim=True)
        if beta == 1.0:
            # Σ_S (x − τ − δ) = 1  →  δ = (s1 − 1)/|S|.
            tau.addcdiv_(s1.sub_(1.0), count.clamp_min_(1.0))
        else:
            # Σ_S (x − τ − δ)² = s2 − 2δ·s1 + s0·δ² = 1; the smaller root, free of cancellation:
            # δ = (s2 − 1)/(s1 + sqrt(s1² − s0·(s2 − 1))).
            s2m1 = torch.mul(t, t, out=scratch).sum(-1, keepdim=True).sub_(1.0)
            root = torch.addcmul(s1 * s1, count, s2m1, value=-1.0).clamp_min_(0.0).sqrt_()
            tau.addcdiv_(s2m1, root.add_(s1).clamp_min_(_TINY))
        weights = _shifted(x, tau, out)
        if beta == 2.0:
            weights.square_()
    else:
        weights = _power(_shifted(x, tau, scratch), beta, out)
    return weights, weights.sum(-1, keepdim=True)


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
    if whole <= 1:
        return out.fill_(1.0) if whole == 0 else out.copy_(t)
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

    Why: torch's CPU ``pow`` with a fractional exponent costs ~40 µs per 13616 rows (a 2^20-score
    chunk), as much as a whole-chunk multiplication; ``log₂`` (:func:`_log2`: numpy's where faster)
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

    ``k ≥ 30`` for the exponents taken here (e ≤ 20): keys at or below the floor weigh less than
    ``2^-600``, zero in float32 whatever the floor.
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

    Timed once per process as :func:`_log2` runs it, on a block of 2^20 floats (a chunk's size),
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


def _settle_rows(
    x: Tensor | ScaledScores, tau: Tensor, beta: float, weights: Tensor, total: Tensor, rows: Tensor
) -> None:
    """Finish the few rows whose support had not settled: more Newton + exact steps, in float64.

    Writes the finished rows of ``weights`` and ``total`` in place (``tau`` is only read). Uses
    ``index_select``/``index_copy_`` (fast, parallel) rather than advanced indexing. Why float64:
    a large group of tied keys just inside the support edge can carry weights below what float32
    resolves in ``x − τ`` (ulp 6e-8 at |τ| = 0.65): float32 steps then flip the whole group in and
    out of the support, and renormalising the flipped total moved the largest weight by up to 2.5e-2
    (sparsemax, 4094 tied keys 1e-5 inside the edge). The rows here are few.
    """
    index = rows.nonzero().squeeze(-1)
    wide = _float64_device(x.device)
    picked = x.index_select(0, index)
    if isinstance(picked, ScaledScores):  # the few rows' scores, scaled in float64
        xs = picked.centred.to(wide, torch.float64).mul_(picked.scale)
    else:
        xs = picked.to(wide, torch.float64)
    taus = tau.index_select(0, index).to(wide, torch.float64)
    ws, totals = torch.empty_like(xs), torch.empty_like(taus)
    pending = torch.arange(index.shape[0], device=wide)
    for _ in range(_FALLBACK_ROUNDS):
        x_p, tau_before = xs.index_select(0, pending), taus.index_select(0, pending)
        tau_p = _newton(x_p, tau_before, beta, 2, None)
        w_p, tot_p = _exact_step(x_p, tau_p, beta, torch.empty_like(x_p), torch.empty_like(x_p))
        taus.index_copy_(0, pending, tau_p)
        ws.index_copy_(0, pending, w_p)
        totals.index_copy_(0, pending, tot_p)
        # Done when the sum is right, or when τ no longer moves (float64 has converged; for a wide
        # row the rounding of the sum itself can exceed the tolerance, and renormalising fixes it).
        moving = tau_p.squeeze(-1) != tau_before.squeeze(-1)
        pending = pending[((tot_p - 1.0).abs_().squeeze(-1) > ROW_SUM_TOL) & moving]
        if pending.numel() == 0:
            break
    weights.index_copy_(0, index, ws.to(weights.device, weights.dtype))
    total.index_copy_(0, index, totals.to(total.device, total.dtype))


def _float64_device(device: torch.device) -> torch.device:
    """Where the float64 finish runs: on ``device`` itself if it has float64 (CPU, CUDA), else on CPU.

    Apple's MPS (and DirectML) have no float64; the rows finished there are few, so the copy is cheap.
    """
    return device if device.type in ("cpu", "cuda") else torch.device("cpu")
