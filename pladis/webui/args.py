"""Script arguments → :class:`~pladis.params.PladisParams` (UI, API positional/short/dict, X/Y/Z overrides).

The API copies ``alwayson_scripts["pladis"]["args"]`` positionally over the UI defaults (or over the
values of the request's ``infotext``, which the API applies first), so a short list keeps those for
the missing tail. A dict in the first position is the dict form: the fields it names override the
values in the positions after it, the others keep them, the same as a short list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pladis.params import PladisParams, loose_mapping, parse_bool, parse_params

ARG_ORDER: tuple[str, ...] = ("enabled", "alpha", "lambda", "layers", "start", "end")
"""Positional order of the script args (and of the controls returned by ``ui()``)."""

XYZ_ATTR = "_pladis_xyz"
"""Attribute of a processing object holding X/Y/Z per-cell overrides ``{field: value}``."""


def params_from_args(args: Sequence[Any]) -> PladisParams:
    """Parse ``[enabled, alpha, lambda, layers, start, end]`` (missing/None → default) or
    ``[{...}, alpha, lambda, ...]`` (the dict form; see the module docstring).

    In the dict form a missing ``enabled`` is true: sending settings means wanting PLADIS (an explicit
    null is off, as in the positional form). Raises ``ValueError`` naming the parameter and its range.
    """
    return _params(_loose_values(args))


def params_for(p: Any, args: Sequence[Any]) -> PladisParams:
    """Params for one generation: the script args, then any X/Y/Z overrides stored on ``p``.

    The overrides are merged before anything is validated, so a cell's value may repair the
    accordion's (a Start above the accordion's End, with an End axis above both). An axis other
    than Enabled turns PLADIS on, as other extensions' value axes do: a "[PLADIS] Lambda" grid with
    the accordion left off gave identical cells. An Enabled axis, on any axis, has the last word.
    When PLADIS ends up off, invalid other values are dropped instead of failing: sliders left at
    start > end must not fail a generation that does not use them.
    """
    values = _loose_values(args)
    overrides = getattr(p, XYZ_ATTR, None)
    if overrides:
        cell = loose_mapping(dict(overrides))
        if "enabled" not in cell:
            cell["enabled"] = True
        values.update(cell)
    return _params(values)


def _loose_values(args: Sequence[Any]) -> dict[str, Any]:
    """Field name → the value given (None: default), from the positional or the dict form."""
    args = tuple(args)
    if args and isinstance(args[0], Mapping):
        # The positions after the dict hold the UI defaults or, with an ``infotext`` in the request,
        # the pasted image's values: fields the dict leaves out keep them (they were dropped).
        values = _loose_values((None, *args[1:]))
        named = loose_mapping(args[0])
        values.update(named)
        if "enabled" not in named:
            values["enabled"] = True
        return values
    if len(args) > len(ARG_ORDER):
        raise ValueError(
            f"PLADIS: expected at most {len(ARG_ORDER)} arguments ({', '.join(ARG_ORDER)}), got {len(args)}"
        )
    padded = args + (None,) * (len(ARG_ORDER) - len(args))
    return loose_mapping(dict(zip(ARG_ORDER, padded, strict=True)))  # "lambda" → the field "lam"


def _params(values: dict[str, Any]) -> PladisParams:
    enabled = values.get("enabled")
    # None is the default, off (the dict form has already made a missing one true).
    if enabled is None or not parse_bool("enabled", enabled):
        try:  # off: the values are kept when they are valid, and dropped when not (they are unused)
            return parse_params(**values)
        except ValueError:
            return PladisParams(enabled=False)
    return parse_params(**values)
