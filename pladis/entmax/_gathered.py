"""α-entmax for 1.5 < α < 2 on CPU: Newton on the few keys that can get weight, gathered once, or on
whole rows where they are many."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ._common import (
    _FLOAT64_NORMAL,
    _LOG_FLOOR,
    _SAMPLED_ROW_STEP,
    _TINY,
    ROW_SUM_TOL,
    ScaledScores,
    SparseRows,
    UnnormalisedRows,
    Workspace,
    _shifted,
)
from ._dense import _FALLBACK_ROUNDS, _equal_keys_start, _l2_bound_in_place, _settle_rows
from ._fastmath import _exp2_scaled_, _log2
from ._halley import _LINEAR_FINISH_SHARE

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
float64 costs 0.39 ms (~5 % of the α = 1.75 solve), for Gaussian scores nothing. Rows finished to
first order (:func:`_linear_rows_limit`) take their step and sum from the same float32 sums, so they
share this limit (review helper-56: 73 keys of weight 4e-8 next to four large ones, α = 1.55:
weights 1.5e-6 off, rows summing to 1 + 4.3e-6; 1.2e-7 when such rows took the float64 finish).
Summing only those rows' runs again in float64 cost 0.55–0.9 ms per chunk at α 1.6–1.65 (finding
the runs and gathering their keys from the chunk's), more than the first-order finish saves there."""

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

_TOP_FIRST_MIN_EXPONENT = 160.0
"""Whole-row Newton (:func:`_whole_row_newton`) takes ``t^β`` first, and ``t^(β−1)`` as ``t^β/t``,
where the floor's power ``2^(−126β)`` underflows to 0 (β·126 ≥ 149) and ``exp2``'s input stays below
its slow window [−159, −126.5] (see ``_FAST_UNDERFLOW``): β ≥ 1.27, α ≤ 1.787. Why: no pass then
sets the floored keys' ``t^(β−1)`` to 0. Measured per 1.5·2^20-score chunk (σ = 0.5, K = 77, whole
rows): α 1.52–1.75 3–5 % faster."""


def _candidate_bound(centred: Tensor, ws: Workspace, radius: float) -> tuple[Tensor, Tensor]:
    """The ℓ2 bound of :func:`_l2_bound_in_place` on ``centred``, and the keys above it as a float
    0/1 mask (in the workspace buffer ``"t"``).

    The keys above ``τ₂ = τ₁ + δ₂`` are those with ``t = (s − τ₁)₊ > δ₂``: compared in place, not
    against the scores in a second buffer (an in-place pass takes about half the time on CPU).
    """
    bound, t, last_step = _l2_bound_in_place(centred, ws.get("t", centred), radius)
    return bound, torch.gt(t, last_step, out=t)


def _solve_on_candidates(
    centred: Tensor, bound: Tensor, above: Tensor, scale: float, beta: float, ws: Workspace
) -> SparseRows | None:
    """Newton for 1 < β < 2 on the keys above the lower bound only; None when they are too many.

    The keys are ``x = scale·centred`` (scale = α − 1) and ``bound`` is a lower bound on the root
    in units of ``centred`` (τ/scale), ``above`` the float 0/1 mask of the keys above it
    (:func:`_candidate_bound`): only the gathered keys are scaled.

    Why: every Newton step needs ``t^(β−1)`` with a fractional exponent, ~10× the cost of a
    multiplication even as ``2^(e·log₂ t)``, yet only the keys above ``bound`` (a lower bound, so a
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
        # Keys off the support sit at 2^-126 instead of 0: their power is exactly 0 (see _exp2_scaled_).
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
    steps.iterate(evaluate, 0 if continued else _FIRST_CHECK, finish_rows, subsets=True)
    settled, linear, moving = steps.settled_rows(), steps.linear_rows(), steps.moving_rows()
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
        # Keys off the support sit at 2^-126 instead of 0: their power is exactly 0 (see _exp2_scaled_).
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
    ) -> None:
        """Evaluate (``evaluate`` fills the sums at the current τ) and step, until every row stops or
        the rows that are neither settled nor within the linear finish's limit are few enough
        (``finish_rows``, by default ``_FINISH_SHARE`` of the rows) to be finished alone, or, with
        ``subsets``, the rows still moving are few enough (``_SUBSET_SHARE``) to go on alone.

        Rows are checked from evaluation ``first_check + 1`` on: by then every row is below the
        root, so a step ≤ 0 means τ no longer moves at this precision and the row stops either way.
        Rows that stopped with a wrong sum are left to the caller's float64 finish, whatever their
        share (float32 τ steps can move a large tie group's mass by more than ``ROW_SUM_TOL``).
        The last check's rows are then in ``settled``, ``linear`` (and :meth:`moving_rows`); the last
        evaluation was at ``tau``, and its Newton step is in ``step`` (not added).
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
                    return
            self._tau += self.step
        self.step.fill(0.0)  # never reached (see _CANDIDATE_ROUNDS); the last step is already in tau
        self._linear.fill(False)
        self._done.fill(True)

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
    rows still sum to 1 within ``ROW_SUM_TOL``/4. (That is the expansion's error; the Newton iterate's
    own, second order in its last step, adds up to ~2.5e-7 near α = 1.5: review helper-56.)

    Measured on q·kᵀ scores (σ 0.5–2, K 77–231): after the third evaluation every row that is not
    settled is within it at α 1.52–1.6, and most at 1.65–1.7, where 2–10 % of the rows were left to
    the float64 finish or (wide rows: 70–98 %) to a fourth evaluation; at α ≥ 1.8 it is below
    float32's resolution of the steps and finishes nothing.
    """
    return (ROW_SUM_TOL / (4.0 * keys)) ** (1.0 / beta)


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
    # Each row's keys are one run (row is sorted): its sum by reduceat over the non-empty runs'
    # starts only (a run ends where the next one starts); rows with no key sum to 0.
    runs = np.bincount(row, minlength=count)
    keyed = runs > 0
    starts = (np.cumsum(runs) - runs)[keyed]

    def row_sums(x: np.ndarray) -> np.ndarray:
        sums = np.zeros(count)
        if x.size:
            sums[keyed] = np.add.reduceat(x, starts)
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
