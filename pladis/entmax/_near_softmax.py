"""α-entmax just above α = 1, written around the softmax so that float32 stays exact."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import _LOG2_E, _TINY, ROW_SUM_TOL, Workspace, cpu_variant
from ._fastmath import _EXP_SLOW_BELOW, _exp2_flushed_, _exp_into, _mostly_slow_for_exp, exp2_is_faster
from ._halley import _HALLEY_ROUNDS


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
