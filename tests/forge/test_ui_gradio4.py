"""The PLADIS accordion built with real gradio 4 (Forge ships 4.40.0) on the Forge stand-ins.

Runs only in an environment with gradio 4 (CI: ``.ci-venv-gradio4``); the main environment has
gradio 3.41 (A1111) and skips it. With ``PLADIS_REQUIRE_GRADIO4=1`` a missing gradio 4 is a
failure, so CI cannot pass by skipping. Gradio itself is left unpatched: where Forge's shims would
only warn about an unknown keyword argument, plain gradio 4 raises, and any warning emitted while
``ui()`` runs fails the test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import gradio as gr
import pytest

from tests.ui_contract import INFOTEXT_KEYS, SUFFIXES, infotext_keys

GRADIO4 = gr.__version__.startswith("4")
if not GRADIO4:
    _REASON = f"needs gradio 4 (Forge's UI stack); this environment has gradio {gr.__version__}"
    if os.environ.get("PLADIS_REQUIRE_GRADIO4") == "1":
        pytest.fail(f"PLADIS_REQUIRE_GRADIO4=1 but {_REASON}", pytrace=False)
    pytest.skip(_REASON, allow_module_level=True)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "pladis.py"
TABS = ["txt2img", "img2img"]


@pytest.fixture
def script_class(forge_ui_host):
    """``PladisScript`` loaded by path like Forge does (and like ``test_script_e2e.py``)."""
    spec = importlib.util.spec_from_file_location("pladis_forge_ui_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module.PladisScript
    from pladis.webui.controller import CONTROLLER

    CONTROLLER.stop()


def for_tab(script_class: type, is_img2img: bool) -> Any:
    """A script instance set up like Forge's ``ScriptRunner.initialize_scripts`` (one runner per tab)."""
    script = script_class()
    script.is_img2img = is_img2img
    script.is_txt2img = not is_img2img
    script.tabname = "img2img" if is_img2img else "txt2img"
    return script


def build(script: Any) -> list[Any]:
    """``script.ui()`` inside the caller's Blocks; fails on any warning gradio (or we) emit meanwhile."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        controls = script.ui(script.is_img2img)
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    return controls


def element_ids(demo: gr.Blocks) -> list[str]:
    return [block.elem_id for block in demo.blocks.values() if getattr(block, "elem_id", None)]


def config_without_ids(demo: gr.Blocks) -> str:
    """The components and event handlers of a Blocks config as JSON, without per-process ids/hashes."""
    config = demo.get_config_file()
    components = [
        {k: v for k, v in c.items() if k not in ("id", "component_class_id")} for c in config["components"]
    ]
    dependencies = [
        {k: v for k, v in d.items() if k not in ("id", "targets", "inputs", "outputs")}
        for d in config["dependencies"]
    ]
    return json.dumps([components, dependencies], sort_keys=True, default=str)


@pytest.mark.parametrize("is_img2img", [False, True])
def test_controls_are_the_six_args_with_documented_defaults_and_ranges(script_class, is_img2img):
    from modules.ui_components import InputAccordionImpl

    script = for_tab(script_class, is_img2img)
    tab = script.tabname
    with gr.Blocks():
        controls = build(script)
    assert len(controls) == 6
    enabled, alpha, lam, layers, start, end = controls
    assert isinstance(enabled, InputAccordionImpl) and enabled.value is False and enabled.visible is False
    assert enabled.accordion.label == "PLADIS" and enabled.accordion.open is False
    assert all(isinstance(c, gr.Slider) for c in (alpha, lam, start, end))
    assert (alpha.minimum, alpha.maximum, alpha.step, alpha.value) == (1.0, 2.0, 0.05, 1.5)
    assert (lam.minimum, lam.maximum, lam.step, lam.value) == (0.0, 10.0, 0.05, 2.0)  # as the API
    assert (start.minimum, start.maximum, start.step, start.value) == (0.0, 1.0, 0.01, 0.0)
    assert (end.minimum, end.maximum, end.step, end.value) == (0.0, 1.0, 0.01, 1.0)
    assert isinstance(layers, gr.CheckboxGroup) and layers.value == ["down", "up"]
    assert layers.choices == [("down", "down"), ("mid", "mid"), ("up", "up")]  # gradio 4: (label, value)
    assert all(c.info for c in controls[1:])
    ids = [enabled.accordion_id, *(c.elem_id for c in controls[1:])]
    assert ids == [f"script_{tab}_pladis_{s}" for s in SUFFIXES]
    assert enabled.elem_id == f"script_{tab}_pladis_enable-checkbox"
    assert infotext_keys(script) == INFOTEXT_KEYS
    assert [component for component, _ in script.infotext_fields] == controls
    assert script.paste_field_names == [name for _, name in script.infotext_fields]  # all callables


def test_api_arg_info_as_forge_derives_it(script_class):
    """Forge's ``create_script_ui_inner`` reads label/value/range/choices off each control for the API."""
    with gr.Blocks():
        controls = build(for_tab(script_class, False))
    info = []
    for control in controls:
        arg = {"label": control.label or ""}
        for field in ("value", "minimum", "maximum", "step"):
            if getattr(control, field, None) is not None:
                arg[field] = getattr(control, field)
        choices = getattr(control, "choices", None)
        if choices is not None:
            arg["choices"] = [c[0] if isinstance(c, tuple) else c for c in choices]
        info.append(arg)
    assert [a["label"] for a in info] == [
        "PLADIS",
        "α (entmax exponent)",
        "λ (PLADIS scale)",
        "Layer groups",
        "Start (fraction of schedule)",
        "End (fraction of schedule)",
    ]
    assert [a["value"] for a in info] == [False, 1.5, 2.0, ["down", "up"], 0.0, 1.0]
    assert info[3]["choices"] == ["down", "mid", "up"]


def test_both_tabs_in_one_blocks_have_unique_ids_and_a_serialisable_config(script_class):
    with gr.Blocks() as demo:
        per_tab = {tab: build(for_tab(script_class, tab == "img2img")) for tab in TABS}
    ids = element_ids(demo)
    assert len(ids) == len(set(ids))
    for tab in TABS:
        mine = [i for i in ids if i.startswith(f"script_{tab}_pladis_")]
        assert {f"script_{tab}_pladis_{s}" for s in SUFFIXES} <= set(mine)
        assert {f"script_{tab}_pladis_enable-checkbox", f"script_{tab}_pladis_row_strength"} <= set(mine)
    assert all(i.startswith(("script_txt2img_pladis_", "script_img2img_pladis_")) for i in ids)
    config = json.loads(json.dumps(demo.get_config_file(), default=str))
    accordions = {c["props"].get("elem_id") for c in config["components"] if c["type"] == "accordion"}
    assert accordions == {f"script_{tab}_pladis_enable" for tab in TABS}
    # the accordion follows its hidden checkbox through a client-side handler only (no Python fn)
    handlers = [d for d in config["dependencies"] if d.get("js")]
    assert len(handlers) == 2 and all(d.get("backend_fn") is False for d in handlers)
    for tab, controls in per_tab.items():
        assert any(f'"script_{tab}_pladis_enable"' in d["js"] for d in handlers), tab
        assert controls[0]._id in {t[0] for d in handlers for t in d["targets"]}


def test_calling_ui_again_has_no_side_effects(script_class):
    from modules import script_callbacks
    from modules.ui_components import InputAccordionImpl

    from pladis.webui.controller import CONTROLLER

    script = for_tab(script_class, False)
    with gr.Blocks() as first_demo:
        first = build(script)
    first_config = config_without_ids(first_demo)
    first_blocks = set(first_demo.blocks)
    registered = list(script_callbacks.registered)
    modules = set(sys.modules)
    anonymous = InputAccordionImpl.global_index

    with gr.Blocks() as second_demo:  # the WebUI calls ui() again in throwaway Blocks for API defaults
        second = build(script)

    assert set(first_demo.blocks) == first_blocks  # nothing added to the first UI
    assert config_without_ids(first_demo) == first_config
    assert config_without_ids(second_demo) == first_config  # same UI again
    assert not set(map(id, first)) & set(map(id, second))
    assert [c.value for c in second] == [c.value for c in first]
    assert [component for component, _ in script.infotext_fields] == second  # replaced, not appended
    assert script_callbacks.registered == registered
    assert set(sys.modules) == modules
    assert InputAccordionImpl.global_index == anonymous
    assert CONTROLLER.patcher.session is None


def test_plain_gradio4_rejects_what_forge_would_only_warn_about(forge_ui_host):
    """The guard behind the tests above: gradio is unpatched, so an unknown kwarg cannot slip through."""
    from modules.ui_components import InputAccordion

    with gr.Blocks():
        with pytest.raises(TypeError, match="tooltip"):
            gr.Slider(minimum=0, maximum=1, tooltip="Forge would capture this")
        with pytest.raises(TypeError, match="_js"):
            gr.Checkbox(False).change(fn=None, _js="() => 0")
        accordion = InputAccordion(True, label="x")  # id-less: numbered like Forge
    assert accordion.accordion_id.startswith("input-accordion-") and accordion.accordion.open is True


def test_stand_in_writes_no_pyi_file():
    """gradio 4 writes a ``.pyi`` next to any module defining a component; the stand-in must not."""
    assert not (Path(__file__).parent / "host" / "modules" / "ui_components.pyi").exists()
