"""Benchmark of PLADIS cross-attention against stock SDPA and the reference approach.

Run ``python -m pladis.bench`` (``--help`` for options). For each cross-attention shape of SD1.5 512²,
SDXL 1024² and long prompts it prints the median time of

* ``sdpa``: stock :func:`torch.nn.functional.scaled_dot_product_attention`;
* ``ref``: the reference approach — explicit softmax and the ``entmax`` package (sort-based
  ``entmax15`` / ``sparsemax``, ``entmax_bisect`` otherwise), blended before one V matmul, in the
  input dtype as the official code does (only when ``entmax`` is installed);
* ``ours``: :func:`pladis.attention.pladis_attention` for each requested α;

their ratios, and the extra peak memory of ours over SDPA (at the first α, and the worst over all
α). Variants are interleaved round by round, in an order shuffled each round (seeded), and every
ratio is the median of per-round ratios, so a machine shared with other work still gives comparable
figures. Timings belong here, never in a pass/fail test.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import pladis_attention, pladis_attention_packed

Shape = tuple[int, int, int, int, int]  # (B, H, N, K, d)

LAYOUTS = ("heads", "packed")
"""``heads``: contiguous (B, H, tokens, d), as diffusers-style callers and the core API take it;
``packed``: (B, tokens, H·d) split into heads as a transposed view, as the WebUI attention modules
hand it over (A1111, Forge: :func:`pladis_attention_packed`; SDPA and the reference get the views)."""

SHAPES: dict[str, Shape] = {
    "SD1.5 L1": (2, 8, 4096, 77, 40),
    "SD1.5 L2": (2, 8, 1024, 77, 80),
    "SD1.5 L3": (2, 8, 256, 77, 160),
    "SD1.5 L4": (2, 8, 64, 77, 160),
    "SDXL L1": (2, 10, 4096, 77, 64),
    "SDXL L2": (2, 20, 1024, 77, 64),
    "SD1.5 L1 K=154": (2, 8, 4096, 154, 40),
    "SD1.5 L1 K=231": (2, 8, 4096, 231, 40),
    "SDXL L1 K=154": (2, 10, 4096, 154, 64),
    "SDXL L2 K=154": (2, 20, 1024, 154, 64),
}


@dataclass
class Row:
    name: str
    shape: Shape
    sdpa_ms: float
    ref_ms: float | None
    ours_ms: dict[float, float]
    ours_ratio: dict[float, float]  # ours/sdpa
    alpha_ratio: dict[float, float]  # ours at α / ours at the first α
    ref_speedup: float | None
    sdpa_peak_mib: float
    ours_peak_mib: dict[float, float]  # ours at each α, in the order measured (the first α first)

    @property
    def peak_mib(self) -> tuple[float, float]:
        """(sdpa, ours at the first α)."""
        return self.sdpa_peak_mib, next(iter(self.ours_peak_mib.values()))

    @property
    def extra_peak_mib(self) -> float:
        return max(0.0, self.peak_mib[1] - self.peak_mib[0])

    @property
    def worst_extra_peak(self) -> tuple[float, float]:
        """The largest extra peak memory over all α (MiB) and its α."""
        alpha = max(self.ours_peak_mib, key=self.ours_peak_mib.__getitem__)
        return max(0.0, self.ours_peak_mib[alpha] - self.sdpa_peak_mib), alpha


def _reference(alpha: float) -> Callable[[torch.Tensor], torch.Tensor] | None:
    try:
        import entmax as package
    except ImportError:
        return None
    if alpha == 1.5:
        return lambda s: package.entmax15(s, dim=-1)
    if alpha == 2.0:
        return lambda s: package.sparsemax(s, dim=-1)
    return lambda s: package.entmax_bisect(s, alpha=alpha, dim=-1)


def reference_attention(q, k, v, alpha: float, lam: float):
    """The official recipe: softmax and ``entmax``-package weights in q's dtype, blended, one V matmul."""
    sparse = _reference(alpha)
    assert sparse is not None
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    weights = (1.0 - lam) * torch.softmax(scores, dim=-1) + lam * sparse(scores)
    return weights @ v


@dataclass
class Ops:
    """The benchmarked calls on one set of inputs, in one layout."""

    sdpa: Callable[[], object]
    ours: Callable[[float, float], object]  # (α, λ)
    ref: Callable[[float, float], object]  # (α, λ); needs the entmax package


KEYS = ("random", "padded")
KEYS_HELP = (
    "random: Gaussian keys; padded: a short prompt padded to K tokens with near-equal end tokens "
    "(a first key of thrice the norm, 11 others, the rest within 1 %% of one another), as a text "
    "encoder's repeated end token gives: keys tied near the support edge"
)


def _pad_prompt_(k: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Keys ``(..., K, features)`` made a padded prompt's in place (see ``KEYS_HELP``)."""
    k.select(-2, 0).mul_(3.0)
    padding = k[..., 12:, :]
    base = torch.randn(k[..., :1, :].shape, generator=gen)
    padding.copy_(base + 0.01 * torch.randn(padding.shape, generator=gen))
    return k


def make_ops(
    shape: Shape, layout: str, device: torch.device, dtype: torch.dtype, keys: str = "random"
) -> Ops:
    """Seeded inputs of ``shape`` in ``layout`` (keys as ``keys`` says), and the calls on them."""
    if keys not in KEYS:
        raise ValueError(f"keys must be one of {KEYS}, got {keys!r}")
    batch, heads, n_queries, n_keys, dim = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    if layout == "heads":
        q, k, v = (torch.randn(batch, heads, n, dim, generator=gen) for n in (n_queries, n_keys, n_keys))
        if keys == "padded":
            _pad_prompt_(k, gen)
        q, k, v = (t.to(device, dtype) for t in (q, k, v))
        return Ops(
            sdpa=lambda: F.scaled_dot_product_attention(q, k, v),
            ours=lambda a, lam: pladis_attention(q, k, v, alpha=a, lam=lam),
            ref=lambda a, lam: reference_attention(q, k, v, a, lam),
        )
    if layout != "packed":
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    packed = [torch.randn(batch, n, heads * dim, generator=gen) for n in (n_queries, n_keys, n_keys)]
    if keys == "padded":
        _pad_prompt_(packed[1], gen)
    packed = [t.to(device, dtype) for t in packed]
    q, k, v = (t.view(batch, -1, heads, dim).transpose(1, 2) for t in packed)

    def merge(out: torch.Tensor) -> torch.Tensor:
        return out.transpose(1, 2).reshape(batch, n_queries, heads * dim)

    return Ops(
        sdpa=lambda: merge(F.scaled_dot_product_attention(q, k, v)),
        ours=lambda a, lam: pladis_attention_packed(*packed, heads, alpha=a, lam=lam),
        ref=lambda a, lam: merge(reference_attention(q, k, v, a, lam)),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak CUDA memory allocated while ``fn`` runs (its result included), above what was allocated before."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_peak_child(
    shape: Shape,
    variant: str,
    alpha: float,
    lam: float,
    dtype: str = "float32",
    layout: str = "heads",
    keys: str = "random",
) -> int:
    """In a fresh process: peak resident memory (bytes) during one call of ``variant``, above before.

    torch's CPU allocator is invisible to tracemalloc and the profiler's memory view double-counts
    nested ops, so this asks Linux: reset the high-water mark (``clear_refs``), run, read ``VmHWM``.
    """
    small_shape = (*shape[:2], 8, 8, shape[4])
    with torch.inference_mode():
        small = make_ops(small_shape, layout, torch.device("cpu"), getattr(torch, dtype))
        small.sdpa()  # load kernels and libraries, not memory
        small.ours(alpha, lam)
        ops = make_ops(shape, layout, torch.device("cpu"), getattr(torch, dtype), keys)
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset VmHWM to the current resident set
        before = _status_kib("VmRSS")
        if variant == "sdpa":
            ops.sdpa()
        else:
            ops.ours(alpha, lam)
        peak = _status_kib("VmHWM")
    return (peak - before) * 1024


def _cpu_peak_bytes(
    shape: Shape,
    variant: str,
    alpha: float,
    lam: float,
    dtype: torch.dtype,
    layout: str = "heads",
    keys: str = "random",
) -> int:
    import subprocess
    import sys

    dtype_name = str(dtype).removeprefix("torch.")
    code = (
        f"import torch; torch.set_num_threads({torch.get_num_threads()}); "
        "from pladis.bench import _cpu_peak_child; "
        f"print(_cpu_peak_child({tuple(shape)!r}, {variant!r}, {alpha!r}, {lam!r}, "
        f"{dtype_name!r}, {layout!r}, {keys!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def bench_shape(
    name: str,
    shape: Shape,
    alphas: list[float],
    lam: float,
    rounds: int,
    device: torch.device,
    dtype: torch.dtype,
    with_reference: bool,
    layout: str = "heads",
    keys: str = "random",
) -> Row:
    ops = make_ops(shape, layout, device, dtype, keys)
    variants: dict[str, Callable[[], object]] = {"sdpa": ops.sdpa}
    for alpha in alphas:
        variants[f"ours {alpha:g}"] = lambda a=alpha: ops.ours(a, lam)
    reference_alpha = alphas[0]
    if with_reference and _reference(reference_alpha) is not None:
        variants["ref"] = lambda: ops.ref(reference_alpha, lam)

    times: dict[str, list[float]] = {key: [] for key in variants}
    order = list(variants)
    shuffler = random.Random(0)  # seeded: the same orders every run
    with torch.inference_mode():
        for fn in variants.values():
            fn()  # warm-up
        for _ in range(rounds):
            # Shuffled each round, so no variant always runs right after the same one: after the
            # memory-hungry reference a call ran 15-30 % slower (a rotation keeps the neighbours).
            shuffler.shuffle(order)
            for key in order:
                times[key].append(_time_once(variants[key], device))
        # Every α: the solvers differ in chunk size and buffers (1.5 < α < 2 gathers keys).
        if device.type == "cuda":
            peak_sdpa = cuda_peak_bytes(variants["sdpa"], device)
            peaks = {a: cuda_peak_bytes(variants[f"ours {a:g}"], device) for a in alphas}
        else:
            peak_sdpa = _cpu_peak_bytes(shape, "sdpa", alphas[0], lam, dtype, layout, keys)
            peaks = {a: _cpu_peak_bytes(shape, "ours", a, lam, dtype, layout, keys) for a in alphas}

    first = times[f"ours {alphas[0]:g}"]
    ref = statistics.median(times["ref"]) if "ref" in times else None
    return Row(
        name=name,
        shape=shape,
        sdpa_ms=statistics.median(times["sdpa"]),
        ref_ms=ref,
        ours_ms={alpha: statistics.median(times[f"ours {alpha:g}"]) for alpha in alphas},
        ours_ratio={alpha: _median_ratio(times[f"ours {alpha:g}"], times["sdpa"]) for alpha in alphas},
        alpha_ratio={alpha: _median_ratio(times[f"ours {alpha:g}"], first) for alpha in alphas},
        ref_speedup=None if ref is None else _median_ratio(times["ref"], first),
        sdpa_peak_mib=peak_sdpa / 2**20,
        ours_peak_mib={a: peak / 2**20 for a, peak in peaks.items()},
    )


def _median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median of the per-round ratios (both timed in the same rounds)."""
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def format_rows(rows: list[Row], alphas: list[float]) -> str:
    head = ["shape (B,H,N,K,d)", "sdpa ms"]
    head += [f"ours a={a:g} ms" for a in alphas] + [f"ours/sdpa a={a:g}" for a in alphas]
    head += [f"a={a:g} vs a={alphas[0]:g}" for a in alphas[1:]]
    head += [f"ref a={alphas[0]:g} ms", "ref/ours", "peak MiB sdpa/ours", f"extra peak MiB a={alphas[0]:g}"]
    head += ["extra peak MiB, worst a"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for row in rows:
        cells = [f"{row.name} {row.shape}", f"{row.sdpa_ms:.2f}"]
        cells += [f"{row.ours_ms[a]:.2f}" for a in alphas] + [f"{row.ours_ratio[a]:.2f}x" for a in alphas]
        cells += [f"{row.alpha_ratio[a]:.2f}x" for a in alphas[1:]]
        cells += ["-" if row.ref_ms is None else f"{row.ref_ms:.1f}"]
        cells += ["-" if row.ref_speedup is None else f"{row.ref_speedup:.1f}x"]
        cells += [f"{row.peak_mib[0]:.1f}/{row.peak_mib[1]:.1f}", f"{row.extra_peak_mib:.1f}"]
        worst, worst_alpha = row.worst_extra_peak
        cells += [f"{worst:.1f} (a={worst_alpha:g})"]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


LAYOUTS_HELP = "heads: contiguous (B, H, N, d); packed: (B, N, H·d) split into heads, as WebUI modules call"


def main(argv: list[str] | None = None) -> None:
    # No docstring under ``python -OO``: the description is then left out.
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0] or None)
    parser.add_argument(
        "--shapes",
        nargs="*",
        default=list(SHAPES),
        choices=list(SHAPES),
        metavar="SHAPE",
        help="names from SHAPES",
    )
    # One α per solver: 1.5 and 2 (closed form), 1.1 and 1.25 (whole β; on CPU β = 10 takes Halley's
    # steps, see _HALLEY_MIN_WHOLE_BETA), 1.3 (fractional β below 1.5, every key needs a fractional
    # power), 1.75 and 1.9 (gathered keys), 1.01 (just above 1: weights around the softmax). Ratios are
    # to the first.
    parser.add_argument(
        "--alphas", nargs="*", type=float, default=[1.5, 2.0, 1.1, 1.25, 1.3, 1.75, 1.9, 1.01]
    )
    parser.add_argument("--lam", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or float16 (CUDA default)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--layout", choices=LAYOUTS, default="heads", help=LAYOUTS_HELP)
    parser.add_argument("--keys", choices=KEYS, default="random", help=KEYS_HELP)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"dtype {dtype}, lambda {args.lam:g}, rounds {args.rounds}, layout {args.layout}, keys {args.keys}"
    )
    rows = []
    for shape_name in args.shapes:
        row = bench_shape(
            shape_name,
            SHAPES[shape_name],
            args.alphas,
            args.lam,
            args.rounds,
            device,
            dtype,
            with_reference=not args.no_reference,
            layout=args.layout,
            keys=args.keys,
        )
        rows.append(row)
        print(format_rows([row], args.alphas).splitlines()[-1], flush=True)
    print()
    print(format_rows(rows, args.alphas))


if __name__ == "__main__":
    main()
