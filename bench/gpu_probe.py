"""Where the fused kernel's time goes, on a CUDA GPU: GPU-only vs eager vs host time per call, kernel
variants, tile configs, compiled register use, and a profiled SDXL UNet step.

Usage: ``PLADIS_TRITON_AUTOTUNE=0 python bench/gpu_probe.py`` (the heuristic tile unless ``--configs``
sweeps them; autotuning every variant would take minutes of compilation).

Per op and variant it prints three times per call (µs):
- ``gpu``: replay of a CUDA graph of 20 calls (no launch overhead: what the GPU spends);
- ``eager``: 20 back-to-back calls between CUDA events (what a UNet sees when the GPU is the bottleneck);
- ``host``: CPU time to issue one call (Python, checks, Triton's launcher), 100 calls without a sync.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_bench import UNETS, Timer, build_unet, force_torch, op_inputs, unet_inputs
from pladis import triton_kernel as tk
from pladis.attention import pladis_attention
from pladis.bench import SHAPES

INNER = 20


def gpu_time(fn: Callable[[], object], rounds: int) -> float | None:
    """Median µs per call of a CUDA-graph replay of INNER calls (None when capture fails)."""
    seconds = Timer(torch.device("cuda")).graph_time(fn, rounds, INNER)
    return None if seconds is None else seconds * 1e6


def eager_time(fn: Callable[[], object], rounds: int, inner: int = INNER) -> float:
    """Median µs per call of ``inner`` back-to-back calls between CUDA events."""
    timer = Timer(torch.device("cuda"))
    return statistics.median(timer.time(fn, inner) * 1e6 for _ in range(rounds))


def host_time(fn: Callable[[], object], calls: int = 100) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return host


def kernel_fn(q, k, v, alpha: float, lam: float, overrides: dict | None = None) -> Callable[[], object]:
    scale = q.shape[-1] ** -0.5

    def fn():
        tk._meta_overrides.clear()
        tk._meta_overrides.update(overrides or {})
        try:
            return (
                pladis_attention(q, k, v, alpha=alpha, lam=lam, scale=scale)
                if lam
                else (tk.pladis_attention_triton(q, k, v, alpha=alpha, lam=0.0, scale=scale))
            )
        finally:
            tk._meta_overrides.clear()

    return fn


def _variants(q, k, v, scale: float) -> dict[str, Callable[[], object]]:
    def torch_path(alpha=1.5):
        with force_torch(True):
            return pladis_attention(q, k, v, alpha=alpha, lam=2.0, scale=scale)

    variants: dict[str, Callable[[], object]] = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale),
        "kernel softmax only": kernel_fn(q, k, v, 1.5, 0.0),
        "kernel α=1.5": kernel_fn(q, k, v, 1.5, 2.0),
        "kernel α=1.75": kernel_fn(q, k, v, 1.75, 2.0),
        "kernel α=2": kernel_fn(q, k, v, 2.0, 2.0),
        "kernel α=1.5 one W dot": kernel_fn(q, k, v, 1.5, 2.0, {"SPLIT_W": False}),
        "kernel α=1.5 1 Newton": kernel_fn(q, k, v, 1.5, 2.0, {"N_NEWTON": 1}),
        "torch path α=1.5": torch_path,
        "direct kernel α=1.5 (no dispatch)": lambda: tk.pladis_attention_triton(
            q, k, v, alpha=1.5, lam=2.0, scale=scale
        ),
    }
    return variants


def probe_ops(shapes: list[str], rounds: int) -> None:
    print("== op times, µs per call: gpu (graph replay) | eager (events, back-to-back) | host (issue only)")
    for name in shapes:
        q, k, v = op_inputs(SHAPES[name], "cuda", torch.float16)
        scale = q.shape[-1] ** -0.5

        variants = _variants(q, k, v, scale)
        with torch.inference_mode():
            for var, fn in variants.items():
                try:
                    t0 = time.perf_counter()
                    fn()
                    torch.cuda.synchronize()
                    first = time.perf_counter() - t0
                    gt = gpu_time(fn, rounds)
                    et = eager_time(fn, rounds)
                    ht = host_time(fn)
                except Exception as exc:
                    print(f"{name:14s} {var:34s} FAILED {type(exc).__name__}: {str(exc)[:300]}")
                    continue
                gs = f"{gt:8.1f}" if gt is not None else "     n/a"
                print(
                    f"{name:14s} {var:34s} gpu {gs} | eager {et:8.1f} | host {ht:7.1f}  (first {first:.1f}s)"
                )


def sweep_configs(rounds: int) -> None:
    """Tile configs for SDXL L1, α = 1.5, timed on the GPU alone."""
    q, k, v = op_inputs(SHAPES["SDXL L1"], "cuda", torch.float16)
    print("== tile configs, SDXL L1 α=1.5 (gpu µs per call)")
    original = tk._heuristic
    try:
        for block_m, warps in ((16, 4), (32, 4), (64, 4), (32, 8), (64, 8), (128, 8)):
            tk._heuristic = lambda *a, bm=block_m, w=warps: (bm, w)
            fn = kernel_fn(q, k, v, 1.5, 2.0)
            try:
                with torch.inference_mode():
                    fn()
                    gt = gpu_time(fn, rounds)
                print(f"  BLOCK_M={block_m:3d} warps={warps}: gpu {gt:8.1f}")
            except Exception as exc:
                print(f"  BLOCK_M={block_m:3d} warps={warps}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
    finally:
        tk._heuristic = original


def report_compiled() -> None:
    raw, _tuned = tk._kernels()
    print("== compiled kernels: registers / spills / shared memory")
    try:
        kernels = [
            (dev, key, kern) for dev, entry in raw.device_caches.items() for key, kern in entry[0].items()
        ]
    except Exception as exc:
        print(f"  (cannot list: {type(exc).__name__}: {exc})")
        return
    for device, key, kern in kernels:
        if True:
            meta = getattr(kern, "metadata", None)
            try:
                regs, spills = kern.n_regs, kern.n_spills
            except Exception:
                regs = spills = "?"
            warps = getattr(meta, "num_warps", "?")
            shared = getattr(meta, "shared", "?")
            print(
                f"  dev {device}: warps {warps} regs {regs} spills {spills} smem {shared}  {str(key)[-160:]}"
            )


def probe_unet(rounds: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    from pladis.diffusers import apply_pladis

    spec = UNETS["SDXL 1024²"]
    unet = build_unet(spec[0], torch.device("cuda"), torch.float16)
    pos, kw = unet_inputs(spec, torch.device("cuda"), torch.float16)

    def step():
        return unet(*pos, **kw).sample

    print("== SDXL 1024² UNet step (batch 2): wall ms (events) and profiled CUDA kernel ms per step")
    with torch.inference_mode():
        for label, alpha, torch_path in (
            ("sdpa", None, False),
            ("pladis α=1.5", 1.5, False),
            ("pladis α=1.5 torch path", 1.5, True),
        ):
            ctx = None
            if alpha is not None:
                ctx = apply_pladis(unet, alpha=alpha, lam=2.0, layers=("down", "up"))
            with force_torch(torch_path):
                step()
                step()
                wall = eager_time(step, rounds, inner=2) / 1e3
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        step()
                    torch.cuda.synchronize()
            if ctx is not None:
                ctx.remove()
            events = prof.key_averages()
            total = sum(e.self_device_time_total for e in events) / 1e3 / 3
            print(f"  {label:26s} wall {wall:9.2f} ms | CUDA kernels {total:8.2f} ms/step")
            top = sorted(events, key=lambda e: -e.self_device_time_total)[:6]
            for e in top:
                print(f"      {e.self_device_time_total / 1e3 / 3:8.2f} ms  x{e.count // 3:4d}  {e.key[:90]}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["SDXL L1", "SDXL L2", "SDXL L1 K=154"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--skip", nargs="*", default=[], choices=["ops", "configs", "unet"])
    args = p.parse_args()
    setting = os.environ.get("PLADIS_TRITON_AUTOTUNE", "where no tile was measured")
    print(torch.cuda.get_device_name(), torch.__version__, "autotune:", setting)
    if "ops" not in args.skip:
        probe_ops(args.shapes, args.rounds)
    if "configs" not in args.skip:
        sweep_configs(args.rounds)
    report_compiled()
    if "unet" not in args.skip:
        probe_unet(5)


if __name__ == "__main__":
    main()
