"""Whole generations through the stand-in WebUI with scripts/pladis.py loaded like A1111 loads it."""

from __future__ import annotations

import gc

import pytest
import torch

from pladis.hosts import a1111
from pladis.params import PladisParams


def _generate(webui, model, *values, data=None, **kwargs):
    kit = webui.kit
    kit.use_models(model)
    args = kit.script_args(webui.runner, *values) if values else kit.script_args(webui.runner)
    return kit.run(kit.txt2img(webui.runner, args, data=data, **kwargs))


def _reference(webui, model, data=None, oracle=None, **kwargs):
    """Output of an untouched copy of ``model`` (optionally with oracle attn2), generated without scripts."""
    kit = webui.kit
    copy = kit.baseline_copy(model)
    if oracle is not None:
        kit.install_oracle(copy, **oracle)
    kit.use_models(copy)
    out, _ = kit.run(kit.txt2img(None, (), data=data, **kwargs))
    return out


@pytest.mark.parametrize(
    ("builder", "unet", "ctx_dim"),
    [
        ("sd15", {}, 24),  # SD1.x: ldm, 4 heads x 8
        ("sd15", {"heads": 2, "dim_head": 16, "context_dim": 20}, 20),  # SD2.x-like: ldm, 64-channel heads
        ("sdxl", {}, 40),  # SDXL: sgm, 2 transformer blocks per level
    ],
)
def test_enabled_equals_oracle_and_disabled_is_bit_identical(webui, builder, unet, ctx_dim):
    kit = webui.kit
    model = getattr(kit, builder)(**unet)
    data = kit.inputs(ctx_dim=ctx_dim)
    baseline = _reference(webui, model, data)
    oracle = _reference(webui, model, data, oracle={"alpha": 1.5, "lam": 2.0})

    enabled, res = _generate(webui, model, True, 1.5, 2.0, ["down", "up"], 0.0, 1.0, data=data)
    torch.testing.assert_close(enabled, oracle, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(enabled, baseline, atol=1e-3)
    assert kit.instance_forwards(model) == []  # postprocess restored everything

    disabled, res = _generate(webui, model, False, 1.5, 2.0, ["down", "up"], 0.0, 1.0, data=data)
    assert torch.equal(disabled, baseline)
    assert not any(k.startswith("PLADIS") for k in res.extra_generation_params)

    lam0, _ = _generate(webui, model, True, 1.5, 0.0, data=data)
    assert torch.equal(lam0, baseline)
    # α = 1 (softmax): the blend is the stock attention; nothing is patched, the output is bit-identical
    seen = []
    hook = model.model.diffusion_model.register_forward_pre_hook(
        lambda *_: seen.append(kit.instance_forwards(model))
    )
    alpha1, res = _generate(webui, model, True, 1.0, 2.0, data=data)
    hook.remove()
    assert torch.equal(alpha1, baseline)
    assert seen and all(names == [] for names in seen)
    assert res.extra_generation_params["PLADIS alpha"] == 1.0  # the setting is still recorded
    assert webui.errors.reported == []


def test_only_selected_groups_are_patched(webui):
    kit = webui.kit
    model = kit.sd15()
    seen = []
    model.model.diffusion_model.register_forward_pre_hook(
        lambda *_: seen.append(kit.instance_forwards(model))
    )
    data = kit.inputs()
    out, _ = _generate(webui, model, True, 2.0, 1.0, ["mid"], data=data)
    assert seen and all(names == ["middle_block.1.transformer_blocks.0.attn2"] for names in seen)
    oracle = _reference(webui, model, data, oracle={"alpha": 2.0, "lam": 1.0, "layers": ("mid",)})
    torch.testing.assert_close(out, oracle, atol=1e-5, rtol=1e-4)

    seen.clear()
    _generate(webui, model, True, 1.5, 2.0, "down+up", data=data)
    names = seen[0]
    assert len(names) == 2 + 3 and not any(n.startswith("middle_block") for n in names)


def test_start_end_window_follows_sampling_progress(webui):
    kit = webui.kit
    model = kit.sd15()
    data = kit.inputs()
    steps = 8
    out, _ = _generate(webui, model, True, 1.5, 2.0, ["down", "up"], 0.25, 0.75, data=data, steps=steps)
    copy = kit.baseline_copy(model)
    _, progress = kit.progress_gate(copy, steps)
    kit.install_oracle(copy, 1.5, 2.0, gate=lambda: 0.25 <= progress() < 0.75)
    kit.use_models(copy)
    expected, _ = kit.run(kit.txt2img(None, (), data=data, steps=steps))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    # and it is not the always-on result
    always = _reference(webui, model, data, oracle={"alpha": 1.5, "lam": 2.0}, steps=steps)
    assert not torch.allclose(out, always, atol=1e-4)


def test_batches_long_prompts_and_separate_cond_uncond_calls(webui):
    kit = webui.kit
    model = kit.sd15()
    data = kit.inputs(batch=2, n_iter=2, ctx_tokens=154, uncond_tokens=77)  # lengths differ → two UNet calls
    out, res = _generate(webui, model, True, 1.5, 2.0, data=data)
    oracle = _reference(webui, model, data, oracle={"alpha": 1.5, "lam": 2.0})
    assert out.shape[0] == 4 and len(res.infotexts) == 2
    torch.testing.assert_close(out, oracle, atol=1e-5, rtol=1e-4)


def test_batch_cond_uncond_off(webui):
    kit = webui.kit
    webui.shared.opts.batch_cond_uncond = False
    model = kit.sd15()
    data = kit.inputs(batch=2)
    out, _ = _generate(webui, model, True, 2.0, 2.0, data=data)
    oracle = _reference(webui, model, data, oracle={"alpha": 2.0, "lam": 2.0})
    torch.testing.assert_close(out, oracle, atol=1e-5, rtol=1e-4)


def test_exception_mid_sampling_leaves_no_effect_on_next_disabled_generation(webui):
    kit = webui.kit
    model = kit.sd15()
    data = kit.inputs()
    baseline = _reference(webui, model, data)
    calls = {"n": 0}

    def boom(*_):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("CUDA out of memory (simulated)")

    handle = model.model.diffusion_model.middle_block.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="out of memory"):
        _generate(webui, model, True, 1.5, 2.0, data=data)
    handle.remove()
    assert kit.instance_forwards(model) == []  # postprocess was skipped; the failed pass restored

    handle = model.model.diffusion_model.middle_block.register_forward_pre_hook(boom)
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="out of memory"):
        _generate(webui, model, True, 1.5, 2.0, data=data)
    handle.remove()
    disabled, _ = _generate(webui, model, False, data=data)
    assert torch.equal(disabled, baseline)
    assert kit.instance_forwards(model) == []


def test_foreign_generation_after_crash_is_not_affected(webui):
    """A generation without scripts (e.g. a training preview) after a crash runs stock."""
    kit = webui.kit
    model = kit.sd15()
    data = kit.inputs()
    baseline = _reference(webui, model, data)
    handle = model.model.diffusion_model.middle_block.register_forward_pre_hook(
        lambda *_: (_ for _ in ()).throw(RuntimeError("boom"))
    )
    with pytest.raises(RuntimeError, match="boom"):  # the injected crash, not another one
        _generate(webui, model, True, 1.5, 2.0, data=data)
    handle.remove()
    kit.use_models(model)
    out, _ = kit.run(kit.txt2img(None, (), data=data))
    assert torch.equal(out, baseline)
    assert kit.instance_forwards(model) == []


def test_disabled_pladis_ignores_its_sliders_even_when_start_is_after_end(webui):
    # Closing the accordion turns PLADIS off; sliders left at start 0.8 > end 0.2 must not fail the
    # generation (they are unused), which must be bit-for-bit stock.
    kit = webui.kit
    model = kit.sd15()
    data = kit.inputs()
    baseline = _reference(webui, model, data)
    out, res = _generate(webui, model, False, 1.5, 2.0, ["down", "up"], 0.8, 0.2, data=data)
    assert torch.equal(out, baseline)
    assert "PLADIS alpha" not in res.extra_generation_params
    with pytest.raises(ValueError, match=r"start \(0\.8\) must not be greater than end \(0\.2\)"):
        _generate(webui, model, True, 1.5, 2.0, ["down", "up"], 0.8, 0.2, data=data)  # on: it is an error


@pytest.fixture
def no_gc():
    """The garbage collector off: A1111's processing object sits in a reference cycle (sampler ↔
    denoiser), so in a real WebUI it outlives a crash until a full collection, which may be long."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _direct_unet_call(model, data) -> torch.Tensor:
    """What textual-inversion or hypernetwork training does: the UNet without a sampler or callbacks."""
    with torch.no_grad():
        return model.apply_model(data["noise"], torch.full((1,), 0.5), data["cond"])


@pytest.mark.parametrize("where", ["before sampling", "sampling", "after sampling"])
def test_direct_unet_calls_after_a_crash_run_stock_at_once(webui, no_gc, monkeypatch, where):
    """A crash skips postprocess; the sampling pass's own end must restore, not the garbage collector.

    "before sampling": after ``process_before_every_sampling`` but before ``launch_sampling``, where
    A1111's sampler still prepares the pass (``initialize(p)``, which ties p and the sampler in a
    cycle, then e.g. the Brownian noise sampler of DPM++ SDE, whose ``torchsde`` may fail).
    "after sampling": e.g. A1111's NaN check on the decoded latents raises after sampling returned.
    """
    kit = webui.kit
    model = kit.sd15()
    data = kit.inputs()
    clean = kit.baseline_copy(model)
    handle = None
    if where == "before sampling":
        from modules import sd_samplers_common

        initialize = sd_samplers_common.Sampler.initialize

        def failing_initialize(self, p):
            initialize(self, p)
            raise RuntimeError("boom")

        monkeypatch.setattr(sd_samplers_common.Sampler, "initialize", failing_initialize)
    elif where == "sampling":
        handle = model.model.diffusion_model.middle_block.register_forward_pre_hook(
            lambda *_: (_ for _ in ()).throw(RuntimeError("boom"))
        )
    else:
        monkeypatch.setattr(
            webui.processing, "create_infotext", lambda p: (_ for _ in ()).throw(RuntimeError("boom"))
        )
    with pytest.raises(RuntimeError, match="boom"):  # the injected crash, not another one
        _generate(webui, model, True, 1.5, 2.0, data=data)
    if handle is not None:
        handle.remove()
    assert kit.instance_forwards(model) == []
    assert torch.equal(_direct_unet_call(model, data), _direct_unet_call(clean, data))


def test_direct_unet_calls_after_crash_run_stock_once_the_generation_is_gone(webui, monkeypatch):
    """Second line of defence, for a sampler whose pass could not be guarded (another extension
    replaced its ``launch_sampling``): stale patches stay installed until the next generation, but
    they must not apply once the crashed generation's processing object is gone."""
    monkeypatch.setattr(a1111, "guard_sampling", lambda sampler, begin, end: False)
    kit = webui.kit
    model = kit.sd15()
    data = kit.inputs()
    clean = kit.baseline_copy(model)
    handle = model.model.diffusion_model.middle_block.register_forward_pre_hook(
        lambda *_: (_ for _ in ()).throw(RuntimeError("boom"))
    )
    with pytest.raises(RuntimeError, match="boom"):  # the injected crash, not another one
        _generate(webui, model, True, 1.5, 2.0, data=data)
    handle.remove()
    gc.collect()
    assert kit.instance_forwards(model) != []  # postprocess was skipped: the patches are still there
    assert torch.equal(_direct_unet_call(model, data), _direct_unet_call(clean, data))


def test_hires_fix_patches_both_passes(webui):
    kit = webui.kit
    model = kit.sd15()
    data = kit.inputs()
    kw = {"enable_hr": True, "hr_second_pass_steps": 3, "denoising_strength": 0.7}
    baseline = _reference(webui, model, data, **kw)
    out, _ = _generate(webui, model, True, 1.5, 2.0, data=data, **kw)
    oracle = _reference(webui, model, data, oracle={"alpha": 1.5, "lam": 2.0}, **kw)
    torch.testing.assert_close(out, oracle, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out, baseline, atol=1e-3)


@pytest.mark.parametrize("checkpoints_limit", [1, 2])  # 2: models come back from the cache, no callback
def test_hires_checkpoint_switch_is_patched_and_restored(webui, checkpoints_limit):
    kit = webui.kit
    webui.shared.opts.sd_checkpoints_limit = checkpoints_limit
    main, hires = kit.sd15(seed=0, name="main"), kit.sd15(seed=5, name="hires")
    data = kit.inputs()
    kw = {"enable_hr": True, "hr_second_pass_steps": 3, "hr_checkpoint_info": "hires"}
    o_main, o_hires = kit.baseline_copy(main), kit.baseline_copy(hires)
    for m in (o_main, o_hires):
        kit.install_oracle(m, 1.5, 2.0)
    kit.use_models(o_main, o_hires)
    o_hires.sd_checkpoint_info = "hires"
    expected, _ = kit.run(kit.txt2img(None, (), data=data, **kw))

    kit.use_models(main, hires)
    for _ in range(2):  # the second time both models were loaded before
        out, _ = kit.run(
            kit.txt2img(webui.runner, kit.script_args(webui.runner, True, 1.5, 2.0), data=data, **kw)
        )
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
        assert kit.instance_forwards(main) == [] and kit.instance_forwards(hires) == []


@pytest.mark.parametrize("checkpoints_limit", [1, 2])  # 2: models come back from the cache, no callback
def test_sdxl_refiner_switch_mid_sampling_is_patched(webui, checkpoints_limit):
    kit = webui.kit
    webui.shared.opts.sd_checkpoints_limit = checkpoints_limit
    base, refiner = kit.sdxl(seed=1, name="base"), kit.sdxl(seed=2, name="refiner", context_dim=40)
    data = kit.inputs(ctx_dim=40)
    kw = {
        "refiner_checkpoint_info": "refiner",
        "refiner_switch_at": 0.5,
        "refiner_cond": data["cond"] * 0.5,
        "refiner_uncond": data["uncond"] * 0.5,
    }
    o_base, o_ref = kit.baseline_copy(base), kit.baseline_copy(refiner)
    for m in (o_base, o_ref):
        kit.install_oracle(m, 1.5, 2.0)
    kit.use_models(o_base, o_ref)
    expected, _ = kit.run(kit.txt2img(None, (), data=data, **kw))

    switched = []
    refiner.model.diffusion_model.register_forward_pre_hook(
        lambda *_: switched.append(kit.instance_forwards(refiner))
    )

    kit.use_models(base, refiner)
    for _ in range(2):  # the second time both models were loaded before
        switched.clear()
        out, res = kit.run(kit.txt2img(webui.runner, kit.script_args(webui.runner, True), data=data, **kw))
        assert res.extra_generation_params["Refiner"] == "refiner"
        assert switched and all(
            len(names) == len(kit.attn2_modules(refiner, ("down", "up"))) for names in switched
        )
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
        assert kit.instance_forwards(base) == [] and kit.instance_forwards(refiner) == []


def _img2img(webui, data, init, runner, args, **kwargs):
    return webui.processing.StableDiffusionProcessingImg2Img(
        data["cond"],
        data["uncond"],
        data["noise"],
        scripts=runner,
        script_args=args,
        init_latent=init,
        **kwargs,
    )


def test_img2img(webui):
    kit = webui.kit
    runner = kit.make_runner(is_img2img=True)
    model = kit.sd15()
    data = kit.inputs()
    init = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(3))

    def p(runner_, args):
        return _img2img(webui, data, init, runner_, args, steps=5, denoising_strength=0.6)

    copy = kit.install_oracle(kit.baseline_copy(model), 2.0, 2.0)
    kit.use_models(copy)
    expected, _ = kit.run(p(None, ()))
    kit.use_models(model)
    out, _ = kit.run(p(runner, kit.script_args(runner, True, 2.0, 2.0)))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    assert kit.instance_forwards(model) == []


@pytest.mark.parametrize("checkpoints_limit", [1, 2])
def test_img2img_refiner_in_a_second_batch_is_patched(webui, checkpoints_limit):
    # img2img builds its sampler once, in p.init, and A1111's denoiser keeps the model it was built
    # on. After batch 1's refiner switch, batch 2 starts on the base model again (shared.sd_model),
    # but its sampler is still bound to the refiner it switched to: those UNet calls ran without
    # PLADIS, which had patched p.sd_model only.
    kit = webui.kit
    webui.shared.opts.sd_checkpoints_limit = checkpoints_limit
    runner = kit.make_runner(is_img2img=True)
    base, refiner = kit.sdxl(seed=1, name="base"), kit.sdxl(seed=2, name="refiner", context_dim=40)
    data = kit.inputs(ctx_dim=40, n_iter=2)
    init = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(5))

    def p(runner_, args):
        return _img2img(
            webui,
            data,
            init,
            runner_,
            args,
            steps=6,
            n_iter=2,
            denoising_strength=0.9,
            refiner_checkpoint_info="refiner",
            refiner_switch_at=0.5,
            refiner_cond=data["cond"] * 0.5,
            refiner_uncond=data["uncond"] * 0.5,
        )

    o_base, o_ref = kit.baseline_copy(base), kit.baseline_copy(refiner)
    for m in (o_base, o_ref):
        kit.install_oracle(m, 1.5, 2.0)
    kit.use_models(o_base, o_ref)
    expected, _ = kit.run(p(None, ()))
    unpatched = []
    refiner.model.diffusion_model.register_forward_pre_hook(
        lambda *_: unpatched.append(len(kit.instance_forwards(refiner)) == 0)
    )
    kit.use_models(base, refiner)
    out, _ = kit.run(p(runner, kit.script_args(runner, True)))
    assert unpatched and not any(unpatched)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    assert kit.instance_forwards(base) == [] and kit.instance_forwards(refiner) == []


def test_model_reload_and_script_unload_remove_patches(webui):
    kit = webui.kit
    model = kit.sd15()
    data = kit.inputs()
    reloaded = {"done": False}

    def reload_once(*_):
        if not reloaded["done"]:
            reloaded["done"] = True
            names = kit.instance_forwards(model)
            webui.sd_models.reload_model_weights(forced_reload=True)  # same object, weights reloaded
            assert names and kit.instance_forwards(model) == []

    handle = model.model.diffusion_model.register_forward_pre_hook(reload_once)
    later = []
    model.model.diffusion_model.register_forward_pre_hook(
        lambda *_: later.append(len(kit.instance_forwards(model)))
    )
    out, _ = _generate(webui, model, True, 1.5, 2.0, data=data)
    handle.remove()
    assert later[0] == 0 and all(n == 5 for n in later[1:])
    oracle = _reference(webui, model, data, oracle={"alpha": 1.5, "lam": 2.0})
    # the first UNet call ran unpatched after the reload; re-patched from the next on_cfg_denoiser on
    assert reloaded["done"] and not torch.allclose(out, oracle, atol=1e-6)

    controller = webui.controller
    kit.use_models(model)
    p = kit.txt2img(webui.runner, kit.script_args(webui.runner, True))
    controller.process(p, (True,))
    controller.before_sampling(p)
    assert kit.instance_forwards(model) != []
    webui.script_callbacks.script_unloaded_callback()
    assert kit.instance_forwards(model) == []


@pytest.mark.parametrize("installs", [True, False], ids=["installed", "skipped"])
def test_forge_host_delegates_to_forge_adapter(webui, monkeypatch, installs):
    # The infotext keys stay only when a pass got PLADIS: Forge's adapter puts a patched clone of the
    # UNet patcher back, or leaves a model it cannot patch as it was.
    import sys
    import types

    from pladis import hosts

    kit = webui.kit
    calls = []

    def apply(p, params):
        calls.append((p, params))
        if installs:
            p.sd_model.forge_objects = types.SimpleNamespace(unet=object())  # a new clone each pass

    fake = types.ModuleType("pladis.hosts.forge")
    fake.apply = apply
    monkeypatch.setitem(sys.modules, "pladis.hosts.forge", fake)
    monkeypatch.setattr(hosts, "detect_host", lambda: "forge")
    model = kit.sd15()
    data = kit.inputs()
    out, res = _generate(
        webui,
        model,
        True,
        2.0,
        1.5,
        ["down", "mid", "up"],
        0.1,
        0.9,
        data=data,
        enable_hr=True,
        hr_second_pass_steps=2,
    )
    assert len(calls) == 2  # first pass and hires pass
    assert calls[0][1] == PladisParams(True, 2.0, 1.5, ("down", "mid", "up"), 0.1, 0.9)
    assert kit.instance_forwards(model) == []
    kw = {"enable_hr": True, "hr_second_pass_steps": 2}
    assert torch.equal(out, _reference(webui, model, data, **kw))
    if installs:
        assert res.extra_generation_params["PLADIS alpha"] == 2.0
    else:
        assert not any("PLADIS" in key for key in res.extra_generation_params)


def test_nested_foreign_generation_between_batches_does_not_cancel_pladis(webui):
    """ADetailer-style: another generation (without PLADIS) runs between batch 1 and batch 2."""
    kit = webui.kit
    model = kit.sd15()
    data = kit.inputs(n_iter=2)
    oracle = _reference(webui, model, data, oracle={"alpha": 1.5, "lam": 2.0})
    single = kit.inputs(seed=9)

    class Nested(webui.scripts.Script):
        def title(self):
            return "nested"

        def process_batch(self, p, *args, batch_number=0, **kwargs):
            if batch_number == 1:
                foreign = webui.processing.StableDiffusionProcessingTxt2Img(
                    single["cond"], single["uncond"], single["noise"], steps=2
                )
                self.foreign, _ = kit.run(foreign)
                assert kit.instance_forwards(model) == []  # stayed out of the foreign generation

    nested = Nested()
    nested.args_from = nested.args_to = 0
    webui.runner.alwayson_scripts.append(nested)
    out, _ = _generate(webui, model, True, 1.5, 2.0, data=data)
    webui.runner.alwayson_scripts.remove(nested)
    torch.testing.assert_close(out, oracle, atol=1e-5, rtol=1e-4)
    kit.use_models(kit.baseline_copy(model))
    stock, _ = kit.run(
        webui.processing.StableDiffusionProcessingTxt2Img(
            single["cond"], single["uncond"], single["noise"], steps=2
        )
    )
    assert torch.equal(nested.foreign, stock)
    assert webui.errors.reported == []


def test_an_enabled_setting_that_changes_nothing_says_why(webui, caplog):
    # Start = End or no layer group: the generation runs stock, and the console says why (once).
    # λ = 0 and α = 1 are deliberate stock settings (X/Y/Z columns) and stay quiet, as does "off".
    kit = webui.kit
    model, data = kit.sd15(), kit.inputs()
    baseline = _reference(webui, model, data)
    cases = [
        ((True, 1.5, 2.0, ["down"], 0.5, 0.5), ["Start equals End (0.5), so its window is empty"]),
        ((True, 1.5, 2.0, [], 0.0, 1.0), ["no layer group is ticked"]),
        ((True, 1.5, 0.0, ["down"], 0.0, 1.0), []),
        ((True, 1.0, 2.0, ["down"], 0.0, 1.0), []),
        ((False, 1.5, 2.0, [], 0.5, 0.5), []),
    ]
    for values, reasons in cases:
        caplog.clear()
        with caplog.at_level("WARNING", logger="pladis"):
            out, _ = _generate(webui, model, *values, data=data)
        assert torch.equal(out, baseline), values
        said = [r.getMessage() for r in caplog.records if "changes nothing" in r.getMessage()]
        assert said == [f"PLADIS is enabled but changes nothing: {reason}" for reason in reasons], values


def test_model_warning_comes_once_per_generation_not_per_sampling_pass(webui, monkeypatch, caplog):
    # Each batch of n_iter and the hires pass begin a new PLADIS session (the previous pass ended
    # it); a TensorRT UNet's warning still comes once per generation, and again for the next one.
    import importlib

    kit = webui.kit
    model = kit.sd15()
    monkeypatch.setattr(importlib.import_module("modules.sd_unet"), "current_unet", object())
    message = "PLADIS: an alternative UNet (e.g. TensorRT) is active; it bypasses attention patches."
    kw = {"enable_hr": True, "hr_second_pass_steps": 2, "denoising_strength": 0.7}
    with caplog.at_level("WARNING", logger=a1111.__name__):
        _generate(webui, model, True, 1.5, 2.0, data=kit.inputs(n_iter=2), **kw)
        assert [r.getMessage() for r in caplog.records].count(message) == 1
        _generate(webui, model, True, 1.5, 2.0, data=kit.inputs(), **kw)
    assert [r.getMessage() for r in caplog.records].count(message) == 2


def test_an_unguarded_sampler_is_patched_and_restored_by_the_backup_paths(webui, monkeypatch):
    # A sampler whose launch_sampling cannot be wrapped (slots, a read-only attribute: not A1111's own)
    # is patched from process_before_every_sampling and restored by postprocess; after a crash
    # (postprocess skipped, patches left on) a foreign generation runs stock, and the next
    # generation's process removes the patches before anything else.
    monkeypatch.setattr(a1111, "guard_sampling", lambda *args: False)
    kit = webui.kit
    model = kit.sd15()
    data = kit.inputs()
    baseline = _reference(webui, model, data)
    out, _ = _generate(webui, model, True, 1.5, 2.0, data=data)
    assert kit.instance_forwards(model) == []  # postprocess restored
    oracle = _reference(webui, model, data, oracle={"alpha": 1.5, "lam": 2.0})
    torch.testing.assert_close(out, oracle, atol=1e-5, rtol=1e-4)

    def crash(p):
        handle = model.model.diffusion_model.middle_block.register_forward_pre_hook(
            lambda *_: (_ for _ in ()).throw(RuntimeError("boom"))
        )
        with pytest.raises(RuntimeError, match="boom"):
            kit.run(p)
        handle.remove()
        assert kit.instance_forwards(model) != []  # unguarded: nothing restored yet

    kit.use_models(model)
    crashed = kit.txt2img(webui.runner, kit.script_args(webui.runner, True, 1.5, 2.0), data=data)
    crash(crashed)  # ``crashed`` stays alive (a local until the test returns): its session would still apply
    kit.use_models(model)
    foreign, _ = kit.run(kit.txt2img(None, (), data=data))
    assert torch.equal(foreign, baseline)
    assert kit.instance_forwards(model) == []

    again = kit.txt2img(webui.runner, kit.script_args(webui.runner, True, 1.5, 2.0), data=data)
    crash(again)
    kit.use_models(model)
    nxt = kit.txt2img(webui.runner, kit.script_args(webui.runner, False), data=data)
    webui.controller.process(nxt, (False,))
    assert kit.instance_forwards(model) == []  # gone before the next generation does anything


def test_a_request_that_failed_validation_is_usable_once_processed_with_valid_values(webui):
    # process() marks a processing object whose PLADIS values are bad so that p.init raises; the same
    # object processed again with valid values (a script re-running it) must not keep that error.
    from pladis.webui.controller import FAILED_INIT_ATTR

    kit, controller = webui.kit, webui.controller
    kit.use_models(kit.sd15())
    p = kit.txt2img(webui.runner, kit.script_args(webui.runner, True))
    controller.process(p, (True, 5.0))
    with pytest.raises(ValueError, match="alpha"):
        p.init([], [], [])
    controller.process(p, (True, 1.5))
    assert FAILED_INIT_ATTR not in vars(p) and "init" not in vars(p)
