"""The attn2 instance patch on single ldm/sgm CrossAttention modules: maths, fall-through, chaining."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pladis.hosts import a1111
from pladis.params import PladisParams


def _module(host, kind, seed=0, heads=4, dim_head=8, query_dim=32, context_dim=24):
    torch.manual_seed(seed)
    cls = host.ldm_attention.CrossAttention if kind == "ldm" else host.sgm_attention.CrossAttention
    return cls(query_dim=query_dim, context_dim=context_dim, heads=heads, dim_head=dim_head).eval()


class _Model(nn.Module):
    """``sd_model.model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2`` around one module."""

    def __init__(self, attn2):
        super().__init__()
        block = nn.Module()
        block.attn2 = attn2
        st = nn.Module()
        st.transformer_blocks = nn.ModuleList([block])
        unet = nn.Module()
        unet.input_blocks = nn.ModuleList([nn.Identity(), nn.ModuleList([nn.Identity(), st])])
        self.model = nn.Module()
        self.model.diffusion_model = unet


def _xc(seed=1, batch=2, tokens=10, ctx_tokens=77):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, 32, generator=g), torch.randn(batch, ctx_tokens, 24, generator=g) * 3


def _patch(module, **changes):
    patcher = a1111.Attn2Patcher()
    params = PladisParams(enabled=True).replace(**changes)
    patcher.begin(params)
    assert patcher.patch_model(_Model(module)) == 1
    return patcher


@pytest.mark.parametrize("kind", ["ldm", "sgm"])
@pytest.mark.parametrize(("alpha", "lam"), [(1.5, 2.0), (2.0, 2.0), (1.5, 1.0), (2.0, 0.5), (1.25, 3.0)])
def test_patched_forward_equals_independent_pladis(host, kind, alpha, lam):
    module = _module(host, kind)
    x, context = _xc()
    with torch.no_grad():
        expected = host.kit.oracle_attn2(module, x, context, alpha, lam)
        stock = module(x, context=context)
        patcher = _patch(module, alpha=alpha, lam=lam)
        got = module(x, context=context)
    patcher.end()
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got, stock, atol=1e-3)  # PLADIS really changed the output


@pytest.mark.parametrize("ctx_tokens", [77, 154, 231])
def test_long_prompts_and_batches(host, ctx_tokens):
    module = _module(host, "ldm", seed=3)
    x, context = _xc(seed=4, batch=3, ctx_tokens=ctx_tokens)
    with torch.no_grad():
        expected = host.kit.oracle_attn2(module, x, context, 1.5, 2.0)
        patcher = _patch(module)
        got = module(x, context=context)
    patcher.end()
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_half_precision_is_computed_in_float32_and_cast_back(host):
    module = _module(host, "sgm").to(torch.bfloat16)
    x, context = _xc()
    x, context = x.bfloat16(), context.bfloat16()
    with torch.no_grad():
        patcher = _patch(module)
        got = module(x, context=context)
        patcher.end()
        # oracle on the same bf16 projections, maths in float64, then the same cast before to_out
        expected = host.kit.oracle_attn2(module, x, context, 1.5, 2.0)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kind", ["ldm", "sgm"])
def test_restore_and_inactive_paths_are_bit_identical(host, kind):
    module = _module(host, kind)
    x, context = _xc()
    with torch.no_grad():
        stock = module(x, context=context)
        patcher = _patch(module, start=0.5)
        assert "forward" in module.__dict__
        patcher.set_progress(0.25)  # outside the window: falls through to the class forward
        assert torch.equal(module(x, context=context), stock)
        patcher.set_progress(0.5)
        assert not torch.equal(module(x, context=context), stock)
        patcher.end()
        assert "forward" not in module.__dict__ and a1111.RECORD_ATTR not in module.__dict__
        assert torch.equal(module(x, context=context), stock)


def test_lambda_zero_and_disabled_patch_nothing(host):
    module = _module(host, "ldm")
    for params in (
        PladisParams(enabled=True, lam=0.0),
        PladisParams(enabled=False),
        PladisParams(enabled=True, layers=()),
    ):
        patcher = a1111.Attn2Patcher()
        patcher.begin(params)
        assert patcher.patch_model(_Model(module)) == 0
        assert "forward" not in module.__dict__


def test_stock_forward_is_looked_up_on_the_class_at_call_time(host, monkeypatch):
    module = _module(host, "ldm")
    x, context = _xc()
    patcher = _patch(module, start=0.9)
    patcher.set_progress(0.0)
    calls = []

    def other_optimisation(self, x, context=None, mask=None, **kwargs):
        calls.append(self)
        return host.hypernetwork.attention_CrossAttention_forward(self, x, context, mask)

    monkeypatch.setattr(host.ldm_attention.CrossAttention, "forward", other_optimisation)  # A1111 redo_hijack
    with torch.no_grad():
        out = module(x, context=context)
        assert calls == [module]
        assert torch.equal(out, host.hypernetwork.attention_CrossAttention_forward(module, x, context))
    patcher.end()


def test_stale_session_falls_through(host):
    module = _module(host, "ldm")
    x, context = _xc()
    with torch.no_grad():
        stock = module(x, context=context)
        patcher = _patch(module)
        assert not torch.equal(module(x, context=context), stock)  # live: PLADIS applies
        patcher.session.live = False  # e.g. a generation that ended without postprocess
        assert "forward" in module.__dict__  # the patch stays installed …
        assert torch.equal(module(x, context=context), stock)  # … but falls through to stock
    patcher.end()
    assert "forward" not in module.__dict__


def test_chains_to_and_restores_another_extensions_instance_forward(host, monkeypatch, caplog):
    module = _module(host, "ldm")
    x, context = _xc()
    seen = []

    def theirs(x, context=None, mask=None, **kwargs):
        seen.append("theirs")
        return type(module).forward(module, x, context=context, mask=mask) * 2

    module.forward = theirs
    monkeypatch.setattr(a1111, "_bypass_warned", [])
    with torch.no_grad(), caplog.at_level("WARNING", logger=a1111.__name__):
        doubled = module(x, context=context)
        patcher = _patch(module, start=0.5)
        patcher.set_progress(0.0)
        assert torch.equal(module(x, context=context), doubled)  # inactive → their forward, not the class one
        assert not caplog.records
        patcher.set_progress(0.5)
        seen.clear()
        module(x, context=context)
        module(x, context=context)
        assert seen == []  # active: PLADIS computes the layer, theirs is not called, and it says so once
        assert [r.getMessage() for r in caplog.records if "another extension" in r.getMessage()] == [
            "PLADIS: another extension's cross-attention forward is installed on CrossAttention layers; "
            "while PLADIS is active there (λ > 0, inside start/end), PLADIS computes their attention and "
            "that extension's change is not applied"
        ]
        patcher.end()
    assert module.__dict__["forward"] is theirs


def _hack_like_controlnet_ip_adapter(module, weight=0.7, seed=5, tokens=4):
    """Install what sd-webui-controlnet's IP-Adapter puts on an attn2 module (plugable_ipadapter.py):
    an instance forward doing stock SDPA text attention, plus each ``ipadapter_hacks`` term (image-prompt
    attention of the same queries), then ``to_out``. Returns the image-prompt term."""
    g = torch.Generator().manual_seed(seed)
    inner = module.to_q.out_features
    ip_k, ip_v = torch.randn(2, tokens, inner, generator=g), torch.randn(2, tokens, inner, generator=g)

    def split(t, h):
        return t.view(t.shape[0], -1, h, t.shape[-1] // h).transpose(1, 2)

    def image_prompt(attn, x, q):
        h = attn.heads
        ik, iv = (split(t.to(q.dtype), h) for t in (ip_k, ip_v))
        out = torch.nn.functional.scaled_dot_product_attention(q, ik, iv)
        return out.transpose(1, 2).reshape(x.shape[0], -1, inner) * weight

    def attn_forward_hacked(self, x, context=None, **kwargs):
        context = x if context is None else context
        h = self.heads
        q, k, v = (split(t, h) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(x.shape[0], -1, inner)
        for f in self.ipadapter_hacks:
            out = out + f(self, x, q)
        return self.to_out(out)

    module.ipadapter_hacks = [image_prompt]
    module.forward = attn_forward_hacked.__get__(module, type(module))
    return image_prompt


@pytest.mark.parametrize("kind", ["ldm", "sgm"])
def test_controlnet_ip_adapter_under_pladis_keeps_the_image_prompt(host, kind, monkeypatch, caplog):
    # ControlNet's IP-Adapter forward is additive (text attention + image-prompt attention, then
    # to_out): PLADIS changes its text attention and keeps the image prompt, without a warning.
    module = _module(host, kind)
    x, context = _xc()
    image_prompt = _hack_like_controlnet_ip_adapter(module)
    theirs = module.__dict__["forward"]
    monkeypatch.setattr(a1111, "_bypass_warned", [])
    with torch.no_grad(), caplog.at_level("WARNING", logger=a1111.__name__):
        with_image = module(x, context=context)
        patcher = _patch(module, alpha=1.5, lam=2.0)
        got = module(x, context=context)
        # oracle: PLADIS text attention (float64) plus the same image-prompt term, through to_out
        text = host.kit.oracle_attn2(module, x, context, 1.5, 2.0)  # to_out(PLADIS text attention)
        heads = module.heads
        q = module.to_q(x).view(2, -1, heads, 8).transpose(1, 2)
        ip = torch.nn.functional.linear(image_prompt(module, x, q), module.to_out[0].weight)
        patcher.end()
    torch.testing.assert_close(got, text + ip, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got, with_image, atol=1e-3)  # PLADIS changed it …
    assert not torch.allclose(got, text, atol=1e-3)  # … and the image prompt stayed
    assert not [r for r in caplog.records if "another extension" in r.getMessage()]
    assert module.__dict__["forward"] is theirs and not a1111.is_patched(module)  # theirs is back
    assert module.ipadapter_hacks == [image_prompt]


@pytest.mark.parametrize("kind", ["ldm", "sgm"])
def test_controlnet_ip_adapter_outside_the_window_is_theirs_bit_for_bit(host, kind):
    module = _module(host, kind)
    x, context = _xc()
    _hack_like_controlnet_ip_adapter(module)
    with torch.no_grad():
        with_image = module(x, context=context)
        patcher = _patch(module, alpha=1.5, lam=2.0, start=0.0, end=0.5)
        patcher.set_progress(0.75)
        got = module(x, context=context)
        patcher.end()
    assert torch.equal(got, with_image)


def test_controlnet_ip_adapter_chain_in_bf16_adds_nothing_for_an_empty_image_prompt(host):
    # With a zero image-prompt term the chained result is PLADIS alone, up to bf16 rounding of the
    # three to_out calls (to_out(a) + to_out(b) − to_out(0) rounds where to_out(a + b) does once).
    module = _module(host, "sgm").to(torch.bfloat16)
    x, context = (t.to(torch.bfloat16) for t in _xc())
    with torch.no_grad():
        patcher = _patch(module, alpha=1.5, lam=2.0)
        plain = module(x, context=context)
        patcher.end()
        _hack_like_controlnet_ip_adapter(module, weight=0.0)
        patcher = _patch(module, alpha=1.5, lam=2.0)
        chained = module(x, context=context)
        patcher.end()
    assert chained.dtype == torch.bfloat16
    torch.testing.assert_close(chained.float(), plain.float(), rtol=2**-6, atol=2**-6)


def _pladis_replaces(host, module, monkeypatch, caplog) -> int:
    """Run ``module`` under PLADIS, check it computed the layer itself (float64 oracle, nothing of the
    forward under it); returns how many "another extension" warnings it gave."""
    x, context = _xc()
    monkeypatch.setattr(a1111, "_bypass_warned", [])
    with torch.no_grad(), caplog.at_level("WARNING", logger=a1111.__name__):
        patcher = _patch(module, alpha=1.5, lam=2.0)
        got = module(x, context=context)
        patcher.end()
        expected = host.kit.oracle_attn2(module, x, context, 1.5, 2.0)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    return sum("another extension" in r.getMessage() for r in caplog.records)


def test_a_forward_on_top_of_controlnet_ip_adapter_is_replaced_not_chained(host, monkeypatch, caplog):
    # ipadapter_hacks stays on the module while another extension's forward (Regional Prompter's,
    # say) sits on top of ControlNet's: that one is not known to be additive, so PLADIS replaces it
    # (and says so), as for any unknown forward.
    module = _module(host, "ldm")
    _hack_like_controlnet_ip_adapter(module)
    theirs = module.__dict__["forward"]
    module.forward = lambda x, context=None, **kw: theirs(x, context=context, **kw) * 0.5
    assert _pladis_replaces(host, module, monkeypatch, caplog) == 1


@pytest.mark.parametrize("kind", ["ldm", "sgm"])
def test_after_controlnet_clears_its_ip_adapter_no_bypass_warning(host, kind, monkeypatch, caplog):
    # ControlNet's clear_all_ip_adapter puts back what it saved: the class forward bound to the
    # module, an instance forward that is only the stock one. Replacing it loses nothing.
    module = _module(host, kind)
    saved = module.forward  # hack_blk: all_hacks[block] = block.forward
    _hack_like_controlnet_ip_adapter(module)
    module.forward, module.ipadapter_hacks = saved, []  # clear_all_ip_adapter
    assert _pladis_replaces(host, module, monkeypatch, caplog) == 0
    assert module.__dict__["forward"] is saved


def test_extra_keyword_values_that_are_tensors_fall_back_without_error() -> None:
    # sgm's forward takes n_times_crossframe_attn_in_self (default 0); a tensor there must not raise
    # "Boolean value of Tensor with more than one value is ambiguous" in the support check.
    assert a1111._split_call((), {"n_times_crossframe_attn_in_self": torch.tensor([1, 2])})[2] is False
    assert a1111._split_call((), {"n_times_crossframe_attn_in_self": 0, "additional_tokens": None})[2] is True


def test_wrapped_by_another_extension_after_us_stays_but_is_disarmed(host):
    module = _module(host, "sgm")
    x, context = _xc()
    with torch.no_grad():
        stock = module(x, context=context)
        patcher = _patch(module)
        ours = module.__dict__["forward"]
        module.forward = lambda x, context=None, **kw: ours(x, context=context, **kw)  # someone wraps us
        assert patcher.unpatch_all() == 0  # cannot remove without breaking their chain
        assert torch.equal(module(x, context=context), stock)  # but our link passes through
        patcher.end()


@pytest.mark.parametrize("kind", ["ldm", "sgm"])
def test_hypernetwork_is_applied_to_the_context(host, kind):
    module = _module(host, kind)
    x, context = _xc()
    host.shared.loaded_hypernetworks.append(
        host.hypernetwork.Hypernetwork("hn", enable_sizes=[24, 32], seed=7)
    )
    with torch.no_grad():
        with_hn = host.kit.oracle_attn2(module, x, context, 1.5, 2.0)
        patcher = _patch(module)
        got = module(x, context=context)
        patcher.end()
        host.shared.loaded_hypernetworks.clear()
        without_hn = host.kit.oracle_attn2(module, x, context, 1.5, 2.0)
    torch.testing.assert_close(got, with_hn, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(with_hn, without_hn, atol=1e-3)
    # No `layer` argument, as the optimised WebUI forwards call it: nothing is attached to attn2.
    assert getattr(module, "hyper_k", None) is None
    assert not any(name.startswith("hyper") for name, _ in module.named_children())


def test_lora_style_class_level_linear_patch_reaches_to_k(host, monkeypatch):
    """Built-in Lora patches ``nn.Linear.forward`` at class level; calling ``to_k`` as a module honours it."""
    module = _module(host, "ldm")
    x, context = _xc()
    module.to_k.network_layer_name = "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    g = torch.Generator().manual_seed(9)
    down, up = torch.randn(24, 4, generator=g), torch.randn(4, 32, generator=g)
    stock_linear = nn.Linear.forward

    def lora_linear_forward(self, input):
        out = stock_linear(self, input)
        if getattr(self, "network_layer_name", "").endswith("attn2_to_k"):
            out = out + input @ down @ up
        return out

    with torch.no_grad():
        plain = host.kit.oracle_attn2(module, x, context, 1.5, 2.0)
        monkeypatch.setattr(nn.Linear, "forward", lora_linear_forward)
        expected = host.kit.oracle_attn2(module, x, context, 1.5, 2.0)
        patcher = _patch(module)
        got = module(x, context=context)
        patcher.end()
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(expected, plain, atol=1e-3)


def test_unsupported_calls_fall_back(host):
    module = _module(host, "sgm")
    x, context = _xc()
    extra = torch.randn(2, 3, 32)
    with torch.no_grad():
        stock = module(x, context=context, additional_tokens=extra)
        patcher = _patch(module)
        assert torch.equal(module(x, context=context, additional_tokens=extra), stock)
    patcher.end()


def test_progress_from_cfg_params():
    class Den:
        step, total_steps = 5, 20

    class Params:
        denoiser = Den()
        sampling_step, total_sampling_steps = 4, 20

    assert a1111.progress_from_cfg_params(Params()) == 0.25
    Params.denoiser = None
    assert a1111.progress_from_cfg_params(Params()) == 0.2


def test_models_pladis_cannot_change_are_left_alone_with_one_warning(host, monkeypatch, caplog):
    # SD3-like (a UNet with no attn2) and a model with no UNet: one warning each, nothing patched.
    import importlib

    mmdit = nn.Module()
    mmdit.model = nn.Module()
    mmdit.model.diffusion_model = nn.Sequential(nn.Linear(4, 4))
    bare = nn.Module()
    with caplog.at_level("WARNING", logger=a1111.__name__):
        patcher = a1111.Attn2Patcher()
        patcher.begin(PladisParams(enabled=True))
        for _ in range(2):
            assert patcher.patch_model(mmdit) == 0
            assert patcher.patch_model(bare) == 0
        # TensorRT & co. (modules.sd_unet.current_unet) bypass the UNet's attention modules.
        monkeypatch.setattr(importlib.import_module("modules.sd_unet"), "current_unet", object())
        module = _module(host, "ldm")
        assert patcher.patch_model(_Model(module)) == 1
        assert patcher.patch_model(_Model(module)) == 1
        patcher.end()
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "PLADIS: no cross-attention (attn2) layers in this model (e.g. SD3); PLADIS is inactive.",
        "PLADIS: this model has no UNet diffusion_model; PLADIS is inactive.",
        "PLADIS: an alternative UNet (e.g. TensorRT) is active; it bypasses attention patches.",
    ]
    assert not any(a1111.is_patched(m) for m in mmdit.modules()) and "forward" not in module.__dict__
    # once per generation, not per sampling pass (each begins a session) nor per process
    caplog.clear()
    monkeypatch.setattr(importlib.import_module("modules.sd_unet"), "current_unet", None)
    with caplog.at_level("WARNING", logger=a1111.__name__):
        patcher.begin(PladisParams(enabled=True))  # the same generation's next pass (hires, next batch)
        assert patcher.patch_model(mmdit) == 0
        patcher.end()
        assert caplog.records == []
        patcher.new_generation()
        patcher.begin(PladisParams(enabled=True))
        assert patcher.patch_model(mmdit) == 0
        assert patcher.patch_model(mmdit) == 0
        patcher.end()
    assert [r.getMessage() for r in caplog.records] == [messages[0]]
