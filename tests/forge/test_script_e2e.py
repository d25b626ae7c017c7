"""End to end on Forge stand-ins: the shared ``scripts/pladis.py`` drives ``pladis.hosts.forge.apply``.

Emulates Forge's ``processing.py`` order for txt2img with hires fix: ``process`` → reset →
``process_before_every_sampling`` → sampling → hires: hook call #1 on the still-patched objects →
reset → hook call #2 → sampling → ``postprocess``.
"""

import contextlib
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "pladis.py"


@pytest.fixture
def script(forge_host):
    spec = importlib.util.spec_from_file_location("pladis_forge_e2e_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    instance = module.PladisScript()
    yield instance
    from pladis.webui.controller import CONTROLLER

    CONTROLLER.stop()


def test_forge_is_detected_and_the_script_patches_a_clone_per_sampling_pass(forge_host, script):
    from backend.nn.unet import EXPECTED_SITES

    from pladis import hosts
    from pladis.hosts.forge import installed_sites
    from pladis.hosts.forge_attn2 import PRIOR

    tk = forge_host
    assert hosts.detect_host() == "forge"
    original = tk.unet_patcher()
    p = tk.processing(original)
    p.extra_generation_params = {}
    args = (True, 1.5, 2.0, ["down", "up"], 0.0, 1.0)
    x, cond, uncond = tk.inputs()

    script.process(p, *args)
    assert any("PLADIS" in str(key) for key in p.extra_generation_params)
    tk.reset(p)
    script.process_before_every_sampling(p, *args, x=x, noise=x, c=cond, uc=uncond)
    first = p.sd_model.forge_objects.unet
    expected_sites = set(EXPECTED_SITES["down"] + EXPECTED_SITES["up"])
    assert first is not original and set(installed_sites(first)) == expected_sites
    got = tk.denoise(first, x, 3.0, cond, uncond)
    stock = tk.denoise(original, x, 3.0, cond, uncond)
    assert all((g - s).abs().max() > 1e-3 for g, s in zip(got, stock, strict=True))

    # hires fix: call #1 sees the first pass's patched objects, call #2 a fresh reset.
    script.process_before_every_sampling(p, *args, x=x, noise=x, c=cond, uc=uncond)
    assert all(getattr(fn, PRIOR) is None for fn in installed_sites(p.sd_model.forge_objects.unet).values())
    tk.reset(p)
    script.process_before_every_sampling(p, *args, x=x, noise=x, c=cond, uc=uncond)
    second = p.sd_model.forge_objects.unet
    assert set(installed_sites(second)) == expected_sites
    again = tk.denoise(second, x, 3.0, cond, uncond)
    assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True))

    script.postprocess(p, None, *args)
    assert original.model_options == {"transformer_options": {}}
    tk.reset(p)
    script.process_before_every_sampling(p, *args, x=x, noise=x, c=cond, uc=uncond)  # after the generation
    assert p.sd_model.forge_objects.unet is original


def test_disabled_script_leaves_forge_objects_alone(forge_host, script):
    tk = forge_host
    original = tk.unet_patcher()
    p = tk.processing(original)
    p.extra_generation_params = {}
    args = (False, 1.5, 2.0, ["down", "up"], 0.0, 1.0)
    script.process(p, *args)
    tk.reset(p)
    script.process_before_every_sampling(p, *args)
    assert p.sd_model.forge_objects.unet is original
    assert original.model_options == {"transformer_options": {}}


def test_flux_with_no_layer_group_ticked_still_gets_pladis(forge_host, script, caplog):
    # The Layers option does not apply to Flux: the script must reach the Forge adapter without one,
    # and must not say that PLADIS changes nothing.
    from pladis.hosts.flux import is_ours

    tk = forge_host
    original = tk.flux_patcher()
    p = tk.processing(original)
    p.extra_generation_params = {}
    args = (True, 1.5, 2.0, [], 0.0, 1.0)
    script.process(p, *args)
    tk.reset(p)
    script.process_before_every_sampling(p, *args)
    patched = p.sd_model.forge_objects.unet
    assert patched is not original and is_ours(patched.model_options["model_function_wrapper"])
    assert not [r for r in caplog.records if "changes nothing" in r.getMessage()]


def _first_pass(tk, script, args: tuple, seed: int = 0) -> tuple[Any, Any]:
    """A Forge generation up to its first sampling pass: ``(p, the denoiser's on_cfg_denoiser params)``."""
    from types import SimpleNamespace

    p = tk.first_pass(script, tk.unet_patcher(seed=seed), args, *tk.inputs())
    return p, SimpleNamespace(denoiser=SimpleNamespace(p=p))


def test_a_refiner_loaded_mid_sampling_gets_pladis_from_on_cfg_denoiser(forge_host, script):
    # Forge's SDXL refiner switch loads another model mid-sampling without calling the script hook;
    # its denoiser then reads the new model's forge_objects.unet on every call, after on_cfg_denoiser.
    # PLADIS patches a clone there, once, and leaves the refiner's own patcher untouched.
    from backend.nn.unet import EXPECTED_SITES

    from pladis.hosts.forge import installed_sites
    from pladis.webui.controller import CONTROLLER

    tk = forge_host
    args = (True, 1.5, 2.0, ["down", "up"], 0.0, 1.0)
    x, cond, uncond = tk.inputs()
    sites = EXPECTED_SITES["down"] + EXPECTED_SITES["up"]
    p, params = _first_pass(tk, script, args)
    first = p.sd_model.forge_objects.unet
    for _ in range(2):
        CONTROLLER.on_cfg_denoiser(params)
        assert p.sd_model.forge_objects.unet is first  # the hook's clone: nothing more to do

    refiner = tk.unet_patcher(seed=1)
    p.sd_model = tk.processing(refiner).sd_model  # what the switch leaves in shared.sd_model
    CONTROLLER.on_cfg_denoiser(params)
    patched = p.sd_model.forge_objects.unet
    assert patched is not refiner and set(installed_sites(patched)) == set(sites)
    CONTROLLER.on_cfg_denoiser(params)
    assert p.sd_model.forge_objects.unet is patched  # cloned once, not per call
    assert refiner.model_options == {"transformer_options": {}}
    got = tk.denoise(patched, x, 3.0, cond, uncond)
    expected = tk.denoise(tk.with_oracle(refiner, sites, 1.5, 2.0), x, 3.0, cond, uncond)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    script.postprocess(p, None, *args)
    assert p.sd_model.forge_objects.unet is refiner  # a host that keeps the refiner loaded gets it back


def test_a_patcher_set_on_the_refiner_after_pladis_is_kept_at_postprocess(forge_host, script):
    # Only PLADIS's own clone is taken off the switched model: another extension's patcher, set after
    # PLADIS's, stays.
    from pladis.webui.controller import CONTROLLER

    tk = forge_host
    args = (True, 1.5, 2.0, ["down", "up"], 0.0, 1.0)
    p, params = _first_pass(tk, script, args)
    refiner = tk.unet_patcher(seed=1)
    p.sd_model = tk.processing(refiner).sd_model
    CONTROLLER.on_cfg_denoiser(params)
    assert p.sd_model.forge_objects.unet is not refiner
    theirs = tk.unet_patcher(seed=2)
    p.sd_model.forge_objects.unet = theirs
    script.postprocess(p, None, *args)
    assert p.sd_model.forge_objects.unet is theirs


@pytest.mark.parametrize("weak", [True, False], ids=["ForgeObjects", "no-weakref"])
@pytest.mark.parametrize("next_enabled", [False, True])
def test_a_crash_after_the_refiner_switch_leaves_no_pladis_on_a_cached_refiner(
    forge_host, script, next_enabled, weak
):
    # reForge with a checkpoint cache hands the same refiner object to later generations without
    # resetting its forge_objects, and postprocess is skipped when a generation raises after the
    # switch (out of memory in the VAE decode): the next generation must not run PLADIS's old clone
    # (PLADIS off), nor take it for the refiner's own patcher (PLADIS on).
    from pladis.hosts.forge import installed_sites
    from pladis.hosts.forge_attn2 import PRIOR
    from pladis.webui.controller import CONTROLLER

    tk = forge_host
    refiner = tk.unet_patcher(seed=1)
    refiner_model = tk.processing(refiner).sd_model  # kept loaded between generations
    if not weak:  # a fork's holder that takes no weak reference: held until restored
        from types import SimpleNamespace as NoWeakref

        refiner_model.forge_objects = NoWeakref(unet=refiner)

    def generation(enabled: bool, alpha: float, finish: bool) -> Any:
        args = (enabled, alpha, 2.0, ["down", "up"], 0.0, 1.0)
        p, params = _first_pass(tk, script, args)
        p.sd_model = refiner_model  # the switch
        CONTROLLER.on_cfg_denoiser(params)
        used = refiner_model.forge_objects.unet
        if finish:
            script.postprocess(p, None, *args)
        return used

    crashed = generation(True, 1.5, finish=False)
    assert installed_sites(crashed)  # no postprocess: the clone is still on the refiner
    used = generation(next_enabled, 1.75, finish=True)
    if next_enabled:
        assert used is not crashed and installed_sites(used)
        assert {fn.pladis_settings["alpha"] for fn in installed_sites(used).values()} == {1.75}
        assert all(
            getattr(fn, PRIOR) is None for fn in installed_sites(used).values()
        )  # not chained on the old
    else:
        assert used is refiner  # the refiner's own patcher, PLADIS off
    assert refiner_model.forge_objects.unet is refiner
    assert refiner.model_options == {"transformer_options": {}}


def test_on_cfg_denoiser_leaves_a_patcher_swapped_on_the_same_model_alone(forge_host, script, monkeypatch):
    # Only a new model (the refiner switch) is patched from the callback: an extension that swaps the
    # patcher of the same model keeps its choice, and a failing apply is not retried on every call.
    from types import SimpleNamespace

    import pladis.hosts.forge as forge
    from pladis.webui.controller import CONTROLLER

    tk = forge_host
    p = tk.processing(tk.unet_patcher(seed=0))
    p.extra_generation_params = {}
    args = (True, 1.5, 2.0, ["down", "up"], 0.0, 1.0)
    x, cond, uncond = tk.inputs()
    script.process(p, *args)
    tk.reset(p)
    script.process_before_every_sampling(p, *args, x=x, noise=x, c=cond, uc=uncond)
    theirs = tk.unet_patcher(seed=2)
    p.sd_model.forge_objects.unet = theirs
    params = SimpleNamespace(denoiser=SimpleNamespace(p=p))
    CONTROLLER.on_cfg_denoiser(params)
    assert p.sd_model.forge_objects.unet is theirs

    calls = []

    def failing(*a, **k):
        calls.append(1)
        raise RuntimeError("boom")

    monkeypatch.setattr(forge, "apply", failing)
    p.sd_model = tk.processing(tk.unet_patcher(seed=1)).sd_model  # a switch, and apply fails
    for _ in range(3):
        with contextlib.suppress(RuntimeError):
            CONTROLLER.on_cfg_denoiser(params)
    assert calls == [1]
    script.postprocess(p, None, *args)
