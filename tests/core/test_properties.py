"""Property tests (hypothesis) of the entmax family and the blend."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pladis.attention import pladis_attention
from pladis.entmax import entmax

alphas = st.floats(min_value=1.0, max_value=2.0, allow_nan=False)


@st.composite
def score_rows(draw) -> torch.Tensor:
    rows = draw(st.integers(1, 6))
    keys = draw(st.integers(1, 160))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 0.3, 1.0, 4.0, 30.0]))
    x = torch.randn(rows, keys, generator=torch.Generator().manual_seed(seed)) * scale
    if draw(st.booleans()):  # ties: quantise heavily
        x = (x * 2).round() / 2
    if keys > 1 and draw(st.booleans()):  # mask some keys, never all of them
        x[:, 1::3] = float("-inf")
    return x


@settings(max_examples=60, deadline=None)
@given(score_rows(), alphas)
def test_outputs_lie_on_the_simplex(x: torch.Tensor, alpha: float) -> None:
    p = entmax(x, alpha)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(x.shape[0]), rtol=0, atol=1e-5)
    assert (p[x == float("-inf")] == 0).all()


@settings(max_examples=60, deadline=None)
@given(score_rows(), alphas, alphas)
def test_support_never_grows_as_alpha_grows(x: torch.Tensor, a: float, b: float) -> None:
    low, high = min(a, b), max(a, b)
    support_low = entmax(x, low) > 0
    support_high = entmax(x, high) > 0
    # Supports are top-k sets of the same row, so the larger α's must be contained in the smaller α's.
    assert not (support_high & ~support_low).any()


@settings(max_examples=40, deadline=None)
@given(score_rows())
def test_alpha_one_equals_softmax(x: torch.Tensor) -> None:
    torch.testing.assert_close(entmax(x, 1.0), torch.softmax(x, -1), rtol=0, atol=1e-6)


@st.composite
def attention_inputs(draw):
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    n, k, d = draw(st.integers(1, 40)), draw(st.integers(1, 100)), draw(st.sampled_from([8, 16, 40]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return tuple(torch.randn(b, h, m, d, generator=gen) for m in (n, k, k))


@settings(max_examples=30, deadline=None)
@given(attention_inputs(), alphas)
def test_blend_at_lambda_zero_equals_sdpa(tensors, alpha: float) -> None:
    q, k, v = tensors
    assert torch.equal(
        pladis_attention(q, k, v, alpha=alpha, lam=0.0),
        torch.nn.functional.scaled_dot_product_attention(q, k, v),
    )


@settings(max_examples=30, deadline=None)
@given(attention_inputs(), alphas)
def test_blend_at_lambda_one_equals_sparse_attention(tensors, alpha: float) -> None:
    q, k, v = tensors
    weights = entmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, alpha)
    torch.testing.assert_close(
        pladis_attention(q, k, v, alpha=alpha, lam=1.0), weights @ v, rtol=0, atol=1e-5
    )


@settings(max_examples=30, deadline=None)
@given(attention_inputs(), alphas, st.integers(1, 64))
def test_chunked_equals_unchunked(tensors, alpha: float, chunk: int) -> None:
    q, k, v = tensors
    # Quarters and a power-of-two scale: exact scores, whatever rows the CPU matmul blocks together.
    q, k = (torch.round(t * 4) / 4 for t in (q, k))
    groups = q.shape[0] * q.shape[1]
    budget = groups * k.shape[2] * 4 * 6 * chunk
    whole = pladis_attention(q, k, v, alpha=alpha, lam=2.0, scale=0.125)
    # Rows are independent; only the float32 rounding of the V matmul depends on its block size.
    chunked = pladis_attention(q, k, v, alpha=alpha, lam=2.0, scale=0.125, memory_budget=budget)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(attention_inputs(), alphas, st.sampled_from([torch.float16, torch.bfloat16]))
def test_half_inputs_give_the_float32_answer_of_the_rounded_inputs(tensors, alpha: float, dtype) -> None:
    q, k, v = (t.to(dtype) for t in tensors)
    got = pladis_attention(q, k, v, alpha=alpha, lam=2.0)
    assert got.dtype == dtype
    assert torch.equal(got, pladis_attention(q.float(), k.float(), v.float(), alpha=alpha, lam=2.0).to(dtype))
