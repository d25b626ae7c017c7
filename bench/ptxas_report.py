"""Compile the fused kernel offline (no GPU needed) and report what ptxas says about each tile.

Why: GPU time is scarce; registers, spills, shared memory, barriers and which matrix instructions were
used explain most of the kernel's speed differences, and Triton can compile for any NVIDIA target on a
machine without a GPU. On an H100 the fast tiles were the ones with few barriers (rows reduced inside a
warp) and no spills — see ``_measured_tile`` in ``pladis/triton_kernel.py``.

Usage::

    python bench/ptxas_report.py                              # the default grid, sm_90
    python bench/ptxas_report.py --cap 80 --modes 1 3 --tiles 64x4 32x8 --keys 128 --dims 64 128

Columns: mode (0 softmax, 1 α=1.5, 2 α=2, 3 other α, 4 α<1.05, 5 1.5<α<2), BLOCK_M x warps, BLOCK_K,
BLOCK_D, registers per thread, spill bytes (stores), shared memory, and counts in the PTX of barriers,
warpgroup MMAs (Hopper) and warp MMAs. Numbers come from the local Triton, which may differ slightly from
the GPU machine's; integer arguments are not specialised here (a launch makes those equal to 1 constants
and marks those divisible by 16), so a launch can compile a little differently."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: this compiles for a GPU target")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pladis import _triton_fwd
from pladis.triton_kernel import compile_meta

POINTERS = ("Q", "Kp", "V", "Out", "Msk")
FLOATS = ("scale", "lam", "am1", "beta")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def compile_tile(
    mode: int, block_m: int, warps: int, block_k: int, block_d: int, dtype: str, cap: int
) -> tuple[str, str, int]:
    """(PTX, ptxas -v output, shared memory bytes) of one configuration."""
    fn = _triton_fwd.pladis_fwd_kernel
    meta = compile_meta(DTYPES[dtype], mode, block_k, block_d) | {"BLOCK_M": block_m}
    signature: dict[str, str] = {}
    for name in fn.arg_names:
        if name in meta:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = f"*{dtype}"
        elif name == "Wout":
            signature[name] = "*fp32"
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
    aligned = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in (*POINTERS, "Wout")}
    src = ASTSource(fn, signature, meta, aligned)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", cap, 32), options={"num_warps": warps, "num_stages": 1}
    )
    ptx = compiled.asm["ptx"]
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    arch = f"sm_{cap}a" if cap == 90 else f"sm_{cap}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        res = subprocess.run(
            [str(ptxas), "-v", f"--gpu-name={arch}", str(path), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
            check=False,
        )
    return ptx, res.stdout + res.stderr, int(compiled.metadata.shared)


def summarise(ptx: str, report: str, shared: int) -> str:
    def grab(pattern: str, text: str) -> str:
        m = re.search(pattern, text)
        return m.group(1) if m else "?"

    regs = grab(r"Used (\d+) registers", report)
    spills = grab(r"(\d+) bytes spill stores", report)
    bars = len(re.findall(r"\bbar\.sync|\bbarrier\.sync", ptx))
    wgmma = len(re.findall(r"wgmma\.mma_async", ptx))
    mma = len(re.findall(r"\bmma\.sync", ptx))
    return (
        f"regs {regs:>3} spill {spills:>5} B smem {shared:>6} B | bar {bars:3d} wgmma {wgmma:3d} mma {mma:3d}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cap", type=int, default=90, help="compute capability ×10 (80, 86, 89, 90)")
    p.add_argument("--modes", type=int, nargs="+", default=[1, 2, 3, 5])
    p.add_argument("--tiles", nargs="+", default=["64x4", "128x8", "32x8", "32x4"], help="BLOCK_MxWARPS")
    p.add_argument("--keys", type=int, nargs="+", default=[128, 256], help="BLOCK_K (padded key count)")
    p.add_argument("--dims", type=int, nargs="+", default=[64], help="BLOCK_D (padded head dim)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    args = p.parse_args()
    print(f"triton {triton.__version__}, sm_{args.cap}, {args.dtype}")
    for mode in args.modes:
        for block_k in args.keys:
            for block_d in args.dims:
                for tile in args.tiles:
                    block_m, warps = (int(x) for x in tile.split("x"))
                    label = f"mode {mode} {block_m:3d}x{warps} K{block_k:<3d} D{block_d:<3d}"
                    try:
                        print(label, summarise(*compile_tile(mode, block_m, warps, block_k, block_d,
                                                             args.dtype, args.cap)), flush=True)  # fmt: skip
                    except Exception as exc:  # a tile that does not compile is a result too
                        print(label, f"does not compile: {type(exc).__name__}: {str(exc)[:200]}")


if __name__ == "__main__":
    main()
