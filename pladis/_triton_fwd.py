"""Triton kernel bodies for the fused PLADIS cross-attention (imported only by ``pladis.triton_kernel``).

This module imports ``triton`` at import time on purpose: it is loaded lazily, only after
``pladis.triton_kernel`` has checked that Triton is usable, so ``import pladis`` never needs Triton.

One program owns ``BLOCK_M`` queries of one (batch, head) and the whole key row (K ≤ 512, padded to a
power of two), so the score row never leaves registers:

1. ``S = q·kᵀ·scale`` (``tl.dot`` into float32), −inf for padded / masked keys;
2. softmax statistics (max, Σexp);
3. the α-entmax threshold τ for ``p = [(α−1)(S − max) − τ]₊^β``, β = 1/(α−1), by Newton's method on
   ``h(τ) = ‖(X − τ)₊‖_β − 1`` from τ = −1 (convex and decreasing, so the iterates climb to the root
   without overshooting), then one exact step on the found support (the support quadratic for α = 1.5,
   Michelot's mean for α = 2, one more Newton step otherwise). For 1.5 < α < 2 the search starts
   instead from two power-free ℓ2 Newton steps mapped by ``τ ↦ −(−τ)^(2/β)`` (exact for equal keys,
   as ``pladis.entmax._dense._equal_keys_start``), which saves two of the ℓβ steps and their powers; the
   first ℓβ step from there may start above the root and lands below it. Just above α = 1 (α < 1.05), where τ
   would need more digits than float32 has, the weights are ``exp(u + β·log1p(v))`` around the
   softmax instead and Halley steps find ``u = log p_max`` (as ``_near_softmax_solve`` in
   ``pladis.entmax._near_softmax``);
4. a per-row check ``|Σp − 1| ≤ TOL``: rows that fail (support not settled yet) keep iterating inside the
   program, from the last safe (below-root) iterate, for at most ``MAX_FIX`` rounds — no host sync;
5. ``W = (1−λ)·softmax + λ·p/Σp`` and ``O = W @ V`` (``W`` cast to V's dtype, float32 accumulation).

Rows whose keys are all masked get zero weights and a zero output (as PyTorch's SDPA returns).

Layout: q, k, v and the output have unit stride along the head dim (the launcher ensures it); the
float32 weights (tests only) are written contiguous. Fewer arguments make each launch cheaper: Triton's
launcher inspects every argument on every call.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _powb(d, beta, MODE: tl.constexpr):
    """``d^β`` for ``d ≥ 0`` (β = 2, 1 or general)."""
    if MODE == 1:
        return d * d
    elif MODE == 2:
        return d
    else:
        return tl.where(d > 0, tl.exp2(beta * tl.log2(d)), 0.0)


@triton.jit
def _newton(z, tau, am1, beta, MODE: tl.constexpr):
    """One Newton step on ``‖(X − τ)₊‖_β − 1`` (X = (α−1)·z); stays below the root."""
    d = tl.maximum(z * am1 - tau[:, None], 0.0)
    if MODE == 1:
        s1 = tl.sum(d, axis=1)
        s2 = tl.sum(d * d, axis=1)
        step = (s2 - tl.sqrt(s2)) / s1
    elif MODE == 2:
        s0 = tl.sum((d > 0).to(tl.float32), axis=1)
        s1 = tl.sum(d, axis=1)
        step = (s1 - 1.0) / s0
    else:
        dbm1 = tl.where(d > 0, tl.exp2((beta - 1.0) * tl.log2(d)), 0.0)
        sb1 = tl.sum(dbm1, axis=1)
        sb = tl.sum(dbm1 * d, axis=1)
        step = sb * (1.0 - tl.exp2(-tl.log2(sb) / beta)) / sb1
    return tau + step


@triton.jit
def _exact(z, tau, am1, beta, MODE: tl.constexpr):
    """Threshold that is exact if the support of ``(X − τ)₊`` is the final one (α = 1.5 / 2)."""
    if MODE == 1:
        d = tl.maximum(z * am1 - tau[:, None], 0.0)
        s0 = tl.sum((d > 0).to(tl.float32), axis=1)
        s1 = tl.sum(d, axis=1)
        s2 = tl.sum(d * d, axis=1)
        c = s2 - 1.0
        return tau + c / (s1 + tl.sqrt(tl.maximum(s1 * s1 - s0 * c, 0.0)))
    else:
        return _newton(z, tau, am1, beta, MODE)


@triton.jit
def _log1p(v):
    """``log(1 + v)`` for −1 ≤ v ≤ 0 at float32 precision, without relying on a precise ``log``.

    GPUs take ``log`` from an approximation whose error is absolute (~2^-22), which β ≥ 20 would
    amplify in the weights. Where v > −1/2: ``2·atanh(y)``, ``y = v/(2 + v)`` (|y| ≤ 1/3), by its
    series to y^13 (truncation < 2e-8 relative). Below, ``log(1 + v)``: those keys weigh < 2^-20.
    """
    y = v / (2.0 + v)
    y2 = y * y
    series = 1.0 / 13.0
    series = series * y2 + 1.0 / 11.0
    series = series * y2 + 1.0 / 9.0
    series = series * y2 + 1.0 / 7.0
    series = series * y2 + 1.0 / 5.0
    series = series * y2 + 1.0 / 3.0
    series = series * y2 + 1.0
    return tl.where(v > -0.5, 2.0 * y * series, tl.log(1.0 + v))


@triton.jit
def _near_weights(z, u, am1, beta):
    """Weights ``exp(u + β·log1p(v))`` with ``v = max((α−1)·z·e^(−(α−1)u), −1)`` (α just above 1), and v."""
    v = tl.maximum(z * (am1 * tl.exp(-am1 * u))[:, None], -1.0)
    return tl.exp(u[:, None] + beta * _log1p(v)), v


@triton.jit
def _near_step(z, u, am1, beta):
    """One Halley step on ``log Σp`` over ``u`` (``Φ' = Σp/w``, ``Φ'' = Σp(1 + v/β)/w²``, w = 1 + v)."""
    p, v = _near_weights(z, u, am1, beta)
    w = tl.maximum(1.0 + v, 1e-30)  # keys with v = −1 have p = 0: p/w is 0, not 0/0
    q = p / w
    phi = tl.sum(p, axis=1)
    first = tl.sum(q, axis=1)
    second = (1.0 - 1.0 / beta) * tl.sum(q / w, axis=1) + first / beta
    norm = tl.maximum(phi, 1e-30)
    f = tl.log(norm)
    slope = tl.maximum(first / norm, 1.0)  # Σ(p/w)/Σp ≥ 1 as w ≤ 1
    curvature = second / norm - slope * slope
    correction = tl.minimum(tl.maximum(1.0 - 0.5 * f * curvature / (slope * slope), 0.5), 2.0)
    step = tl.where(phi > 0, -f / slope / correction, 0.0)
    return tl.minimum(u + step, 0.0)


@triton.jit
def pladis_fwd_kernel(
    Q,
    Kp,
    V,
    Out,
    Wout,
    Msk,
    sqb,
    sqh,
    sqn,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    sob,
    soh,
    son,
    smb,
    smh,
    smn,
    smk,
    H,
    N,
    KLEN,
    D,
    scale,
    lam,
    am1,
    beta,
    MODE: tl.constexpr,  # 0 softmax (α = 1 or λ = 0), 1 α = 1.5, 2 α = 2, 3 other, 4 α < 1.05, 5 1.5 < α < 2
    MASK_KIND: tl.constexpr,  # 0 none, 1 bool (True = attend), 2 additive float
    N_NEWTON: tl.constexpr,
    MAX_FIX: tl.constexpr,
    TOL: tl.constexpr,  # entmax rows whose unnormalised sum is further than this from 1 keep iterating
    WRITE_O: tl.constexpr,
    WRITE_W: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SPLIT_W: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    k_ok = offs_k < KLEN
    d_ok = offs_d < D

    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :],
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    k = tl.load(
        Kp + b * skb + h * skh + offs_k[:, None] * skn + offs_d[None, :],
        mask=k_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST_DOT:  # Triton's interpreter mis-multiplies bf16 operands: same rounding, fp32 product
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
    valid = k_ok[None, :]
    if MASK_KIND == 1:
        mk = tl.load(
            Msk + b * smb + h * smh + offs_m[:, None] * smn + offs_k[None, :] * smk,
            mask=m_ok[:, None] & k_ok[None, :],
            other=1,
        )
        valid = valid & (mk != 0)
    s = tl.where(valid, s, float("-inf"))
    if MASK_KIND == 2:
        madd = tl.load(
            Msk + b * smb + h * smh + offs_m[:, None] * smn + offs_k[None, :] * smk,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        s = s + madd.to(tl.float32)

    mx = tl.max(s, axis=1)
    dead = mx == float("-inf")  # every key masked: zero weights, zero output
    # z ≤ 0, −inf where masked; dead rows become all-ties (finite, no 0/0) and are zeroed at the end
    z = tl.where(dead[:, None], 0.0, s - tl.where(dead, 0.0, mx)[:, None])
    e = tl.exp2(z * 1.4426950408889634)
    den = tl.sum(e, axis=1)
    den = tl.where(dead, 1.0, den)

    if MODE == 0:
        c_soft = 1.0 / den
        w = e * c_soft[:, None]
    elif MODE == 4:
        u = tl.minimum(-tl.log(den), 0.0)  # log p_max of the softmax: the root as α → 1
        for _ in tl.static_range(N_NEWTON):
            u = _near_step(z, u, am1, beta)
        p, _ = _near_weights(z, u, am1, beta)
        tot = tl.sum(p, axis=1)
        bad = (tl.abs(tot - 1.0) > TOL) & m_ok & (dead == 0)
        n_bad = tl.sum(bad.to(tl.int32), axis=0)
        it = 0
        while (n_bad > 0) & (it < MAX_FIX):
            u = tl.where(bad, _near_step(z, u, am1, beta), u)
            p, _ = _near_weights(z, u, am1, beta)
            tot = tl.sum(p, axis=1)
            bad = bad & (tl.abs(tot - 1.0) > TOL)
            n_bad = tl.sum(bad.to(tl.int32), axis=0)
            it += 1
        tot = tl.where(dead, 1.0, tot)
        w = e * ((1.0 - lam) / den)[:, None] + p * (lam / tot)[:, None]
    else:
        tau = tl.full([BLOCK_M], -1.0, tl.float32)
        if MODE == 5:  # power-free ℓ2 steps (branch 1's Newton), then the equal-keys map
            for _ in tl.static_range(2):
                tau = _newton(z, tau, am1, beta, 1)
            tau = -tl.exp2(tl.log2(-tau) * (2.0 / beta))
        for _ in tl.static_range(N_NEWTON):
            tau = _newton(z, tau, am1, beta, MODE)
        tau_x = _exact(z, tau, am1, beta, MODE)
        tot = tl.sum(_powb(tl.maximum(z * am1 - tau_x[:, None], 0.0), beta, MODE), axis=1)
        bad = (tl.abs(tot - 1.0) > TOL) & m_ok & (dead == 0)
        n_bad = tl.sum(bad.to(tl.int32), axis=0)
        it = 0
        while (n_bad > 0) & (it < MAX_FIX):
            # Rare: the support was not settled. Continue from the safe iterate (below the root).
            tau = tl.where(bad, _newton(z, tau, am1, beta, MODE), tau)
            tau_x = tl.where(bad, _exact(z, tau, am1, beta, MODE), tau_x)
            tot = tl.sum(_powb(tl.maximum(z * am1 - tau_x[:, None], 0.0), beta, MODE), axis=1)
            bad = bad & (tl.abs(tot - 1.0) > TOL)
            n_bad = tl.sum(bad.to(tl.int32), axis=0)
            it += 1
        tot = tl.where(dead, 1.0, tot)
        c_soft = (1.0 - lam) / den
        c_ent = lam / tot
        p = _powb(tl.maximum(z * am1 - tau_x[:, None], 0.0), beta, MODE)
        w = e * c_soft[:, None] + p * c_ent[:, None]
    w = tl.where(dead[:, None], 0.0, w)

    if WRITE_W:
        tl.store(
            Wout + (pid_bh * N + offs_m[:, None]) * KLEN + offs_k[None, :],
            w,
            mask=m_ok[:, None] & k_ok[None, :],
        )
    if WRITE_O:
        v = tl.load(
            V + b * svb + h * svh + offs_k[:, None] * svn + offs_d[None, :],
            mask=k_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        w_hi = w.to(v.dtype)
        w_lo = (w - w_hi.to(tl.float32)).to(v.dtype)
        if UPCAST_DOT:
            v = v.to(tl.float32)
            w_hi = w_hi.to(tl.float32)
            w_lo = w_lo.to(tl.float32)
        acc = tl.dot(w_hi, v, input_precision=DOT_PREC)
        if SPLIT_W:
            # 16-bit W keeps ~3 digits and λ > 1 makes |W| up to 2λ − 1: add the rounding residual too.
            acc = tl.dot(w_lo, v, acc, input_precision=DOT_PREC)
        tl.store(
            Out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :],
            acc.to(Out.dtype.element_ty),
            mask=m_ok[:, None] & d_ok[None, :],
        )
