"""PLADIS keys in the generation parameters ("infotext") and their paste-back.

Keys contain only word characters and spaces (the WebUI's infotext regex). They are removed when
PLADIS is disabled because X/Y/Z cells share one ``extra_generation_params`` dict.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import numpy as np

from pladis.params import PladisParams, parse_params

ALPHA_KEY = "PLADIS alpha"
LAMBDA_KEY = "PLADIS lambda"
LAYERS_KEY = "PLADIS layers"
RANGE_KEY = "PLADIS range"
KEYS: tuple[str, ...] = (ALPHA_KEY, LAMBDA_KEY, LAYERS_KEY, RANGE_KEY)

log = logging.getLogger("pladis")


def _number(value: float) -> float:
    """α or λ as written: 15 significant digits, so a paste gives the value back (``round(x, 4)``
    wrote an API λ of 4e-5 as 0.0, which pastes as PLADIS off, and X/Y/Z's α 1.3333… as 1.3333)."""
    return float(f"{float(value):.15g}")


def range_text(params: PladisParams) -> str:
    """``start-end`` as fractions of the sampling schedule, e.g. ``0-1`` or ``0.2-0.8``.

    Positional notation, 15 significant digits: ``{:g}`` would write 0.00005 as ``5e-05``,
    whose own minus sign breaks the ``start-end`` split.
    """
    return f"{_fraction_text(params.start)}-{_fraction_text(params.end)}"


def _fraction_text(value: float) -> str:
    # 15 significant digits: X/Y/Z's np.arange writes 0.3 as 0.30000000000000004 (the window
    # treats the two alike, see PladisParams.active_at), and the infotext should say 0.3; small
    # values such as 1e-13 keep their digits.
    return np.format_float_positional(_number(value), trim="-")


def write(extra: MutableMapping[str, Any], params: PladisParams) -> None:
    """Record ``params`` in ``p.extra_generation_params`` when enabled; remove our keys otherwise."""
    clear(extra)
    if not params.enabled:
        return
    extra[ALPHA_KEY] = _number(params.alpha)
    extra[LAMBDA_KEY] = _number(params.lam)
    extra[LAYERS_KEY] = params.layers_text()
    extra[RANGE_KEY] = range_text(params)


def clear(extra: MutableMapping[str, Any]) -> None:
    for key in KEYS:
        extra.pop(key, None)


def parse_range(text: Any) -> tuple[float, float]:
    """``"0.2-0.8"`` → ``(0.2, 0.8)``; ValueError naming the key otherwise.

    The separator is the one minus sign that is not an exponent's (``5e-05-1`` → 0.00005, 1), so
    ranges written in exponent notation by earlier versions still paste back.
    """
    text = str(text).strip()
    separators = [i for i, char in enumerate(text) if char == "-" and i > 0 and text[i - 1] not in "eE"]
    try:
        if len(separators) != 1:
            raise ValueError
        return float(text[: separators[0]]), float(text[separators[0] + 1 :])
    except ValueError:
        raise ValueError(
            f"{RANGE_KEY}: expected 'start-end' with fractions in [0, 1], got {text!r}"
        ) from None


def params_from_infotext(fields: Mapping[str, Any]) -> PladisParams:
    """Params described by parsed infotext; ``enabled`` is the presence of ``PLADIS alpha``."""
    if ALPHA_KEY not in fields:
        return PladisParams(enabled=False)
    start = end = None
    if RANGE_KEY in fields:
        start, end = parse_range(fields[RANGE_KEY])
    return parse_params(
        enabled=True,
        alpha=fields.get(ALPHA_KEY),
        lam=fields.get(LAMBDA_KEY),
        layers=fields.get(LAYERS_KEY),
        start=start,
        end=end,
    )


# -- paste-back: callables receive the parsed infotext dict; None leaves the control unchanged ------
# A value that is there but malformed or out of range raises ValueError naming the key and what is
# allowed. Why raise: the API's ``infotext`` field (``api.py`` ``apply_infotext``) lets it through,
# failing the request with that message, where None would run PLADIS with the defaults instead of
# what the infotext says; a UI paste reports it and leaves that control as it was
# (``infotext_utils.connect_paste``). Other UI pastes catch nothing: there the error is logged and
# the control left as it was (see _called_from_guarded_caller). Plain key strings would reach the
# host's own ``float()``, whose message names neither PLADIS nor the range.
def paste_enabled(fields: Mapping[str, Any]) -> bool:
    """Turn the accordion on exactly when the image was made with PLADIS (off otherwise)."""
    return ALPHA_KEY in fields


def paste_alpha(fields: Mapping[str, Any]) -> float | None:
    return _paste(fields, ALPHA_KEY, lambda value: parse_params(alpha=value).alpha)


def paste_lambda(fields: Mapping[str, Any]) -> float | None:
    return _paste(fields, LAMBDA_KEY, lambda value: parse_params(lam=value).lam)


def paste_layers(fields: Mapping[str, Any]) -> list[str] | None:
    return _paste(fields, LAYERS_KEY, lambda value: list(parse_params(layers=value).layers))


def paste_start(fields: Mapping[str, Any]) -> float | None:
    return _paste(fields, RANGE_KEY, lambda value: _checked_range(value)[0])


def paste_end(fields: Mapping[str, Any]) -> float | None:
    return _paste(fields, RANGE_KEY, lambda value: _checked_range(value)[1])


def _paste(fields: Mapping[str, Any], key: str, read: Any) -> Any:
    if key not in fields:
        return None
    value = fields[key]
    try:
        return read(value)
    except ValueError as error:
        message = f"{error} (from the infotext's '{key}: {value}')"
        if not _called_from_guarded_caller():
            log.error("PLADIS: %s; that control is left as it was", message)
            return None
        raise ValueError(message) from None


GUARDED_PASTE = ("modules.infotext_utils", "paste_func")
"""(module, function) of the UI paste that calls a target itself, inside a ``try`` that reports the
error (``errors.report``) and leaves the control as it was: A1111 1.10, Forge and reForge
(``connect_paste.paste_func``). A1111 1.8–1.9 have the same name without the ``try``."""

API_INFOTEXT = "apply_infotext"
"""The API's ``infotext`` field (``Api.apply_infotext``, directly or through its ``get_field_value``):
an error fails the request naming the value, instead of running PLADIS with defaults."""


def _called_from_guarded_caller() -> bool:
    """Whether the function that called the paste target wants a malformed value raised.

    Only the target's direct caller is judged (frames: this, ``_paste``, the target, its caller).
    Why: other UI pastes call the targets outside any ``try`` (Forge Classic/Neo's ``_parse_info``,
    itself called by a ``paste_func`` in ``modules.infotext_utils``; SD.Next's and older A1111's
    ``generation_parameters_copypaste``), and there one malformed PLADIS value aborted the whole
    paste, prompt and seed included. Those get the message in the log and the control left as it was.
    """
    try:
        caller = sys._getframe(3)
    except ValueError:  # no caller that deep: not a host's paste
        return False
    name, module = caller.f_code.co_name, caller.f_globals.get("__name__")
    if (module, name) == GUARDED_PASTE:
        # A1111 1.8–1.9 have the same paste_func without the try: it must report errors to count.
        return {"errors", "report"} <= set(caller.f_code.co_names)
    if name == "get_field_value" and caller.f_back is not None:
        name = caller.f_back.f_code.co_name
    return name == API_INFOTEXT


def _checked_range(text: Any) -> tuple[float, float]:
    start, end = parse_range(text)
    params = parse_params(start=start, end=end)
    return params.start, params.end


PASTE_TARGETS: tuple[Any, ...] = (
    paste_enabled,
    paste_alpha,
    paste_lambda,
    paste_layers,
    paste_start,
    paste_end,
)
"""The infotext target of each control, in control order: a callable of the parsed fields."""


def paste_fields(
    enabled: Any, alpha: Any, lam: Any, layers: Any, start: Any, end: Any
) -> list[tuple[Any, Any]]:
    """``Script.infotext_fields`` entries for the six controls."""
    return list(zip((enabled, alpha, lam, layers, start, end), PASTE_TARGETS, strict=True))


def send_to_names() -> list[Any]:
    """``Script.paste_field_names``: the infotext targets "Send to img2img/inpaint" copies.

    The WebUI copies a control from tab to tab when its target (the key string, or the callable)
    is in this list: it tests ``name in paste_field_names`` (``infotext_utils.py:168-174``), so the
    paste callables are listed. They are module-level functions, the same objects in both tabs'
    paste fields. (With only key strings listed, the img2img accordion stayed off or kept stale
    layers and window.)
    """
    return list(PASTE_TARGETS)
