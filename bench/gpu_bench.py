"""GPU benchmark of PLADIS cross-attention: per-op times and end-to-end UNet step times.

Usage (from the repository root, on a CUDA machine with torch, triton, entmax, diffusers)::

    python bench/gpu_bench.py                      # ops + SD1.5 512² and SDXL 1024² UNet steps
    python bench/gpu_bench.py --ops-only --alphas 1.5 2
    python bench/gpu_bench.py --smoke              # tiny shapes; runs (degraded) without CUDA too

Per op, for each (B, H, N, K, d) shape of SD1.5 / SDXL cross-attention (and long prompts, K = 154
and 231), it times: ``sdpa`` (stock ``F.scaled_dot_product_attention``), ``reference`` (explicit
softmax + the ``entmax`` package, blended before one V matmul, in the query dtype — what the official
code does), ``torch`` (our torch path, forced with ``PLADIS_FORCE_TORCH=1``) and ``kernel`` (the fused
Triton kernel), with ratios to SDPA and the extra peak memory of one call
(``torch.cuda.max_memory_allocated`` minus the memory held before the call; includes the output).

End to end, it builds ``UNet2DConditionModel`` from the published SD1.5 and SDXL-base configs (written
inline, random weights, fp16, no download) and times one UNet forward (batch 2 = cond + uncond) with
stock SDPA vs PLADIS installed by ``pladis.diffusers.apply_pladis`` (down+up, λ = 2) for each α.

Timing: CUDA events, variants interleaved (ops: in an order shuffled every round, seeded; UNet
steps: in an order rotated every round), medians over rounds.
Without CUDA, wall-clock timing on CPU is used and the report says so (smoke test only).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pladis import triton_kernel
from pladis.attention import FORCE_TORCH_ENV, pladis_attention
from pladis.bench import SHAPES, cuda_peak_bytes, reference_attention

OP_SHAPES = SHAPES  # the CPU benchmark's shapes: SD1.5 / SDXL levels and long prompts
SMOKE_SHAPES = {"tiny L1": (1, 2, 64, 77, 40), "tiny K154": (1, 2, 32, 154, 64)}

SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SDXL_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
TINY_UNET = {
    "attention_head_dim": 8,
    "block_out_channels": [32, 64],
    "cross_attention_dim": 64,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 16,
}
# name: (config, latent side, text tokens, text width, SDXL extra conditioning?)
UNETS = {"SD1.5 512²": (SD15_UNET, 64, 77, 768, False), "SDXL 1024²": (SDXL_UNET, 128, 77, 2048, True)}
SMOKE_UNETS = {"tiny UNet": (TINY_UNET, 16, 77, 64, False)}


# ----------------------------------------------------------------------------------------------- timing
class Timer:
    """Times a callable with CUDA events (GPU) or perf_counter (CPU, degraded)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object], inner: int = 1) -> float:
        """Seconds per call, averaged over ``inner`` back-to-back calls."""
        self.sync()
        if self.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop) / 1e3 / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner

    def graph_time(self, fn: Callable[[], object], rounds: int, inner: int) -> float | None:
        """Median seconds per call of a replayed CUDA graph of ``inner`` calls: GPU time alone, no
        launch cost. None without CUDA or when ``fn`` cannot be captured (e.g. it synchronises)."""
        if not self.cuda:
            return None
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                fn()  # warm-up on a side stream, as capture requires
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(inner):
                    fn()
        except Exception:
            torch.cuda.synchronize(self.device)
            return None
        graph.replay()
        samples = []
        for _ in range(rounds):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop) / 1e3 / inner)
        return statistics.median(samples)

    def extra_peak(self, fn: Callable[[], object]) -> float | None:
        """Bytes allocated at the peak of one call beyond what was held before it (CUDA only)."""
        return float(cuda_peak_bytes(fn, self.device)) if self.cuda else None


def interleaved(
    timer: Timer, fns: dict[str, Callable[[], object]], rounds: int, inner: int
) -> dict[str, float]:
    """Median seconds per call of each variant, interleaved in an order shuffled every round (seeded).

    A rotation would keep each variant's neighbours (e.g. always right after the memory-hungry
    reference), which biased the CPU benchmark by 15-30 %.
    """
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    shuffler = random.Random(0)
    for _ in range(rounds):
        shuffler.shuffle(names)
        for n in names:
            samples[n].append(timer.time(fns[n], inner))
    return {n: statistics.median(v) for n, v in samples.items()}


@contextlib.contextmanager
def force_torch(on: bool) -> Iterator[None]:
    """Route ``pladis_attention`` to the torch path (on) or let it dispatch normally (off)."""
    old = os.environ.get(FORCE_TORCH_ENV)
    if on:
        os.environ[FORCE_TORCH_ENV] = "1"
    else:
        os.environ.pop(FORCE_TORCH_ENV, None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(FORCE_TORCH_ENV, None)
        else:
            os.environ[FORCE_TORCH_ENV] = old


# -------------------------------------------------------------------------------------------------- ops
def _has(module: str) -> bool:
    try:
        __import__(module)
    except Exception:
        return False
    return True


def op_inputs(shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype) -> tuple:
    """Seeded q, k, v for a (B, H, N, K, d) shape; q scaled by 2 so the weights are fairly sparse."""
    b, h, n, k_len, d = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    q = (torch.randn(b, h, n, d, generator=g) * 2).to(device, dtype)
    k = torch.randn(b, h, k_len, d, generator=g).to(device, dtype)
    v = torch.randn(b, h, k_len, d, generator=g).to(device, dtype)
    return q, k, v


def op_variants(q, k, v, alpha: float, lam: float) -> dict[str, Callable[[], object]]:
    scale = 1.0 / math.sqrt(q.shape[-1])
    fns: dict[str, Callable[[], object]] = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)
    }
    if _has("entmax"):
        fns["reference"] = lambda: reference_attention(q, k, v, alpha, lam)

    def torch_path():
        with force_torch(True):
            return pladis_attention(q, k, v, alpha=alpha, lam=lam, scale=scale)

    fns["torch"] = torch_path
    if triton_kernel.is_supported(q, k, v, None):
        fns["kernel"] = lambda: triton_kernel.pladis_attention_triton(
            q, k, v, alpha=alpha, lam=lam, scale=scale
        )
    return fns


def bench_ops(args: argparse.Namespace, timer: Timer, device: torch.device, dtype: torch.dtype) -> None:
    shapes = SMOKE_SHAPES if args.smoke else OP_SHAPES
    if args.shapes:
        shapes = {name: shapes[name] for name in args.shapes}
    print(
        "\n== per-op cross-attention (median per call, eager; ratio = time / SDPA; GPU = CUDA-graph replay,"
    )
    print("   the GPU's time alone without launch costs; +MiB = extra peak of one call)")
    if "reference" not in op_variants(*[torch.zeros(1, 1, 1, 16)] * 3, 1.5, 2.0):
        print("   (entmax package not installed: no 'reference' column)")
    for name, (b, h, n, k_len, d) in shapes.items():
        q, k, v = op_inputs((b, h, n, k_len, d), device, dtype)
        for alpha in args.alphas:
            fns = op_variants(q, k, v, alpha, args.lam)
            with torch.inference_mode():
                for var, fn in list(fns.items()):  # warm-up: compilation, autotuning, allocator
                    try:
                        fn()
                        fn()
                    except Exception as exc:  # report a broken variant, time the others
                        print(f"{name}: α={alpha}: {var} failed: {type(exc).__name__}: {exc}"[:2000])
                        del fns[var]
                med = interleaved(timer, fns, args.rounds, args.inner)
                gpu = {var: timer.graph_time(fn, args.rounds, args.inner) for var, fn in fns.items()}
                mem = {var: timer.extra_peak(fn) for var, fn in fns.items()}
                err = ""
                if "kernel" in fns:
                    diff = (fns["kernel"]().float() - fns["torch"]().float()).abs().max().item()
                    err = f"  |kernel−torch|max={diff:.1e}"
            base = med["sdpa"]
            cells = []
            for var, t in med.items():
                mib = f" +{mem[var] / 2**20:.1f}MiB" if mem[var] is not None else ""
                graph = ""
                if gpu[var] is not None and gpu["sdpa"]:
                    graph = f" (GPU {gpu[var] * 1e6:.1f}µs {gpu[var] / gpu['sdpa']:.2f}×)"
                cells.append(f"{var} {t * 1e6:8.1f}µs {t / base:6.2f}×{graph}{mib}")
            if "torch" in med and "reference" in med:  # also without the kernel: the torch path's own target
                cells.append(f"ref/torch {med['reference'] / med['torch']:.1f}×")
            print(f"{name:14s} {(b, h, n, k_len, d)!s:24s} α={alpha:<5} " + " | ".join(cells) + err)


# ------------------------------------------------------------------------------------------------- UNet
def build_unet(config: dict, device: torch.device, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of a minute for SDXL on CPU
        unet = UNet2DConditionModel(**config)
    return unet.to(device=device, dtype=dtype).eval()


def unet_inputs(spec: tuple, device: torch.device, dtype: torch.dtype, batch: int = 2) -> tuple[tuple, dict]:
    _config, side, tokens, width, sdxl = spec
    g = torch.Generator(device="cpu").manual_seed(1)
    sample = torch.randn(batch, 4, side, side, generator=g).to(device, dtype)
    timestep = torch.tensor(500, device=device)
    text = torch.randn(batch, tokens, width, generator=g).to(device, dtype)
    kwargs: dict = {"encoder_hidden_states": text}
    if sdxl:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 1280, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[side * 8, side * 8, 0, 0, side * 8, side * 8]] * batch).to(
                device, dtype
            ),
        }
    return (sample, timestep), kwargs


def bench_unets(args: argparse.Namespace, timer: Timer, device: torch.device, dtype: torch.dtype) -> None:
    if not _has("diffusers"):
        print("\n== UNet step: skipped (diffusers not installed)")
        return
    from pladis.diffusers import apply_pladis

    unets = SMOKE_UNETS if args.smoke else UNETS
    if args.unets:
        unets = {name: unets[name] for name in args.unets}
    print("\n== UNet step, batch 2 (cond+uncond), random weights (median per step; ratio = time / SDPA step)")
    # variant: (α or None for stock SDPA, force the torch path?)
    variants: dict[str, tuple[float | None, bool]] = {"sdpa": (None, False)}
    for alpha in args.alphas:
        variants[f"pladis α={alpha}"] = (alpha, False)
    if args.unet_torch_path:
        variants["pladis α=1.5 torch path"] = (1.5, True)
    names = list(variants)
    for name, spec in unets.items():
        unet = build_unet(spec[0], device, dtype)
        pos, kw = unet_inputs(spec, device, dtype)

        def step(unet=unet, pos=pos, kw=kw) -> torch.Tensor:
            return unet(*pos, **kw).sample

        counted: list[int] = []  # layers PLADIS installed on, printed once per UNet

        @contextlib.contextmanager
        def installed(
            variant: tuple[float | None, bool], unet=unet, counted: list[int] = counted, name: str = name
        ) -> Iterator[None]:
            """Install outside the timed region (apply/remove walks the modules)."""
            alpha, torch_path = variant
            if alpha is None:
                yield
                return
            with (
                force_torch(torch_path),
                apply_pladis(unet, alpha=alpha, lam=args.lam, layers=("down", "up")) as handle,
            ):
                if not counted:  # a bench where nothing was installed would print a false ~1.00×
                    counted.append(len(handle))
                    print(f"   {name}: PLADIS on {len(handle)} cross-attention layers {handle.counts}")
                    assert len(handle) > 0, "PLADIS installed no processor"
                yield

        samples: dict[str, list[float]] = {n: [] for n in names}
        peaks: dict[str, float | None] = {}
        with torch.inference_mode():
            if not torch.isfinite(step()).all():
                print(f"   note: {name} random-weight output has non-finite values (timing still valid)")
            for n in names:  # warm-up: kernel compilation and autotuning happen here
                with installed(variants[n]):
                    step()
                    peaks[n] = timer.extra_peak(step)
            for r in range(args.unet_rounds):
                for n in names[r % len(names) :] + names[: r % len(names)]:
                    with installed(variants[n]):
                        samples[n].append(timer.time(step, args.unet_inner))
        med = {n: statistics.median(v) for n, v in samples.items()}
        base, base_peak = med["sdpa"], peaks.get("sdpa")
        for n, t in med.items():
            extra = ""
            if peaks.get(n) is not None and base_peak is not None:
                # Of the whole step, which is set elsewhere: not the op's extra memory (see the op rows).
                delta = (peaks[n] - base_peak) / 2**20
                extra = f"  step peak {peaks[n] / 2**20:8.1f} MiB ({delta:+.1f} MiB vs SDPA)"
            print(f"{name:12s} {n:26s} {t * 1e3:9.2f} ms  {t / base:6.3f}×{extra}")
        del unet, step, installed
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ check
CHECK_SHAPES = [(2, 8, 512, 77, 40), (2, 10, 512, 77, 64), (2, 4, 256, 154, 80), (1, 4, 128, 231, 160)]
CHECK_SHAPES += [(1, 2, 64, 512, 64), (1, 2, 33, 1, 64)]


def _oracle(s: torch.Tensor, alpha: float, lam: float) -> torch.Tensor:
    """Float64 (1−λ)·softmax + λ·entmax from the ``entmax`` package; all-masked rows → 0 (as SDPA)."""
    import entmax

    dead = torch.isneginf(s).all(-1, keepdim=True)
    s = s.double().masked_fill(dead, 0.0)
    if alpha == 1.0:
        e = torch.softmax(s, -1)
    elif alpha == 1.5:
        e = entmax.entmax15(s, dim=-1)
    elif alpha == 2.0:
        e = entmax.sparsemax(s, dim=-1)
    else:
        e = entmax.entmax_bisect(s, alpha=alpha, dim=-1, n_iter=100)
    return ((1 - lam) * torch.softmax(s, -1) + lam * e).masked_fill(dead, 0.0)


def run_check(device: torch.device, quick: bool = False) -> bool:
    """Kernel vs a float64 oracle on this device (fp16/bf16/fp32, masks, α ∈ [1, 2]); True if all pass.

    ``quick``: two tile sizes, two masks and one α per entmax branch, no softmax (under half the
    compilations, for short GPU leases).
    """
    if not _has("entmax"):
        print("check: the entmax package is needed for the oracle")
        return False
    # bf16: half an ulp of output rounding on GPUs; Triton's interpreter truncates instead (one ulp).
    bf16_rel = 2**-7 if triton_kernel.interpreter_mode() else 2**-8
    # float32: the weights are checked to 1e-5 below; the output sums 77–512 products of such weights
    # with |v| ≲ 4 (measured on an H100: up to 1.7e-5), so it gets 1e-4.
    tols = {torch.float16: (2e-3, 2**-10), torch.bfloat16: (2e-3, bf16_rel), torch.float32: (1e-4, 1e-5)}
    ok, checked = True, 0
    print("== kernel vs float64 oracle (output: |err| ≤ abs + rel·|ref|; weights: ≤ 1e-5, rows sum to 1)")
    shapes = [CHECK_SHAPES[1], CHECK_SHAPES[2]] if quick else CHECK_SHAPES
    # One α per kernel branch. 1.01: just above α = 1 (no τ search there; a log1p that avoids the
    # GPU's approximate log near 1 — only a real GPU shows whether that holds); 1.75: the mapped start.
    alphas = (1.01, 1.25, 1.5, 1.75, 2.0) if quick else (1.0, 1.01, 1.25, 1.5, 1.75, 2.0)
    for b, h, n, k_len, d in shapes:
        g = torch.Generator(device="cpu").manual_seed(k_len + d)
        q0 = torch.randn(b, h, n, d, generator=g) * 2
        k0 = torch.randn(b, h, k_len, d, generator=g)
        k0[:, :, 1:4] = k0[:, :, :1]  # ties
        v0 = torch.randn(b, h, k_len, d, generator=g)
        keep = torch.rand(b, 1, 1, k_len, generator=g) > 0.3
        keep[..., 0] = True
        bias = torch.where(
            torch.rand(b, 1, n, k_len, generator=g) > 0.2, 0.5 * torch.randn(b, 1, n, k_len), -math.inf
        )
        bias[:, :, 0] = -math.inf  # one fully masked query row → zeros
        masks = {"none": None, "bool": keep.to(device), "additive": bias.to(device)}
        if quick:
            del masks["bool"]
        for dtype, (abs_tol, rel_tol) in tols.items():
            q, k, v = (t.to(device, dtype) for t in (q0, k0, v0))
            scale = d**-0.5
            for mname, mask in masks.items():
                s = (q.double() @ k.double().transpose(-1, -2)) * scale
                if mask is not None:
                    s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
                for alpha in alphas:
                    if not triton_kernel.is_supported(q, k, v, mask):
                        print(f"  {(b, h, n, k_len, d)} {dtype} mask={mname}: not supported here, skipped")
                        break
                    ref = _oracle(s, alpha, 2.0)
                    try:
                        out = triton_kernel.pladis_attention_triton(
                            q, k, v, alpha=alpha, lam=2.0, scale=scale, mask=mask
                        )
                    except triton_kernel.TritonUnsupported as exc:
                        print(f"  {(b, h, n, k_len, d)} {dtype}: TritonUnsupported ({exc}); torch path runs")
                        break
                    ref_out = ref @ v.double()
                    err = (out.double() - ref_out).abs()
                    good = bool((err <= abs_tol + rel_tol * ref_out.abs()).all())
                    shape = f"{(b, h, n, k_len, d)!s:22s} {dtype!s:14s}"
                    line = f"  {shape} mask={mname:8s} α={alpha:<4} out {err.max():.1e}"
                    if dtype == torch.float32:
                        w = triton_kernel.pladis_weights_triton(
                            q, k, alpha=alpha, lam=1.0, scale=scale, mask=mask
                        )
                        e_ref = _oracle(s, alpha, 1.0)
                        werr = (w.double() - e_ref).abs().max().item()
                        live = ~torch.isneginf(s).all(-1)
                        rows = (w.double().sum(-1)[live] - 1).abs().max().item()
                        good = good and werr <= 1e-5 and rows <= 1e-5
                        line += f"  weights {werr:.1e} rowsum {rows:.1e}"
                    ok = ok and good
                    checked += 1
                    print(line + ("" if good else "   FAIL"))
    if not checked:
        print("check: nothing ran (no CUDA/Triton; set TRITON_INTERPRET=1 to use the interpreter)")
        ok = False
    print("check:", "PASS" if ok else "FAIL", f"({checked} cases)")
    return ok


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes and a tiny UNet (works on CPU)")
    p.add_argument("--alphas", type=float, nargs="+", default=[1.5, 1.75, 2.0])
    p.add_argument("--lam", type=float, default=2.0)
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per op (median)")
    p.add_argument("--inner", type=int, default=20, help="back-to-back calls per op measurement")
    p.add_argument("--unet-rounds", type=int, default=7)
    p.add_argument("--unet-inner", type=int, default=3)
    p.add_argument("--unet-torch-path", action="store_true", help="also time the UNet with the torch path")
    p.add_argument("--ops-only", action="store_true")
    p.add_argument("--unet-only", action="store_true")
    p.add_argument("--check", action="store_true", help="only check the kernel against a float64 oracle")
    p.add_argument("--quick", action="store_true", help="with --check: fewer tile sizes, masks and α")
    p.add_argument("--shapes", nargs="+", choices=list(OP_SHAPES) + list(SMOKE_SHAPES), help="op shapes")
    p.add_argument("--unets", nargs="+", choices=list(UNETS) + list(SMOKE_UNETS), help="UNets to time")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if not cuda:
        print("WARNING: no CUDA device — DEGRADED run: CPU wall-clock, float32, no peak memory, and the")
        print("         Triton kernel only if TRITON_INTERPRET=1 (interpreter: its times mean nothing).")
        dtype = torch.float32
        if not args.smoke:
            print("         Use --smoke without a GPU; full shapes would take very long.")
    else:
        props = torch.cuda.get_device_properties(device)
        print(f"device: {props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}")
    try:
        import triton

        setting = os.environ.get("PLADIS_TRITON_AUTOTUNE", "where no tile was measured")
        print(f"triton {triton.__version__}; autotune: {setting}")
    except Exception:
        print("triton: not importable — 'kernel' column absent (torch path only)")
    print(f"dtype {dtype}, λ={args.lam}, α∈{args.alphas}, rounds={args.rounds}×{args.inner}")
    if args.check:
        raise SystemExit(0 if run_check(device, args.quick) else 1)
    timer = Timer(device)
    if not args.unet_only:
        bench_ops(args, timer, device, dtype)
    if not args.ops_only:
        bench_unets(args, timer, device, dtype)


if __name__ == "__main__":
    main()
