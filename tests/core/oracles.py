"""Shared oracles for the core tests: the reference ``entmax`` package, run in float64."""

from __future__ import annotations

import pytest
import torch

entmax_package = pytest.importorskip("entmax")


def reference_entmax(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """α-entmax by the reference package, in float64 (its float32 sort loses precision itself)."""
    x = scores.double()
    if alpha == 1.0:
        return torch.softmax(x, dim=-1)
    if alpha == 1.5:
        return entmax_package.entmax15(x, dim=-1)
    if alpha == 2.0:
        return entmax_package.sparsemax(x, dim=-1)
    return entmax_package.entmax_bisect(x, alpha=alpha, dim=-1, n_iter=200)


def near_one_oracle(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """α-entmax for α → 1 in float64, written as ``p = (1 + a·(s − κ))₊^(1/a)`` with ``a = α − 1``.

    ``log1p`` keeps the small ``a·(s − κ)`` exact where ``x − τ ≈ 1`` would round it away; κ by
    bisection (200 halvings).
    """
    s, a = scores.double(), alpha - 1.0
    top = s.max(-1, keepdim=True).values
    low, high = top - 60.0, top + 60.0
    for _ in range(200):
        kappa = (low + high) / 2
        u = (a * (s - kappa)).clamp_min(-1.0)
        p = torch.where(u > -1.0, torch.exp(torch.log1p(u.clamp_min(-1 + 1e-15)) / a), torch.zeros_like(s))
        above = p.sum(-1, keepdim=True) > 1
        low, high = torch.where(above, kappa, low), torch.where(above, high, kappa)
    return p / p.sum(-1, keepdim=True)


def reference_pladis(q, k, v, alpha: float, lam: float, scale: float | None = None, mask=None):
    """((1 − λ)·softmax + λ·entmax)·V in float64, written independently of the package under test."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q64 @ k64.transpose(-1, -2) * scale
    if mask is not None:
        scores = (
            scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
        )
    weights = (1 - lam) * torch.softmax(scores, dim=-1) + lam * reference_entmax(scores, alpha)
    return weights @ v64
