"""On a CUDA machine: the compiled kernel against the float64 oracle (``bench/gpu_bench.py --check``).

Runs in a subprocess because this test directory forces Triton's interpreter for the CPU tests.
Skipped without CUDA, Triton or the ``entmax`` package.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("entmax")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernel_matches_oracle_on_gpu():
    root = Path(__file__).resolve().parents[2]
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    # Fixed tiles (the measured one where there is one): autotuning every case of the check would
    # compile ~6 tiles for each of ~100 specialisations, far past the timeout.
    env.setdefault("PLADIS_TRITON_AUTOTUNE", "0")
    res = subprocess.run(
        [sys.executable, str(root / "bench" / "gpu_bench.py"), "--check"],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=1200,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "check: PASS" in res.stdout
