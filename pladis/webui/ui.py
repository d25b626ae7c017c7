"""The PLADIS accordion: builds the six controls and returns them in script-arg order.

Side-effect free (the WebUI calls ``ui()`` again to compute API defaults): it only creates gradio
components inside the caller's Blocks context, sets the script's ``infotext_fields`` /
``paste_field_names`` and makes sure the X/Y/Z axes are registered (idempotent). Uses only the
subset of gradio that behaves the same on 3.41 (A1111, reForge) and 4.x (Forge): Slider,
CheckboxGroup, Checkbox, Accordion, Row, ``info=``, ``elem_id``.
"""

from __future__ import annotations

import logging
from typing import Any

from pladis.params import DEFAULT_LAYERS, LAM_RANGE, LAYER_GROUPS, PladisParams
from pladis.webui import infotext, xyz

log = logging.getLogger("pladis")

DEFAULTS = PladisParams()

ALPHA_INFO = "Entmax exponent: 1 = softmax (no effect) · 1.5 = entmax15 (paper) · 2 = sparsemax (paper)"
LAMBDA_INFO = "Blend (1-λ)·softmax + λ·entmax: 0 = off, 1 = pure sparse, 2 = paper default, higher = stronger"
LAYERS_INFO = "UNet cross-attention groups to change; the paper's default is down + up (mid excluded)"
START_INFO = "Where PLADIS starts: fraction of the steps (A1111) or of the noise schedule (Forge)"
END_INFO = (
    "Where PLADIS stops: fraction of the steps (A1111) or of the noise schedule (Forge); 1 = to the end"
)

TOOLTIPS: dict[str, str] = {
    "enable": "PLADIS: sparse (α-entmax) cross-attention blend, no extra model calls",
    "alpha": ALPHA_INFO,
    "lambda": LAMBDA_INFO,
    "layers": LAYERS_INFO,
    "start": START_INFO,
    "end": END_INFO,
}
"""Tooltips per control suffix; ``javascript/pladis.js`` carries the same texts for hover titles."""


def _accordion(script: Any, label: str) -> tuple[Any, Any]:
    """(enabled component, context manager for the body): InputAccordion, else Accordion + Checkbox."""
    import gradio as gr

    try:
        from modules.ui_components import InputAccordion
    except ImportError:
        InputAccordion = None

    if InputAccordion is not None:
        accordion = InputAccordion(False, label=label, elem_id=script.elem_id("enable"))
        return accordion, accordion
    accordion = gr.Accordion(label, open=False, elem_id=script.elem_id("accordion"))
    with accordion:
        enabled = gr.Checkbox(False, label="Enable PLADIS", elem_id=script.elem_id("enable"))
    return enabled, accordion


def build(script: Any, is_img2img: bool) -> list[Any]:
    """Create the controls; returns ``[enabled, alpha, lambda, layers, start, end]``."""
    import gradio as gr

    del is_img2img  # ids are already per tab: Script.elem_id() includes the tab name
    # Not only from on_before_ui: with --nowebui the API builds the UI (and X/Y/Z, a selectable script
    # set up after the always-on ones, fixes its axis list) before the before_ui callbacks run. An odd
    # X/Y/Z must not cost the accordion itself.
    try:
        xyz.register()
    except Exception as error:  # any failure of a foreign module's AxisOption
        log.warning("PLADIS: could not add the X/Y/Z axes (%s: %s)", type(error).__name__, error)
    enabled, body = _accordion(script, "PLADIS")
    with body:
        with gr.Row(elem_id=script.elem_id("row_strength")):
            alpha = gr.Slider(
                minimum=1.0,
                maximum=2.0,
                step=0.05,
                value=DEFAULTS.alpha,
                label="α (entmax exponent)",
                info=ALPHA_INFO,
                elem_id=script.elem_id("alpha"),
                elem_classes=["pladis-control"],
            )
            lam = gr.Slider(
                minimum=0.0,
                maximum=LAM_RANGE[1],  # the API, X/Y/Z and infotext take up to 10: a paste must fit
                step=0.05,
                value=DEFAULTS.lam,
                label="λ (PLADIS scale)",
                info=LAMBDA_INFO,
                elem_id=script.elem_id("lambda"),
                elem_classes=["pladis-control"],
            )
        layers = gr.CheckboxGroup(
            choices=list(LAYER_GROUPS),
            value=list(DEFAULT_LAYERS),
            label="Layer groups",
            info=LAYERS_INFO,
            elem_id=script.elem_id("layers"),
            elem_classes=["pladis-control"],
        )
        with gr.Row(elem_id=script.elem_id("row_window")):
            start = gr.Slider(
                minimum=0.0,
                maximum=1.0,
                step=0.01,
                value=DEFAULTS.start,
                label="Start (fraction of schedule)",
                info=START_INFO,
                elem_id=script.elem_id("start"),
                elem_classes=["pladis-control"],
            )
            end = gr.Slider(
                minimum=0.0,
                maximum=1.0,
                step=0.01,
                value=DEFAULTS.end,
                label="End (fraction of schedule)",
                info=END_INFO,
                elem_id=script.elem_id("end"),
                elem_classes=["pladis-control"],
            )
    script.infotext_fields = infotext.paste_fields(enabled, alpha, lam, layers, start, end)
    script.paste_field_names = infotext.send_to_names()
    return [enabled, alpha, lam, layers, start, end]
