"""The benchmark runs end to end on a tiny shape (a smoke test: no timing is asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pladis import bench


def test_bench_shape_runs_and_formats(capsys) -> None:
    bench.SHAPES["tiny"] = (1, 2, 16, 9, 8)
    try:
        bench.main(["--shapes", "tiny", "--alphas", "1.5", "2", "--rounds", "2"])
    finally:
        del bench.SHAPES["tiny"]
    out = capsys.readouterr().out
    assert "device: cpu" in out
    assert "tiny (1, 2, 16, 9, 8)" in out
    assert "extra peak MiB, worst a" in out


def test_peak_memory_is_reported_for_the_worst_alpha() -> None:
    # The solvers differ in chunk size and buffers, so the first α's peak is not every α's.
    times = {1.5: 1.0, 1.75: 1.0}
    row = bench.Row("s", (1, 1, 1, 1, 1), 1.0, None, times, times, times, None, 10.0, {1.5: 20.0, 1.75: 45.0})
    assert row.peak_mib == (10.0, 20.0)  # sdpa, and ours at the first α
    assert row.extra_peak_mib == 10.0
    assert row.worst_extra_peak == (35.0, 1.75)
    assert "35.0 (a=1.75)" in bench.format_rows([row], [1.5, 1.75])


def test_unknown_shape_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--shapes", "SD1.5-L1"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'SD1.5-L1'" in capsys.readouterr().err


def test_reference_attention_is_the_official_recipe() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen) for n in (5, 9, 9))
    from pladis.attention import pladis_attention

    torch.testing.assert_close(
        bench.reference_attention(q, k, v, 1.5, 2.0),
        pladis_attention(q, k, v, alpha=1.5, lam=2.0),
        rtol=0,
        atol=1e-5,
    )


def test_cpu_peak_memory_is_measured_in_the_timed_dtype() -> None:
    # The peak-memory child used to build float32 inputs whatever --dtype said.
    from pladis.bench import _cpu_peak_bytes

    # Ours, not SDPA: its output is 16 MiB in float32 and 8 in bfloat16, while its float32 working
    # buffers are the same size, plus in bfloat16 a block's converted queries and float32 output
    # (float32 output is written in place): 2.3 MiB with 231 keys, 6.8 with 77. SDPA's own bfloat16
    # path may take more memory than its float32 one (seen on an AVX-512 CPU: 25 against 23 MiB).
    shape = (2, 8, 4096, 231, 64)
    ours32 = _cpu_peak_bytes(shape, "ours", 1.5, 2.0, torch.float32)
    ours16 = _cpu_peak_bytes(shape, "ours", 1.5, 2.0, torch.bfloat16)
    assert 0 < ours16 < ours32 - 2 * 2**20


def test_packed_layout_times_the_calls_webui_modules_make(capsys) -> None:
    # (B, N, H·d) inputs split into heads as views: SDPA and the reference get the views and merge
    # heads back; ours is the packed entry point. All three answer the same problem.
    ops = bench.make_ops((1, 2, 16, 9, 8), "packed", torch.device("cpu"), torch.float32)
    ours = ops.ours(1.5, 2.0)
    assert ours.shape == (1, 16, 16)
    torch.testing.assert_close(ops.ref(1.5, 2.0), ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(ops.sdpa(), ops.ours(1.5, 0.0), rtol=0, atol=0)
    with pytest.raises(ValueError, match="layout must be one of"):
        bench.make_ops((1, 2, 16, 9, 8), "rows", torch.device("cpu"), torch.float32)
    bench.SHAPES["tiny"] = (1, 2, 16, 9, 8)
    try:
        bench.main(["--shapes", "tiny", "--alphas", "1.5", "--rounds", "1", "--layout", "packed"])
    finally:
        del bench.SHAPES["tiny"]
    assert "layout packed" in capsys.readouterr().out


@pytest.mark.parametrize("layout", ["heads", "packed"])
def test_padded_keys_are_a_padded_prompts(layout: str, capsys) -> None:
    # --keys padded: the first key thrice the random one, the next 11 as they were, and the rest
    # near-equal (end tokens repeated), in either layout; the same problem for SDPA, the reference
    # and ours.
    shape = (1, 2, 16, 40, 8)
    keys = {}
    real = torch.nn.functional.scaled_dot_product_attention
    for kind in bench.KEYS:

        def spy(q, k, v, _kind=kind, **options):
            keys[_kind] = k
            return real(q, k, v, **options)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
            bench.make_ops(shape, layout, torch.device("cpu"), torch.float32, keys=kind).sdpa()
    padded, plain = keys["padded"], keys["random"]  # (B, H, K, d) in both layouts
    torch.testing.assert_close(padded[..., 0, :], 3 * plain[..., 0, :], rtol=0, atol=0)
    torch.testing.assert_close(padded[..., 1:12, :], plain[..., 1:12, :], rtol=0, atol=0)
    tail = padded[..., 12:, :]
    spread = (tail - tail.mean(-2, keepdim=True)).norm(dim=-1) / tail.norm(dim=-1)
    assert (spread < 0.05).all()
    ops = bench.make_ops(shape, layout, torch.device("cpu"), torch.float32, keys="padded")
    torch.testing.assert_close(ops.ref(1.7, 2.0), ops.ours(1.7, 2.0), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="keys must be one of"):
        bench.make_ops(shape, layout, torch.device("cpu"), torch.float32, keys="tied")
    bench.SHAPES["tiny"] = shape
    try:
        bench.main(
            ["--shapes", "tiny", "--alphas", "1.5", "--rounds", "1", "--keys", "padded", "--layout", layout]
        )
    finally:
        del bench.SHAPES["tiny"]
    assert "keys padded" in capsys.readouterr().out


def test_help_works_with_docstrings_stripped() -> None:
    # `python -OO` strips docstrings: the description read from the module's one was None.split().
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-OO", "-m", "pladis.bench", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],  # this tree's pladis, not an installed copy
    )
    assert run.returncode == 0, run.stderr
    assert "--alphas" in run.stdout
