"""Fused Triton path for PLADIS cross-attention: ``((1−λ)·softmax(S) + λ·entmax_α(S)) @ V`` in one kernel.

Why: done with separate torch ops the blend is many K-wide passes over a float32 score tensor; with
cross-attention's short key rows (77–231 text tokens) one program can hold a whole row on-chip and do the
softmax, the entmax threshold and the blend between the two matmuls, writing only the output.

Triton is imported lazily (``pladis._triton_fwd``), never at ``import pladis`` time. The kernel runs on
CUDA tensors (NVIDIA; ROCm is left to the torch path), or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported) for tests.

Public API: :func:`is_supported`, :func:`unsupported_reason`, :func:`pladis_attention_triton`,
:func:`pladis_weights_triton`; :class:`TritonUnsupported` is raised when a supported-looking call cannot
be launched on this GPU (e.g. not enough shared memory) — callers fall back to the torch path.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import warnings
from typing import Any

import torch
from torch import Tensor

from .entmax import check_alpha, float32_exact, is_softmax
from .env import env_flag

log = logging.getLogger("pladis")

MAX_KEYS = 512
"""Longest key row the kernel holds on-chip (padded to a power of two)."""
HEAD_DIM_RANGE = (16, 256)
"""Supported head dims (padded to a power of two); SD1.5/SD2/SDXL/Flux use 40–160."""
ROW_SUM_TOL = 2e-6
"""Entmax rows whose unnormalised sum is off by more than this keep iterating in the kernel."""
MAX_FIX = 32
"""Bound on the in-kernel extra rounds for unsettled rows (Newton from below converges long before)."""
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_GRID_Y = 65535
_failed_shapes: set[tuple[Any, ...]] = set()
_untuned_shapes: set[tuple[Any, ...]] = set()
"""Autotuning keys (shape class, queries, mode, mask kind, outputs: what the autotuner keys on) whose
tuning ran out of GPU memory: they take the heuristic tile from then on. Why: the autotuner
benchmarks with a 256 MB buffer of its own and caches nothing after a failure, so on a nearly full
card every call tuned again, each failed allocation emptying torch's cache. Keys tuned before keep
their tile."""
_broken: list[str] = []
"""Why Triton cannot build or launch anything in this process (e.g. no C compiler), once it failed."""
_meta_overrides: dict[str, Any] = {}
"""Compile-time parameters to override in every launch (GPU experiments in ``bench/``; empty in use)."""


class TritonUnsupported(RuntimeError):
    """The kernel cannot run this call on this device (e.g. shared memory); use the torch path."""


def interpreter_mode() -> bool:
    """True when Triton's CPU interpreter is requested (tests without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


MIN_TRITON = (3, 0)
"""Oldest Triton the kernel compiles with: it uses ``tl.dot``'s ``input_precision`` and accumulator
arguments (Triton 3.0). A1111 1.10's default torch 2.1.2 brings Triton 2.1, where every shape paid a
failed compile before the torch path took over."""


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether a Triton the kernel compiles with imports (cached; Windows installs often lack it)."""
    return _triton_problem() is None


@functools.lru_cache(maxsize=1)
def _triton_problem() -> str | None:
    """Why Triton cannot be used (not importable, too old), or None."""
    try:
        import triton
        import triton.language
    except Exception:
        return "triton is not importable"
    version = _release(getattr(triton, "__version__", ""))
    if version is not None and version < MIN_TRITON:
        minimum = ".".join(map(str, MIN_TRITON))
        return f"triton {triton.__version__} is too old (the kernel needs {minimum}+)"
    return None


def _release(version: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a version string such as ``3.5.1`` or ``2.1.0+git``; None if unreadable."""
    parts = version.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return None


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=256)
def _tiles(k_len: int, d: int) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_D): key count and head dim padded to powers of two (cached: asked per call)."""
    return max(16, _next_pow2(k_len)), max(16, _next_pow2(d))


def _shape_class(q: Tensor, k_len: int) -> tuple[Any, ...]:
    return (q.device.type, q.device.index, q.dtype, *_tiles(k_len, q.shape[-1]))


def _smem_estimate(k_len: int, d: int, elem_size: int) -> int:
    """Shared memory the compiled kernel uses: one K/V tile plus ≤ 32 KiB of staging (ptxas at sm_86,
    fp16, α = 1.5: 64 KiB at K = 256, d = 64; 96 KiB at d = 128 and at K = 512, d = 64)."""
    block_k, block_d = _tiles(k_len, d)
    return block_k * block_d * elem_size + 32 * 1024


@functools.lru_cache(maxsize=16)
def _capability(device: torch.device) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


@functools.lru_cache(maxsize=16)
def _smem_limit(device: torch.device) -> int | None:
    """Opt-in shared memory per block of a CUDA device (None when unknown or not CUDA)."""
    if device.type != "cuda":
        return None
    try:
        props = torch.cuda.get_device_properties(device)
    except Exception:
        return None
    limit = getattr(props, "shared_memory_per_block_optin", None)
    return int(limit) if limit else None


def _mask_ok(mask: Tensor, q: Tensor, k: Tensor) -> str | None:
    if not isinstance(mask, Tensor):
        return "mask is not a tensor"
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        return f"mask dtype {mask.dtype} (need bool or floating)"
    if mask.device != q.device:
        return "mask on another device"
    if mask.dim() > 4:
        return "mask has more than 4 dims"
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    if any(m not in (1, t) for m, t in zip(shape, target, strict=True)):
        return f"mask shape {tuple(mask.shape)} does not broadcast to {target}"
    return None


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> str | None:
    """Why the kernel cannot take this call, or None when it can (cheap; no GPU work, no sync)."""
    if not all(isinstance(t, Tensor) for t in (q, k, v)):
        return "q/k/v are not tensors"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q/k/v must be (B, H, N|K, d)"
    dev = q.device
    if k.device != dev or v.device != dev:
        return "q/k/v on different devices"
    if dev.type == "cuda":
        if torch.version.hip is not None:
            return "ROCm (use the torch path)"
        cap = _capability(dev)
        if cap < (8, 0):
            # Triton's supported GPUs; on 7.5 it compiled the kernel without tensor cores, with spills.
            return f"compute capability {cap} (kernel needs 8.0+)"
    elif not (dev.type == "cpu" and interpreter_mode()):
        return f"device {dev.type} (kernel needs CUDA, or CPU under TRITON_INTERPRET=1)"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype} (need one of fp16/bf16/fp32 for all)"
    b, h, _n, d = q.shape
    if k.shape[:2] != (b, h) or v.shape[:2] != (b, h):
        return "batch/heads of q, k, v differ"
    k_len = k.shape[2]
    if v.shape[2] != k_len or k.shape[3] != d or v.shape[3] != d:
        return "k/v shapes do not match q"
    if not 1 <= k_len <= MAX_KEYS:
        return f"{k_len} keys (kernel holds at most {MAX_KEYS})"
    if not HEAD_DIM_RANGE[0] <= d <= HEAD_DIM_RANGE[1]:
        return f"head dim {d} outside {HEAD_DIM_RANGE}"
    if b * h > _MAX_GRID_Y:
        return "too many batch·heads for one launch"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "autograd requested (kernel has no backward)"
    if mask is not None:
        reason = _mask_ok(mask, q, k)
        if reason:
            return reason
        if torch.is_grad_enabled() and mask.requires_grad:
            return "autograd requested on the mask"
    need = _smem_estimate(k_len, d, q.element_size())
    limit = _smem_limit(dev)
    if limit is not None and need > limit:
        return f"tiles need ~{need // 1024} KiB of shared memory, this GPU has {limit // 1024} KiB per block"
    if _shape_class(q, k_len) in _failed_shapes:
        return "this tile size failed to launch on this device before"
    if not triton_available():
        return _triton_problem()
    if _broken:
        return f"triton failed to build or launch the kernel before: {_broken[0]}"
    return None


def is_supported(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> bool:
    """True when :func:`pladis_attention_triton` can take these inputs."""
    try:
        return unsupported_reason(q, k, v, mask) is None
    except Exception:
        return False


def _mode(alpha: float, lam: float) -> tuple[int, float, float]:
    """Kernel branch and (α−1, β=1/(α−1)): 0 softmax only, 1 α=1.5, 2 α=2, 3 other α, 4 α just above 1,
    5 1.5 < α < 2.

    Branch 4 (1 + 1e-7 < α < 1.05), where a float32 search on τ is not exact, solves for the
    log-weight of the largest key instead; branch 5 is branch 3 started from the ℓ2 threshold mapped
    towards the ℓβ one (see ``pladis/_triton_fwd.py``).
    """
    if lam == 0.0 or is_softmax(alpha):
        return 0, 1.0, 1.0
    if alpha == 1.5:
        return 1, 0.5, 2.0
    if alpha == 2.0:
        return 2, 1.0, 1.0
    if alpha > 1.5:
        return 5, alpha - 1.0, 1.0 / (alpha - 1.0)
    return 3 if float32_exact(alpha) else 4, alpha - 1.0, 1.0 / (alpha - 1.0)


def _newton_steps(mode: int, block_k: int) -> int:
    """Fixed Newton steps before the exact step: enough that unsettled rows are rare (<0.3%).

    Branch 4 takes Halley steps from the softmax's value: two settle nearly every row (measured on
    CPU with the same iteration, α 1.0001–1.049, σ 1–10; the rest go on inside the program).
    """
    if mode == 4:
        return 2
    # Branch 5, + the exact step: three steps (four for K > 128) from the mapped start the torch path
    # also takes, whose GPU variant now takes four there (GPU_NEWTON_STEPS; it took three when this
    # branch was written).
    if mode == 5:
        return 2 if block_k <= 128 else 3
    if mode == 1:
        return 3 if block_k <= 128 else 4
    if mode == 2:
        return 4 if block_k <= 256 else 5
    return 4 if block_k <= 128 else 5


def _fits(block_m: int, block_k: int, block_d: int, wide: bool = False) -> bool:
    """Tiles that compile for sm_90 without register spills (checked with ptxas, 4 and 8 warps; at
    sm_86 the default tiles spill 52–140 bytes, review helper-64).

    ``wide``: float32 inputs, whose exact (non-tensor-core) dots need far more registers.
    """
    if wide and block_m > 16:
        return False
    return block_m * block_k <= 8192 and block_m * block_k * block_d <= 8192 * 128


def _measured_tile(
    block_k: int, block_d: int, wide: bool, mode: int, capability: tuple[int, int] | None
) -> tuple[int, int] | None:
    """(BLOCK_M, num_warps) where a tile was measured best on a GPU, else None.

    Hopper, 16-bit inputs, K ≤ 128, head dim ≤ 64, softmax / α = 1.5 / α = 2: 64 queries on 4 warps.
    Measured on an H100 (SDXL level 1, α = 1.5, GPU time per call): 64/4 34.6 µs, 128/8 38.4, 32/4
    50.6, 16/4 57.6, 64/8 72.9, 32/8 78.4. The two fast ones give each warp 16 whole rows (one
    warpgroup MMA tile): the ~15 row reductions of the threshold search stay inside a warp, where the
    others cross warps through shared memory and a barrier each (``bench/ptxas_report.py``: 17
    barriers in the PTX against 42–73). On the H100 (Triton 3.6) 64/4 used 255 registers, no spills.
    Nothing else was measured: general α (its powers spill ~500 bytes at 64/4), Ampere/Ada (64/4
    spills ~130 bytes), K > 128, head dims above 64.
    """
    hopper = capability is not None and capability[0] == 9
    if hopper and not wide and mode in (0, 1, 2) and block_k <= 128 and block_d <= 64:
        return 64, 4
    return None


def _heuristic(
    block_k: int, block_d: int, wide: bool = False, mode: int = 1, capability: tuple[int, int] | None = None
) -> tuple[int, int]:
    """(BLOCK_M, num_warps) when not autotuning: the measured tile, else the largest spill-free query
    block on 8 warps."""
    measured = _measured_tile(block_k, block_d, wide, mode, capability)
    if measured is not None:
        return measured
    for block_m in (32, 16):
        if _fits(block_m, block_k, block_d, wide):
            return block_m, 8
    return 16, 8


def _autotune_enabled(measured_tile: bool = False) -> bool:
    """``PLADIS_TRITON_AUTOTUNE=1``: always; ``=0``: never; unset: only where no tile was measured.

    Why not always: autotuning compiles and times several tiles (seconds) for every new shape and α
    class — a stall in the first steps of a generation — and adds its own cost to every launch, for
    nothing where the measured tile is known to be the fastest. Where nothing was measured (other
    GPUs, general α, long prompts) it is the best guess available.
    """
    if interpreter_mode():
        return False
    setting = env_flag("PLADIS_TRITON_AUTOTUNE")
    return not measured_tile if setting is None else setting


@functools.lru_cache(maxsize=1)
def _kernels() -> tuple[Any, Any]:
    """(raw kernel, autotuned kernel) — imports Triton on first use."""
    import triton

    from . import _triton_fwd

    raw = _triton_fwd.pladis_fwd_kernel
    configs = [
        triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=1) for bm in (16, 32, 64) for w in (4, 8)
    ]

    def prune(configs: list, nargs: dict | None, **kwargs: Any) -> list:
        args = {**(nargs or {}), **kwargs}
        bk, bd = int(args["BLOCK_K"]), int(args["BLOCK_D"])
        wide = args.get("DOT_PREC") == "ieee"
        keep = [c for c in configs if _fits(c.kwargs["BLOCK_M"], bk, bd, wide)]
        return keep or [c for c in configs if c.kwargs["BLOCK_M"] == 16 and c.num_warps == 8]

    tuned = triton.autotune(
        configs=configs,
        key=["N", "KLEN", "D", "MODE", "MASK_KIND", "WRITE_O", "WRITE_W"],
        prune_configs_by={"early_config_prune": prune},
    )(raw)
    return raw, tuned


def _prepare_mask(mask: Tensor | None, q: Tensor, k_len: int) -> tuple[int, Tensor, tuple[int, ...]]:
    if mask is None:
        return 0, q, (0, 0, 0, 0)
    b, h, n, _ = q.shape
    full = torch.broadcast_to(mask, (b, h, n, k_len))
    kind = 1 if mask.dtype == torch.bool else 2
    return kind, full, tuple(full.stride())


def _check_args(
    alpha: float, lam: float, scale: float | None, d: int, checked: bool
) -> tuple[float, float, float]:
    """α and λ get the torch path's checks and messages, unless the dispatch already checked them
    (``checked``: host time per launch counts at SD shapes); the scale is checked here."""
    if not checked:
        from .attention import check_lam  # not at import time: attention imports this module lazily

        alpha, lam = check_alpha(alpha), check_lam(lam)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: {scale!r} is not finite")
    return float(alpha), float(lam), scale


def compile_meta(
    dtype: torch.dtype,
    mode: int,
    block_k: int,
    block_d: int,
    mask_kind: int = 0,
    write_o: bool = True,
    write_w: bool = False,
    upcast: bool = False,
) -> dict[str, Any]:
    """The kernel's compile-time parameters except the tile (``BLOCK_M``, warps), for launches and for
    ``bench/ptxas_report.py``, which compiles them offline to read register use."""
    n_newton = _newton_steps(mode, block_k)
    meta = _base_meta(dtype, mode, n_newton, MAX_FIX, block_k, block_d, mask_kind, write_o, write_w, upcast)
    return {**meta, **_meta_overrides} if _meta_overrides else meta


@functools.lru_cache(maxsize=512)
def _base_meta(
    dtype: torch.dtype,
    mode: int,
    n_newton: int,
    max_fix: int,
    block_k: int,
    block_d: int,
    mask_kind: int,
    write_o: bool,
    write_w: bool,
    upcast: bool,
) -> dict[str, Any]:
    """Cached: a launch passes it as keywords and never changes it."""
    return {
        "MODE": mode,
        "MASK_KIND": mask_kind,
        "N_NEWTON": n_newton,
        "MAX_FIX": max_fix,
        "TOL": ROW_SUM_TOL,
        "WRITE_O": write_o,
        "WRITE_W": write_w,
        "DOT_PREC": "ieee" if dtype == torch.float32 or upcast else "tf32",
        "UPCAST_DOT": upcast,
        "SPLIT_W": dtype != torch.float32,
        "BLOCK_K": block_k,
        "BLOCK_D": block_d,
    }


def _launch(
    q: Tensor,
    k: Tensor,
    v: Tensor | None,
    mask: Tensor | None,
    alpha: float,
    lam: float,
    scale: float | None,
    write_o: bool,
    write_w: bool,
    checked: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    vv = k if v is None else v
    if not checked:
        reason = unsupported_reason(q, k, vv, mask)
        if reason:
            raise ValueError(f"pladis triton kernel: unsupported input: {reason}")
    # The kernel assumes unit stride along the head dim (true of head-split views of linear outputs).
    q, k, vv = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, vv))
    b, h, n, d = q.shape
    k_len = k.shape[2]
    alpha, lam, scale = _check_args(alpha, lam, scale, d, checked)
    mode, am1, beta = _mode(alpha, lam)
    block_k, block_d = _tiles(k_len, d)
    # empty_like keeps q's strides when q is dense (so its unit head stride), else it is contiguous.
    out = torch.empty_like(q) if write_o else None
    wout = torch.empty((b, h, n, k_len), device=q.device, dtype=torch.float32) if write_w else None
    if n == 0:
        return out, wout
    mask_kind, mask_t, ms = _prepare_mask(mask, q, k_len)
    upcast = q.dtype == torch.bfloat16 and interpreter_mode()
    o_t = out if out is not None else q
    w_t = wout if wout is not None else q
    args: tuple[Any, ...] = (
        q, k, vv, o_t, w_t, mask_t,
        *q.stride()[:3], *k.stride()[:3], *vv.stride()[:3], *o_t.stride()[:3], *ms,
        h, n, k_len, d,
        scale, lam, am1, beta,
    )  # fmt: skip
    meta = compile_meta(q.dtype, mode, block_k, block_d, mask_kind, write_o, write_w, upcast)
    tune_key, tuning = None, False
    try:
        raw, tuned = _kernels()
        with _device_guard(q):
            cap = _capability(q.device) if q.is_cuda else None
            wide = q.dtype == torch.float32
            measured = _measured_tile(block_k, block_d, wide, mode, cap) is not None
            tune_key = (_shape_class(q, k_len), n, mode, mask_kind, write_o, write_w)
            tuning = _autotune_enabled(measured) and tune_key not in _untuned_shapes
            if tuning:

                def grid(m: dict[str, Any]) -> tuple[int, int]:
                    return (-(-n // m["BLOCK_M"]), b * h)

                tuned[grid](*args, **meta)
            else:
                block_m, warps = _heuristic(block_k, block_d, wide, mode, cap)
                raw[(-(-n // block_m), b * h)](*args, **meta, BLOCK_M=block_m, num_warps=warps, num_stages=1)
    except Exception as exc:
        classified = _classified(exc, q, k_len, tune_key if tuning else None)
        if classified is exc:
            raise
        raise classified from exc
    return out, wout


_PER_TILE_ERRORS = ("OutOfResources", "CompileTimeAssertionFailure")
"""Triton errors that depend on the GPU and the tile (shared memory, registers, a static size check):
that shape class goes to the torch path from then on, other tiles are still tried."""


def _classified(exc: Exception, q: Tensor, k_len: int, tune_key: tuple[Any, ...] | None) -> Exception:
    """What a failed build or launch becomes: :class:`TritonUnsupported` (the torch path answers this
    call) or, for a GPU in error, the exception itself.

    - Per tile (:data:`_PER_TILE_ERRORS`): the shape class is marked, and said once.
    - Out of memory, from torch or from Triton's driver ("Triton Error [CUDA]: out of memory"): the
      torch path answers this call; when the launch was tuning (``tune_key``), that key is no longer
      autotuned (:data:`_untuned_shapes`: the tuning's 256 MB benchmark buffer is the kernel's only
      large allocation). The kernel itself stays on, since memory comes back.
    - Any other CUDA error: raised, since the GPU itself is in error (the torch path would not help).
    - Anything else is Triton's toolchain or version (no C compiler for its launcher, a broken cache,
      an API renamed between versions, surfacing as ``CompilationError``; a ptxas that does not know
      the GPU): a broken Triton install must not break generation. Off for the process, said once.
    """
    name = type(exc).__name__
    if name in _PER_TILE_ERRORS:
        shape = _shape_class(q, k_len)
        _failed_shapes.add(shape)
        log.warning(
            "PLADIS: the Triton kernel cannot run %s here (%s); using the torch path for it", shape, exc
        )
        return TritonUnsupported(f"pladis triton kernel cannot run here: {exc}")
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        if tune_key is not None and tune_key not in _untuned_shapes:
            _untuned_shapes.add(tune_key)
            log.warning(
                "PLADIS: out of GPU memory tuning the Triton kernel for %s; untuned from now on", tune_key
            )
        return TritonUnsupported(f"pladis triton kernel: out of memory now ({exc}); torch path this call")
    if "CUDA error" in str(exc):
        return exc
    _broken.append(f"{name}: {exc}")
    warnings.warn(
        f"PLADIS: the Triton kernel failed ({_broken[0]}); using the torch path from now on",
        RuntimeWarning,
        stacklevel=3,
    )
    return TritonUnsupported(f"pladis triton kernel cannot run here: {exc}")


def _device_guard(q: Tensor) -> Any:
    """Make q's GPU current for the launch (Triton launches on the current device); free when it is."""
    if q.is_cuda and q.device.index != torch.cuda.current_device():
        return torch.cuda.device(q.device)
    return contextlib.nullcontext()


def pladis_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    alpha: float,
    lam: float,
    scale: float | None = None,
    mask: Tensor | None = None,
    checked: bool = False,
) -> Tensor:
    """Fused ``((1−λ)·softmax(S) + λ·entmax_α(S)) @ v`` with ``S = q·kᵀ·scale (+ mask)``; q.dtype out.

    q: (B, H, N, d); k, v: (B, H, K, d); mask: bool (True = attend) or additive float, broadcastable to
    (B, H, N, K). The output has q's memory layout (a head-split view of a packed tensor stays packed).
    Raises ValueError for unsupported inputs (check :func:`is_supported` first) and
    :class:`TritonUnsupported` when this GPU cannot launch the tile size.

    ``checked=True``: the caller has just had these inputs accepted by :func:`is_supported` (the
    dispatch in :func:`pladis.attention.pladis_attention` does), so the check is not repeated — at SD
    shapes the host time of a launch already exceeds the kernel's GPU time.
    """
    out, _ = _launch(q, k, v, mask, alpha, lam, scale, write_o=True, write_w=False, checked=checked)
    assert out is not None
    return out


def pladis_weights_triton(
    q: Tensor,
    k: Tensor,
    *,
    alpha: float,
    lam: float,
    scale: float | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """The kernel's float32 mixed weights ``(1−λ)·softmax + λ·entmax_α`` (B, H, N, K), for testing."""
    _, w = _launch(q, k, None, mask, alpha, lam, scale, write_o=False, write_w=True)
    assert w is not None
    return w


__all__: list[str] = [
    "HEAD_DIM_RANGE",
    "MAX_KEYS",
    "TritonUnsupported",
    "interpreter_mode",
    "is_supported",
    "pladis_attention_triton",
    "pladis_weights_triton",
    "triton_available",
    "unsupported_reason",
]
