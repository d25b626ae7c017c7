"""What every solver shares: the row-sum tolerance, workspace buffers, result containers, scaled scores."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

ROW_SUM_TOL = 1e-6
"""A row whose unnormalised weights sum to 1 within this is accepted (then renormalised)."""

SOFTMAX_LIMIT = 1e-7
"""α − 1 at or below this gives softmax: α-entmax differs from it by about 2·(α − 1), which the blend
multiplies by λ (up to 10 in :class:`~pladis.params.PladisParams`): 2e-6 at this limit. Above it the
float32 near-softmax solver is exact to ~2e-7 (measured down to α − 1 = 1.01e-7)."""

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


_SAMPLED_ROW_STEP = 8  # shares (candidate keys, slow exp inputs) are estimated on every 8th row
_TINY = 1e-30
_LOG2_E = 1.0 / math.log(2.0)
_LOG_FLOOR = 2.0**-126  # smallest normal float32: log₂ of it is exactly −126
_FLOAT64_NORMAL = 2.0**-1022  # smallest normal float64


def cpu_variant(t: Tensor | ScaledScores) -> bool:
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

    def get(self, name: str, like: Tensor | ScaledScores, dtype: torch.dtype = torch.float32) -> Tensor:
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


def _settled(total: Tensor) -> Tensor:
    """Rows whose sum is within ``ROW_SUM_TOL`` of 1, or 0 (no finite key: nothing to settle)."""
    return ((total - 1.0).abs_() <= ROW_SUM_TOL).logical_or_(total == 0)


def _support(t: Tensor, out: Tensor) -> Tensor:
    """1.0 where ``t > 0``, else 0.0, into ``out`` (a float comparison: ~1.5× faster than ``sign``)."""
    return torch.gt(t, 0.0, out=out)


def _shifted(x: Tensor | ScaledScores, tau: Tensor, out: Tensor, floor: float = 0.0) -> Tensor:
    """``max(x − τ, floor)`` into ``out``: ``(x − τ)₊``, or floored at ``2^-126`` before a ``log₂``."""
    if isinstance(x, ScaledScores):
        return torch.add(tau.neg(), x.centred, alpha=x.scale, out=out).clamp_min_(floor)
    return torch.sub(x, tau, out=out).clamp_min_(floor)
