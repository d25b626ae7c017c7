"""PLADIS cross-attention: ``((1 − λ)·softmax(S) + λ·entmax_α(S)) @ V`` with ``S = q·kᵀ·scale``.

The blend is linear in the weights, so it is one matmul with V on mixed weights — the same as
``At + λ(At_α − At)`` of the paper. Scores and weights are float32 whatever the input dtype (entmax in
half precision is unreliable); the V matmul runs in float32 too (the fused GPU kernel: the weights in
two 16-bit parts, float32 accumulation) and the result is cast back to q's dtype.

Queries are processed in chunks: cross-attention has few keys (77–231 text tokens) and many queries
(up to 4096 image tokens per head), so the float32 score block of a chunk stays small and in cache,
which both bounds memory and makes the many cheap passes of the threshold search fast. Rows are
independent, so results do not depend on the chunk size (beyond float32 rounding: the matmuls may
block and sum differently for another number of rows).
"""

from __future__ import annotations

import itertools
import math
import numbers
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from .entmax import (
    SparseRows,
    UnnormalisedRows,
    Workspace,
    check_alpha,
    check_no_grad,
    check_real,
    check_scores,
    entmax_rows,
    is_softmax,
    row_max,
    softmax_centred_,
)
from .env import env_flag

DEFAULT_MEMORY_BUDGET = 256 * 2**20
"""Upper bound, in bytes, on the float32 working set of one chunk (scores and temporaries)."""

_CACHE_FRIENDLY_ELEMENTS = 3 << 19
"""Preferred number of score elements per chunk on CPU (6 MiB of float32, in the L3 cache).

Measured on the benchmark's level-1 shapes (2-core AVX-512 VM, chunks of whole heads): 1.5·2^20
was fastest or within noise of it for every α (1.3–2); 2^20 was 3–8 % slower (more chunks, and
each chunk's per-row ops cost the same), 2^21 2–5 % slower."""

_WORKING_COPIES = 6
"""float32 score-sized buffers alive at once while a chunk is processed (scores, weights, temporaries)."""

FORCE_TORCH_ENV = "PLADIS_FORCE_TORCH"
"""Set to 1 to bypass the fused GPU kernel and use the torch path (debugging, comparisons)."""


LAM_MAX = 1e30
"""Largest λ the maths takes: beyond float32's range (3.4e38) the blend overflows to inf/NaN."""


def check_lam(lam: float) -> float:
    """Validate λ: any real number (numpy scalars included) in [0, ``LAM_MAX``]."""
    return check_real("PLADIS lambda", lam, 0, LAM_MAX)


def pladis_weights(scores: Tensor, alpha: float, lam: float) -> Tensor:
    """Mixed attention weights ``(1 − λ)·softmax + λ·entmax_α`` of ``scores`` (keys last), float32.

    Rows whose keys are all masked (−inf) get zero weights.
    """
    alpha, lam = check_alpha(alpha), check_lam(lam)
    check_scores("PLADIS weights", scores, keys_dim=True)
    check_no_grad("PLADIS weights", scores=scores)
    shape = scores.shape
    rows = scores.to(torch.float32).reshape(math.prod(shape[:-1]), shape[-1])  # no -1: 0-size inputs
    rows = rows.clone(memory_format=torch.contiguous_format)
    if rows.numel() == 0:  # no rows, or rows of no keys (whose maximum is undefined)
        return rows.reshape(shape)
    return blend_rows_(rows, alpha, lam, Workspace()).reshape(shape)


def blend_rows_(scores: Tensor, alpha: float, lam: float, ws: Workspace) -> Tensor:
    """The PLADIS weights, computed in place in the float32 (rows, keys) buffer ``scores``."""
    centred = scores.sub_(row_max(scores))
    if is_softmax(alpha):  # entmax is softmax here: the blend is softmax itself
        return softmax_centred_(centred)
    sparse = entmax_rows(centred, alpha, ws)
    blend = softmax_centred_(centred, 1.0 - lam)
    if isinstance(sparse, UnnormalisedRows):
        return blend.addcdiv_(sparse.values, sparse.total, value=lam)
    if isinstance(sparse, SparseRows):
        # scatter_add_ of the scaled values: on CPU 1.5× faster than index_add_ (unique flat indices
        # into a score-sized block: 0.09 against 0.15 ms per 131k values).
        return blend.view(-1).scatter_add_(0, sparse.index, sparse.values.mul_(lam)).view(blend.shape)
    return blend.add_(sparse, alpha=lam)


def pladis_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    alpha: float,
    lam: float,
    scale: float | None = None,
    mask: Tensor | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Tensor:
    """PLADIS attention for q ``(B, H, N, d)`` and k, v ``(B, H, K, d)`` (any leading dims).

    ``mask`` is boolean (True = attend) or additive float, broadcastable to ``(B, H, N, K)``, as for
    :func:`torch.nn.functional.scaled_dot_product_attention`. ``scale`` defaults to ``1/sqrt(d)``.
    λ = 0 returns exactly the stock SDPA result; λ = 1 is pure α-entmax attention; λ > 1
    extrapolates (weights outside the sparse support become negative — that is the method).
    Returns q's dtype. Inference only (no backward): for λ > 0, inputs that require grad raise
    ``ValueError`` unless grad is disabled.
    """
    return _attention(q, k, v, alpha, lam, scale, mask, memory_budget, heads_last=False)


def _attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: float,
    lam: float,
    scale: float | None,
    mask: Tensor | None,
    memory_budget: int,
    *,
    heads_last: bool,
) -> Tensor:
    """:func:`pladis_attention`; with ``heads_last`` the torch path's output is a ``(..., N, H, d)``
    tensor seen as ``(..., H, N, d)`` (a free merge of heads for the packed layout)."""
    alpha, lam = check_alpha(alpha), check_lam(lam)
    scale = check_attention_inputs(q, k, v, mask, scale, memory_budget)
    if lam == 0.0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    check_no_grad("PLADIS attention", q=q, k=k, v=v, mask=mask)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0  # d = 0: every score is 0
    fused = _fused_kernel(q, k, v, mask)
    if fused is not None:
        from .triton_kernel import TritonUnsupported

        try:
            return fused(q, k, v, alpha=alpha, lam=lam, scale=scale, mask=mask, checked=True)
        except TritonUnsupported:
            pass  # tile too large for this GPU: the kernel marks the shape, the torch path answers
    return _pladis_attention_torch(q, k, v, alpha, lam, scale, mask, int(memory_budget), heads_last)


SCALE_MAX = 1e30
"""Largest |scale| taken: beyond it the scores of any non-zero q·k overflow float32."""


def check_attention_inputs(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None, memory_budget: int
) -> float | None:
    """Refuse what attention would get wrong silently or fail on deep inside; returns the scale as a float.

    Why: an integer 0/1 mask (a tokenizer's ``attention_mask``) was added to the scores as a bias,
    masking nothing; integer q/k/v gave results truncated to integers; a NaN scale gave NaN output.
    SDPA rejects such inputs only at λ = 0, so the answer depended on λ. Cheap: shapes and dtypes only.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"PLADIS attention: {name} must be a tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise ValueError(
                f"PLADIS attention: {name} must be floating point (fp16, bf16, fp32, fp64), got {t.dtype}"
            )
        if t.dim() < 2:
            raise ValueError(
                f"PLADIS attention: {name} must be (..., tokens, features), got shape {tuple(t.shape)}"
            )
    try:
        torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"PLADIS attention: the leading (batch, head) dims of q {tuple(q.shape)}, k {tuple(k.shape)} "
            f"and v {tuple(v.shape)} do not broadcast"
        ) from None
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"PLADIS attention: q and k must have the same feature size, got {q.shape[-1]} and {k.shape[-1]}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"PLADIS attention: k and v must have as many keys, got {k.shape[-2]} and {v.shape[-2]}"
        )
    if mask is not None and not (
        isinstance(mask, Tensor) and (mask.dtype == torch.bool or mask.dtype.is_floating_point)
    ):
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            "PLADIS attention: mask must be a bool tensor (True = attend) or a floating-point additive "
            f"one, got {got} (an integer 0/1 mask would be added to the scores: convert it with .bool())"
        )
    check_memory_budget(memory_budget)
    if isinstance(scale, Tensor) and scale.numel() == 1 and not scale.dtype.is_complex:
        scale = scale.item()  # a one-value tensor, as accepted before these checks
    return None if scale is None else check_real("PLADIS scale", scale, -SCALE_MAX, SCALE_MAX)


def check_memory_budget(memory_budget: int) -> None:
    """A positive whole number of bytes (a Python or numpy integer; bools are refused)."""
    if (
        isinstance(memory_budget, bool)
        or not isinstance(memory_budget, numbers.Integral)
        or memory_budget <= 0
    ):
        raise ValueError(f"PLADIS memory_budget: {memory_budget!r} must be a positive number of bytes")


def _fused_kernel(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None):
    """The Triton kernel when it can run this call, else None (CPU, no Triton, forced off, shape)."""
    if not q.is_cuda or env_flag(FORCE_TORCH_ENV):
        return None
    try:
        from . import triton_kernel
    except ImportError:
        return None
    try:
        if triton_kernel.is_supported(q, k, v, mask):
            return triton_kernel.pladis_attention_triton
    except Exception:  # a broken Triton install must not break generation: use the torch path
        return None
    return None


def _pladis_attention_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: float,
    lam: float,
    scale: float,
    mask: Tensor | None,
    memory_budget: int,
    heads_last: bool = False,
) -> Tensor:
    *lead, n_queries, _ = q.shape
    n_keys, d_v = k.shape[-2], v.shape[-1]
    lead_q, lead_k = torch.Size(lead), torch.Size(k.shape[:-2])
    batch = torch.broadcast_shapes(lead_q, lead_k, torch.Size(v.shape[:-2]))
    if heads_last and batch:
        out = torch.empty((*batch[:-1], n_queries, batch[-1], d_v), dtype=q.dtype, device=q.device)
        out = out.transpose(-2, -3)
    else:
        out = torch.empty((*batch, n_queries, d_v), dtype=q.dtype, device=q.device)
    if n_queries == 0 or out.numel() == 0:
        return out.zero_()

    groups = max(1, math.prod(batch))
    dim = q.shape[-1]
    if n_keys == 0:  # nothing to attend to: zeros, as SDPA gives
        return out.zero_()
    # q is converted chunk by chunk: the WebUI's packed layout is not contiguous, and a float32 copy of
    # all of q (two, from half precision) would sit outside the memory budget (+81 MiB at hires sizes).
    q_full = q.expand(*batch, n_queries, dim)
    k32 = k.to(torch.float32).expand(*batch, n_keys, k.shape[-1]).reshape(groups, n_keys, -1)
    v32 = v.to(torch.float32).expand(*batch, n_keys, d_v).reshape(groups, n_keys, d_v)
    k32t = k32.transpose(1, 2)
    mask_full = None if mask is None else _expand_mask(mask, batch, n_queries, n_keys)

    step = chunk_queries(
        groups, n_queries, n_keys, memory_budget, q.device.type != "cpu", q_dim=dim, v_dim=d_v
    )
    q_groups = _group_view(q_full, groups)
    mask_groups = None if mask_full is None else _group_view(mask_full, groups)
    out_groups = _group_view(out, groups)
    if q_groups is not None and out_groups is not None and (mask_full is None or mask_groups is not None):
        leading, q_src, mask_src, out_src = torch.Size([groups]), q_groups, mask_groups, out_groups
    else:  # leading dims that do not flatten without a copy (the WebUI's packed layout): index them
        leading, q_src, mask_src, out_src = batch, q_full, mask_full, out
    k_src = k32t.view(*leading, *k32t.shape[1:])
    v_src = v32.view(*leading, n_keys, d_v)
    with _workspace(q.device) as ws:
        for index, query_slice in attention_blocks(leading, n_queries, step, fewest=q.device.type != "cpu"):
            q_block = q_src[index][..., query_slice, :]
            g, rows = math.prod(q_block.shape[:-2]), q_block.shape[-2]
            q_chunk = _float32_rows(q_block, g, ws)
            scores = ws.buffer("scores", (g, rows, n_keys), q.device)
            _scaled_scores_into(scores, q_chunk, k_src[index].view(g, -1, n_keys), scale)
            if mask_src is not None:
                block_mask = mask_src[index][..., query_slice, :]
                _apply_mask(scores.view(block_mask.shape), block_mask)
            weights = blend_rows_(scores.view(-1, n_keys), alpha, lam, ws).view(g, rows, n_keys)
            target = out_src[index][..., query_slice, :]
            v_block = v_src[index].view(g, n_keys, d_v)
            if out.dtype == torch.float32 and target.is_contiguous():
                torch.bmm(weights, v_block, out=target.view(g, rows, d_v))
            else:
                block_out = torch.bmm(weights, v_block, out=ws.buffer("out", (g, rows, d_v), q.device))
                target.copy_(block_out.view(target.shape))
    return out


Block = tuple[tuple[int | slice, ...], slice]
"""(index into the leading dims, query slice) of one chunk of work."""


def attention_blocks(leading: torch.Size, n_queries: int, step: int, *, fewest: bool) -> list[Block]:
    """The chunks of a ``(*leading, queries, ·)`` problem, ``step`` queries of every group's worth each.

    Preferred: :func:`in_place_blocks`, each a contiguous slice of a contiguous output, so the V
    matmul writes in place (4–8 % of a CPU call otherwise goes to a copy onto fresh memory).
    :func:`across_blocks` are taken instead when they are fewer and either ``fewest`` is asked
    (GPU: each block costs kernel launches) or the leading dims did not flatten: in-place blocks
    then never span two batch entries (batch 16 of 64 queries made 16 blocks where one chunk across
    all does, at twice the time), and the packed layout's output is strided anyway.
    """
    in_place, across = in_place_blocks(leading, n_queries, step), across_blocks(leading, n_queries, step)
    return across if (fewest or len(leading) > 1) and len(across) < len(in_place) else in_place


def in_place_blocks(leading: torch.Size, n_queries: int, step: int) -> list[Block]:
    """Blocks of whole groups, or queries of one group, along the last leading dim (:func:`group_blocks`)."""
    *outer, inner = leading
    rows = step * math.prod(leading)
    return [
        ((*index, groups), queries)
        for index in itertools.product(*map(range, outer))
        for groups, queries in group_blocks(inner, n_queries, rows)
    ]


def across_blocks(leading: torch.Size, n_queries: int, step: int) -> list[Block]:
    """Chunks of ``step`` queries across all groups."""
    every = (slice(None),) * len(leading)
    return [(every, slice(start, min(start + step, n_queries))) for start in range(0, n_queries, step)]


def group_blocks(groups: int, n_queries: int, block_rows: int) -> list[tuple[slice, slice]]:
    """(groups, queries) blocks of about ``block_rows`` score rows each, each a contiguous slice of a
    ``(groups, queries, ·)`` tensor: whole groups when a group fits, else queries of one group.

    Why: the V matmul then writes straight into the output, with no per-chunk copy (4–8 % of a
    call on CPU: the copy lands on fresh output memory). Sizes are balanced (no small last block).
    """
    block_rows = max(1, block_rows)
    if n_queries <= block_rows:
        return [(part, slice(0, n_queries)) for part in _balanced(groups, block_rows // n_queries)]
    return [(slice(g, g + 1), part) for g in range(groups) for part in _balanced(n_queries, block_rows)]


def _balanced(n: int, most: int) -> list[slice]:
    """``range(n)`` cut into as few slices of at most ``most`` as possible, their sizes within one."""
    count = -(-n // most)
    size, larger = divmod(n, count)
    starts = [i * size + min(i, larger) for i in range(count + 1)]
    return [slice(starts[i], starts[i + 1]) for i in range(count)]


def _scaled_scores_into(scores: Tensor, q: Tensor, k_t: Tensor, scale: float) -> None:
    """``scores = scale · q @ k_t`` (batched), written into the workspace buffer ``scores``.

    One ``baddbmm`` with β = 0 where that ignores the buffer's old contents (CPU, CUDA). Elsewhere a
    matmul and a scaling: MPS computed ``0 · old`` (torch ≤ 2.13, pytorch/pytorch#187521), so a fresh
    buffer's garbage or a masked call's −∞ became NaN in every score.
    """
    if scores.device.type in ("cpu", "cuda"):
        torch.baddbmm(scores, q, k_t, beta=0.0, alpha=scale, out=scores)
    else:
        torch.bmm(q, k_t, out=scores).mul_(scale)


def _group_view(t: Tensor, groups: int) -> Tensor | None:
    """``t`` (*batch, rows, cols) viewed as (groups, rows, cols), or None if that needs a copy."""
    try:
        return t.view(groups, *t.shape[-2:])
    except RuntimeError:
        return None


_kept_workspaces: dict[bool, Workspace] = {}
_kept_lock = threading.Lock()


@contextmanager
def _workspace(device: torch.device) -> Iterator[Workspace]:
    """The buffers for one call: on CPU one set is kept between calls, elsewhere they are fresh.

    Why: a UNet step calls cross-attention dozens of times with the same few shapes; on CPU, fresh
    multi-megabyte buffers come back from the OS as new pages each call (page faults cost more than
    the arithmetic). GPU allocators already cache, and GPU memory is too precious to hold on to.
    One set per process (not per thread: WebUI servers run generations on pooled threads), taken
    under a lock; a concurrent call gets fresh buffers instead of waiting.
    """
    if device.type != "cpu" or not _kept_lock.acquire(blocking=False):
        yield Workspace()
        return
    try:
        # Buffers made under inference mode cannot be written outside it (the WebUI, diffusers and
        # scripts differ in which mode they sample under): one set per mode.
        yield _kept_workspaces.setdefault(torch.is_inference_mode_enabled(), Workspace())
    finally:
        _kept_lock.release()


def _float32_rows(chunk: Tensor, groups: int, ws: Workspace) -> Tensor:
    """A ``(..., rows, d)`` chunk of queries as float32 ``(groups, rows, d)``: a view when it is one
    already (float32 q whose leading dims merge; the matmul takes strided rows), else converted into
    a workspace buffer."""
    rows, dim = chunk.shape[-2], chunk.shape[-1]
    if chunk.dtype == torch.float32:
        try:
            return chunk.view(groups, rows, dim)
        except RuntimeError:
            pass
    buffer = ws.buffer("q", (groups, rows, dim), chunk.device)
    buffer.view(chunk.shape).copy_(chunk)
    return buffer


def chunk_queries(
    groups: int,
    n_queries: int,
    n_keys: int,
    memory_budget: int,
    on_gpu: bool,
    *,
    q_dim: int = 0,
    v_dim: int = 0,
) -> int:
    """Queries per chunk: within the memory budget and, on CPU, about ``_CACHE_FRIENDLY_ELEMENTS`` scores.

    Per query: the float32 score-sized buffers, plus its float32 query and output rows.
    """
    check_memory_budget(memory_budget)
    per_query = groups * 4 * (n_keys * _WORKING_COPIES + q_dim + v_dim)
    step = max(1, memory_budget // per_query)
    if not on_gpu:
        step = min(step, max(1, _CACHE_FRIENDLY_ELEMENTS // (groups * n_keys)))
    return min(step, n_queries)


def _expand_mask(mask: Tensor, batch: torch.Size, n_queries: int, n_keys: int) -> Tensor:
    """A (bool or additive) mask broadcast to ``(*batch, N, K)``: a view, never a copy (a mask shared
    by all heads would otherwise become a score-sized tensor)."""
    try:
        return mask.expand(*batch, n_queries, n_keys)
    except RuntimeError:
        raise ValueError(
            f"PLADIS attention: a mask of shape {tuple(mask.shape)} does not broadcast to the scores' "
            f"shape {(*batch, n_queries, n_keys)}"
        ) from None


def _apply_mask(scores: Tensor, mask: Tensor) -> None:
    if mask.dtype == torch.bool:
        scores.masked_fill_(~mask, -math.inf)
    else:
        scores.add_(mask.to(torch.float32))


def pladis_attention_packed(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    *,
    alpha: float,
    lam: float,
    scale: float | None = None,
    mask: Tensor | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Tensor:
    """:func:`pladis_attention` for the packed layout of WebUI attention modules.

    q ``(B, N, heads·d)``, k and v ``(B, K, heads·d)`` → ``(B, N, heads·d)`` in q's dtype. ``mask``
    broadcasts against ``(B, heads, N, K)``.
    """
    if isinstance(heads, bool) or not isinstance(heads, numbers.Integral) or heads <= 0:
        raise ValueError(f"PLADIS attention: heads must be a positive integer, got {heads!r}")
    heads = int(heads)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"PLADIS attention: packed {name} must be (batch, tokens, heads·d), got {shape}")
        if t.shape[2] % heads:
            raise ValueError(f"PLADIS attention: {heads} heads do not divide {name}'s width {t.shape[2]}")
    n_queries = q.shape[1]

    def split(t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], t.shape[1], heads, t.shape[2] // heads).transpose(1, 2)

    out = _attention(split(q), split(k), split(v), alpha, lam, scale, mask, memory_budget, heads_last=True)
    # The batch of the result: q's, k's and v's broadcast together. No -1: 0-size inputs.
    return out.transpose(1, 2).reshape(out.shape[0], n_queries, heads * out.shape[-1])
