"""α-entmax for a fractional β > 2 (1.05 ≤ α < 1.5), and on CPU for whole β ≥ 8 (α ≤ 1.125): Halley
steps and Taylor finishes of the weights."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import (
    _TINY,
    ROW_SUM_TOL,
    ScaledScores,
    UnnormalisedRows,
    Workspace,
    _empty_like,
    _shifted,
    _support,
    cpu_variant,
)
from ._dense import _equal_keys_start, _l2_bound, _power_mean_bound
from ._fastmath import _exp2_scaled_, _is_whole, _log2, _power, _row_power, _underflow_floor

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

_THIRD_ORDER_MIN_BETA = 4.0
"""From this β on (α ≤ 1.25), the CPU Halley solver may finish rows to third order in its last step
(:func:`_third_order_weights`), whose tolerance (:func:`_third_order_tolerance`) is 5–7× the
second-order one's (K 77–231), when that lets all but a quarter of the rows finish after the evaluation.

Why: at α 1.16–1.25 the interpolated start (:func:`_interpolated_start`) lands 1–3e-3 from the root
on σ = 1 scores, beyond the second-order tolerance (5–9e-4 at K = 77) for 91–96 % of the rows, so
every row took a second evaluation (eight passes) and α = 1.19 cost 1.6× α = 1.5; the third-order
finish costs at most two passes more than the second-order one (and no mask for leaving keys). Measured per
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

_LEAVING_MASS = 1e-9  # weight a row may keep on keys a last Taylor step takes out (see _taylor_weights)
_QUADRATIC_CLAMP_BELOW_BETA = 2.001
"""Below this β the second-order weights are clamped at 0 (a pass more, for α in (1.4998, 1.5) only)."""


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
    """Halley step towards ``h(τ) = (Σt^β)^(1/β) = 1`` from the sums ``F``, ``M1`` and ``M2``.

    ``F = Σt^β``, ``M1 = Σt^(β−1)``, ``M2 = Σt^(β−2)``; ``h' = −h·M1/F`` and
    ``h'' = (β − 1)·h/F·(M2 − M1²/F) ≥ 0``. The step is Newton's, ``δ = (h − 1)·F^(1 − 1/β)/M1``,
    times ``1/(1 − ε)`` with ``ε = δ·h''/(2|h'|)``, kept in [1/2, 2] so a poor curvature estimate
    cannot run away. Rows with no finite key (F = M1 = 0) get 0.
    """
    return _halley_and_newton_steps(total, first, second, beta)[0]


def _newton_step(total: Tensor, first: Tensor, beta: float) -> Tensor:
    """Newton's step towards ``h(τ) = (Σt^β)^(1/β) = 1`` from ``F = Σt^β`` and ``M1 = Σt^(β−1)`` (new tensor).

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
    weights = _taylor_quadratic(t, step, beta, out).mul_(powered)
    # The quadratic's minimum, β(β − 2)/4·δ², is within float32 rounding of 0 for β just above 2
    # (α just below 1.5): there it can come out negative (−3e-14 at β = 2 + 3e-9, review helper-74).
    return weights.clamp_min_(0.0) if beta < _QUADRATIC_CLAMP_BELOW_BETA else weights


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
    (``_THIRD_ORDER_MIN_BETA``; ``t ≤ 1``; the factor is below 1.011 here, K ≥ 77). Keys a step carries
    across τ are flagged as for the second-order tolerance (:func:`_flag_crossing_keys`).
    ``_THIRD_ORDER_SHARE`` of that step is taken: Halley's own error (cubic in the step) adds to the
    finish's, and at the whole bound it moved weights by up to 4.9e-7 (α = 1.2499, K = 231,
    σ = 0.5); at 3/4 of it by 2.1e-7, as after a second evaluation (2.0e-7).
    """
    remainder = beta * (beta - 1.0) * (beta - 2.0) * (beta - 3.0) / 24.0
    return _THIRD_ORDER_SHARE * (ROW_SUM_TOL / (4.0 * keys * remainder)) ** 0.25
