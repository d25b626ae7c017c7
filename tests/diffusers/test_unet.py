"""apply_pladis on tiny random UNet2DConditionModels (SD-like and SDXL-like) against an oracle."""

from __future__ import annotations

import types

import pytest
import torch

from pladis.diffusers import PladisAttnProcessor, apply_pladis

TOL = {"rtol": 1e-4, "atol": 1e-5}


def _processors(unet) -> dict[str, object]:
    return dict(unet.attn_processors)


def _assert_differs(a: torch.Tensor, b: torch.Tensor, minimum: float = 1e-3) -> None:
    """Guard that a comparison is meaningful: PLADIS must visibly change the output."""
    assert (a - b).abs().max().item() > minimum


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_lambda_zero_is_bit_identical_to_stock(kit, kind):
    unet = kit.make_unet(kind)
    inputs = kit.make_inputs(kind, batch=2)
    stock = kit.run_unet(unet, *inputs)
    with apply_pladis(unet, lam=0.0, layers="all") as handle:
        assert len(handle) > 0
        assert torch.equal(kit.run_unet(unet, *inputs), stock)
        handle.set(lam=2.0)
        _assert_differs(kit.run_unet(unet, *inputs), stock)
        handle.set(lam=0)
        assert torch.equal(kit.run_unet(unet, *inputs), stock)


@pytest.mark.parametrize(
    ("kind", "alpha", "lam", "layers"),
    [
        ("sd", 1.5, 2.0, ("down", "up")),
        ("sd", 2.0, 1.0, ("down", "mid", "up")),
        ("sdxl", 1.5, 2.0, ("down", "up")),
        ("sdxl", 1.5, 3.0, ("mid",)),
    ],
)
def test_enabled_output_matches_independent_oracle(kit, kind, alpha, lam, layers):
    unet = kit.make_unet(kind)
    inputs = kit.make_inputs(kind)
    stock = kit.run_unet(unet, *inputs)

    with apply_pladis(unet, alpha=alpha, lam=lam, layers=layers):
        ours = kit.run_unet(unet, *inputs)

    oracle = kit.install_oracle(unet, layers, alpha, lam)
    expected = kit.run_unet(unet, *inputs)
    assert oracle.calls > 0
    _assert_differs(expected, stock)
    torch.testing.assert_close(ours, expected, **TOL)


def test_set_changes_alpha_and_lambda_of_the_installed_processors(kit):
    unet = kit.make_unet("sd")
    inputs = kit.make_inputs("sd")
    with apply_pladis(unet, alpha=1.5, lam=2.0) as handle:
        before = kit.run_unet(unet, *inputs)
        handle.set(alpha=2.0)
        sparsemax = kit.run_unet(unet, *inputs)
        handle.set(alpha=1.75, lam=3.0)
        both = kit.run_unet(unet, *inputs)
        with pytest.raises(ValueError, match="alpha"):
            handle.set(alpha=2.5)
        assert (handle.params.alpha, handle.params.lam) == (1.75, 3.0)
        torch.testing.assert_close(kit.run_unet(unet, *inputs), both, rtol=0, atol=0)
    expected = {}
    for alpha, lam in ((2.0, 2.0), (1.75, 3.0)):
        kit.install_oracle(unet, ("down", "up"), alpha, lam)
        expected[alpha] = kit.run_unet(unet, *inputs)
    _assert_differs(sparsemax, before)
    torch.testing.assert_close(sparsemax, expected[2.0], **TOL)
    torch.testing.assert_close(both, expected[1.75], **TOL)


def test_sdxl_down_up_excludes_mid_and_self_attention(kit):
    unet = kit.make_unet("sdxl")
    before = _processors(unet)
    attn2 = {name for name in before if name.endswith(".attn2.processor")}
    assert len(attn2) == 11  # down 3, mid 2, up 6 (see build_sdxl_unet)

    with apply_pladis(unet) as handle:
        assert handle.counts == {"down": 3, "up": 6}
        during = _processors(unet)
        changed = {name for name in before if during[name] is not before[name]}
        assert changed == {n for n in attn2 if n.startswith(("down_blocks.", "up_blocks."))}
        assert all(isinstance(during[name], PladisAttnProcessor) for name in changed)
        assert all(
            type(during[name]).__name__ == "AttnProcessor2_0" for name in before if name not in changed
        )

    with apply_pladis(unet, layers="mid") as handle:
        assert handle.counts == {"mid": 2}
        assert all(name.startswith("mid_block.") and name.endswith(".attn2") for name in handle.names)

    with apply_pladis(unet, layers="none") as handle:
        assert len(handle) == 0


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_restore_puts_back_the_same_objects_and_stock_output(kit, kind):
    unet = kit.make_unet(kind)
    inputs = kit.make_inputs(kind, batch=2)
    before = _processors(unet)
    stock = kit.run_unet(unet, *inputs)

    pipe = types.SimpleNamespace(unet=unet)  # anything with a .unet, like a DiffusionPipeline
    with apply_pladis(pipe, layers="all"):
        _assert_differs(kit.run_unet(unet, *inputs), stock)
    after = _processors(unet)
    assert all(after[name] is before[name] for name in before)
    assert torch.equal(kit.run_unet(unet, *inputs), stock)

    handle = apply_pladis(unet)
    handle.remove()
    handle.remove()  # idempotent
    assert all(_processors(unet)[name] is before[name] for name in before)


def test_stacked_handles_remove_in_any_order(kit):
    unet = kit.make_unet("sd")
    inputs = kit.make_inputs("sd")
    before = _processors(unet)
    stock = kit.run_unet(unet, *inputs)

    first = apply_pladis(unet, lam=2.0)
    with_first = kit.run_unet(unet, *inputs)
    second = apply_pladis(unet, lam=1.0, layers="all")
    second.set(lam=0)  # λ=0 on top delegates straight to the stock processor, not to `first`
    assert torch.equal(kit.run_unet(unet, *inputs), stock)

    first.remove()  # out of order: `second` stays, and later restores past `first`
    assert all(isinstance(p, PladisAttnProcessor) for n, p in _processors(unet).items() if ".attn2." in n)
    second.remove()
    assert all(_processors(unet)[name] is before[name] for name in before)

    with apply_pladis(unet, lam=2.0), apply_pladis(unet, lam=5.0) as inner:
        inner.remove()
        assert torch.equal(kit.run_unet(unet, *inputs), with_first)
    assert all(_processors(unet)[name] is before[name] for name in before)


def test_foreign_processor_changed_meanwhile_is_left_alone(kit):
    from diffusers.models.attention_processor import AttnProcessor

    unet = kit.make_unet("sd")
    handle = apply_pladis(unet)
    name = handle.names[0]
    module = unet.get_submodule(name)
    replacement = AttnProcessor()
    module.set_processor(replacement)
    with pytest.warns(RuntimeWarning, match="replaced by someone else"):
        handle.remove()
    assert module.processor is replacement


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_unet_runs_and_matches_float32(kit, dtype):
    unet = kit.make_unet("sdxl")
    inputs = kit.make_inputs("sdxl", batch=2)
    stock32 = kit.run_unet(unet, *inputs)
    with apply_pladis(unet):
        ours32 = kit.run_unet(unet, *inputs)
    _assert_differs(ours32, stock32)

    unet = unet.to(dtype)
    sample, context, kwargs = kit.make_inputs("sdxl", batch=2, dtype=dtype)
    stock_low = kit.run_unet(unet, sample, context, kwargs)
    with apply_pladis(unet):
        ours_low = kit.run_unet(unet, sample, context, kwargs)
    assert ours_low.dtype == dtype
    assert torch.isfinite(ours_low).all()
    # PLADIS in low precision is as close to its float32 result as the stock model is to its own,
    # and much closer than to the stock model.
    err = (ours_low.float() - ours32).abs().max().item()
    stock_err = (stock_low.float() - stock32).abs().max().item()
    assert err <= 2 * stock_err + 1e-3
    assert err < 0.2 * (ours32 - stock32).abs().max().item()


def test_attention_mask_is_honoured(kit):
    """Masked text tokens must act as if they were absent — checked two independent ways."""
    unet = kit.make_unet("sd")
    sample, context, kwargs = kit.make_inputs("sd", batch=2, tokens=154)
    mask = torch.ones(2, 154)
    mask[0, 100:] = 0
    mask[1, 77:] = 0

    with apply_pladis(unet, layers="all"):
        masked = kit.run_unet(unet, sample, context, kwargs, encoder_attention_mask=mask)
        unmasked = kit.run_unet(unet, sample, context, kwargs)
        trimmed = kit.run_unet(unet, sample[1:], context[1:, :77], kwargs)
    _assert_differs(masked, unmasked)
    torch.testing.assert_close(masked[1:], trimmed, **TOL)

    kit.install_oracle(unet, ("down", "mid", "up"), 1.5, 2.0)
    expected = kit.run_unet(unet, sample, context, kwargs, encoder_attention_mask=mask)
    torch.testing.assert_close(masked, expected, **TOL)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_cfg_batch_with_long_prompt_matches_oracle(kit, kind):
    """A CFG pair (uncond zeros, as diffusers SDXL makes them, + cond) with 154-token contexts."""
    unet = kit.make_unet(kind)
    sample, context, kwargs = kit.make_inputs(kind, batch=2, tokens=154)
    context[0] = 0.0
    with apply_pladis(unet, alpha=1.5, lam=2.0):
        ours = kit.run_unet(unet, sample, context, kwargs)
        single = kit.run_unet(unet, sample[1:], context[1:], {k: _row(v, 1) for k, v in kwargs.items()})
    kit.install_oracle(unet, ("down", "up"), 1.5, 2.0)
    expected = kit.run_unet(unet, sample, context, kwargs)
    torch.testing.assert_close(ours, expected, **TOL)
    torch.testing.assert_close(ours[1:], single, **TOL)  # batch rows are independent


def _row(value, index):
    if isinstance(value, dict):
        return {k: v[index : index + 1] for k, v in value.items()}
    return value[index : index + 1]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"alpha": 2.5}, "alpha"),
        ({"alpha": "soft"}, "alpha"),
        ({"lam": -1}, "lambda"),
        ({"lam": 11}, "lambda"),
        ({"layers": ("down", "sideways")}, "layers"),
    ],
)
def test_invalid_parameters_raise_naming_the_parameter(kit, kwargs, name):
    unet = kit.make_unet("sd")
    before = _processors(unet)
    with pytest.raises(ValueError, match=f"PLADIS {name}"):
        apply_pladis(unet, **kwargs)
    assert all(_processors(unet)[n] is before[n] for n in before)  # nothing half-installed


def test_rejects_objects_without_a_unet():
    with pytest.raises(TypeError, match="UNet"):
        apply_pladis(object())


def test_non_standard_processor_is_replaced_with_a_warning_and_restored(kit):
    class CustomProcessor:  # stands in for e.g. an IP-Adapter processor
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
            raise AssertionError("must not run while PLADIS is active")

    unet = kit.make_unet("sd")
    name = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    custom = CustomProcessor()
    unet.get_submodule(name).set_processor(custom)
    with pytest.warns(RuntimeWarning, match=r"non-standard.*CustomProcessor ×1"):
        handle = apply_pladis(unet)
    kit.run_unet(unet, *kit.make_inputs("sd"))
    handle.remove()
    assert unet.get_submodule(name).processor is custom


def _to(value, device):
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value.to(device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fused-kernel path of the core)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_half_precision_unet_matches_oracle(kit, dtype):
    unet = kit.make_unet("sdxl").to("cuda", dtype)
    sample, context, kwargs = _to(kit.make_inputs("sdxl", batch=2, tokens=154, dtype=dtype), "cuda")
    mask = torch.ones(2, 154, device="cuda")
    mask[0, 120:] = 0
    stock = kit.run_unet(unet, sample, context, kwargs, encoder_attention_mask=mask)
    with apply_pladis(unet):
        ours = kit.run_unet(unet, sample, context, kwargs, encoder_attention_mask=mask)
    kit.install_oracle(unet, ("down", "up"), 1.5, 2.0)
    expected = kit.run_unet(unet, sample, context, kwargs, encoder_attention_mask=mask)
    assert ours.dtype == dtype and torch.isfinite(ours).all()
    err = (ours.float() - expected.float()).abs().max().item()
    assert err < 0.05 * (expected.float() - stock.float()).abs().max().item()


def test_compiled_unet_runs_pladis_eagerly_inside_the_graph(kit):
    # torch.compile traced into the entmax solvers (numpy, .item(), data-dependent shapes) and
    # failed on the first call; the processor is now kept out of the graph.
    import torch._dynamo

    unet = kit.make_unet("sd")
    inputs = kit.make_inputs("sd", batch=2)  # CFG-sized batch: the packed q is not a plain view then
    stock = kit.run_unet(unet, *inputs)
    with apply_pladis(unet, lam=2.0):
        eager = kit.run_unet(unet, *inputs)
    torch._dynamo.reset()
    compiled = torch.compile(unet, backend="eager")
    try:
        assert torch.equal(kit.run_unet(compiled, *inputs), stock)  # compiled before PLADIS comes in
        with apply_pladis(compiled, lam=2.0) as handle:
            torch.testing.assert_close(kit.run_unet(compiled, *inputs), eager, rtol=0, atol=0)
            handle.set(lam=0.0)
            assert torch.equal(kit.run_unet(compiled, *inputs), stock)
        assert torch.equal(kit.run_unet(compiled, *inputs), stock)
    finally:
        torch._dynamo.reset()


def test_a_copied_or_pickled_unet_keeps_pladis(kit):
    # Called with no arguments the processor class gives a stock processor (diffusers'
    # unload_ip_adapter rebuilds processors that way); copy and pickle must not take that path.
    import copy
    import pickle

    unet = kit.make_unet("sd").eval()
    sample, context, kwargs = kit.make_inputs("sd")
    handle = apply_pladis(unet, alpha=1.75, lam=3.0)
    expected = kit.run_unet(unet, sample, context, kwargs)
    for twin in (copy.deepcopy(unet), pickle.loads(pickle.dumps(unet))):
        ours = [p for p in twin.attn_processors.values() if isinstance(p, PladisAttnProcessor)]
        assert len(ours) == len(handle) and {(p.alpha, p.lam) for p in ours} == {(1.75, 3.0)}
        assert torch.equal(kit.run_unet(twin, sample, context, kwargs), expected)


def test_a_model_without_cross_attention_gets_a_warning():
    # e.g. UNets of SimpleCrossAttn blocks (DeepFloyd IF, UnCLIP) have no attn2: an active handle that
    # changes nothing must say so rather than look like PLADIS having no visible effect.
    from pladis.diffusers import apply_pladis

    with pytest.warns(RuntimeWarning, match=r"no cross-attention \(attn2\) layer in down\+up"):
        handle = apply_pladis(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert len(handle) == 0


def test_only_attn2_is_changed_when_attn1_is_cross_attention_too(kit):
    # only_cross_attention=True builds attn1 as cross-attention as well: PLADIS still changes attn2 only.
    unet = kit.make_unet("sd", only_cross_attention=True)
    attn1 = unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1")
    assert attn1.is_cross_attention
    before = _processors(unet)
    with apply_pladis(unet, layers="all") as handle:
        assert handle.counts == {"down": 1, "mid": 1, "up": 2}
        during = _processors(unet)
        changed = {name for name in before if during[name] is not before[name]}
        assert changed == {name for name in before if name.endswith(".attn2.processor")}


def test_remove_twice_is_silent_and_the_handle_says_removed(kit):
    import warnings

    unet = kit.make_unet("sd")
    handle = apply_pladis(unet, alpha=2.0, lam=0.5)
    assert repr(handle) == "PladisHandle(alpha=2, lam=0.5, layers=down+up, processors=3, active)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle.remove()
        handle.remove()
    assert not handle.active
    assert repr(handle).endswith("processors=3, removed)")


def test_empty_layer_selection_does_not_warn(kit):
    import warnings

    unet = kit.make_unet("sd")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle = apply_pladis(unet, layers="none")
    assert len(handle) == 0


def test_replaced_layers_warning_counts_them_and_names_the_first(kit):
    from diffusers.models.attention_processor import AttnProcessor

    unet = kit.make_unet("sdxl")
    handle = apply_pladis(unet)
    first, last = handle.names[0], handle.names[-1]
    for name in (first, last):
        unet.get_submodule(name).set_processor(AttnProcessor())
    with pytest.warns(RuntimeWarning, match=rf"^PLADIS: 2 processor\(s\) .*\(first: {first}\)$"):
        handle.remove()
