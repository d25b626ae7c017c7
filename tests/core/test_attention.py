"""The PLADIS blend: oracle agreement, λ = 0 / λ = 1 identities, masks, chunking, dtypes, layout."""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pladis.attention import (
    attention_blocks,
    chunk_queries,
    group_blocks,
    pladis_attention,
    pladis_attention_packed,
    pladis_weights,
)
from pladis.entmax import entmax
from tests.core.oracles import reference_pladis
from tests.core.solver_namespace import solver_namespace


def qkv(b: int, h: int, n: int, k: int, d: int, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        (torch.randn(b, h, m, d, generator=gen) * s).to(dtype) for m, s in ((n, 1.5), (k, 1.5), (k, 1.0))
    )


EXACT_SCALE = 0.125
"""A power of two: with :func:`exact_qk`'s inputs, ``q·kᵀ·scale`` is exact in float32."""


def exact_qk(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Quarters in [−2, 2): products are sixteenths, and a d ≤ 2^16 sum of them is exact in float32.

    Why: the CPU matmul sums in an order that depends on the number of rows (MKL blocks a 7-row
    chunk differently from a 300-row one, measured up to 4 ulps on the scores, ~9e-6 at the
    output once λ = 2 weighs them). With exact scores, chunking can only change the V matmul.
    """
    return torch.randint(-8, 8, shape, generator=gen).float() / 4


@pytest.mark.parametrize("alpha", [1.25, 1.5, 1.75, 2.0])
@pytest.mark.parametrize("lam", [0.5, 1.0, 2.0, 5.0])
def test_matches_float64_oracle(alpha: float, lam: float) -> None:
    q, k, v = qkv(2, 3, 70, 77, 40, seed=int(alpha * 10 + lam))
    got = pladis_attention(q, k, v, alpha=alpha, lam=lam)
    want = reference_pladis(q, k, v, alpha, lam)
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max().item() <= 1e-5 * max(1.0, lam)  # measured ≤ 1.2e-5 at λ = 2


def test_lambda_zero_is_exactly_sdpa() -> None:
    q, k, v = qkv(2, 4, 33, 77, 40)
    mask = torch.rand(2, 1, 33, 77, generator=torch.Generator().manual_seed(1)) > 0.2
    assert torch.equal(pladis_attention(q, k, v, alpha=1.5, lam=0.0), F.scaled_dot_product_attention(q, k, v))
    assert torch.equal(
        pladis_attention(q, k, v, alpha=1.5, lam=0.0, mask=mask, scale=0.3),
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3),
    )


def test_lambda_one_is_pure_sparse_attention() -> None:
    q, k, v = qkv(1, 2, 40, 77, 64, seed=3)
    want = reference_pladis(q, k, v, 1.5, 1.0)  # the entmax package's entmax15, no pladis code
    assert (pladis_attention(q, k, v, alpha=1.5, lam=1.0).double() - want).abs().max().item() <= 5e-6


def test_alpha_one_is_softmax_attention_for_any_lambda() -> None:
    q, k, v = qkv(1, 2, 40, 77, 40, seed=4)
    want = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(pladis_attention(q, k, v, alpha=1.0, lam=3.0), want, rtol=0, atol=2e-6)


def test_lambda_above_one_gives_negative_weights_that_still_sum_to_one() -> None:
    scores = torch.randn(64, 77, generator=torch.Generator().manual_seed(5)) * 2
    weights = pladis_weights(scores, 1.5, 2.0)
    assert (weights < 0).any()
    torch.testing.assert_close(weights.sum(-1), torch.ones(64), rtol=0, atol=1e-5)


@pytest.mark.parametrize("alpha", [1.5, 1.8])
def test_chunked_equals_unchunked(alpha: float) -> None:
    gen = torch.Generator().manual_seed(6)
    q, k = exact_qk((2, 2, 300, 40), gen), exact_qk((2, 2, 154, 40), gen)
    v = torch.randn(2, 2, 154, 40, generator=gen)
    whole = pladis_attention(q, k, v, alpha=alpha, lam=2.0, scale=EXACT_SCALE, memory_budget=1 << 40)
    tiny_budget = 2 * 2 * 154 * 4 * 6 * 7  # 7 queries per chunk
    assert chunk_queries(4, 300, 154, tiny_budget, on_gpu=False) == 7
    chunked = pladis_attention(q, k, v, alpha=alpha, lam=2.0, scale=EXACT_SCALE, memory_budget=tiny_budget)
    # Rows are independent and the scores exact; only the V matmul's blocking may differ, by an ulp.
    torch.testing.assert_close(chunked, whole, rtol=2e-6, atol=2e-6)


def test_chunk_size_respects_the_memory_budget() -> None:
    budget = 256 * 2**20
    step = chunk_queries(20, 4096, 77, budget, on_gpu=True)
    assert step * 20 * 77 * 4 * 6 <= budget
    assert chunk_queries(20, 4096, 77, budget, on_gpu=False) <= step
    with pytest.raises(ValueError, match="memory_budget"):
        chunk_queries(1, 1, 1, 0, on_gpu=False)


@pytest.mark.parametrize("alpha", [1.5, 1.3, 1.75, 1.9])
def test_cpu_chunks_are_whole_heads_of_about_one_and_a_half_mebi_scores(
    alpha: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every solver takes chunks of ~1.5·2^20 scores on CPU (cache; fewer chunks spare per-row ops):
    # here 4 of the 8 heads of 4096 queries (4 · 4096 · 77 ≤ 1.5 · 2^20 < 5 · 4096 · 77).
    import pladis.attention as attention

    rows = []
    real = attention.blend_rows_
    monkeypatch.setattr(attention, "blend_rows_", lambda s, *a: rows.append(s.shape[0]) or real(s, *a))
    q, k, v = qkv(2, 4, 4096, 77, 8, seed=12)
    pladis_attention(q, k, v, alpha=alpha, lam=2.0)
    assert rows == [4 * 4096, 4 * 4096]


def test_blocks_are_whole_heads_when_they_fit_else_queries_of_one_head() -> None:
    heads = [(0, 3), (3, 6), (6, 9), (9, 12), (12, 14), (14, 16)]  # 16 heads of 3 at most: 6 blocks
    assert group_blocks(16, 4096, 13616) == [(slice(a, b), slice(0, 4096)) for a, b in heads]
    assert group_blocks(5, 100, 10**6) == [(slice(0, 5), slice(0, 100))]
    # 16384 queries do not fit in 13616 rows: two halves of each head, in order; 7 in 3 rows: 3, 2, 2.
    assert group_blocks(2, 16384, 13616) == [
        (slice(g, g + 1), slice(n, n + 8192)) for g in range(2) for n in (0, 8192)
    ]
    assert group_blocks(1, 7, 3) == [(slice(0, 1), slice(a, b)) for a, b in [(0, 3), (3, 5), (5, 7)]]
    assert group_blocks(3, 10, 1) == [(slice(g, g + 1), slice(n, n + 1)) for g in range(3) for n in range(10)]


def test_leading_dims_that_do_not_flatten_are_indexed_into_blocks_of_heads() -> None:
    # The WebUI's packed layout: (B, H) do not merge into one view, so blocks index a batch entry
    # and a range of its heads (4 of 8 heads of 4096 queries for 1276 queries' worth of rows).
    assert attention_blocks(torch.Size([2, 8]), 4096, 1276, fewest=False) == [
        ((b, slice(h, h + 4)), slice(0, 4096)) for b in (0, 1) for h in (0, 4)
    ]
    assert attention_blocks(torch.Size([16]), 4096, 1276, fewest=False) == [
        ((slice(h, h + 4),), slice(0, 4096)) for h in (0, 4, 8, 12)
    ]
    # On a GPU every block costs launches: one chunk across all heads beats one per batch entry.
    assert attention_blocks(torch.Size([2, 10]), 4096, 4096, fewest=True) == [
        ((slice(None), slice(None)), slice(0, 4096))
    ]
    assert len(attention_blocks(torch.Size([2, 10]), 4096, 4096, fewest=False)) == 1  # fewer, too
    # Ties keep the in-place blocks.
    assert attention_blocks(torch.Size([4]), 100, 25, fewest=True) == [
        ((slice(g, g + 1),), slice(0, 100)) for g in range(4)
    ]


@pytest.mark.parametrize("kind", ["in_place", "across"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_output_is_written_in_its_merged_layout(
    kind: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The packed result is (B, N, H·d): written there block by block, it needs no final merge of
    # heads (a whole extra output-sized copy onto fresh memory). Both block kinds (per head, and
    # across heads as on a GPU) and several block sizes give the split-heads answer.
    import pladis.attention as attention

    blocks: list = []
    chosen = getattr(attention, f"{kind}_blocks")
    monkeypatch.setattr(
        attention, "attention_blocks", lambda *a, fewest: blocks.extend(chosen(*a)) or chosen(*a)
    )
    b, n, kk, heads, d = 2, 50, 20, 3, 16
    gen = torch.Generator().manual_seed(21)
    q = exact_qk((b, n, heads * d), gen).to(dtype)
    k = exact_qk((b, kk, heads * d), gen).to(dtype)
    v = torch.randn(b, kk, heads * d, generator=gen).to(dtype)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, -1, heads, d).transpose(1, 2).contiguous()

    want = pladis_attention(split(q), split(k), split(v), alpha=1.5, lam=2.0, scale=EXACT_SCALE)
    want = want.transpose(1, 2).reshape(b, n, heads * d)
    # Score rows a block: 6 (within a head), 60 (one head), 120 (two), 300 (all six).
    for queries in (6, 60, 120, 300):
        budget = queries * 4 * (kk * 6 + 2 * d) // 6 * 6
        made: list[tuple[str, int, torch.dtype]] = []
        blocks.clear()
        run = functools.partial(
            pladis_attention_packed,
            q,
            k,
            v,
            heads,
            alpha=1.5,
            lam=2.0,
            scale=EXACT_SCALE,
            memory_budget=budget,
        )
        got = _new_tensors(run, made)
        tol = 2e-6 if dtype == torch.float32 else 2.0**-10
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        # No output-sized tensor is computed but in the blocks' buffers (a merge of heads would copy).
        assert [
            op for op, numel, kind in made if (numel, kind) == (got.numel(), dtype) and op != "empty"
        ] == []
        if kind == "in_place":  # (batch entry, its heads), queries
            heads_per_block = {index[1].stop - index[1].start for index, _ in blocks}
            queries_per_block = {part.stop - part.start for _, part in blocks}
            assert (heads_per_block, queries_per_block) == {
                6: ({1}, {5, 6}),
                60: ({1}, {50}),
                120: ({1, 2}, {50}),
                300: ({3}, {50}),
            }[queries]


def test_blocks_of_small_layers_span_the_batch_when_the_leading_dims_do_not_flatten() -> None:
    # Batch 16 of 64 queries (SD1.5's smallest layer, batch 8 with CFG), packed: one chunk across
    # every head and batch entry, not one block per batch entry (which took twice the time).
    assert attention_blocks(torch.Size([16, 8]), 64, 64, fewest=False) == [
        ((slice(None), slice(None)), slice(0, 64))
    ]
    # Flattened leading dims keep in-place blocks on CPU even when they are one more.
    assert len(attention_blocks(torch.Size([20]), 4096, 1021, fewest=False)) == 5
    assert len(attention_blocks(torch.Size([20]), 4096, 1021, fewest=True)) == 5
    assert attention_blocks(torch.Size([20]), 4096, 1000, fewest=False)[0] == ((slice(0, 4),), slice(0, 4096))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_write_the_output_of_every_head_and_query(dtype) -> None:
    # Whole-head blocks, and blocks within a head, write each output row once, in its place.
    gen = torch.Generator().manual_seed(14)
    q, k = exact_qk((2, 3, 50, 16), gen).to(dtype), exact_qk((2, 3, 20, 16), gen).to(dtype)
    v = torch.randn(2, 3, 20, 16, generator=gen).to(dtype)
    want = pladis_attention(q, k, v, alpha=1.5, lam=2.0, scale=EXACT_SCALE, memory_budget=1 << 40)
    # 6 rows (within a head), 48 (halves of a head), 120 (two heads), 300 (all six) per block.
    for queries in (7, 50, 120, 300):
        budget = queries * 4 * (20 * 6 + 32) // 6 * 6  # ``queries`` score rows a block
        got = pladis_attention(q, k, v, alpha=1.5, lam=2.0, scale=EXACT_SCALE, memory_budget=budget)
        tol = 2e-6 if dtype == torch.float32 else 2.0**-7
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_the_float32_answer_of_the_rounded_inputs(dtype) -> None:
    q, k, v = qkv(2, 2, 50, 77, 40, seed=8, dtype=dtype)
    got = pladis_attention(q, k, v, alpha=1.5, lam=2.0)
    assert got.dtype == dtype
    want = pladis_attention(q.float(), k.float(), v.float(), alpha=1.5, lam=2.0)
    assert torch.equal(got, want.to(dtype))
    assert torch.isfinite(got).all()


def test_boolean_and_additive_masks() -> None:
    q, k, v = qkv(2, 2, 20, 77, 40, seed=9)
    keep = torch.ones(2, 1, 1, 77, dtype=torch.bool)
    keep[0, ..., 50:] = False
    keep[1, ..., ::2] = False
    got = pladis_attention(q, k, v, alpha=1.5, lam=2.0, mask=keep)
    want = reference_pladis(q, k, v, 1.5, 2.0, mask=keep.expand(2, 2, 20, 77))
    assert (got.double() - want).abs().max().item() <= 5e-5
    additive = torch.zeros(2, 1, 1, 77).masked_fill(~keep, -math.inf)
    torch.testing.assert_close(
        pladis_attention(q, k, v, alpha=1.5, lam=2.0, mask=additive), got, rtol=0, atol=0
    )
    # Masked keys do not matter at all: dropping them gives the same result.
    trimmed = pladis_attention(q[:1], k[:1, :, :50], v[:1, :, :50], alpha=1.5, lam=2.0)
    torch.testing.assert_close(got[:1], trimmed, rtol=0, atol=2e-6)


@pytest.mark.parametrize("shape", [(3, 2, 20, 77), (1, 1, 1, 2, 20, 77), (20, 76)])
def test_a_mask_that_does_not_broadcast_is_named(shape: tuple[int, ...]) -> None:
    q, k, v = qkv(2, 2, 20, 77, 40, seed=9)
    message = r"PLADIS attention: a mask of shape .* does not broadcast .* \(2, 2, 20, 77\)"
    with pytest.raises(ValueError, match=message):
        pladis_attention(q, k, v, alpha=1.5, lam=2.0, mask=torch.ones(shape, dtype=torch.bool))


def test_fully_masked_query_rows_give_zeros() -> None:
    q, k, v = qkv(1, 1, 4, 8, 16, seed=10)
    keep = torch.ones(1, 1, 4, 8, dtype=torch.bool)
    keep[..., 2, :] = False
    out = pladis_attention(q, k, v, alpha=1.5, lam=2.0, mask=keep)
    assert (out[..., 2, :] == 0).all()
    assert torch.isfinite(out).all()


def test_explicit_scale_is_used() -> None:
    q, k, v = qkv(1, 2, 10, 77, 40, seed=11)
    got = pladis_attention(q, k, v, alpha=2.0, lam=2.0, scale=0.05)
    want = reference_pladis(q, k, v, 2.0, 2.0, scale=0.05)
    assert (got.double() - want).abs().max().item() <= 2e-5


def test_packed_layout_matches_split_heads() -> None:
    b, n, kk, heads, d = 2, 30, 77, 5, 16
    gen = torch.Generator().manual_seed(12)
    q, k, v = (
        torch.randn(b, n, heads * d, generator=gen),
        torch.randn(b, kk, heads * d, generator=gen),
        torch.randn(b, kk, heads * d, generator=gen),
    )
    got = pladis_attention_packed(q, k, v, heads, alpha=1.5, lam=2.0)
    assert got.shape == (b, n, heads * d)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, -1, heads, d).transpose(1, 2)

    want = reference_pladis(split(q), split(k), split(v), 1.5, 2.0).transpose(1, 2).reshape(b, n, heads * d)
    assert (got.double() - want).abs().max().item() <= 2e-5


def test_broadcast_batch_dimensions() -> None:
    q, k, v = qkv(3, 2, 10, 77, 16, seed=13)
    got = pladis_attention(q, k[:1], v[:1], alpha=1.5, lam=2.0)
    want = pladis_attention(q, k[:1].expand(3, -1, -1, -1), v[:1].expand(3, -1, -1, -1), alpha=1.5, lam=2.0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("message", "kwargs"),
    [
        (r"alpha: 2\.5 is outside the allowed range \[1, 2\]", {"alpha": 2.5, "lam": 1.0}),
        (r"lambda: -1\.0 is outside the allowed range \[0, 1e\+30\]", {"alpha": 1.5, "lam": -1.0}),
        (r"lambda: 1e\+39 is outside the allowed range", {"alpha": 1.5, "lam": 1e39}),  # float32 overflow
        (
            r"alpha: expected a real number .* in \[1, 2\], got '1\.5' of type str",
            {"alpha": "1.5", "lam": 1.0},
        ),
        (r"lambda: expected a real number .* of type Tensor", {"alpha": 1.5, "lam": torch.tensor(2.0)}),
        (r"lambda: 1000+ is outside the allowed range", {"alpha": 1.5, "lam": 10**400}),  # no OverflowError
        (r"alpha: 1000+ is outside the allowed range \[1, 2\]", {"alpha": 10**400, "lam": 1.0}),
    ],
)
def test_invalid_blend_parameters_are_rejected(message: str, kwargs: dict) -> None:
    q, k, v = qkv(1, 1, 2, 3, 4)
    with pytest.raises(ValueError, match=message):
        pladis_attention(q, k, v, **kwargs)


def test_numpy_scalars_are_numbers_too() -> None:
    import numpy as np

    q, k, v = qkv(1, 2, 5, 77, 8, seed=2)
    want = pladis_attention(q, k, v, alpha=1.5, lam=2.0)
    for alpha, lam in ((np.float32(1.5), np.float64(2.0)), (np.float64(1.5), np.int64(2))):
        torch.testing.assert_close(pladis_attention(q, k, v, alpha=alpha, lam=lam), want, rtol=0, atol=0)


def test_fused_kernel_dispatch_respects_device_support_and_force_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from pladis import attention, triton_kernel

    q, k, v = qkv(1, 1, 4, 8, 16)
    assert attention._fused_kernel(q, k, v, None) is None  # CPU tensors never go to the kernel

    cuda_like = SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(triton_kernel, "is_supported", lambda *args: True)
    monkeypatch.delenv("PLADIS_FORCE_TORCH", raising=False)
    assert attention._fused_kernel(cuda_like, k, v, None) is triton_kernel.pladis_attention_triton
    monkeypatch.setenv("PLADIS_FORCE_TORCH", "1")
    assert attention._fused_kernel(cuda_like, k, v, None) is None
    monkeypatch.setenv("PLADIS_FORCE_TORCH", "0")
    assert attention._fused_kernel(cuda_like, k, v, None) is triton_kernel.pladis_attention_triton
    monkeypatch.setattr(triton_kernel, "is_supported", lambda *args: False)
    assert attention._fused_kernel(cuda_like, k, v, None) is None


def test_alpha_just_above_one_goes_to_the_kernel_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel has its own branch for 1 < α < 1.05 (no τ search there); when it cannot run, the
    # torch path answers with its own solver.
    from pladis import attention
    from pladis.triton_kernel import TritonUnsupported

    calls: list[float] = []

    def kernel(*args, **kwargs):
        calls.append(kwargs["alpha"])
        raise TritonUnsupported("stand-in: record the call, let the torch path answer")

    monkeypatch.setattr(attention, "_fused_kernel", lambda *args: kernel)
    q, k, v = qkv(1, 2, 9, 77, 16, seed=3)
    got = pladis_attention(q, k, v, alpha=1.001, lam=2.0)
    assert calls == [1.001]
    want = reference_pladis(q, k, v, 1.001, 2.0)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("alpha", [1.5, 1.75])
def test_calls_under_and_outside_inference_mode_can_alternate(
    alpha: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CPU buffers are kept between calls; ones made under inference mode cannot be written
    # outside it, so a later plain call must not reuse them. No buffers kept from earlier tests: the
    # first call here must be the one that makes them.
    from pladis import attention

    monkeypatch.setattr(attention, "_kept_workspaces", {})
    q, k, v = qkv(1, 2, 33, 77, 16, seed=21)
    with torch.inference_mode():
        first = pladis_attention(q, k, v, alpha=alpha, lam=2.0)
    second = pladis_attention(q, k, v, alpha=alpha, lam=2.0)
    with torch.no_grad():
        third = pladis_attention(q, k, v, alpha=alpha, lam=2.0)
    with torch.inference_mode():
        fourth = pladis_attention(q, k, v, alpha=alpha, lam=2.0)
    assert torch.equal(first, second) and torch.equal(second, third) and torch.equal(third, fourth)


def test_a_call_while_the_kept_buffers_are_in_use_gets_fresh_ones() -> None:
    # Another thread holds the kept CPU buffers: this call must neither wait nor share them.
    from pladis import attention

    q, k, v = qkv(1, 2, 33, 77, 16, seed=22)
    want = pladis_attention(q, k, v, alpha=1.75, lam=2.0)
    kept = set(map(id, attention._kept_workspaces.values()))
    used = []
    real = attention._workspace

    @contextlib.contextmanager
    def spy(device):
        with real(device) as ws:
            used.append(ws)
            yield ws

    assert attention._kept_lock.acquire(blocking=False)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(attention, "_workspace", spy)
            got = pladis_attention(q, k, v, alpha=1.75, lam=2.0)  # a blocking acquire would hang here
    finally:
        attention._kept_lock.release()
    assert len(used) == 1 and id(used[0]) not in kept  # fresh buffers, not the kept ones
    assert torch.equal(got, want)


def test_a_kernel_that_cannot_launch_falls_back_to_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from pladis import attention
    from pladis.triton_kernel import TritonUnsupported

    def cannot_launch(*args, **kwargs):
        raise TritonUnsupported("out of shared memory")

    q, k, v = qkv(1, 2, 9, 77, 16, seed=14)
    want = pladis_attention(q, k, v, alpha=1.5, lam=2.0)
    monkeypatch.setattr(attention, "_fused_kernel", lambda *args: cannot_launch)
    assert torch.equal(pladis_attention(q, k, v, alpha=1.5, lam=2.0), want)


def test_inputs_requiring_grad_are_refused_with_a_clear_message() -> None:
    # PLADIS has no backward: asking for gradients must fail up front, naming the tensor, not deep
    # inside torch with a message about out= arguments. λ = 0 is stock SDPA and keeps its autograd.
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen) for n in (12, 7, 7))
    k.requires_grad_(True)
    with pytest.raises(ValueError, match=r"PLADIS attention: k require grad.*torch.no_grad"):
        pladis_attention(q, k, v, alpha=1.5, lam=2.0)
    scores = torch.randn(4, 7, requires_grad=True)
    with pytest.raises(ValueError, match=r"entmax: scores require grad"):
        entmax(scores, 1.75)
    with pytest.raises(ValueError, match=r"PLADIS weights: scores require grad"):
        pladis_weights(scores, 1.5, 2.0)
    assert pladis_attention(q, k, v, alpha=1.5, lam=0.0).requires_grad  # stock SDPA, differentiable
    with torch.no_grad():
        got = pladis_attention(q, k, v, alpha=1.5, lam=2.0)
        torch.testing.assert_close(
            got, pladis_attention(q, k.detach(), v, alpha=1.5, lam=2.0), rtol=0, atol=0
        )
        assert entmax(scores, 1.75).sum(-1).sub(1).abs().max() <= 1e-6


@pytest.mark.parametrize("alpha", [1.5, 1.75])
def test_gpu_variant_of_the_torch_path_matches_the_oracle(
    alpha: float, monkeypatch: pytest.MonkeyPatch
) -> None:

    monkeypatch.setattr(solver_namespace(), "cpu_variant", lambda t: False)
    q, k, v = qkv(2, 3, 50, 77, 16, seed=9)
    got = pladis_attention(q, k, v, alpha=alpha, lam=2.0)
    assert (got.double() - reference_pladis(q, k, v, alpha, 2.0)).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("alpha", "most"), [(1.5, 70), (2.0, 86), (1.75, 104), (1.01, 80)])
def test_torch_path_stays_lean_in_ops(alpha: float, most: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without Triton (common on Windows) CUDA runs the torch path, where every op is a kernel launch
    # and host time per launch dominates at these sizes (issue 6): count the ops of one chunk.
    # α ≠ 1.5 include a fourth Newton step (8–13 ops), which spares the float64 finish's ~50.
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    from pladis.attention import _pladis_attention_torch

    no_launch = {"view", "slice", "expand", "empty", "detach", "select", "unsqueeze", "squeeze", "t", "alias"}

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: collections.Counter[str] = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in no_launch and not name.startswith(("_reshape", "_unsafe_view", "as_strided")):
                self.ops[name] += 1
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(solver_namespace(), "cpu_variant", lambda t: False)
    q, k, v = qkv(2, 10, 256, 77, 64, seed=3)
    with Count() as counted:
        _pladis_attention_torch(q, k, v, alpha, 2.0, 0.125, None, 1 << 40)  # one chunk, as on a GPU
    assert 0 < sum(counted.ops.values()) <= most, counted.ops


def _new_tensors(fn, made: list[tuple[str, int, torch.dtype]]):
    """``fn()``, with (op, numel, dtype) of every new tensor an op returns put in ``made`` (views,
    in-place ops and ``out=`` calls excluded)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    views = {"view", "slice", "expand", "select", "unsqueeze", "squeeze", "t", "alias", "transpose", "detach"}

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            fresh = name not in views and not name.endswith("_") and "out" not in (kwargs or {})
            if fresh and not name.startswith(("as_strided", "_reshape", "_unsafe_view")):
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor):
                        made.append((name, t.numel(), t.dtype))
            return out

    with Sizes():
        return fn()


def _largest_new_tensor_bytes(fn) -> int:
    """Bytes of the largest tensor any op returns while ``fn`` runs (views excluded)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    views = {"view", "slice", "expand", "select", "unsqueeze", "squeeze", "t", "alias", "transpose", "detach"}

    class Largest(TorchDispatchMode):
        most = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ not in views and not func.overloadpacket.__name__.startswith(
                ("as_strided", "_reshape", "_unsafe_view")
            ):
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > 0:
                        Largest.most = max(Largest.most, t.numel() * t.element_size())
            return out

    with Largest():
        fn()
    return Largest.most


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_queries_and_a_shared_mask_are_never_copied_whole(dtype) -> None:
    # The WebUI hands q in its packed (B, N, H·d) layout, split into heads as a non-contiguous view,
    # and a mask shared by every head broadcasts: neither may become a whole float32 copy (an
    # +81 MiB q copy at hires sizes, and a score-sized mask, sat outside the memory budget).
    b, h, n, k_len, d, d_v = 2, 4, 4096, 77, 40, 4  # a small d_v keeps the output below those sizes
    gen = torch.Generator().manual_seed(12)
    packed_q = exact_qk((b, n, h * d), gen).to(dtype)  # exact scores: only the layout may differ
    k = exact_qk((b, h, k_len, d), gen).to(dtype)
    v = torch.randn(b, h, k_len, d_v, generator=gen).to(dtype)
    q = packed_q.view(b, n, h, d).transpose(1, 2)
    keep = torch.ones(b, 1, 1, k_len, dtype=torch.bool)
    keep[0, ..., 40:] = False
    budget = 64 * b * h * 4 * (k_len * 6 + d + d_v)  # 64 queries per chunk
    got = {}

    def run() -> None:
        got["out"] = pladis_attention(
            q, k, v, alpha=1.5, lam=2.0, scale=EXACT_SCALE, mask=keep, memory_budget=budget
        )

    largest = _largest_new_tensor_bytes(run)
    assert largest <= budget < min(b * h * n * d * 4, b * h * n * k_len)  # no whole float32 q, no whole mask
    mask = keep.expand(b, h, n, k_len).clone()
    want = pladis_attention(q.contiguous(), k, v, alpha=1.5, lam=2.0, scale=EXACT_SCALE, mask=mask)
    # float16 output: the V matmul's blocking may move a float32 value across a rounding boundary.
    tol = 2e-6 if dtype == torch.float32 else 2.0**-10
    torch.testing.assert_close(got["out"], want, rtol=tol, atol=tol)


def test_chunks_count_the_query_and_output_rows_too() -> None:
    budget = 256 * 2**20
    plain = chunk_queries(20, 10**6, 8, budget, on_gpu=True)
    with_rows = chunk_queries(20, 10**6, 8, budget, on_gpu=True, q_dim=160, v_dim=160)
    assert with_rows * 20 * 4 * (8 * 6 + 320) <= budget < plain * 20 * 4 * (8 * 6 + 320)


@pytest.mark.parametrize("bad", [None, 0, -1, 1.5, True])
def test_memory_budget_must_be_a_positive_number_of_bytes(bad) -> None:
    q, k, v = qkv(1, 1, 4, 8, 16, seed=1)
    with pytest.raises(ValueError, match=r"PLADIS memory_budget: .* must be a positive number of bytes"):
        pladis_attention(q, k, v, alpha=1.5, lam=2.0, memory_budget=bad)


def test_a_numpy_integer_memory_budget_is_a_number_of_bytes() -> None:
    q, k, v = qkv(1, 2, 40, 8, 16, seed=1)
    want = pladis_attention(q, k, v, alpha=1.5, lam=2.0, scale=EXACT_SCALE, memory_budget=1000)
    got = pladis_attention(q, k, v, alpha=1.5, lam=2.0, scale=EXACT_SCALE, memory_budget=np.int64(1000))
    assert torch.equal(got, want)


def test_no_keys_or_empty_heads_answer_like_sdpa() -> None:
    q, k, v = qkv(1, 2, 4, 8, 16, seed=2)
    assert torch.equal(
        pladis_attention(q, k[..., :0, :], v[..., :0, :], alpha=1.5, lam=2.0), torch.zeros(1, 2, 4, 16)
    )
    out = pladis_attention(
        q[..., :0], k[..., :0], v, alpha=1.5, lam=2.0
    )  # d = 0: all scores 0, uniform weights
    torch.testing.assert_close(out, v.mean(-2, keepdim=True).expand(1, 2, 4, 16), rtol=0, atol=1e-6)


def _misuse_inputs() -> dict:
    q, k, v = qkv(1, 2, 3, 5, 4, seed=11)
    return {"q": q, "k": k, "v": v}


@pytest.mark.parametrize("lam", [0.0, 2.0])  # the same answer whatever λ (SDPA takes λ = 0)
@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"mask": torch.tensor([1, 1, 0, 0, 0])}, ["mask", "bool", "int64", ".bool()"]),  # tokenizer mask
        ({"mask": torch.tensor([1, 1, 0, 0, 0], dtype=torch.uint8)}, ["mask", "uint8"]),
        ({"mask": [[True] * 5]}, ["mask", "list"]),
        ({"q": torch.ones(1, 2, 3, 4, dtype=torch.int32)}, ["q", "floating point", "int32"]),
        ({"v": torch.ones(1, 2, 5, 4, dtype=torch.bool)}, ["v", "floating point", "bool"]),
        ({"k": torch.randn(1, 2, 5, 3)}, ["q and k", "feature size", "4 and 3"]),
        ({"v": torch.randn(1, 2, 4, 4)}, ["k and v", "keys", "5 and 4"]),
        ({"k": torch.randn(1, 3, 5, 4)}, ["leading (batch, head) dims", "q (1, 2, 3, 4)", "k (1, 3, 5, 4)"]),
        ({"q": torch.randn(4)}, ["q", "(..., tokens, features)", "(4,)"]),
        ({"scale": math.nan}, ["PLADIS scale", "nan"]),
        ({"scale": math.inf}, ["PLADIS scale", "inf"]),
        ({"scale": "0.5"}, ["PLADIS scale", "str"]),
        ({"memory_budget": -1}, ["memory_budget", "-1", "positive"]),
        ({"memory_budget": "big"}, ["memory_budget", "'big'"]),
    ],
)
def test_misused_inputs_raise_a_value_error_naming_them(change, fragments, lam):
    # An integer 0/1 mask was added to the scores (masking nothing), integer q gave integer results,
    # a NaN scale NaN output: silently, at λ > 0, while SDPA (λ = 0) failed deep inside, or not at all.
    args = {**_misuse_inputs(), **change}
    with pytest.raises(ValueError) as raised:
        pladis_attention(args.pop("q"), args.pop("k"), args.pop("v"), alpha=1.5, lam=lam, **args)
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_packed_attention_broadcasts_a_batch_of_one() -> None:
    # The result has the broadcast batch (it took q's, and failed to reshape, for q of batch 1).
    gen = torch.Generator().manual_seed(30)
    q, k, v = (torch.randn(b, n, 16, generator=gen) for b, n in ((1, 5), (2, 7), (2, 7)))
    got = pladis_attention_packed(q, k, v, 2, alpha=1.5, lam=2.0)
    want = pladis_attention_packed(q.expand(2, -1, -1), k, v, 2, alpha=1.5, lam=2.0)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="do not broadcast"):
        pladis_attention_packed(
            q.expand(2, -1, -1), k[:1].expand(3, -1, -1), v[:1].expand(3, -1, -1), 2, alpha=1.5, lam=2.0
        )


@pytest.mark.parametrize(
    ("heads", "fragments"),
    [
        (0, ["heads", "positive integer", "0"]),
        (2.0, ["heads", "2.0"]),
        (True, ["heads", "True"]),
        (3, ["3 heads", "16"]),
    ],
)
def test_packed_attention_checks_its_heads(heads, fragments):
    q, k, v = torch.randn(2, 3, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    with pytest.raises(ValueError) as raised:
        pladis_attention_packed(q, k, v, heads, alpha=1.5, lam=2.0)
    for fragment in fragments:
        assert fragment in str(raised.value)


@pytest.mark.parametrize("lam", [0.0, 2.0])
@pytest.mark.parametrize(("batch", "n"), [(2, 0), (0, 3)])
def test_packed_attention_takes_empty_inputs(batch, n, lam):
    q, k, v = torch.randn(batch, n, 16), torch.randn(batch, 5, 16), torch.randn(batch, 5, 16)
    assert pladis_attention_packed(q, k, v, 2, alpha=1.5, lam=lam).shape == (batch, n, 16)


def test_weights_of_empty_rows_and_bad_scores():
    assert pladis_weights(torch.randn(3, 0), 1.5, 2.0).shape == (3, 0)
    assert pladis_weights(torch.randn(0, 4), 1.5, 2.0).shape == (0, 4)
    for bad, fragment in ((torch.tensor(1.0), "shape ()"), ([1.0], "list"), (torch.tensor([1, 2]), "int64")):
        with pytest.raises(
            ValueError, match="PLADIS weights: scores must be a floating-point tensor"
        ) as raised:
            pladis_weights(bad, 1.5, 2.0)
        assert fragment in str(raised.value)


@pytest.mark.parametrize("lam", [0.0, 2.0])
def test_a_one_value_tensor_scale_is_its_value(lam):
    q, k, v = qkv(1, 2, 3, 5, 4, seed=12)
    want = pladis_attention(q, k, v, alpha=1.5, lam=lam, scale=0.25)
    assert torch.equal(pladis_attention(q, k, v, alpha=1.5, lam=lam, scale=torch.tensor(0.25)), want)


def test_scores_never_read_the_buffer_where_beta_zero_does_not_ignore_it(monkeypatch) -> None:
    # MPS (torch <= 2.13) computed baddbmm's beta * input even for beta = 0, so a fresh buffer's
    # garbage or a masked call's -inf left in it turned every score into NaN. Devices other than
    # CPU and CUDA take a matmul and a scaling instead; emulated here with MPS's baddbmm semantics.
    import pladis.attention as attention_module

    def mps_baddbmm(input, batch1, batch2, *, beta=1.0, alpha=1.0, out=None):
        garbage = input.fill_(float("nan"))  # what an uninitialised buffer may hold
        return torch.add(garbage * beta, torch.bmm(batch1, batch2) * alpha, out=out)

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(3, 5, 8, generator=g), torch.randn(3, 8, 7, generator=g)
    expected = torch.bmm(q, k) * 0.25
    monkeypatch.setattr(torch, "baddbmm", mps_baddbmm)
    for device_type in ("mps", "privateuseone", "xpu"):
        scores = torch.full((3, 5, 7), float("-inf"))
        view = _DeviceTypeView(scores, device_type)
        attention_module._scaled_scores_into(view, q, k, 0.25)
        torch.testing.assert_close(scores, expected)
    cpu_scores = torch.full((3, 5, 7), float("-inf"))
    attention_module._scaled_scores_into(cpu_scores, q, k, 0.25)
    assert torch.isnan(cpu_scores).all()  # the emulation bites where baddbmm is used


class _DeviceTypeView(torch.Tensor):
    """A CPU tensor that reports another ``device.type`` (only ``_scaled_scores_into`` asks)."""

    @staticmethod
    def __new__(cls, data: torch.Tensor, device_type: str):
        view = torch.Tensor._make_subclass(cls, data)
        view._fake_device = torch.device(device_type)
        return view

    @property
    def device(self):  # type: ignore[override]
        return self._fake_device

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        unwrapped = [a.as_subclass(torch.Tensor) if isinstance(a, _DeviceTypeView) else a for a in args]
        kwargs = {
            key: value.as_subclass(torch.Tensor) if isinstance(value, _DeviceTypeView) else value
            for key, value in (kwargs or {}).items()
        }
        return func(*unwrapped, **kwargs)


def test_a_broken_triton_install_falls_back_to_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # Triton imports but fails when asked (a driver or version mismatch): the torch path answers.
    from types import SimpleNamespace

    from pladis import attention, triton_kernel

    def broken(*args):
        raise RuntimeError("broken triton install")

    monkeypatch.delenv("PLADIS_FORCE_TORCH", raising=False)
    _, k, v = qkv(1, 2, 9, 77, 16, seed=23)
    cuda_like = SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(triton_kernel, "is_supported", lambda *args: True)
    assert attention._fused_kernel(cuda_like, k, v, None) is triton_kernel.pladis_attention_triton
    monkeypatch.setattr(triton_kernel, "is_supported", broken)
    assert attention._fused_kernel(cuda_like, k, v, None) is None


def test_buffers_are_kept_between_calls_on_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # GPU memory is too precious to hold score-sized buffers between calls: off CPU each call gets a
    # fresh workspace, and nothing is added to the kept ones.
    from pladis import attention

    monkeypatch.setattr(attention, "_kept_workspaces", {})
    with (
        attention._workspace(torch.device("meta")) as first,
        attention._workspace(torch.device("meta")) as second,
    ):
        assert first is not second
    with attention._workspace(torch.device("meta")) as third:
        assert third is not first
    assert attention._kept_workspaces == {}
    with attention._workspace(torch.device("cpu")) as kept:
        pass
    with attention._workspace(torch.device("cpu")) as again:
        assert again is kept
