"""The accordion built with real gradio 3.41 (the WebUI's version) through the WebUI's own loading path."""

from __future__ import annotations

import ast
import os
import re
import sys

import gradio as gr
import pytest

from pladis.webui import ui
from tests.ui_contract import INFOTEXT_KEYS, SUFFIXES, infotext_keys


def _controls(webui, runner):
    script = webui.kit.pladis_script(runner)
    return script, runner.inputs[script.args_from : script.args_to]


def test_script_is_loaded_like_a1111_does(webui):
    data = webui.loaded["pladis.py"]
    assert data.module.__name__ == "pladis.py" and "pladis.py" not in sys.modules
    assert [d.script_class.__name__ for d in webui.scripts.scripts_data] == ["PladisScript", "Script"]
    script = webui.kit.pladis_script(webui.runner)
    assert script.title() == "PLADIS" and script.name == "pladis"
    assert script.show(False) is webui.scripts.AlwaysVisible and script.alwayson
    callbacks = webui.script_callbacks.callback_map
    assert [
        len(callbacks[k])
        for k in (
            "callbacks_cfg_denoiser",
            "callbacks_model_loaded",
            "callbacks_script_unloaded",
            "callbacks_before_ui",
        )
    ] == [1, 1, 1, 1]


@pytest.mark.parametrize("is_img2img", [False, True])
def test_controls_ranges_defaults_and_ids(webui, is_img2img):
    runner = webui.kit.make_runner(is_img2img)
    script, controls = _controls(webui, runner)
    enabled, alpha, lam, layers, start, end = controls
    tab = "img2img" if is_img2img else "txt2img"
    assert type(enabled).__name__ == "InputAccordion" and enabled.value is False
    assert enabled.accordion.label == "PLADIS"
    assert (alpha.minimum, alpha.maximum, alpha.step, alpha.value) == (1.0, 2.0, 0.05, 1.5)
    assert (lam.minimum, lam.maximum, lam.step, lam.value) == (0.0, 10.0, 0.05, 2.0)  # as the API
    assert isinstance(layers, gr.CheckboxGroup) and layers.choices and layers.value == ["down", "up"]
    assert [c if isinstance(c, str) else c[0] for c in layers.choices] == ["down", "mid", "up"]
    assert (start.minimum, start.maximum, start.step, start.value) == (0.0, 1.0, 0.01, 0.0)
    assert (end.minimum, end.maximum, end.step, end.value) == (0.0, 1.0, 0.01, 1.0)
    ids = [enabled.accordion_id, *(c.elem_id for c in controls[1:])]
    assert ids == [f"script_{tab}_pladis_{s}" for s in SUFFIXES]
    # each info line is that control's tooltip (the texts javascript/pladis.js shows on hover)
    assert [c.info for c in controls[1:]] == [ui.TOOLTIPS[s] for s in SUFFIXES[1:]]
    assert "1.5" in alpha.info and "2" in alpha.info  # the paper's values are marked
    assert infotext_keys(script) == INFOTEXT_KEYS


def test_ui_is_side_effect_free_and_stable(webui):
    script, first = _controls(webui, webui.runner)
    callbacks = {k: list(v) for k, v in webui.script_callbacks.callback_map.items()}
    for _ in range(2):  # the API calls ui() again inside throwaway Blocks for defaults
        with gr.Blocks():
            again = script.ui(False)
        assert [type(c) for c in again] == [type(c) for c in first]
        assert [c.value for c in again] == [c.value for c in first]
    assert {k: list(v) for k, v in webui.script_callbacks.callback_map.items()} == callbacks
    assert webui.controller.patcher.session is None


def test_blocks_config_serialises(webui):
    with gr.Blocks() as demo:
        webui.kit.pladis_script(webui.runner).ui(False)
    config = demo.get_config_file()
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert {f"script_txt2img_pladis_{s}" for s in SUFFIXES[1:]} <= ids
    assert "script_txt2img_pladis_enable" in ids  # the accordion


def test_fallback_without_input_accordion(webui, monkeypatch):
    import modules.ui_components as ui_components

    monkeypatch.delattr(ui_components, "InputAccordion")
    script = webui.kit.pladis_script(webui.runner)
    with gr.Blocks():
        controls = script.ui(False)
    assert isinstance(controls[0], gr.Checkbox) and controls[0].value is False
    assert controls[0].elem_id == "script_txt2img_pladis_enable" and len(controls) == 6


def test_tooltips_in_javascript_match_python():
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    with open(os.path.join(root, "javascript", "pladis.js"), encoding="utf-8") as handle:
        js = handle.read()
    for suffix, text in ui.TOOLTIPS.items():
        assert re.search(rf'\b{suffix}: "{re.escape(text)}"', js), suffix


def test_script_file_is_thin_glue():
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    with open(os.path.join(root, "scripts", "pladis.py"), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    assert imported <= {"modules", "pladis.webui", "pladis.webui.controller"}
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    assert len(classes) == 1
    for method in (n for n in classes[0].body if isinstance(n, ast.FunctionDef)):
        body = [
            s for s in method.body if not isinstance(s, ast.Expr) or not isinstance(s.value, ast.Constant)
        ]
        assert len(body) == 1, method.name  # each hook is a one-line delegation
