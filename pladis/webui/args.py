"""Script arguments → :class:`~pladis.params.PladisParams` (UI, API positional/short/dict, X/Y/Z overrides).

The API copies ``alwayson_scripts["pladis"]["args"]`` positionally over the UI defaults, so a short
list keeps the defaults for the missing tail, and a dict in the first position arrives here untouched
(the rest are defaults and are ignored).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pladis.params import PladisParams, params_from_mapping, parse_params

ARG_ORDER: tuple[str, ...] = ("enabled", "alpha", "lambda", "layers", "start", "end")
"""Positional order of the script args (and of the controls returned by ``ui()``)."""

XYZ_ATTR = "_pladis_xyz"
"""Attribute of a processing object holding X/Y/Z per-cell overrides ``{field: value}``."""


def params_from_args(args: Sequence[Any]) -> PladisParams:
    """Parse ``[enabled, alpha, lambda, layers, start, end]`` (missing/None → default) or ``[{...}]``.

    In the dict form ``enabled`` defaults to true: sending settings means wanting PLADIS.
    Raises ``ValueError`` naming the parameter and its allowed range.
    """
    args = tuple(args)
    if args and isinstance(args[0], Mapping):
        return params_from_mapping(args[0], base=PladisParams(enabled=True))
    if len(args) > len(ARG_ORDER):
        raise ValueError(
            f"PLADIS: expected at most {len(ARG_ORDER)} arguments ({', '.join(ARG_ORDER)}), got {len(args)}"
        )
    padded = args + (None,) * (len(ARG_ORDER) - len(args))
    return parse_params(*padded)


def params_for(p: Any, args: Sequence[Any]) -> PladisParams:
    """Params for one generation: the script args, then any X/Y/Z overrides stored on ``p``."""
    params = params_from_args(args)
    overrides = getattr(p, XYZ_ATTR, None)
    if overrides:
        params = params.replace(**dict(overrides))
    return params
