"""Stand-in for Forge ``modules/ui_components.py`` on gradio 4.40: only ``InputAccordion``.

Behaviour follows Forge (``InputAccordion(value, **kwargs)`` is a factory returning an
``InputAccordionImpl``, a hidden ``gr.Checkbox`` whose value is the script arg, plus a
``gr.Accordion`` that is opened/closed with it). Two things Forge does through its global
``modules/gradio_extensions.py`` shims are done locally here so that real gradio stays untouched
for the rest of the test process:

* the checkbox → accordion event is registered with gradio 4's ``js=`` (Forge writes ``_js=`` and
  its ``EventWrapper`` renames it);
* gradio 4's component metaclass writes a ``.pyi`` file next to the module defining a component
  subclass; Forge disables that globally, this module only while defining its class.

Unknown keyword arguments are *not* filtered as Forge's ``repair()`` does (it drops them with a
warning): on plain gradio 4 they raise ``TypeError``, which is the stricter check for the tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import gradio as gr

if not gr.__version__.startswith("4."):
    raise ImportError(
        f"the Forge ui_components stand-in needs gradio 4 (Forge ships 4.40), not {gr.__version__}"
    )

import gradio.component_meta as component_meta  # gradio 4 only


@contextlib.contextmanager
def _no_pyi_files() -> Iterator[None]:
    """Keep gradio 4 from writing ``ui_components.pyi`` into the test tree while the class is defined."""
    original = component_meta.create_or_modify_pyi
    component_meta.create_or_modify_pyi = lambda *args, **kwargs: None
    try:
        yield
    finally:
        component_meta.create_or_modify_pyi = original


with _no_pyi_files():

    class InputAccordionImpl(gr.Checkbox):
        """Hidden checkbox (the input) driving an accordion; ``with`` enters the accordion body."""

        global_index = 0

        def __init__(self, value: Any = None, setup: bool = False, **kwargs: Any) -> None:
            # gradio 4 may re-create a component from its recorded constructor kwargs; without
            # ``setup`` that is a plain checkbox (no second accordion), as in Forge.
            if not setup:
                super().__init__(value=value, **kwargs)
                return
            self.accordion_id = kwargs.get("elem_id")
            if self.accordion_id is None:
                self.accordion_id = f"input-accordion-{InputAccordionImpl.global_index}"
                InputAccordionImpl.global_index += 1
            super().__init__(
                value=value, **{**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False}
            )
            self.change(
                fn=None,
                js=f'function(checked){{ inputAccordionChecked("{self.accordion_id}", checked); }}',
                inputs=[self],
            )
            self.accordion = gr.Accordion(
                **{
                    **kwargs,
                    "elem_id": self.accordion_id,
                    "label": kwargs.get("label", "Accordion"),
                    "elem_classes": ["input-accordion"],
                    "open": value,
                }
            )

        def extra(self) -> gr.Column:
            """A column placed in the accordion's header row."""
            return gr.Column(
                elem_id=f"{self.accordion_id}-extra", elem_classes="input-accordion-extra", min_width=0
            )

        def __enter__(self) -> InputAccordionImpl:
            self.accordion.__enter__()
            return self

        def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
            self.accordion.__exit__(exc_type, exc_val, exc_tb)

        def get_block_name(self) -> str:
            return "checkbox"


def InputAccordion(value: Any = None, **kwargs: Any) -> InputAccordionImpl:  # Forge's name and casing
    """Forge's public constructor: a set-up ``InputAccordionImpl``."""
    return InputAccordionImpl(value=value, setup=True, **kwargs)
