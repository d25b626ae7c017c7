"""What the PLADIS accordion promises on every host: element ids and infotext keys, in UI order.

A1111 (gradio 3.41) and Forge (gradio 4.40) build the same script; their UI tests check it against
this one list each, so a new control cannot be added to one expectation and forgotten in the other.
"""

from __future__ import annotations

SUFFIXES = ["enable", "alpha", "lambda", "layers", "start", "end"]
"""``elem_id`` suffixes of the controls: ids are ``script_<tab>_pladis_<suffix>``."""

INFOTEXT_KEYS = ["paste_enabled", "paste_alpha", "paste_lambda", "paste_layers", "paste_start", "paste_end"]
"""``infotext_fields`` keys, as strings or the names of the paste functions, in control order."""


def infotext_keys(script) -> list[str]:
    """The script's ``infotext_fields`` keys, paste functions given by name."""
    return [key if isinstance(key, str) else key.__name__ for _, key in script.infotext_fields]
