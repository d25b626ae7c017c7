"""Forge Neo's compile extension with its ``guard_filter_fn`` preset (``pladis.hosts.forge_compile``).

Neo's ``extensions-builtin/sd_forge_compile/scripts/compile.py`` (Haoming02/sd-webui-forge-classic,
read at 50df301 and 6c04e84) compiles the diffusion model with a guard filter that keeps only the
guards whose name does not contain ``transformer_options``. Two revisions are stood in for:

* 50df301: ``KModel.apply_model`` is wrapped; each call puts ``torch.compile(diffusion_model, …)`` in
  place for the call (``torch.compile`` pops ``guard_filter_fn`` from the shared options dict, so
  only the first call passes it, and later calls reuse its graphs); ``_torch_compile_config`` is
  ``("guard_filter_fn",)``.
* 6c04e84: ``diffusion_model`` is replaced by the compiled module once; ``_compile_config`` holds the
  arguments (their ``options`` emptied by ``torch.compile``).

Neo compiles with ``backend="inductor"``; these tests use ``"eager"`` (the guards, and so the stale
graphs, are Dynamo's, whatever the backend; inductor would need a C compiler and minutes in CI).

A third stand-in follows forks of 50df301 (e.g. Ariq139/sd-webui-forge-classic 97ec3e8) that put the
filter in every preset, compile on the first call and keep the compiled module as
``_forge_compiled_model``, the preset recorded as a plain string.
"""

import contextlib
from collections.abc import Iterator

import pytest
import torch

ARGS = {
    "off": (False, 1.5, 2.0, ["down", "up"], 0.0, 1.0),
    "on": (True, 1.5, 2.0, ["down", "up"], 0.0, 1.0),
    "down only": (True, 2.0, 1.0, ["down"], 0.0, 1.0),
}


def neo_guard_filter(guard_entries):
    """Neo's filter: keep the guards whose name does not mention ``transformer_options``."""
    return [("transformer_options" not in entry.name) for entry in guard_entries]


def _arguments(preset: str, filter_every_preset: bool = False) -> dict:
    """``torch.compile``'s arguments for a Neo preset (backend as Neo records it)."""
    if preset == "guard_filter_fn":
        return dict(
            backend="inductor", dynamic=False, fullgraph=False, options={"guard_filter_fn": neo_guard_filter}
        )
    assert preset == "dynamic"
    options = {"guard_filter_fn": neo_guard_filter} if filter_every_preset else {}
    return dict(backend="inductor", dynamic=True, fullgraph=False, options=options)


def _wrap_apply_model(kmodel, config: dict, cached: bool) -> None:
    """``apply_model`` wrapped to run the diffusion model compiled with ``config``: compiled anew for
    each call (one dict of arguments for all calls) or, ``cached``, once and kept as
    ``_forge_compiled_model``. A previous wrapper is taken off first."""
    if hasattr(kmodel, "_orig_apply_model"):
        kmodel.apply_model = kmodel._orig_apply_model
        if hasattr(kmodel, "_forge_compiled_model"):
            delattr(kmodel, "_forge_compiled_model")
    original_apply = kmodel.apply_model

    def apply_model(*args, **kwargs):
        model = kmodel.diffusion_model
        if not cached:
            compiled = torch.compile(model, **config)
        elif hasattr(kmodel, "_forge_compiled_model"):
            compiled = kmodel._forge_compiled_model
        else:
            compiled = kmodel._forge_compiled_model = torch.compile(model, **config)
        kmodel.diffusion_model = compiled
        try:
            return original_apply(*args, **kwargs)
        finally:
            kmodel.diffusion_model = model

    kmodel.apply_model = apply_model
    kmodel._orig_apply_model = original_apply


def compile_per_call(kmodel, preset: str) -> None:
    """Neo 50df301: the diffusion model compiled for each call, the preset recorded as
    ``_torch_compile_config``."""
    _wrap_apply_model(kmodel, {**_arguments(preset), "backend": "eager"}, cached=False)
    kmodel._torch_compile_config = (preset,)


def compile_module(kmodel, preset: str) -> None:
    """Neo 6c04e84: the diffusion model replaced by its compiled module, the arguments recorded as
    ``_compile_config`` (the dict ``torch.compile`` was given, its options emptied by it)."""
    model = getattr(kmodel, "_model_backup", kmodel.diffusion_model)
    config = _arguments(preset)
    compiled = torch.compile(model, **{**config, "backend": "eager"})  # shares config's options dict
    kmodel._model_backup = model
    kmodel.diffusion_model = compiled
    kmodel._compile_config = config


def compile_cached(kmodel, preset: str) -> None:
    """Forks of 50df301 (Ariq139 97ec3e8): every preset filtered, compiled on the first call and kept
    as ``_forge_compiled_model``, the preset recorded as a string."""
    _wrap_apply_model(
        kmodel, {**_arguments(preset, filter_every_preset=True), "backend": "eager"}, cached=True
    )
    kmodel._torch_compile_config = preset


@contextlib.contextmanager
def uncompiled(kmodel) -> Iterator[None]:
    """The same model run eagerly (the expected outputs)."""
    if hasattr(kmodel, "_orig_apply_model"):
        compiled_apply = kmodel.apply_model
        kmodel.apply_model = kmodel._orig_apply_model
        try:
            yield
        finally:
            kmodel.apply_model = compiled_apply
    else:
        compiled = kmodel.diffusion_model
        kmodel.diffusion_model = kmodel._model_backup
        try:
            yield
        finally:
            kmodel.diffusion_model = compiled


@pytest.fixture
def neo_dynamo():
    """Dynamo as Neo's compile script configures it; no graph kept across tests."""
    import torch._dynamo

    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(suppress_errors=True):
            yield
    finally:
        torch._dynamo.reset()


@pytest.fixture
def script(forge_host):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "pladis.py"
    spec = importlib.util.spec_from_file_location("pladis_neo_compile_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module.PladisScript()
    from pladis.webui.controller import CONTROLLER

    CONTROLLER.stop()


def _generation(tk, script, base, setting: str):
    """One generation on ``base`` (its model compiled): the compiled and the eager outputs of the UNet
    that was sampled (or the exception the compiled call raised), and the PLADIS sites on it. The
    infotext has PLADIS's keys exactly when it acted (asserted here)."""
    from pladis.hosts.forge import installed_sites

    args = ARGS[setting]
    x, cond, uncond = tk.inputs(seed=3)
    p = tk.first_pass(script, base, args, x, cond, uncond)
    unet = p.sd_model.forge_objects.unet
    try:
        got: object = tk.denoise(unet, x, 3.0, cond, uncond)
    except Exception as error:  # a stale graph's KeyError, for the test to report
        got = error
    with uncompiled(base.model):
        expected = tk.denoise(unet, x, 3.0, cond, uncond)
    script.postprocess(p, None, *args)
    sites = installed_sites(unet)
    assert any("PLADIS" in key for key in p.extra_generation_params) == bool(sites), setting
    return got, expected, sites


def _same(got, expected) -> bool:
    return not isinstance(got, Exception) and all(
        torch.allclose(g, e, atol=1e-6, rtol=1e-6) for g, e in zip(got, expected, strict=True)
    )


VARIANTS = pytest.mark.parametrize(
    "compile_like_neo", [compile_per_call, compile_module], ids=["50df301", "6c04e84"]
)


@pytest.mark.parametrize(
    ("compile_like_neo", "preset"),
    [
        (compile_per_call, "guard_filter_fn"),
        (compile_module, "guard_filter_fn"),
        (compile_cached, "guard_filter_fn"),
        (compile_cached, "dynamic"),
    ],
    ids=["50df301", "6c04e84", "97ec3e8", "97ec3e8-dynamic"],
)
def test_pladis_leaves_a_unet_compiled_with_the_guard_filter_preset_alone(
    forge_host, script, neo_dynamo, compile_like_neo, preset, caplog
):
    from pladis.hosts.forge_compile import SKIPPED

    tk = forge_host
    base = tk.unet_patcher()
    compile_like_neo(base.model, preset)
    for setting in ["on", "off", "down only", "off", "on"]:
        caplog.clear()
        got, expected, sites = _generation(tk, script, base, setting)
        assert _same(got, expected), setting
        assert not sites, setting
        assert (SKIPPED in caplog.text) == (setting != "off"), setting


@VARIANTS
def test_pladis_takes_effect_again_once_the_preset_is_left(forge_host, script, neo_dynamo, compile_like_neo):
    # Other presets keep their guards and do not run the code compiled under this one: PLADIS works
    # under them, before and after generations under the preset.
    tk = forge_host
    base = tk.unet_patcher()
    x, cond, uncond = tk.inputs(seed=3)
    stock = tk.denoise(base, x, 3.0, cond, uncond)  # not compiled yet
    for preset, setting in [
        ("guard_filter_fn", "on"),
        ("dynamic", "on"),
        ("dynamic", "down only"),
        ("dynamic", "off"),
        ("guard_filter_fn", "on"),
        ("dynamic", "on"),
    ]:
        compile_like_neo(base.model, preset)
        got, expected, sites = _generation(tk, script, base, setting)
        assert _same(got, expected), (preset, setting)
        acts = preset == "dynamic" and setting != "off"
        assert bool(sites) == acts, (preset, setting)
        assert _same(expected, stock) != acts, (preset, setting)  # the comparison means something


@VARIANTS
def test_the_stand_in_reproduces_what_the_preset_does_to_pladis(
    forge_host, script, neo_dynamo, compile_like_neo, monkeypatch
):
    # The control: without the skip the stand-in must show the failure it is for, or the tests above
    # prove nothing. Installed under the preset, PLADIS set for the down layers runs on others too,
    # and the next generation, PLADIS off, still runs the code traced with its patches.
    from pladis.hosts import forge_compile

    tk = forge_host
    base = tk.unet_patcher()
    monkeypatch.setattr(forge_compile, "guard_filtered", lambda kmodel: False)
    compile_like_neo(base.model, "guard_filter_fn")
    got, expected, sites = _generation(tk, script, base, "down only")
    assert sites and not _same(got, expected)
    got, expected, sites = _generation(tk, script, base, "off")
    assert not sites and not _same(got, expected)


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ({"_torch_compile_config": ("guard_filter_fn",)}, True),
        ({"_torch_compile_config": ("dynamic",)}, False),
        ({"_torch_compile_config": ("max-autotune",)}, False),
        ({"_compile_config": dict(backend="inductor", dynamic=False, fullgraph=False, options={})}, True),
        (
            {
                "_compile_config": dict(
                    backend="inductor", dynamic=False, fullgraph=False, options={"guard_filter_fn": 1}
                )
            },
            True,
        ),
        ({"_compile_config": dict(backend="inductor", dynamic=True, fullgraph=False)}, False),
        (
            {
                "_compile_config": dict(
                    backend="inductor", mode="reduce-overhead", dynamic=False, fullgraph=False
                )
            },
            False,
        ),
        (
            {
                "_compile_config": dict(
                    backend="inductor", dynamic=False, fullgraph=False, options={"max_autotune": True}
                )
            },
            False,
        ),
        ({"_torch_compile_config": "guard_filter_fn"}, True),
        ({"_torch_compile_config": "dynamic"}, False),
        ({"_compile_config": "guard_filter_fn"}, True),
        ({"_compile_config": ("guard_filter_fn", "lora-hash")}, True),
        ({"_torch_compile_config": ("dynamic", "lora-hash")}, False),
        ({"_compile_config": "{'backend': 'inductor'}lora-hash"}, False),
        ({"_torch_compile_config": ["guard_filter_fn", "lora-hash"]}, True),
        ({"_torch_compile_config": ()}, False),
        ({}, False),
    ],
    ids=[
        "2026-guard",
        "2026-dynamic",
        "2026-autotune",
        "2025-guard",
        "2025-guard-kept",
        "2025-dynamic",
        "2025-overhead",
        "2025-autotune",
        "string-guard",
        "string-dynamic",
        "string-guard-2025",
        "tuple-with-lora-hash",
        "tuple-dynamic-with-lora-hash",
        "config-string-with-lora-hash",
        "list-with-lora-hash",
        "empty-tuple",
        "not-compiled",
    ],
)
def test_the_preset_is_recognised_by_the_marker_each_revision_leaves(attributes, expected):
    from types import SimpleNamespace

    from pladis.hosts.forge_compile import guard_filtered

    assert guard_filtered(SimpleNamespace(**attributes)) is expected


def _keep_all(guard_entries):
    return [True for _ in guard_entries]


def _unaskable(guard_entries):
    raise RuntimeError("wants Dynamo's real guard entries")


@pytest.mark.parametrize(
    ("guard_filter", "expected"),
    [(neo_guard_filter, True), (_keep_all, False), (_unaskable, True), (None, False)],
    ids=["neo-filter", "keeps-patch-guards", "cannot-be-asked", "no-filter"],
)
@pytest.mark.parametrize("where", ["diffusion_model", "cached copy", "wrapper arguments"])
def test_a_guard_filter_is_found_wherever_the_compile_script_keeps_it(guard_filter, expected, where):
    # Markers aside: a compiled module in place or cached on the model (its Dynamo context holds the
    # filter), or apply_model wrapped around arguments not yet given to torch.compile. The filter is
    # asked about a guard on the patches; one that cannot be asked counts as dropping it.
    from pladis.hosts.forge_compile import guard_filtered

    model = torch.nn.Linear(2, 2)
    kmodel = torch.nn.Module()
    kmodel.diffusion_model = model
    options = {} if guard_filter is None else {"guard_filter_fn": guard_filter}
    config = dict(backend="eager", dynamic=False, options=options)
    if where == "diffusion_model":
        kmodel.diffusion_model = torch.compile(model, **config)
    elif where == "cached copy":
        kmodel._forge_compiled_model = torch.compile(model, **config)
    else:

        def apply_model(*args, **kwargs):
            return torch.compile(kmodel.diffusion_model, **config)(*args, **kwargs)

        kmodel.apply_model = apply_model
    assert guard_filtered(kmodel) is expected


def test_an_empty_closure_cell_of_the_apply_model_wrapper_is_passed_over():
    # A wrapper may close over a name its enclosing function never assigned (an empty cell, which
    # raises ValueError when read): the check goes on to the arguments it holds and finds the filter.
    from pladis.hosts.forge_compile import guard_filtered

    kmodel = torch.nn.Module()
    kmodel.diffusion_model = torch.nn.Linear(2, 2)

    def wrap(config, ahead_of_time):
        def apply_model(*args, **kwargs):
            model = compiled if ahead_of_time else torch.compile(kmodel.diffusion_model, **config)
            return model(*args, **kwargs)

        if ahead_of_time:
            compiled = torch.compile(kmodel.diffusion_model, **config)
        return apply_model

    config = dict(backend="eager", dynamic=False, options={"guard_filter_fn": neo_guard_filter})
    kmodel.apply_model = wrap(config, ahead_of_time=False)
    assert guard_filtered(kmodel)


def test_the_skip_is_said_once_per_generation(forge_host, script, caplog):
    # Every sampling pass (hires fix, each batch) asks again; the reason is logged once per p.
    from pladis.hosts.forge_compile import SKIPPED

    tk = forge_host
    base = tk.unet_patcher()
    base.model._torch_compile_config = ("guard_filter_fn",)  # the marker 50df301 leaves
    args = ARGS["on"]
    x, cond, uncond = tk.inputs(seed=3)
    p = tk.first_pass(script, base, args, x, cond, uncond)
    tk.reset(p)
    script.process_before_every_sampling(p, *args, x=x, noise=x, c=cond, uc=uncond)  # the hires pass
    assert p.sd_model.forge_objects.unet is base
    assert caplog.text.count(SKIPPED) == 1
    script.postprocess(p, None, *args)


def _flux_inputs():
    """``(x, cond, uncond)`` for the Flux stand-ins: latents (2, 5, 4) and two text contexts (2, 3, 6)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 4, generator=g)
    cond, uncond = (torch.randn(2, 3, 6, generator=g) for _ in range(2))
    return x, cond, uncond


FLUX_SETTINGS = [
    ("off", (False, 1.5, 2.0, ["down", "up"], 0.0, 1.0)),
    ("on", (True, 1.5, 2.0, ["down", "up"], 0.0, 1.0)),
    ("alpha 2", (True, 2.0, 2.0, ["down", "up"], 0.0, 1.0)),
    ("lambda 1", (True, 2.0, 1.0, ["down", "up"], 0.0, 1.0)),
    ("window 0.3-0.7", (True, 1.5, 3.0, ["down", "up"], 0.3, 0.7)),
    ("off", (False, 1.5, 2.0, ["down", "up"], 0.0, 1.0)),
]
FLUX_SIGMAS = {0.9: False, 0.5: True, 0.2: False}  # sigma: inside the 0.3-0.7 window (sigma 0.7-0.3)


@VARIANTS
@pytest.mark.parametrize("neo", [True, False], ids=["neo-flux", "forge-flux"])
def test_flux_keeps_pladis_under_the_guard_filter_preset(
    forge_host, script, neo_dynamo, compile_like_neo, neo, caplog
):
    # Flux's PLADIS swaps the module-level attention (a global, whose guard the filter keeps) around
    # each model call: the model is not skipped, and the compiled one follows every change. The
    # check flags the model (guard_filtered); only the SD/SDXL attn2 path may be skipped for it.
    from pladis.hosts.flux import is_ours
    from pladis.hosts.forge_compile import SKIPPED, guard_filtered

    tk = forge_host
    base = tk.flux_patcher(neo=neo)
    compile_like_neo(base.model, "guard_filter_fn")
    assert guard_filtered(base.model)
    x, cond, uncond = _flux_inputs()
    with uncompiled(base.model):
        stock = {sigma: tk.denoise(base, x, sigma, cond, uncond) for sigma in FLUX_SIGMAS}
    for setting, args in FLUX_SETTINGS:
        caplog.clear()
        p = tk.first_pass(script, base, args, x, cond, uncond)
        unet = p.sd_model.forge_objects.unet
        assert is_ours(unet.model_options.get("model_function_wrapper")) == args[0], setting
        for sigma, inside in FLUX_SIGMAS.items():
            got = tk.denoise(unet, x, sigma, cond, uncond)
            with uncompiled(base.model):
                expected = tk.denoise(unet, x, sigma, cond, uncond)
            assert _same(got, expected), (setting, sigma)
            acts = args[0] and (inside or args[4:] == (0.0, 1.0))
            assert _same(expected, stock[sigma]) != acts, (setting, sigma)  # the comparison means something
        script.postprocess(p, None, *args)
        assert SKIPPED not in caplog.text, setting


def test_compiled_flux_leaves_the_graph_only_for_the_correction(forge_host, script, neo_dynamo):
    # One graph break per joint-attention call, for the correction (torch.compiler.disable'd):
    # looking the RoPE helper up inside the replacement was one more (importlib is never traced).
    import torch._dynamo.utils

    tk = forge_host
    base = tk.flux_patcher(neo=True)
    base.model.diffusion_model = torch.compile(base.model.diffusion_model, backend="eager")
    x, cond, uncond = _flux_inputs()
    args = FLUX_SETTINGS[1][1]
    p = tk.first_pass(script, base, args, x, cond, uncond)
    torch._dynamo.utils.counters.clear()
    tk.denoise(p.sd_model.forge_objects.unet, x, 0.5, cond, uncond)
    reasons = list(torch._dynamo.utils.counters["graph_break"])
    script.postprocess(p, None, *args)
    assert reasons and all("text_block_correction" in reason for reason in reasons), reasons


@pytest.mark.parametrize(
    "name",
    ["keep_tensor_guards_unsafe", "keep_portable_guards_unsafe", "skip_guard_on_all_nn_modules_unsafe"],
)
def test_torchs_own_guard_filters_that_break_pladis_count_as_dropping(name):
    # Measured on the stand-in UNet with PLADIS installed anyway: under each of these PLADIS set for
    # the down layers ran elsewhere and stale graphs outlived it. skip_guard_on_all_nn_modules_unsafe
    # keeps the patch-dict guards; it counts only because it cannot be asked about the stand-in entry
    # (no orig_guard). A more faithful probe entry must not turn it into a miss.
    from pladis.hosts.forge_compile import guard_filtered

    guard_filter = getattr(torch.compiler, name, None)
    if guard_filter is None:
        pytest.skip(f"torch {torch.__version__} has no torch.compiler.{name}")
    kmodel = torch.nn.Module()
    kmodel.diffusion_model = torch.compile(
        torch.nn.Linear(2, 2), backend="eager", options={"guard_filter_fn": guard_filter}
    )
    assert guard_filtered(kmodel)
