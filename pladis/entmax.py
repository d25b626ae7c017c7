"""Exact α-entmax for α ∈ [1, 2], sort-free, always computed in float32.

α-entmax maps scores ``s`` to ``p_i = [(α−1)(s_i − max s) − τ]₊^β`` with ``β = 1/(α−1)`` and the
threshold ``τ`` chosen so that ``Σ p = 1`` (α → 1 is softmax, α = 2 is sparsemax, α = 1.5 entmax15).

Why not sort: the textbook solvers (and the reference ``entmax`` package) sort every row, which
dominates the cost of a cross-attention layer, and their float32 cumulative sums lose precision in
``mean_sq − mean²``. Here τ is found by Newton's method on ``h(τ) = ‖(X − τ)₊‖_β − 1``:

* ``h`` is convex and decreasing, so Newton started below the root climbs monotonically and never
  overshoots; and ``h`` is close to linear (exactly linear for one dominant key or for all-equal
  keys), so three steps from a good lower bound land on the final support.
* Then an exact step on the found support: for α = 2 ``τ = (Σ_S x − 1)/|S|``; for α = 1.5 the smaller
  root of the support quadratic, written without cancellation. Both are the closed-form thresholds of
  the sort-based algorithms, evaluated on the support Newton found. Other α have no closed form; their
  Newton iterate is renormalised.
* Rows whose weights do not sum to 1 within ``ROW_SUM_TOL`` (support not settled yet) are gathered
  and finished by more steps. Rare, and free for the common rows.

Masked (−inf) keys get exactly 0. A row whose keys are all −inf gets all zeros (softmax would give
NaN); the attention blend relies on this.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ROW_SUM_TOL = 1e-6
"""A row whose unnormalised weights sum to 1 within this is accepted (then renormalised)."""

NEWTON_STEPS = 3
"""Newton steps before the exact step and the row-sum check, for every α.

Measured on Gaussian scores (σ 0.3–100, K = 77, 154, 231) from :func:`_lower_bound`: α = 1.5 and
α = 2 leave no row unsettled after 3 steps; other α leave 0–20 % of rows, which the gathered finish
handles more cheaply than a fourth full-size step with its ``pow`` (measured both ways).
"""

_FALLBACK_ROUNDS = 50  # bound for the rare unsettled rows (2 Newton steps a round); never reached.
_TINY = 1e-30


def check_alpha(alpha: float) -> float:
    """Validate α: the mapping is defined here for 1 ≤ α ≤ 2."""
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or not 1.0 <= float(alpha) <= 2.0
    ):
        raise ValueError(f"entmax alpha: {alpha!r} is outside the allowed range [1, 2]")
    return float(alpha)


def entmax(scores: Tensor, alpha: float, dim: int = -1) -> Tensor:
    """α-entmax of ``scores`` along ``dim``.

    Returns a **float32** tensor whatever the input dtype: half-precision inputs are upcast first,
    because the threshold search in fp16/bf16 arithmetic is unreliable. Exact up to float32 rounding
    for every α (agrees with a float64 sort-based solve to ~1e-6).
    """
    alpha = check_alpha(alpha)
    x = scores.to(torch.float32).movedim(dim, -1)
    if x.numel() == 0:
        return x.clone().movedim(-1, dim)
    shape = x.shape
    rows = x.reshape(-1, shape[-1]).clone()
    centred = rows.sub_(row_max(rows))
    out = softmax_centred_(centred) if alpha == 1.0 else entmax_centred(centred, alpha)
    return out.reshape(shape).movedim(-1, dim)


def softmax_centred_(centred: Tensor, scale: float = 1.0) -> Tensor:
    """``scale·softmax`` in place on rows whose maximum is 0; rows with no finite key give zeros.

    ``exp(0) = 1`` is in every row with a finite key, so its sum is ≥ 1; clamping the sum at 1 only
    changes fully masked rows (sum 0), which then get zeros instead of NaN.
    """
    dense = centred.exp_()
    norm = dense.sum(-1, keepdim=True).clamp_min_(1.0).reciprocal_()
    return dense.mul_(norm.mul_(scale) if scale != 1.0 else norm)


def row_max(rows: Tensor) -> Tensor:
    """Row maxima (keepdim) with fully masked rows mapped to 0, so ``rows − max`` has no NaN."""
    top = rows.amax(dim=-1, keepdim=True)
    return top.masked_fill_(top == -math.inf, 0.0)


class Workspace:
    """Score-sized float32 buffers reused across chunks: large temporaries are allocated once per call.

    On CPU a fresh multi-megabyte temporary per elementwise op costs page faults that can exceed the
    arithmetic itself; on GPU it costs allocator traffic.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def buffer(self, name: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """A float32 buffer of ``shape`` (contents undefined), reusing the storage of ``name``."""
        n = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.device != device:
            buf = torch.empty(n, dtype=torch.float32, device=device)
            self._buffers[name] = buf
        return buf[:n].view(shape)

    def get(self, name: str, like: Tensor) -> Tensor:
        """A float32 buffer shaped like ``like``."""
        return self.buffer(name, tuple(like.shape), like.device)


def entmax_centred(centred: Tensor, alpha: float, workspace: Workspace | None = None) -> Tensor:
    """α-entmax (1 < α ≤ 2) of float32 rows (keys last) whose maximum is 0.

    This is the entry point of the attention blend, which already computed ``S − max S`` for the
    softmax. ``centred`` is not modified. The result lives in a workspace buffer when one is given.
    """
    ws = workspace or Workspace()
    beta = 1.0 / (alpha - 1.0)
    # X = (α − 1)·(S − max S); sparsemax (α = 2) uses the scores as they are.
    x = centred if alpha == 2.0 else torch.mul(centred, alpha - 1.0, out=ws.get("x", centred))
    tau = _newton(x, _lower_bound(x, beta, ws), beta, NEWTON_STEPS, ws)
    weights, total = _exact_step(x, tau, beta, ws.get("t", x))
    # A total of 0 means a row with no finite key: nothing to settle, its weights stay 0.
    unsettled = ((total - 1.0).abs_() > ROW_SUM_TOL) & (total > 0)
    if bool(unsettled.any()):
        _settle_rows(x, tau, beta, weights, total, unsettled.squeeze(-1))
    return weights.div_(total.clamp_min_(_TINY))


def _shifted(x: Tensor, tau: Tensor, out: Tensor) -> Tensor:
    """``(x − τ)₊`` into ``out``."""
    return torch.sub(x, tau, out=out).clamp_min_(0.0)


def _lower_bound(x: Tensor, beta: float, ws: Workspace) -> Tensor:
    """A starting τ at or below the root, as close as cheaply (without ``pow``) possible.

    τ = −1 always qualifies (the maximum of ``x`` is 0). For β ≤ 2 the ℓ2 norm bounds the ℓβ norm
    from below, so a τ where ``‖(x − τ)₊‖₂ ≥ 1`` — two pow-free Newton steps on that equation from
    −1 — is also below the root. For β > 2 the power-mean inequality gives
    ``‖(x − τ)₊‖_β ≥ K^(1/β − 1)·Σ(x − τ)``, so ``mean(x) − K^(−1/β)`` qualifies.
    (A sharper guess from the exact ℓ1 and ℓ2 roots was measured: fewer pow steps, but its extra
    passes cost more than they save.)
    """
    tau = torch.full((*x.shape[:-1], 1), -1.0, dtype=torch.float32, device=x.device)
    if beta == 2.0:
        return tau
    if beta < 2.0:
        return _newton(x, tau, 2.0, 2, ws)
    mean_bound = x.mean(-1, keepdim=True).sub_(x.shape[-1] ** (-1.0 / beta))
    return torch.maximum(tau, mean_bound.nan_to_num_(nan=-1.0, neginf=-1.0))


def _newton(x: Tensor, tau: Tensor, beta: float, steps: int, ws: Workspace | None) -> Tensor:
    """``steps`` Newton steps on ``h(τ) = ‖(x − τ)₊‖_β − 1`` from below (monotone, no overshoot)."""
    t_buf = torch.empty_like(x) if ws is None else ws.get("t", x)
    for _ in range(steps):
        t = _shifted(x, tau, t_buf)
        if beta == 1.0:
            norm = t.sum(-1, keepdim=True)
            slope = t.sign().sum(-1, keepdim=True)
        elif beta == 2.0:
            # ‖t‖₂ = sqrt(Σt²); d‖t‖₂/dτ = −Σt/‖t‖₂.
            norm = torch.linalg.vecdot(t, t).unsqueeze_(-1).sqrt_()
            slope = t.sum(-1, keepdim=True).div_(norm.clamp_min(_TINY))
        else:
            # ‖t‖_β = (Σt^β)^(1/β); d‖t‖_β/dτ = −‖t‖_β^(1−β)·Σt^(β−1).
            lower = torch.pow(t, beta - 1.0, out=torch.empty_like(x) if ws is None else ws.get("p", x))
            power_sum = torch.linalg.vecdot(lower, t).unsqueeze_(-1)
            norm = power_sum.pow(1.0 / beta)
            # Iterates stay below the root, where the norm is ≥ 1; the clamp only matters for rows
            # with no finite key (norm 0), whose weights are 0 whatever τ is.
            slope = lower.sum(-1, keepdim=True).mul_(norm.clamp_min(0.5).pow(1.0 - beta))
        tau = tau + (norm - 1.0).div_(slope.clamp_min_(_TINY))
    return tau


def _exact_step(x: Tensor, tau: Tensor, beta: float, out: Tensor) -> tuple[Tensor, Tensor]:
    """Closed-form τ on the support found at ``tau`` (α = 1.5, 2); weights ``(x − τ)₊^β`` and their sum.

    ``tau`` is updated in place. Other α have no closed form: the weights at ``tau`` are returned.
    """
    if beta in (1.0, 2.0):
        t = _shifted(x, tau, out)
        count = t.sign().sum(-1, keepdim=True)
        s1 = t.sum(-1, keepdim=True)
        if beta == 1.0:
            # Σ_S (x − τ − δ) = 1  →  δ = (s1 − 1)/|S|.
            tau.add_(s1.sub_(1.0).div_(count.clamp_min_(1.0)))
        else:
            # Σ_S (x − τ − δ)² = s2 − 2δ·s1 + s0·δ² = 1; the smaller root, free of cancellation:
            # δ = (s2 − 1)/(s1 + sqrt(s1² − s0·(s2 − 1))).
            s2m1 = torch.linalg.vecdot(t, t).unsqueeze_(-1).sub_(1.0)
            root = (s1 * s1).sub_(count.mul_(s2m1)).clamp_min_(0.0).sqrt_()
            tau.add_(s2m1.div_(root.add_(s1).clamp_min_(_TINY)))
    weights = _power_(_shifted(x, tau, out), beta)
    return weights, weights.sum(-1, keepdim=True)


def _power_(t: Tensor, beta: float) -> Tensor:
    """``t^β`` in place."""
    if beta == 1.0:
        return t
    if beta == 2.0:
        return t.square_()
    return t.pow_(beta)  # (``exp(β·ln t)`` was measured slower: ``ln 0`` takes a slow path on CPU)


def _settle_rows(x: Tensor, tau: Tensor, beta: float, weights: Tensor, total: Tensor, rows: Tensor) -> None:
    """Finish the few rows whose support had not settled: more Newton + exact steps.

    Writes the finished rows of ``weights`` and ``total`` in place (``tau`` is only read). Uses
    ``index_select``/``index_copy_`` (fast, parallel) rather than advanced indexing.
    """
    index = rows.nonzero().squeeze(-1)
    xs, taus = x.index_select(0, index), tau.index_select(0, index)
    ws, totals = torch.empty_like(xs), torch.empty_like(taus)
    pending = torch.arange(index.shape[0], device=x.device)
    for _ in range(_FALLBACK_ROUNDS):
        x_p, tau_before = xs.index_select(0, pending), taus.index_select(0, pending)
        tau_p = _newton(x_p, tau_before, beta, 2, None)
        w_p, tot_p = _exact_step(x_p, tau_p, beta, torch.empty_like(x_p))
        taus.index_copy_(0, pending, tau_p)
        ws.index_copy_(0, pending, w_p)
        totals.index_copy_(0, pending, tot_p)
        # Done when the sum is right, or when τ no longer moves (float32 has converged; for a wide
        # row the rounding of the sum itself can exceed the tolerance, and renormalising fixes it).
        moving = tau_p.squeeze(-1) != tau_before.squeeze(-1)
        pending = pending[((tot_p - 1.0).abs_().squeeze(-1) > ROW_SUM_TOL) & moving]
        if pending.numel() == 0:
            break
    weights.index_copy_(0, index, ws)
    total.index_copy_(0, index, totals)
