"""Newton on whole rows with an exact closed-form step (α = 1.5, 2 and whole β), the lower bounds
the solvers start from, and the float64 finish of rows float32 cannot settle."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import (
    _TINY,
    ROW_SUM_TOL,
    ScaledScores,
    UnnormalisedRows,
    Workspace,
    _empty_like,
    _settled,
    _shifted,
    _support,
    cpu_variant,
)
from ._fastmath import _power, _row_power

NEWTON_STEPS = 3
"""Newton steps before the exact step and the row-sum check: on CPU for α = 1.5, 2 and whole β below
``_HALLEY_MIN_WHOLE_BETA``, on GPUs for α = 1.5 only (the others take ``GPU_NEWTON_STEPS``).

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

_FALLBACK_ROUNDS = 50  # bound for the rare unsettled rows (2 Newton steps a round); never reached.


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


def _equal_keys_start(tau: Tensor, beta: float) -> Tensor:
    """``−(−τ)^(2/β)``: a start for Newton on ``‖(x − τ)₊‖_β = 1`` from the ℓ2 bound ``tau`` (new tensor).

    Why: the ℓ2 root is systematically below the ℓβ root (by up to 0.15 at α = 1.75), which costs
    Newton an evaluation. For m keys equal to the maximum (0) the two roots are ``−m^(−1/2)`` and
    ``−m^(−1/β)``, so this map is exact there; on Gaussian scores it brings the median distance to
    the root from 0.12 to 0.013 (α = 1.75; max 0.15 → 0.05), for one small per-row op.
    The start may lie above the root (a quarter of the rows at σ = 1): the first Newton step then
    lands below it, ``h`` being convex. The gathered keys stay a superset of the support because
    they were chosen at ``tau``, not here; and the start stays below the maximum key (``τ < 0``).
    For 2 < β < ``_L2_START_MAX_BETA`` (``_L2_START_MAX_BETA_CPU`` on CPU; :func:`_halley_start`) the
    ℓ2 root lies above the β root and the map lowers it.
    """
    return _row_power(tau.neg(), 2.0 / beta).neg_()


def _lower_bound(x: Tensor | ScaledScores, beta: float, ws: Workspace | None) -> Tensor:
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
        xs = _float64_on(picked.centred, wide).mul_(picked.scale)
    else:
        xs = _float64_on(picked, wide)
    taus = _float64_on(tau.index_select(0, index), wide)
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


def _float64_on(t: Tensor, device: torch.device) -> Tensor:
    """``t`` as float64 on ``device``: moved first, then converted.

    Why two copies: MPS cannot convert to float64 in the copy that leaves it; ``t.to("cpu",
    torch.float64)`` raised on torch ≤ 2.13 and gave zeros on 2.14 (pytorch/pytorch#197715).
    """
    return t.to(device).to(torch.float64)


def _float64_device(device: torch.device) -> torch.device:
    """Where the float64 finish runs: on ``device`` itself if it has float64 (CPU, CUDA), else on CPU.

    Apple's MPS (and DirectML) have no float64; the rows finished there are few, so the copy is cheap.
    """
    return device if device.type in ("cpu", "cuda") else torch.device("cpu")
