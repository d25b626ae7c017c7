"""The attn2 replacement itself: maths vs an independent oracle, window, pass-through, chaining, tiling."""

import math

import pytest
import torch

HEADS = 2


def options(batch, sigma=5.0, cond_or_uncond=(0,)):
    return {
        "n_heads": HEADS,
        "dim_head": 4,
        "cond_or_uncond": list(cond_or_uncond),
        "sigmas": torch.full((batch // len(cond_or_uncond),), sigma),
    }


def qkv(batch=3, n=5, keys=7, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(batch, n, 8, generator=g) * 2).to(dtype)
    k = (torch.randn(batch, keys, 8, generator=g) * 2).to(dtype)
    v = torch.randn(batch, keys, 8, generator=g).to(dtype)
    return q, k, v


@pytest.fixture
def attention_spy(forge_host, monkeypatch):
    """Count calls of the ``attention_function`` Forge's stock attention calls (``backend.nn.unet``'s,
    imported there by name), still computing the real thing."""
    import backend.nn.unet

    calls = []
    real = backend.nn.unet.attention_function

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(backend.nn.unet, "attention_function", spy)
    return calls


@pytest.mark.parametrize(("alpha", "lam"), [(1.5, 2.0), (2.0, 0.5), (1.5, 1.0), (1.3, 2.0)])
def test_replacement_equals_pladis_formula(forge_host, alpha, lam):
    from pladis.hosts.forge_attn2 import make_attn2_replacement

    q, k, v = qkv()
    out = make_attn2_replacement(alpha=alpha, lam=lam)(q, k, v, options(3))
    expected = forge_host.oracle_attn2(q, k, v, HEADS, alpha, lam)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)
    assert (expected - forge_host.oracle_dense(q, k, v, HEADS)).abs().max() > 1e-2  # PLADIS moved it


def test_half_precision_is_computed_in_float32_and_cast_back(forge_host):
    from pladis.hosts.forge_attn2 import make_attn2_replacement

    q, k, v = qkv(dtype=torch.float16)
    out = make_attn2_replacement(alpha=1.5, lam=2.0)(q, k, v, options(3))
    assert out.dtype == torch.float16
    expected = forge_host.oracle_attn2(q, k, v, HEADS, 1.5, 2.0)
    torch.testing.assert_close(out.double(), expected, atol=3e-3, rtol=2e-3)

    # Chained: the change is added to the prior's output in float32 and cast back to its dtype
    # (float32 out of a half UNet's attn2 would fail in to_out).
    def dense(q, k, v, extra_options):
        return forge_host.oracle_dense(q, k, v, extra_options["n_heads"]).half()

    chained = make_attn2_replacement(alpha=1.5, lam=2.0, prior=dense)(q, k, v, options(3))
    assert chained.dtype == torch.float16
    torch.testing.assert_close(chained.double(), expected, atol=3e-3, rtol=2e-3)


def test_sigma_window_bounds_and_pass_through_calls_host_attention(forge_host, attention_spy):
    import backend.attention

    from pladis.hosts.forge_attn2 import make_attn2_replacement

    q, k, v = qkv()
    fn = make_attn2_replacement(alpha=1.5, lam=2.0, sigma_hi=5.0, sigma_lo=1.0)
    stock = backend.attention.attention_pytorch(q, k, v, HEADS)
    pladis = forge_host.oracle_attn2(q, k, v, HEADS, 1.5, 2.0)

    for sigma in (5.0, 3.0, 1.0001):  # inside: (1, 5]
        torch.testing.assert_close(fn(q, k, v, options(3, sigma)).double(), pladis, atol=2e-5, rtol=1e-5)
    assert attention_spy == []
    for count, sigma in enumerate((5.0001, 1.0, 0.5, 0.0), start=1):  # outside
        out = fn(q, k, v, options(3, sigma))
        assert torch.equal(out, stock)
        assert len(attention_spy) == count
        args, kwargs = attention_spy[-1]
        assert args[0] is q and args[1] is k and args[2] is v and args[3] == HEADS and kwargs == {}


def test_a_live_window_is_asked_at_call_time_and_overrides_the_numbers(forge_host, attention_spy):
    # The numbers say whether there is a window at all; where a live window is given, its answer
    # (the same positions on the schedule being sampled) decides each call.
    from pladis.hosts.forge_attn2 import make_attn2_replacement

    q, k, v = qkv()
    asked = []
    fn = make_attn2_replacement(
        alpha=1.5, lam=2.0, sigma_hi=5.0, sigma_lo=1.0, window=lambda: asked.append(1) or (0.5, 0.1)
    )
    fn(q, k, v, options(3, 0.3))
    assert attention_spy == [] and len(asked) == 1  # inside (0.1, 0.5]: PLADIS
    fn(q, k, v, options(3, 3.0))
    assert len(attention_spy) == 1 and len(asked) == 2  # inside (1, 5] only: the host's attention
    whole = make_attn2_replacement(alpha=1.5, lam=2.0, window=lambda: asked.append(1) or (0.5, 0.1))
    whole(q, k, v, options(3, 3.0))
    assert len(attention_spy) == 1 and len(asked) == 2  # no window: never asked


def test_live_window_reads_the_schedule_on_the_model_and_rereads_it_when_swapped(forge_host, caplog):
    # Forge's model.predictor or reForge's model.model_sampling, whichever the model has.
    from types import SimpleNamespace

    from pladis.hosts.forge import live_sigma_window
    from pladis.params import PladisParams

    class Schedule:
        def __init__(self, scale):
            self.scale, self.calls = scale, 0

        def percent_to_sigma(self, percent):
            self.calls += 1
            return self.scale * (1.0 - percent)

    params = PladisParams(enabled=True, start=0.25, end=0.5)
    for name in ("predictor", "model_sampling"):
        first, second = Schedule(10.0), Schedule(2.0)
        model = SimpleNamespace(**{name: first})
        window = live_sigma_window(model, params, fallback=(9.0, 8.0))
        assert window() == (7.5, 5.0) and window() == (7.5, 5.0) and first.calls == 2  # read once
        setattr(model, name, second)
        assert window() == (1.5, 1.0)
        setattr(model, name, None)
        assert window() == (9.0, 8.0)  # no schedule on the model: the apply-time window
        setattr(model, name, Schedule(0.0))
        model_schedule = getattr(model, name)
        model_schedule.percent_to_sigma = lambda percent: 1.0 / 0.0  # a foreign schedule that fails
        with caplog.at_level("WARNING", logger="pladis"):
            assert window() == (9.0, 8.0)  # mid-sampling: the apply-time window, never an exception
            assert window() == (9.0, 8.0)  # said once per schedule
        assert [r.getMessage() for r in caplog.records] == [
            "PLADIS: cannot read the start/end window on Schedule "
            "(ZeroDivisionError('float division by zero')); using the one read at apply time"
        ]
        caplog.clear()
        setattr(model, name, second)
        assert window() == (1.5, 1.0)  # and the next schedule is read again


def test_a_call_without_sigmas_counts_as_inside_the_window(forge_host, attention_spy):
    # No sigma in the options (a caller other than Forge's sampling function): the window cannot be
    # checked, and PLADIS stays on rather than silently dropping out.
    from pladis.hosts.forge_attn2 import make_attn2_replacement

    q, k, v = qkv()
    fn = make_attn2_replacement(alpha=1.5, lam=2.0, sigma_hi=5.0, sigma_lo=1.0)
    no_sigmas = {key: value for key, value in options(3).items() if key != "sigmas"}
    torch.testing.assert_close(
        fn(q, k, v, no_sigmas).double(), forge_host.oracle_attn2(q, k, v, HEADS, 1.5, 2.0), atol=2e-5, rtol=0
    )
    assert attention_spy == []


def test_end_one_reaches_sigma_zero(forge_host, attention_spy):
    from pladis.hosts.forge_attn2 import make_attn2_replacement

    q, k, v = qkv()
    fn = make_attn2_replacement(alpha=1.5, lam=2.0, sigma_hi=5.0, sigma_lo=-math.inf)
    out = fn(q, k, v, options(3, 0.0))
    torch.testing.assert_close(
        out.double(), forge_host.oracle_attn2(q, k, v, HEADS, 1.5, 2.0), atol=2e-5, rtol=0
    )
    assert attention_spy == []


def test_chained_replacement_gets_pladis_added_and_passes_through(forge_host, attention_spy):
    from pladis.hosts.forge_attn2 import PRIOR, is_ours, make_attn2_replacement

    q, k, v = qkv()
    extra = torch.linspace(-1, 1, 5 * 8).reshape(1, 5, 8)
    prior_calls = []

    def ip_adapter_like(q, k, v, extra_options):  # text attention + an image-prompt term
        prior_calls.append(extra_options)
        return forge_host.oracle_dense(q, k, v, extra_options["n_heads"]).float() + extra

    fn = make_attn2_replacement(alpha=1.5, lam=2.0, sigma_hi=5.0, sigma_lo=1.0, prior=ip_adapter_like)
    assert is_ours(fn) and getattr(fn, PRIOR) is ip_adapter_like
    out = fn(q, k, v, options(3, 2.0))
    expected = forge_host.oracle_attn2(q, k, v, HEADS, 1.5, 2.0) + extra.double()
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)
    assert len(prior_calls) == 1

    outside = fn(q, k, v, options(3, 9.0))
    assert torch.equal(outside, ip_adapter_like(q, k, v, options(3)))
    assert attention_spy == []  # the prior decides how to attend outside the window, not us


def test_ip_adapter_conditions_reach_the_patch_we_chain_on(forge_host):
    # IP-Adapter calls set_new_condition on whatever sits in its attn2 slot (forge.md §3): on top of
    # its patch, ours must pass the call down; on an empty slot there is nothing to pass it to.
    from pladis.hosts.forge_attn2 import make_attn2_replacement

    class CrossAttentionPatchLike:
        def __init__(self):
            self.conditions = ["first"]

        def set_new_condition(self, **kwargs):
            self.conditions.append(kwargs["cond"])

        def __call__(self, q, k, v, extra_options):
            return forge_host.oracle_dense(q, k, v, extra_options["n_heads"]).float()

    ip_patch = CrossAttentionPatchLike()
    fn = make_attn2_replacement(alpha=1.5, lam=2.0, prior=ip_patch)
    fn.set_new_condition(cond="second", weight=1.0)
    assert ip_patch.conditions == ["first", "second"]
    # another replacement without conditions under ours: nothing to pass the call to, as before us
    assert not hasattr(make_attn2_replacement(alpha=1.5, lam=2.0, prior=lambda *a: None), "set_new_condition")


def test_ip_adapter_after_pladis_gets_a_message_naming_the_order(forge_host):
    # On an empty slot IP-Adapter ran after us (a reordered callback list on reForge): its call must
    # say what to change, not fail with a bare AttributeError on a function.
    from pladis.hosts.forge_attn2 import make_attn2_replacement

    fn = make_attn2_replacement(alpha=1.5, lam=2.0)
    with pytest.raises(RuntimeError, match="run ControlNet \\(IP-Adapter\\) before PLADIS"):
        fn.set_new_condition(cond="image", weight=1.0)


def tiled(k, repeat):
    return k.repeat(1, repeat, 1)


def test_tiled_context_gives_the_untiled_answer(forge_host):
    """uncond (3 keys) batched with cond (6 keys): Forge repeats the uncond keys ×2 to 6."""
    from pladis.hosts.forge_attn2 import make_attn2_replacement

    g = torch.Generator().manual_seed(3)
    q = torch.randn(4, 5, 8, generator=g) * 2
    k_unc, v_unc = torch.randn(2, 3, 8, generator=g) * 2, torch.randn(2, 3, 8, generator=g)
    k_cond, v_cond = torch.randn(2, 6, 8, generator=g) * 2, torch.randn(2, 6, 8, generator=g)
    k = torch.cat((tiled(k_unc, 2), k_cond))
    v = torch.cat((tiled(v_unc, 2), v_cond))

    out = make_attn2_replacement(alpha=1.5, lam=2.0)(q, k, v, options(4, cond_or_uncond=(1, 0)))
    untiled = torch.cat(
        (
            forge_host.oracle_attn2(q[:2], k_unc, v_unc, HEADS, 1.5, 2.0),
            forge_host.oracle_attn2(q[2:], k_cond, v_cond, HEADS, 1.5, 2.0),
        )
    )
    torch.testing.assert_close(out.double(), untiled, atol=2e-5, rtol=1e-5)
    # entmax is not invariant to the repeat: the naive tiled answer is measurably different.
    naive = forge_host.oracle_attn2(q, k, v, HEADS, 1.5, 2.0)
    assert (naive - untiled).abs().max() > 1e-2


def _tiled_rows_give_their_untiled_answers(forge_host, lengths, alpha, cond_or_uncond, seed):
    """One row per context length, each tiled to the longest; the answer must be per-row untiled."""
    from pladis.hosts.forge_attn2 import make_attn2_replacement

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(len(lengths), 5, 8, generator=g) * 2
    ks = [torch.randn(1, n, 8, generator=g) * 2 for n in lengths]
    vs = [torch.randn(1, n, 8, generator=g) for n in lengths]
    k = torch.cat([tiled(t, max(lengths) // t.shape[1]) for t in ks])
    v = torch.cat([tiled(t, max(lengths) // t.shape[1]) for t in vs])
    out = make_attn2_replacement(alpha=alpha, lam=2.0)(
        q, k, v, options(len(lengths), cond_or_uncond=cond_or_uncond)
    )
    expected = torch.cat(
        [forge_host.oracle_attn2(q[i : i + 1], ks[i], vs[i], HEADS, alpha, 2.0) for i in range(len(lengths))]
    )
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)


def test_three_chunks_with_different_repeat_factors(forge_host):
    """Lengths 3 and 4 batched: LCM 12, repeats ×4 and ×3; a third chunk of 12 is not repeated."""
    _tiled_rows_give_their_untiled_answers(forge_host, (3, 4, 12), 2.0, (1, 0, 0), seed=4)


def test_chained_delta_also_uses_untiled_keys(forge_host):
    from pladis.hosts.forge_attn2 import make_attn2_replacement

    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 5, 8, generator=g) * 2
    k_unc, v_unc = torch.randn(1, 3, 8, generator=g) * 2, torch.randn(1, 3, 8, generator=g)
    k_cond, v_cond = torch.randn(1, 6, 8, generator=g) * 2, torch.randn(1, 6, 8, generator=g)
    k, v = torch.cat((tiled(k_unc, 2), k_cond)), torch.cat((tiled(v_unc, 2), v_cond))

    def prior(q, k, v, extra_options):
        return torch.zeros(q.shape)

    out = make_attn2_replacement(alpha=1.5, lam=2.0, prior=prior)(q, k, v, options(2, cond_or_uncond=(1, 0)))
    delta = torch.cat(
        (
            forge_host.oracle_attn2(q[:1], k_unc, v_unc, HEADS, 1.5, 2.0)
            - forge_host.oracle_dense(q[:1], k_unc, v_unc, HEADS),
            forge_host.oracle_attn2(q[1:], k_cond, v_cond, HEADS, 1.5, 2.0)
            - forge_host.oracle_dense(q[1:], k_cond, v_cond, HEADS),
        )
    )
    torch.testing.assert_close(out.double(), delta, atol=2e-5, rtol=1e-5)


def test_replacement_is_a_plain_deep_copyable_closure(forge_host):
    import copy

    from pladis.hosts.forge_attn2 import make_attn2_replacement

    fn = make_attn2_replacement(alpha=1.5, lam=2.0)
    assert copy.deepcopy({"f": fn})["f"] is fn  # functions are atomic for deepcopy: nothing duplicated
    assert not hasattr(fn, "to")  # Forge's model_patches_to would otherwise call fn.to(device)
    cells = [cell.cell_contents for cell in fn.__closure__]
    assert all(isinstance(c, (float, int, str, bool, type(None))) or callable(c) for c in cells)
    assert not any(isinstance(c, torch.Tensor) for c in cells)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_repeat_detection_tolerates_rounding_but_not_a_different_token(forge_host, dtype):
    from pladis.hosts.forge_attn2 import untiled_length

    g = torch.Generator().manual_seed(6)
    base = torch.randn(2, 77, 8, generator=g).to(dtype)
    k = base.repeat(1, 2, 1)
    v = torch.randn(2, 77, 8, generator=g).to(dtype).repeat(1, 2, 1)
    assert untiled_length(k, v) == 77
    noisy = k.clone()
    noisy[:, 77:] = (k[:, 77:].float() * (1 + torch.finfo(dtype).eps)).to(dtype)  # one-ulp GEMM noise
    assert untiled_length(noisy, v) == 77
    other = k.clone()
    other[:, 100] = torch.randn(2, 8, generator=g).to(dtype)  # the second chunk has one different token
    assert untiled_length(other, v) == 154
    assert untiled_length(torch.randn(2, 154, 8, generator=g).to(dtype), v) == 154


def test_a_lone_chunk_repeated_by_another_patch_is_untiled(forge_host):
    """CFG 1 (nothing batched), but an attn2_patch before ours (Forge Couple) tiled the keys ×2: the
    answer is that of the un-repeated keys, as softmax's is."""
    from pladis.hosts.forge_attn2 import make_attn2_replacement

    q, k, v = qkv(batch=2, keys=3)
    out = make_attn2_replacement(alpha=1.5, lam=2.0)(
        q, tiled(k, 2), tiled(v, 2), options(2, cond_or_uncond=(0,))
    )
    expected = forge_host.oracle_attn2(q, k, v, HEADS, 1.5, 2.0)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)
    assert (
        forge_host.oracle_attn2(q, tiled(k, 2), tiled(v, 2), HEADS, 1.5, 2.0) - expected
    ).abs().max() > 1e-2


def test_repeat_factors_beyond_forges_batching_limit(forge_host):
    """Forge Couple tiles each region's context to the LCM of all: factors above 4 occur (here 6 and
    3 in 77-token chunks), and rows of one batch differ."""
    from pladis.hosts.forge_attn2 import repeat_periods

    assert repeat_periods(77) == [] and repeat_periods(154) == [77]
    assert repeat_periods(462) == [77, 154, 231] and repeat_periods(12) == [1, 2, 3, 4, 6]
    _tiled_rows_give_their_untiled_answers(forge_host, (77, 154, 462), 1.5, (0,), seed=8)


def test_repeats_are_found_per_row_when_tiles_interleave_cond_and_uncond(forge_host):
    # Forge's MultiDiffusion stacks tiles as [uncond, cond | uncond, cond] under cond_or_uncond
    # [1, 0]: a chunk's rows are not contiguous, so a repeat must be found row by row.
    from pladis.hosts.forge_attn2 import make_attn2_replacement

    g = torch.Generator().manual_seed(6)
    q = torch.randn(4, 5, 8, generator=g) * 2
    k_unc, v_unc = torch.randn(2, 3, 8, generator=g) * 2, torch.randn(2, 3, 8, generator=g)
    k_cond, v_cond = torch.randn(2, 6, 8, generator=g) * 2, torch.randn(2, 6, 8, generator=g)
    # (keys, values, Forge's repeat factor) of each row: uncond keys are repeated ×2 to length 6
    order = [(k_unc[i : i + 1], v_unc[i : i + 1], 2) for i in range(2)]
    order = [order[0], (k_cond[0:1], v_cond[0:1], 1), order[1], (k_cond[1:2], v_cond[1:2], 1)]
    k = torch.cat([tiled(kk, r) for kk, _, r in order])
    v = torch.cat([tiled(vv, r) for _, vv, r in order])
    out = make_attn2_replacement(alpha=1.5, lam=2.0)(q, k, v, options(4, cond_or_uncond=(1, 0)))
    expected = torch.cat(
        [
            forge_host.oracle_attn2(q[i : i + 1], kk, vv, HEADS, 1.5, 2.0)
            for i, (kk, vv, _) in enumerate(order)
        ]
    )
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)


def test_repeat_checks_are_batched_over_rows(forge_host, monkeypatch):
    # One comparison of k and one of v per repeat factor for all rows (one GPU sync each), and each
    # row gets its own answer.
    from pladis.hosts import forge_attn2

    g = torch.Generator().manual_seed(7)
    k = torch.cat((torch.randn(4, 77, 8, generator=g).repeat(1, 2, 1), torch.randn(4, 154, 8, generator=g)))
    v = torch.cat((torch.randn(4, 77, 8, generator=g).repeat(1, 2, 1), torch.randn(4, 154, 8, generator=g)))
    calls, real = [], forge_attn2._rows_shift_equal
    monkeypatch.setattr(
        forge_attn2, "_rows_shift_equal", lambda t, period: calls.append(t.shape[0]) or real(t, period)
    )
    assert forge_attn2.untiled_lengths(k, v) == [77] * 4 + [154] * 4
    assert calls == [8, 8]  # 154 = 2 × 77: only the repeat factor 2 divides it


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_large_entry_does_not_make_different_chunks_look_repeated(forge_host, dtype):
    # CLIP's start token has some large entries, the same in every 77-token chunk. A tolerance taken
    # over the whole row (8 ulps of its largest entry: ~19 in bf16 here) made two different chunks
    # look like a repeat, and PLADIS dropped the second chunk of a long prompt.
    from pladis.hosts import forge_attn2

    g = torch.Generator().manual_seed(8)
    chunks = torch.randn(1, 2, 77, 64, generator=g)  # two different chunks (O(1) differences)
    chunks[:, :, 0] = chunks[:, 0:1, 0]  # the same start token in both...
    chunks[:, :, 0, 5] = 300.0  # ...with one large entry
    k = chunks.reshape(1, 154, 64).to(dtype)
    v = torch.randn(1, 154, 64, generator=g).to(dtype)
    assert forge_attn2.untiled_lengths(k, k) == [154]
    assert forge_attn2.untiled_lengths(k[:, :77].repeat(1, 2, 1), v[:, :77].repeat(1, 2, 1)) == [77]
