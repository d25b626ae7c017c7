"""Forge: the infotext names PLADIS only once a sampling pass got it (review of 7643a90, helper-87).

Forge's order per batch: ``process`` → reset → ``process_before_every_sampling`` (swallowing
exceptions) → sampling → ``postprocess_image`` (ADetailer runs here) → ``create_infotext`` per image.
ADetailer (Bing-su/adetailer ``get_i2i_p``) builds its inner img2img with
``extra_generation_params=p.extra_generation_params`` (the same dict) and, after the last image of a
batch, re-arms the outer runner's scripts with ``p.scripts.process(copy(p))`` (shallow copy: same
dict again), both before the outer image's infotext is created.
"""

import contextlib
import copy
import importlib.util
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "pladis.py"
SD_ALL = (True, 1.5, 2.0, ["down", "mid", "up"], 0.0, 1.0)
NO_LAYERS = (True, 1.5, 2.0, [], 0.0, 1.0)  # Forge's SD UNet path skips; Flux acts


@pytest.fixture
def script(forge_host):
    spec = importlib.util.spec_from_file_location("pladis_forge_outcome_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module.PladisScript()
    from pladis.webui.controller import CONTROLLER

    CONTROLLER.stop()


def _keys(extra) -> bool:
    return any("PLADIS" in key for key in extra)


def _sampled(tk, script, patcher, args, extra=None):
    """A generation on ``patcher`` through its first sampling pass (``extra``: a shared dict)."""
    p = tk.processing(patcher)
    p.extra_generation_params = {} if extra is None else extra
    script.process(p, *args)
    _pass(tk, script, p, args)
    return p


def _pass(tk, script, p, args):
    """Forge's reset + the hook, exceptions swallowed as ``ScriptRunner`` does."""
    x, cond, uncond = tk.inputs()
    tk.reset(p)
    with contextlib.suppress(Exception):
        script.process_before_every_sampling(p, *args, x=x, noise=x, c=cond, uc=uncond)


def test_apply_raising_on_every_pass_leaves_no_keys(forge_host, script, monkeypatch):
    import pladis.hosts.forge as forge

    def failing(p, params):
        raise RuntimeError("boom")

    monkeypatch.setattr(forge, "apply", failing)
    tk = forge_host
    original = tk.unet_patcher()
    p = _sampled(tk, script, original, SD_ALL)
    assert p.sd_model.forge_objects.unet is original  # sampled stock
    assert not _keys(p.extra_generation_params)  # create_infotext runs now
    script.postprocess(p, None, *SD_ALL)


def test_adetailer_rearm_on_a_copy_does_not_bring_back_the_keys_of_a_skipped_generation(forge_host, script):
    tk = forge_host
    p = _sampled(tk, script, tk.unet_patcher(), NO_LAYERS)  # skipped: keys cleared
    assert not _keys(p.extra_generation_params)
    # postprocess_image of the batch's last image, with ADetailer enabled:
    script.process(copy.copy(p), *NO_LAYERS)
    assert not _keys(p.extra_generation_params)  # infotext(i) of that image is created now
    script.postprocess(p, None, *NO_LAYERS)


def test_a_nested_generation_sharing_the_dict_keeps_the_outer_keys(forge_host, script):
    # Flux outer generation (PLADIS acts with no layer group); ADetailer with PLADIS in its script
    # list and its own SD checkpoint (ad_use_checkpoint) runs an inner img2img sharing the dict.
    tk = forge_host
    outer = _sampled(tk, script, tk.flux_patcher(), NO_LAYERS)
    assert _keys(outer.extra_generation_params)
    # get_i2i_p shares the dict; PLADIS skips the SD inpaint checkpoint:
    inner = _sampled(tk, script, tk.unet_patcher(seed=3), NO_LAYERS, extra=outer.extra_generation_params)
    script.postprocess(inner, None, *NO_LAYERS)
    assert _keys(outer.extra_generation_params)  # infotext of the outer image 0 (batch size > 1)
    script.postprocess(outer, None, *NO_LAYERS)


def test_the_generation_sharing_the_dict_is_found_among_other_live_ones(forge_host, script, monkeypatch):
    # Other live generations that got PLADIS (an API request, another tab) with dicts of their own
    # must not hide the enclosing one. The set's order follows ids, so it is fixed here: the
    # enclosing generation comes last.
    from pladis.webui import controller

    tk = forge_host
    outer = _sampled(tk, script, tk.flux_patcher(), NO_LAYERS)
    others = [_sampled(tk, script, tk.flux_patcher(seed=seed), NO_LAYERS) for seed in (5, 6)]

    class EnclosingLast(weakref.WeakSet):
        def __iter__(self):
            return iter(sorted(super().__iter__(), key=lambda generation: generation.owner() is outer))

    monkeypatch.setattr(controller, "_acting", EnclosingLast(controller._acting))
    inner = _sampled(tk, script, tk.unet_patcher(seed=3), NO_LAYERS, extra=outer.extra_generation_params)
    assert _keys(outer.extra_generation_params)
    assert all(_keys(other.extra_generation_params) for other in others)
    for p in (inner, *others, outer):
        script.postprocess(p, None, *NO_LAYERS)


def test_xyz_cells_sharing_the_dict_each_get_their_own_outcome(forge_host, script):
    # Cells run one after the other on shallow copies of p; each cell's infotext (and X/Y/Z's grid
    # infotext, made from a copy of the first cell's dict) is created before the next cell's process.
    tk = forge_host
    base = tk.processing(tk.unet_patcher())
    base.extra_generation_params = {}
    made = []
    for args in (SD_ALL, NO_LAYERS, SD_ALL):
        pc = copy.copy(base)
        script.process(pc, *args)
        _pass(tk, script, pc, args)
        made.append(_keys(pc.extra_generation_params))  # create_infotext of the cell's images
        script.postprocess(pc, None, *args)
    assert made == [True, False, True]


def test_the_infotext_names_pladis_only_once_a_sampling_pass_got_it(forge_host, script):
    # process writes the keys before Forge says whether it can patch the model: a skipped pass (no
    # layer group for an SD UNet here) clears them, a later pass that gets PLADIS (hires fix with
    # another model, the refiner) writes them again, and a skipped pass after that leaves them.
    from pladis.webui.controller import CONTROLLER

    tk = forge_host
    args = (True, 1.5, 2.0, [], 0.0, 1.0)  # no layer group: Forge's SD path skips, Flux's does not
    x, cond, uncond = tk.inputs()
    p = tk.processing(tk.unet_patcher())
    p.extra_generation_params = {}
    script.process(p, *args)
    assert _keys(p.extra_generation_params)  # written before sampling, not yet proof
    tk.reset(p)
    script.process_before_every_sampling(p, *args, x=x, noise=x, c=cond, uc=uncond)
    assert not _keys(p.extra_generation_params)

    flux = tk.processing(tk.flux_patcher())  # the hires pass's checkpoint
    p.sd_model = flux.sd_model
    script.process_before_every_sampling(p, *args, x=x, noise=x, c=cond, uc=uncond)
    assert p.extra_generation_params["PLADIS alpha"] == 1.5

    p.sd_model = tk.processing(tk.unet_patcher(seed=1)).sd_model  # a refiner PLADIS skips
    CONTROLLER.on_cfg_denoiser(SimpleNamespace(denoiser=SimpleNamespace(p=p)))
    assert p.extra_generation_params["PLADIS alpha"] == 1.5
    script.postprocess(p, None, *args)


def test_a_cell_that_raised_keeps_no_keys_on_the_next_cells_images(forge_host, script):
    # X/Y/Z goes on after a cell raises; that cell's copy of p is never post-processed and stays alive
    # (the sampler holds it), acted on. The next cell shares its dict and its script runner: a pass
    # PLADIS skips there must still remove the keys.
    tk = forge_host
    base = tk.processing(tk.unet_patcher())
    base.extra_generation_params = {}
    base.scripts = object()  # the runner every cell's copy shares
    failed = copy.copy(base)
    script.process(failed, *SD_ALL)
    _pass(tk, script, failed, SD_ALL)
    assert _keys(failed.extra_generation_params)  # then sampling raised: no postprocess
    cell = copy.copy(base)
    script.process(cell, *NO_LAYERS)
    _pass(tk, script, cell, NO_LAYERS)
    assert not _keys(cell.extra_generation_params)
    script.postprocess(cell, None, *NO_LAYERS)
    assert failed is not None  # alive until here


def test_a_copy_processed_before_any_pass_writes_its_own_keys(forge_host, script):
    # Only a copy of a generation whose pass was skipped leaves the shared dict alone (ADetailer's
    # re-arm); a copy processed before any pass (a script re-running process) records its settings.
    tk = forge_host
    p = tk.processing(tk.unet_patcher())
    p.extra_generation_params = {}
    script.process(p, *SD_ALL)
    script.process(copy.copy(p), True, 1.75, 2.0, ["down", "mid", "up"], 0.0, 1.0)
    assert p.extra_generation_params["PLADIS alpha"] == 1.75
    script.postprocess(p, None, *SD_ALL)


def test_a_skipped_nested_generation_with_a_dict_of_its_own_names_no_pladis(forge_host, script):
    # Only the very dict a live generation that got PLADIS writes into keeps the keys: a nested
    # generation with a dict of its own (equal contents: same settings) that PLADIS skips must not
    # claim PLADIS in its images' parameters.
    tk = forge_host
    outer = _sampled(tk, script, tk.flux_patcher(), NO_LAYERS)
    assert _keys(outer.extra_generation_params)
    inner = _sampled(tk, script, tk.unet_patcher(seed=3), NO_LAYERS, extra={})
    assert not _keys(inner.extra_generation_params)
    assert _keys(outer.extra_generation_params)
    script.postprocess(inner, None, *NO_LAYERS)
    script.postprocess(outer, None, *NO_LAYERS)


def test_a_copy_of_a_skipped_generation_with_a_dict_of_its_own_writes_its_keys(forge_host, script):
    # Only a copy sharing the skipped generation's dict (ADetailer's re-arm) leaves it alone; a copy
    # given a dict of its own is a generation of its own and records its settings there.
    tk = forge_host
    p = _sampled(tk, script, tk.unet_patcher(), NO_LAYERS)  # skipped: keys cleared
    own = copy.copy(p)
    own.extra_generation_params = {}
    script.process(own, *SD_ALL)
    assert own.extra_generation_params["PLADIS alpha"] == 1.5
    assert not _keys(p.extra_generation_params)
    script.postprocess(own, None, *SD_ALL)
    script.postprocess(p, None, *NO_LAYERS)


def test_a_copy_of_a_generation_that_got_pladis_on_a_later_pass_writes_its_keys(forge_host, script):
    # Skipped on the first pass, then PLADIS on the hires pass's checkpoint: the generation got
    # PLADIS, so a copy processed afterwards (a script re-running process) records its own settings.
    tk = forge_host
    p = _sampled(tk, script, tk.unet_patcher(), NO_LAYERS)
    assert not _keys(p.extra_generation_params)
    p.sd_model = tk.processing(tk.flux_patcher()).sd_model  # the hires pass's checkpoint
    _pass(tk, script, p, NO_LAYERS)
    assert p.extra_generation_params["PLADIS alpha"] == 1.5
    script.process(copy.copy(p), True, 1.75, 2.0, [], 0.0, 1.0)
    assert p.extra_generation_params["PLADIS alpha"] == 1.75
    script.postprocess(p, None, *NO_LAYERS)


@pytest.mark.parametrize(
    ("patcher", "acts"), [("flux_patcher", True), ("unet_patcher", False)], ids=["acted", "skipped"]
)
def test_a_processing_object_without_an_infotext_dict_is_sampled_as_usual(forge_host, script, patcher, acts):
    # process already leaves a p without extra_generation_params alone; recording a pass's outcome
    # must not raise there either (the hook would end before PLADIS is accounted for).
    tk = forge_host
    original = getattr(tk, patcher)()
    p = tk.processing(original)
    assert not hasattr(p, "extra_generation_params")
    x, cond, uncond = tk.inputs()
    script.process(p, *NO_LAYERS)
    tk.reset(p)
    script.process_before_every_sampling(p, *NO_LAYERS, x=x, noise=x, c=cond, uc=uncond)
    assert (p.sd_model.forge_objects.unet is not original) == acts
    script.postprocess(p, None, *NO_LAYERS)
