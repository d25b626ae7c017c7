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

Layout: this module holds the entry points, the input checks and the dispatch by α; the solvers
are in ``_dense`` (α = 1.5, 2, whole β; the bounds and the float64 finish), ``_halley`` (fractional
β > 2; on CPU also whole β ≥ 8), ``_near_softmax`` (α < 1.05) and ``_gathered`` (1.5 < α < 2 on
CPU), on ``_common`` (result types, buffers, shared constants) and ``_fastmath`` (exp, log₂ and
powers).
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

from ._common import (
    FLOAT32_MAX_BETA,
    ROW_SUM_TOL,
    SOFTMAX_LIMIT,
    ScaledScores,
    SparseRows,
    UnnormalisedRows,
    Workspace,
    cpu_variant,
    float32_exact,
    is_softmax,
    row_max,
)
from ._dense import GPU_NEWTON_STEPS, NEWTON_STEPS, _dense_solve, _equal_keys_start, _lower_bound
from ._fastmath import (
    EXP2_ENV,
    NUMPY_LOG2_ENV,
    _is_whole,
    exp2_is_faster,
    numpy_log2_is_faster,
    softmax_centred_,
)
from ._gathered import CANDIDATE_FRACTION, _candidate_bound, _solve_on_candidates, _whole_row_newton
from ._halley import _HALLEY_MIN_WHOLE_BETA, _halley_solve
from ._near_softmax import _near_softmax_solve

__all__ = [
    "CANDIDATE_FRACTION",
    "EXP2_ENV",
    "FLOAT32_MAX_BETA",
    "GPU_NEWTON_STEPS",
    "NEWTON_STEPS",
    "NUMPY_LOG2_ENV",
    "ROW_SUM_TOL",
    "SOFTMAX_LIMIT",
    "SparseRows",
    "UnnormalisedRows",
    "Workspace",
    "check_alpha",
    "check_no_grad",
    "check_real",
    "check_scores",
    "entmax",
    "entmax_centred",
    "entmax_rows",
    "exp2_is_faster",
    "float32_exact",
    "gathers_keys",
    "is_softmax",
    "numpy_log2_is_faster",
    "row_max",
    "softmax_centred_",
]


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
