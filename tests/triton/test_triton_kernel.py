"""Fused PLADIS kernel vs an independent float64 oracle (``entmax`` package + torch softmax).

Runs on CPU through Triton's interpreter (see conftest.py); skipped cleanly where Triton or the
``entmax`` package cannot be imported. Shapes are tiny because the interpreter is slow.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")
entmax_pkg = pytest.importorskip("entmax")

from pladis import triton_kernel as tk  # noqa: E402
from tests.core.oracles import near_one_oracle  # noqa: E402

triton = pytest.importorskip("triton")
tl = triton.language
_log1p = pytest.importorskip("pladis._triton_fwd")._log1p


@triton.jit
def _log1p_probe(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, _log1p(tl.load(X + offs)))


pytestmark = [
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning"),
]

ALPHAS = (1.25, 1.5, 1.75, 2.0)


def oracle_entmax(s: torch.Tensor, alpha: float) -> torch.Tensor:
    """Float64 α-entmax from the reference package (sort-based, or 100-halving bisection).

    Within 1e-6 above α = 1, the log1p form instead: the package's bisection raises to the power
    1/(α − 1) and was 0.07 off at α = 1 + 2⁻⁵² (hypothesis found it), where the two agree to 1e-10 above.
    """
    s = s.double()
    if alpha == 1.0:
        return torch.softmax(s, -1)
    if alpha < 1.0 + 1e-6:
        return near_one_oracle(s, alpha)
    if alpha == 1.5:
        return entmax_pkg.entmax15(s, dim=-1)
    if alpha == 2.0:
        return entmax_pkg.sparsemax(s, dim=-1)
    return entmax_pkg.entmax_bisect(s, alpha=alpha, dim=-1, n_iter=100)


def oracle_scores(q, k, scale, mask=None) -> torch.Tensor:
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    return s


def oracle_weights(s: torch.Tensor, alpha: float, lam: float) -> torch.Tensor:
    """(1−λ)·softmax + λ·entmax in float64; rows with every key masked are all zero (as SDPA)."""
    dead = torch.isinf(s).all(-1, keepdim=True) & (s < 0).all(-1, keepdim=True)
    s = s.masked_fill(dead, 0.0)
    w = (1 - lam) * torch.softmax(s, -1) + lam * oracle_entmax(s, alpha)
    return w.masked_fill(dead, 0.0)


def make_qkv(b, h, n, k_len, d, dtype=torch.float32, spread=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, h, n, d, generator=g) * spread).to(dtype)
    k = torch.randn(b, h, k_len, d, generator=g).to(dtype)
    v = torch.randn(b, h, k_len, d, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("k_len", [77, 154])
@pytest.mark.parametrize("alpha", [1.0, *ALPHAS])
def test_entmax_weights_match_oracle(alpha, k_len):
    q, k, _ = make_qkv(1, 2, 6, k_len, 40, seed=k_len)
    scale = 40**-0.5
    w = tk.pladis_weights_triton(q, k, alpha=alpha, lam=1.0, scale=scale)
    ref = oracle_entmax(oracle_scores(q, k, scale), alpha)
    assert w.dtype == torch.float32 and w.shape == (1, 2, 6, k_len)
    assert (w.double() - ref).abs().max().item() <= 1e-5
    assert (w.double().sum(-1) - 1).abs().max().item() <= 1e-5
    if alpha >= 1.5:  # genuinely sparse: most keys exactly zero, like the oracle
        assert (w == 0).float().mean() > 0.5
        assert torch.equal(w == 0, ref < 1e-7) or (w[(w == 0) != (ref < 1e-7)].abs().max() <= 1e-5)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_blend_weights_match_oracle(alpha):
    q, k, _ = make_qkv(2, 1, 5, 77, 40, seed=1)
    w = tk.pladis_weights_triton(q, k, alpha=alpha, lam=2.0, scale=0.2)
    ref = oracle_weights(oracle_scores(q, k, 0.2), alpha, 2.0)
    assert (w.double() - ref).abs().max().item() <= 1e-5
    assert (w.double().sum(-1) - 1).abs().max().item() <= 1e-5  # (1−λ)·1 + λ·1
    assert w.min() < 0  # λ = 2 extrapolates: softmax enters with weight −1


@pytest.mark.parametrize(("k_len", "d"), [(77, 40), (154, 40), (77, 64)])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_fp16_output_matches_oracle(alpha, k_len, d):
    q, k, v = make_qkv(1, 2, 7, k_len, d, dtype=torch.float16, spread=2.0, seed=d + k_len)
    scale = d**-0.5
    out = tk.pladis_attention_triton(q, k, v, alpha=alpha, lam=2.0, scale=scale)
    ref = oracle_weights(oracle_scores(q, k, scale), alpha, 2.0) @ v.double()
    assert out.dtype == torch.float16 and out.shape == q.shape
    assert (out.double() - ref).abs().max().item() <= 2e-3


@pytest.mark.parametrize(("dtype", "rel"), [(torch.float32, 0.0), (torch.bfloat16, 2**-7)])
def test_other_dtypes(dtype, rel):
    """fp32 to 1e-5; bf16 within one bf16 ulp (Triton's interpreter truncates fp32→bf16, GPUs round)."""
    q, k, v = make_qkv(1, 1, 9, 77, 64, dtype=dtype, spread=2.0, seed=5)
    out = tk.pladis_attention_triton(q, k, v, alpha=1.5, lam=2.0, scale=0.125)
    ref = oracle_weights(oracle_scores(q, k, 0.125), 1.5, 2.0) @ v.double()
    assert out.dtype == dtype
    assert ((out.double() - ref).abs() <= rel * ref.abs() + 1e-5).all()


def test_lambda_zero_is_softmax_attention():
    q, k, v = make_qkv(1, 2, 5, 77, 40, seed=9)
    out = tk.pladis_attention_triton(q, k, v, alpha=1.5, lam=0.0, scale=None)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert (out.double() - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("form", ["bool_b11k", "bool_nk", "additive", "bool_full"])
@pytest.mark.parametrize("alpha", [1.5, 1.75, 2.0])
def test_masks(alpha, form):
    b, h, n, k_len, d = 2, 2, 5, 77, 40
    q, k, v = make_qkv(b, h, n, k_len, d, seed=3)
    g = torch.Generator().manual_seed(4)
    if form == "bool_b11k":
        mask = torch.rand(b, 1, 1, k_len, generator=g) > 0.3
    elif form == "bool_nk":
        mask = torch.rand(n, k_len, generator=g) > 0.5
    elif form == "bool_full":
        mask = torch.rand(b, h, n, k_len, generator=g) > 0.5
    else:  # additive: −inf for dropped keys, finite biases elsewhere
        bias = torch.randn(b, 1, n, k_len, generator=g)
        mask = torch.where(torch.rand(b, 1, n, k_len, generator=g) > 0.4, bias, torch.tensor(float("-inf")))
    assert tk.is_supported(q, k, v, mask)
    w = tk.pladis_weights_triton(q, k, alpha=alpha, lam=2.0, scale=0.3, mask=mask)
    s = oracle_scores(q, k, 0.3, mask)
    ref = oracle_weights(s, alpha, 2.0)
    assert (w.double() - ref).abs().max().item() <= 1e-5
    assert (w[torch.isinf(s)] == 0).all()  # dropped keys get exactly zero weight
    out = tk.pladis_attention_triton(q, k, v, alpha=alpha, lam=2.0, scale=0.3, mask=mask)
    assert (out.double() - ref @ v.double()).abs().max().item() <= 1e-5


def test_fully_masked_row_gives_zeros_like_sdpa():
    q, k, v = make_qkv(1, 1, 4, 77, 40, seed=6)
    mask = torch.ones(4, 77, dtype=torch.bool)
    mask[2] = False
    out = tk.pladis_attention_triton(q, k, v, alpha=1.5, lam=2.0, scale=0.2, mask=mask)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2)
    assert torch.equal(out[0, 0, 2], torch.zeros(40)) and torch.equal(sdpa[0, 0, 2], torch.zeros(40))
    assert torch.isfinite(out).all()
    w = tk.pladis_weights_triton(q, k, alpha=1.5, lam=2.0, scale=0.2, mask=mask)
    assert torch.equal(w[0, 0, 2], torch.zeros(77))
    ref = oracle_weights(oracle_scores(q, k, 0.2, mask), 1.5, 2.0)
    assert (w.double() - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("k_len", [77, 154])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_ties(alpha, k_len):
    q, k, _ = make_qkv(1, 1, 6, k_len, 40, seed=7)
    k[:, :, 1:9] = k[:, :, :1]  # nine identical keys: exactly tied scores
    q[0, 0, 0] = 0.0  # an all-equal row: every key ties
    q[0, 0, 1] = k[0, 0, 0] * 2.0  # the tied group wins by a wide margin
    w = tk.pladis_weights_triton(q, k, alpha=alpha, lam=1.0, scale=0.25)
    ref = oracle_entmax(oracle_scores(q, k, 0.25), alpha)
    assert (w.double() - ref).abs().max().item() <= 1e-5
    assert (w[0, 0, 0] - 1.0 / k_len).abs().max().item() <= 1e-7
    tied = w[..., :9]
    assert torch.equal(tied, tied[..., :1].expand_as(tied))  # tied keys get identical weights


def test_fallback_loop_finishes_unsettled_rows(monkeypatch):
    """With no fixed Newton steps every row relies on the in-kernel fallback; without it rows are wrong."""
    q, k, _ = make_qkv(1, 1, 8, 154, 40, spread=4.0, seed=8)
    ref = oracle_entmax(oracle_scores(q, k, 0.2), 1.5)
    monkeypatch.setattr(tk, "_newton_steps", lambda mode, block_k: 0)
    w = tk.pladis_weights_triton(q, k, alpha=1.5, lam=1.0, scale=0.2)
    assert (w.double() - ref).abs().max().item() <= 1e-5
    monkeypatch.setattr(tk, "MAX_FIX", 0)
    w_bad = tk.pladis_weights_triton(q, k, alpha=1.5, lam=1.0, scale=0.2)
    assert (w_bad.double() - ref).abs().max().item() > 1e-4


@pytest.mark.parametrize("k_len", [77, 154])
@pytest.mark.parametrize("alpha", [1.55, 1.6, 1.75, 1.9])
def test_mapped_start_needs_no_fix_up_on_gaussian_rows(alpha, k_len, monkeypatch):
    # 1.5 < α < 2 (branch 5) starts from the ℓ2 threshold mapped towards the ℓβ one: the fixed steps
    # alone settle Gaussian rows (the in-kernel fix-up is switched off), where the plain start from
    # τ = −1 with the same steps does not (K = 77).
    assert tk._mode(alpha, 1.0)[0] == 5
    q, k, _ = make_qkv(1, 2, 16, k_len, 40, spread=1.0, seed=k_len + 21)
    scale = 40**-0.5
    ref = oracle_entmax(oracle_scores(q, k, scale), alpha)
    monkeypatch.setattr(tk, "MAX_FIX", 0)
    w = tk.pladis_weights_triton(q, k, alpha=alpha, lam=1.0, scale=scale)
    assert (w.double() - ref).abs().max().item() <= 1e-5
    if k_len != 77:
        return  # (at K = 154 the branch takes one step more, which the plain start also needs)
    steps = tk._newton_steps(5, tk._tiles(k_len, 40)[0])
    monkeypatch.setattr(tk, "_mode", lambda a, lam: (3, a - 1.0, 1.0 / (a - 1.0)))
    monkeypatch.setattr(tk, "_newton_steps", lambda mode, block_k: steps)
    w_plain = tk.pladis_weights_triton(q, k, alpha=alpha, lam=1.0, scale=scale)
    assert (w_plain.double() - ref).abs().max().item() > 1e-5


@pytest.mark.parametrize("alpha", [1.05, 1.99])
def test_alpha_near_the_ends(alpha):
    q, k, _ = make_qkv(1, 1, 5, 77, 40, seed=10)
    w = tk.pladis_weights_triton(q, k, alpha=alpha, lam=1.0, scale=0.2)
    ref = oracle_entmax(oracle_scores(q, k, 0.2), alpha)
    assert (w.double() - ref).abs().max().item() <= 1e-5


def test_packed_layout_views_and_odd_sizes():
    """Head-split views of (B, N, H·d) tensors work without copies; the output keeps the packed layout."""
    b, n, h, d, k_len = 2, 5, 3, 40, 77
    g = torch.Generator().manual_seed(11)
    qp = torch.randn(b, n, h * d, generator=g).half()
    kp = torch.randn(b, k_len, h * d, generator=g).half()
    vp = torch.randn(b, k_len, h * d, generator=g).half()

    def split(t):
        return t.view(t.shape[0], t.shape[1], h, d).transpose(1, 2)

    q, k, v = split(qp), split(kp), split(vp)
    out = tk.pladis_attention_triton(q, k, v, alpha=1.75, lam=2.0, scale=d**-0.5)
    assert out.stride() == q.stride()
    ref = oracle_weights(oracle_scores(q, k, d**-0.5), 1.75, 2.0) @ v.double()
    assert (out.double() - ref).abs().max().item() <= 2e-3


def test_is_supported_and_reasons(monkeypatch):
    q, k, v = make_qkv(1, 1, 4, 77, 40)
    assert tk.is_supported(q, k, v, None)
    assert not tk.is_supported(q, k[:, :, :, :32], v, None)
    assert not tk.is_supported(q.half(), k, v, None)
    assert not tk.is_supported(q.double(), k.double(), v.double(), None)
    big = torch.zeros(1, 1, 513, 40)
    assert "keys" in tk.unsupported_reason(q, big, big, None)
    small = torch.zeros(1, 1, 4, 8)
    assert "head dim" in tk.unsupported_reason(small, small[:, :, :3], small[:, :, :3], None)
    assert "mask" in tk.unsupported_reason(q, k, v, torch.ones(3, 77, dtype=torch.bool))
    assert "mask dtype" in tk.unsupported_reason(q, k, v, torch.ones(4, 77, dtype=torch.int64))
    qg = q.clone().requires_grad_()
    assert "autograd" in tk.unsupported_reason(qg, k, v, None)
    with torch.no_grad():
        assert tk.is_supported(qg, k, v, None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "device cpu" in tk.unsupported_reason(q, k, v, None)
    with pytest.raises(ValueError, match="unsupported input: device cpu"):
        tk.pladis_attention_triton(q, k, v, alpha=1.5, lam=2.0, scale=0.1)


def test_alpha_just_above_one():
    q, k, _ = make_qkv(1, 1, 5, 77, 40, seed=10)
    # Within 1e-6 of 1 the kernel takes its softmax branch: entmax differs from softmax by ~2e-6.
    w = tk.pladis_weights_triton(q, k, alpha=1 + 1e-7, lam=2.0, scale=0.2)
    assert (w.double() - oracle_entmax(oracle_scores(q, k, 0.2), 1.0)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("k_len", [77, 154])
@pytest.mark.parametrize("alpha", [1 + 2e-7, 1 + 2e-6, 1.001, 1.01, 1.049])
def test_alpha_just_above_one_solves_for_the_largest_weight(alpha, k_len):
    # Below α = 1.05 a float32 search on τ is not exact: the kernel solves for log p_max instead
    # (branch 4), with a log1p that does not rely on the GPU's approximate log near 1.
    q, k, _ = make_qkv(1, 2, 6, k_len, 40, seed=k_len + 3)
    mask = torch.ones(1, 2, 6, k_len, dtype=torch.bool)
    mask[:, :, 1, 30:] = False
    mask[:, :, 4, :] = False  # a row with every key masked: zero weights
    scale = 40**-0.5
    assert tk._mode(alpha, 1.0)[0] == 4
    w = tk.pladis_weights_triton(q, k, alpha=alpha, lam=1.0, scale=scale, mask=mask)
    scores = oracle_scores(q, k, scale, mask)
    live = mask.any(-1)
    ref = near_one_oracle(scores[live], alpha)
    assert (w[live].double() - ref).abs().max().item() <= 1e-6
    assert torch.equal(w[~live], torch.zeros_like(w[~live]))


def test_log1p_is_exact_near_zero_without_a_precise_log():
    # float32 1 + v rounds tiny v away (log(1 + v) is then 0 or off by 100 %), and GPUs' log has an
    # absolute error: the kernel's log1p must get its digits from the series, not from log.
    v = -torch.cat([torch.logspace(-12, 0, 250, dtype=torch.float64), torch.tensor([0.0, 0.5, 0.4999])])
    v = torch.cat([v, torch.zeros(256 - v.numel(), dtype=torch.float64)]).float()
    out = torch.empty_like(v)
    _log1p_probe[(1,)](v, out, N=256)
    want = torch.log1p(v.double())
    finite = v > -1
    rel = ((out.double() - want) / want.abs().clamp_min(1e-300))[finite & (v != 0)]
    assert rel.abs().max().item() <= 5e-7
    assert out[v == 0].eq(0).all() and out[v == -1].eq(-math.inf).all()


def test_alpha_just_above_one_blend_in_fp16():
    q, k, v = make_qkv(1, 2, 7, 77, 64, dtype=torch.float16, spread=2.0, seed=12)
    out = tk.pladis_attention_triton(q, k, v, alpha=1.02, lam=2.0, scale=0.125)
    s = oracle_scores(q, k, 0.125)
    ref = (-torch.softmax(s, -1) + 2.0 * near_one_oracle(s, 1.02)) @ v.double()
    assert out.dtype == torch.float16
    assert (out.double() - ref).abs().max().item() <= 2e-3


def test_bad_arguments_raise():
    q, k, v = make_qkv(1, 1, 2, 77, 40)
    with pytest.raises(ValueError, match="alpha"):
        tk.pladis_attention_triton(q, k, v, alpha=2.5, lam=2.0, scale=0.1)
    with pytest.raises(ValueError, match="lam"):
        tk.pladis_attention_triton(q, k, v, alpha=1.5, lam=math.inf, scale=0.1)
    # direct callers get the torch path's checks: λ < 0 or > LAM_MAX is rejected, not extrapolated
    for lam in (-1.0, 1e31):
        with pytest.raises(ValueError, match=r"PLADIS lambda.*\[0, 1e\+30\]"):
            tk.pladis_weights_triton(q, k, alpha=1.5, lam=lam, scale=0.1)


def _dispatch_reason_in_fresh_process(setup: str) -> str:
    """What the dispatch check says about a CPU call in a fresh interpreter after ``setup`` (asserting
    that Triton counts as unavailable there)."""
    code = setup + (
        "import torch, pladis, pladis.triton_kernel as tk\n"
        "q = torch.zeros(1, 1, 2, 40)\n"
        "assert not tk.triton_available()\n"
        "assert not tk.is_supported(q, q, q, None)\n"
        "print(tk.unsupported_reason(q, q, q, None))\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=120
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_import_without_triton():
    """``import pladis`` and the dispatch check must work where Triton is missing (e.g. Windows)."""
    reason = _dispatch_reason_in_fresh_process("import sys; sys.modules['triton'] = None\n")
    assert "triton is not importable" in reason


def test_triton_older_than_3_is_not_used():
    """Triton 2.x (A1111 1.10's default torch 2.1.2) cannot compile the kernel: the torch path answers
    at once, with the reason, instead of after a failed compile per shape."""
    reason = _dispatch_reason_in_fresh_process("import triton\ntriton.__version__ = '2.1.0'\n")
    assert "triton 2.1.0 is too old (the kernel needs 3.0+)" in reason
    assert tk._release("3.5.1") == (3, 5) and tk._release("3.0.0+git4d6ca") == (3, 0)
    assert tk._release("2.1.0") < tk.MIN_TRITON and tk._release("nightly") is None


def test_autotuned_launch_path(monkeypatch):
    """The GPU launch path (autotuner, meta-dependent grid, config pruning) with a stand-in timer."""
    raw, tuned = tk._kernels()
    assert all(key in raw.arg_names for key in tuned.keys)
    benched: list[int] = []

    def fake_do_bench(kernel_call, quantiles):
        kernel_call()
        benched.append(1)
        return [1.0, 1.0, 1.0]

    # The tuned kernel lives for the process, and so do the configs it chose and its do_bench (a cached
    # property, read once from _do_bench): both are replaced for this test alone, so a rerun benches too.
    monkeypatch.setitem(vars(tuned), "do_bench", fake_do_bench)
    monkeypatch.setattr(tuned, "cache", {})
    monkeypatch.setattr(tk, "_autotune_enabled", lambda *args: True)
    q, k, v = make_qkv(1, 2, 40, 154, 40, dtype=torch.float16, spread=2.0, seed=12)
    out = tk.pladis_attention_triton(q, k, v, alpha=1.5, lam=2.0, scale=0.15)
    ref = oracle_weights(oracle_scores(q, k, 0.15), 1.5, 2.0) @ v.double()
    assert (out.double() - ref).abs().max().item() <= 2e-3
    pruned = tuned.prune_configs({"BLOCK_K": 256, "BLOCK_D": 64})
    assert len(benched) == len(pruned) >= 2  # every surviving config was tried once
    assert all(tk._fits(c.kwargs["BLOCK_M"], 256, 64) for c in pruned)
    assert tuned.prune_configs({"BLOCK_K": 512, "BLOCK_D": 256})  # never empty


def test_resource_failure_becomes_unsupported(monkeypatch):
    """A GPU that cannot hold the tiles raises TritonUnsupported once, then is_supported says no."""
    from triton.runtime.errors import OutOfResources

    class Launcher:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise OutOfResources(300000, 232448, "shared memory")

            return launch

    monkeypatch.setattr(tk, "_kernels", lambda: (Launcher(), Launcher()))
    monkeypatch.setattr(tk, "_failed_shapes", set())
    q, k, v = make_qkv(1, 1, 4, 77, 40)
    assert tk.is_supported(q, k, v, None)
    with pytest.raises(tk.TritonUnsupported, match="shared memory"):
        tk.pladis_attention_triton(q, k, v, alpha=1.5, lam=2.0, scale=0.1)
    assert not tk.is_supported(q, k, v, None)
    assert "failed to launch" in tk.unsupported_reason(q, k, v, None)
    q2, k2, v2 = make_qkv(1, 1, 4, 154, 40)  # another tile size is still tried
    assert tk.is_supported(q2, k2, v2, None)


@pytest.mark.parametrize("where", ["launch", "build"])
def test_a_broken_triton_toolchain_switches_the_kernel_off(monkeypatch, where):
    """Any other failure (e.g. no C compiler for Triton's launcher, common on Windows) must not break
    generation: the call falls back to the torch path, with a warning, and the kernel stays off."""
    import pladis.attention as attention

    class Launcher:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

            return launch

    def kernels():
        if where == "build":
            raise ImportError("cannot import name 'jit' from partially initialized module 'triton'")
        return Launcher(), Launcher()

    monkeypatch.setattr(tk, "_kernels", kernels)
    monkeypatch.setattr(tk, "_broken", [])
    q, k, v = make_qkv(1, 2, 5, 77, 40, seed=3)
    assert tk.is_supported(q, k, v, None)
    # On CPU the dispatch never picks the kernel: hand it the kernel as it would on a GPU.
    monkeypatch.setattr(attention, "_fused_kernel", lambda *a: tk.pladis_attention_triton)
    with pytest.warns(RuntimeWarning, match="the Triton kernel failed .* using the torch path from now on"):
        got = attention.pladis_attention(q, k, v, alpha=1.5, lam=2.0, scale=0.1)
    want = attention._pladis_attention_torch(q, k, v, 1.5, 2.0, 0.1, None, attention.DEFAULT_MEMORY_BUDGET)
    assert torch.equal(got, want)
    assert not tk.is_supported(q, k, v, None)
    assert "failed to build or launch" in tk.unsupported_reason(q, k, v, None)


def _failing_launcher(error: Exception):
    class Launcher:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise error

            return launch

    return Launcher()


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 256.00 MiB"),  # autotuner's buffer
        RuntimeError("Triton Error [CUDA]: out of memory"),  # Triton's driver, loading a module
    ],
)
def test_out_of_memory_sends_that_call_to_the_torch_path(monkeypatch, error):
    # The autotuner benchmarks with a 256 MB buffer of its own: the torch path may fit where tuning did
    # not. Memory comes back, so nothing is marked (it used to propagate and fail the generation, or
    # switch the kernel off for the session).
    import pladis.attention as attention

    monkeypatch.setattr(tk, "_kernels", lambda: (_failing_launcher(error), _failing_launcher(error)))
    monkeypatch.setattr(tk, "_broken", [])
    monkeypatch.setattr(tk, "_failed_shapes", set())
    monkeypatch.setattr(tk, "_untuned_shapes", set())
    monkeypatch.setattr(attention, "_fused_kernel", lambda *a: tk.pladis_attention_triton)
    q, k, v = make_qkv(1, 2, 5, 77, 40, seed=4)
    got = attention.pladis_attention(q, k, v, alpha=1.5, lam=2.0, scale=0.1)
    want = attention._pladis_attention_torch(q, k, v, 1.5, 2.0, 0.1, None, attention.DEFAULT_MEMORY_BUDGET)
    assert torch.equal(got, want)
    assert tk.is_supported(q, k, v, None) and tk._broken == [] and tk._failed_shapes == set()


def test_after_running_out_of_memory_tuning_a_shape_takes_the_untuned_tile(monkeypatch, caplog):
    # The autotuner caches nothing after a failure: on a nearly full card every call tuned again, each
    # failed 256 MB allocation emptying torch's cache. That autotuning key is now no longer tuned.
    calls = []

    def launcher(kind: str, error: BaseException):
        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    calls.append(kind)
                    raise error

                return launch

        return Launcher()

    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 256.00 MiB")
    raw = launcher("raw", oom)  # out of memory untuned too: nothing more is marked
    monkeypatch.setattr(tk, "_kernels", lambda: (raw, launcher("tuned", oom)))
    monkeypatch.setattr(tk, "_autotune_enabled", lambda measured=False: True)
    monkeypatch.setattr(tk, "_failed_shapes", set())
    monkeypatch.setattr(tk, "_untuned_shapes", set())
    q, k, v = make_qkv(1, 1, 4, 77, 40)
    with caplog.at_level("WARNING", logger="pladis"):
        for _ in range(2):
            with pytest.raises(tk.TritonUnsupported):
                tk.pladis_attention_triton(q, k, v, alpha=1.5, lam=2.0, scale=0.1)
        q2, k2, v2 = make_qkv(1, 1, 9, 77, 40)  # same tile class, another query count: still tuned
        with pytest.raises(tk.TritonUnsupported):
            tk.pladis_attention_triton(q2, k2, v2, alpha=1.5, lam=2.0, scale=0.1)
    assert calls == ["tuned", "raw", "tuned"]
    assert sum("out of GPU memory tuning" in r.getMessage() for r in caplog.records) == 2


def test_out_of_memory_in_an_untuned_launch_marks_nothing(monkeypatch, caplog):
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
    monkeypatch.setattr(tk, "_kernels", lambda: (_failing_launcher(oom), _failing_launcher(oom)))
    monkeypatch.setattr(tk, "_autotune_enabled", lambda measured=False: False)
    monkeypatch.setattr(tk, "_untuned_shapes", set())
    q, k, v = make_qkv(1, 1, 4, 77, 40)
    with caplog.at_level("WARNING", logger="pladis"), pytest.raises(tk.TritonUnsupported):
        tk.pladis_attention_triton(q, k, v, alpha=1.5, lam=2.0, scale=0.1)
    assert tk._untuned_shapes == set() and not caplog.records


def test_a_failure_before_the_launch_is_classified_too(monkeypatch):
    def kernels():
        raise ImportError("cannot import name 'jit' from partially initialized module 'triton'")

    monkeypatch.setattr(tk, "_kernels", kernels)
    monkeypatch.setattr(tk, "_broken", [])
    q, k, v = make_qkv(1, 1, 4, 77, 40)
    with pytest.warns(RuntimeWarning), pytest.raises(tk.TritonUnsupported):
        tk.pladis_attention_triton(q, k, v, alpha=1.5, lam=2.0, scale=0.1)


def test_other_cuda_errors_are_not_swallowed(monkeypatch):
    """A CUDA error other than running out of memory is the GPU's state, not Triton's: it propagates."""
    error = RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(tk, "_kernels", lambda: (_failing_launcher(error), _failing_launcher(error)))
    monkeypatch.setattr(tk, "_broken", [])
    q, k, v = make_qkv(1, 1, 4, 77, 40)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        tk.pladis_attention_triton(q, k, v, alpha=1.5, lam=2.0, scale=0.1)
    assert tk.is_supported(q, k, v, None)


def test_a_compilation_error_switches_the_kernel_off_for_the_process(monkeypatch):
    # An API renamed between Triton versions surfaces as CompilationError, and a ptxas that does not
    # know the GPU as PTXASError: no other tile would compile either (they were marked per shape, and
    # every new shape compiled and failed again).
    from triton.compiler.errors import CompilationError

    try:
        raise CompilationError("", None, "AttributeError: module 'triton.language' has no attribute 'dot2'")
    except CompilationError as caught:
        error = caught
    monkeypatch.setattr(tk, "_kernels", lambda: (_failing_launcher(error), _failing_launcher(error)))
    monkeypatch.setattr(tk, "_broken", [])
    monkeypatch.setattr(tk, "_failed_shapes", set())
    q, k, v = make_qkv(1, 1, 4, 77, 40)
    warned = pytest.warns(RuntimeWarning, match="using the torch path from now on")
    with warned, pytest.raises(tk.TritonUnsupported):
        tk.pladis_attention_triton(q, k, v, alpha=1.5, lam=2.0, scale=0.1)
    q2, k2, v2 = make_qkv(1, 1, 4, 154, 40)
    assert "failed to build or launch" in tk.unsupported_reason(q2, k2, v2, None)


def test_a_tile_that_does_not_fit_is_said_once(monkeypatch, caplog):
    from triton.runtime.errors import OutOfResources

    error = OutOfResources(300000, 232448, "shared memory")
    monkeypatch.setattr(tk, "_kernels", lambda: (_failing_launcher(error), _failing_launcher(error)))
    monkeypatch.setattr(tk, "_failed_shapes", set())
    q, k, v = make_qkv(1, 1, 4, 77, 40)
    with caplog.at_level("WARNING", logger="pladis"), pytest.raises(tk.TritonUnsupported):
        tk.pladis_attention_triton(q, k, v, alpha=1.5, lam=2.0, scale=0.1)
    assert len(caplog.records) == 1 and "shared memory" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("capability", "dtype", "taken"),
    [((6, 1), torch.float16, False), ((7, 5), torch.float16, False), ((8, 0), torch.bfloat16, True)],
)
def test_the_kernel_needs_compute_capability_8(monkeypatch, capability, dtype, taken):
    # Triton supports 8.0+; on 7.5 it compiled this kernel without tensor cores and spilled.
    q, k, v = (_CudaView(t) for t in make_qkv(1, 1, 4, 77, 40, dtype=dtype))
    monkeypatch.setattr(tk, "_capability", lambda device: capability)
    monkeypatch.setattr(tk, "_smem_limit", lambda device: None)
    monkeypatch.setattr(torch.version, "hip", None)
    reason = tk.unsupported_reason(q, k, v, None)
    assert (reason is None or "compute capability" not in reason) == taken
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert "ROCm" in tk.unsupported_reason(q, k, v, None)


class _CudaView(torch.Tensor):
    """A CPU tensor that reports a CUDA device (the gate only reads ``device``)."""

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        return torch.Tensor._make_subclass(cls, data)

    @property
    def device(self):  # type: ignore[override]
        return torch.device("cuda", 0)


def test_shared_memory_limit_routes_big_tiles_to_torch(monkeypatch):
    """Consumer GPUs (~99 KiB per block) take SD1.5's d=160 at K=77 but not at K=154 (ptxas-sized)."""
    monkeypatch.setattr(tk, "_smem_limit", lambda device: 99 * 1024)
    q, k, v = make_qkv(1, 1, 2, 77, 160, dtype=torch.float16)
    assert tk.is_supported(q, k, v, None)
    q, k, v = make_qkv(1, 1, 2, 154, 160, dtype=torch.float16)
    assert "shared memory" in tk.unsupported_reason(q, k, v, None)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    k_len=st.integers(1, 300),
    d=st.sampled_from([16, 40, 64, 80, 96, 160]),
    n=st.integers(1, 12),
    alpha=st.floats(1.0, 2.0),
    lam=st.floats(0.0, 4.0),
    spread=st.floats(0.1, 8.0),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(k_len=2, d=16, n=1, alpha=1 + 2**-52, lam=1.0, spread=1.0, masked=False, seed=0)  # α just above 1
def test_weights_fuzz(k_len, d, n, alpha, lam, spread, masked, seed):
    """Random sizes (odd K and d), α, λ, score spreads and masks: weights within 1e-5 of the oracle."""
    q, k, _ = make_qkv(1, 1, n, k_len, d, spread=spread, seed=seed)
    mask = None
    if masked:
        mask = torch.rand(n, k_len, generator=torch.Generator().manual_seed(seed)) > 0.5
    scale = d**-0.5
    w = tk.pladis_weights_triton(q, k, alpha=alpha, lam=lam, scale=scale, mask=mask)
    ref = oracle_weights(oracle_scores(q, k, scale, mask), alpha, lam)
    assert (w.double() - ref).abs().max().item() <= 1e-5 * max(1.0, lam)


def test_longest_rows():
    q, k, v = make_qkv(1, 1, 3, 512, 64, dtype=torch.float16, spread=2.0, seed=13)
    out = tk.pladis_attention_triton(q, k, v, alpha=1.5, lam=2.0, scale=0.125)
    ref = oracle_weights(oracle_scores(q, k, 0.125), 1.5, 2.0) @ v.double()
    assert (out.double() - ref).abs().max().item() <= 2e-3


def test_inputs_without_unit_head_stride_are_made_contiguous():
    """The kernel indexes the head dim with unit stride; other layouts are copied first, not misread."""
    g = torch.Generator().manual_seed(13)
    q = torch.randn(1, 2, 40, 6, generator=g).half().transpose(-1, -2)  # (1, 2, 6, 40), head stride 6
    k = torch.randn(1, 2, 40, 77, generator=g).half().transpose(-1, -2)
    v = torch.randn(1, 2, 77, 40, generator=g).half()
    assert q.stride(-1) != 1 and k.stride(-1) != 1
    out = tk.pladis_attention_triton(q, k, v, alpha=1.5, lam=2.0, scale=0.15)
    assert out.stride(-1) == 1
    ref = oracle_weights(oracle_scores(q, k, 0.15), 1.5, 2.0) @ v.double()
    assert (out.double() - ref).abs().max().item() <= 2e-3


def test_checked_calls_skip_the_support_check(monkeypatch):
    """The dispatch checks support once; the kernel entry it calls must not check again."""
    checks: list[int] = []
    real = tk.unsupported_reason
    monkeypatch.setattr(tk, "unsupported_reason", lambda *a: checks.append(1) or real(*a))
    q, k, v = make_qkv(1, 1, 4, 77, 40, dtype=torch.float16)
    a = tk.pladis_attention_triton(q, k, v, alpha=1.5, lam=2.0, scale=0.1)
    assert checks == [1]
    b = tk.pladis_attention_triton(q, k, v, alpha=1.5, lam=2.0, scale=0.1, checked=True)
    assert checks == [1] and torch.equal(a, b)


def test_launch_heuristic_and_autotune_default(monkeypatch):
    """Hopper gets the measured 64-query/4-warp tile where it does not spill; autotuning runs where no
    tile was measured, unless the environment says otherwise."""
    assert tk._heuristic(128, 64, False, 1, (9, 0)) == (64, 4)
    assert tk._heuristic(128, 64, False, 3, (9, 0)) == (32, 8)  # general α spills at 64/4
    assert tk._heuristic(128, 64, False, 1, (8, 0)) == (32, 8)
    assert tk._heuristic(256, 64, False, 1, (9, 0)) == (32, 8)
    assert tk._heuristic(128, 128, False, 1, (9, 0)) == (32, 8)  # d = 80: spills at 64/4
    monkeypatch.delenv("PLADIS_TRITON_AUTOTUNE", raising=False)
    monkeypatch.setattr(tk, "interpreter_mode", lambda: False)
    assert not tk._autotune_enabled(measured_tile=True) and tk._autotune_enabled(measured_tile=False)
    monkeypatch.setenv("PLADIS_TRITON_AUTOTUNE", "1")
    assert tk._autotune_enabled(measured_tile=True)
    monkeypatch.setenv("PLADIS_TRITON_AUTOTUNE", "0")
    assert not tk._autotune_enabled(measured_tile=False)


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0])
def test_hopper_tile_of_64_queries(monkeypatch, alpha):
    """The Hopper default (64 queries per program) on a ragged query count, against the oracle."""
    asked: list[tuple] = []
    monkeypatch.setattr(tk, "_heuristic", lambda *args: asked.append(args) or (64, 4))
    q, k, v = make_qkv(1, 2, 70, 77, 64, dtype=torch.float16, spread=2.0, seed=14)
    out = tk.pladis_attention_triton(q, k, v, alpha=alpha, lam=2.0, scale=0.125)
    assert len(asked) == 1  # the launch took its tile from the heuristic
    ref = oracle_weights(oracle_scores(q, k, 0.125), alpha, 2.0) @ v.double()
    assert (out.double() - ref).abs().max().item() <= 2e-3
