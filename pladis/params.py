"""User-facing PLADIS parameters: one validated, immutable record.

Every entry point (the WebUI controls, pasted infotext, X/Y/Z cells, API requests, the diffusers
helper) builds a :class:`PladisParams` through :func:`parse_params` or the constructor, so a bad
value is rejected in one place with one kind of message: ``ValueError`` naming the parameter, the
offending value and the allowed range.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from .entmax import is_softmax

LAYER_GROUPS: tuple[str, ...] = ("down", "mid", "up")
"""UNet block groups whose cross-attention can be modified, in canonical order."""

DEFAULT_LAYERS: tuple[str, ...] = ("down", "up")
"""The official PLADIS choice: every attn2 of the down and up blocks, mid block excluded."""

ALPHA_RANGE: tuple[float, float] = (1.0, 2.0)
LAM_RANGE: tuple[float, float] = (0.0, 10.0)
FRACTION_RANGE: tuple[float, float] = (0.0, 1.0)

_TRUE_WORDS = frozenset({"true", "1", "yes", "on", "enabled", "enable"})
_FALSE_WORDS = frozenset({"false", "0", "no", "off", "disabled", "disable", "none", ""})

# Accepted spellings of each field in mappings (API dicts, infotext-like dicts).
_ALIASES: dict[str, str] = {
    "enabled": "enabled",
    "enable": "enabled",
    "alpha": "alpha",
    "lam": "lam",
    "lambda": "lam",
    "scale": "lam",
    "pladis_scale": "lam",
    "layers": "layers",
    "layer_groups": "layers",
    "start": "start",
    "end": "end",
}


def _range_text(bounds: tuple[float, float]) -> str:
    return f"[{bounds[0]:g}, {bounds[1]:g}]"


def _check_real(name: str, value: Any, bounds: tuple[float, float]) -> float:
    """Return ``value`` as a float if it is a finite real within ``bounds``, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"PLADIS {name}: expected a number in {_range_text(bounds)}, "
            f"got {value!r} of type {type(value).__name__}"
        )
    try:
        number = float(value)
    except OverflowError:  # an int or Fraction beyond float's range: outside any of ours
        raise ValueError(
            f"PLADIS {name}: {value!r} is outside the allowed range {_range_text(bounds)}"
        ) from None
    for bound in bounds:  # X/Y/Z's "1-2 (+0.1)" ends at 2.000000000000001 (np.arange rounding)
        if abs(number - bound) <= _BOUND_SLACK * max(1.0, abs(bound)):
            number = bound
    if not math.isfinite(number) or not bounds[0] <= number <= bounds[1]:
        raise ValueError(f"PLADIS {name}: {value!r} is outside the allowed range {_range_text(bounds)}")
    return number


_BOUND_SLACK = 1e-9
"""Values this close to a range bound (relative) are that bound: float rounding, not user intent."""

_PROGRESS_SLACK = 1e-9
"""Start/end this close to a progress value are that value (float rounding of X/Y/Z ranges)."""


@dataclass(frozen=True)
class PladisParams:
    """Everything a user can set; validated on construction.

    ``alpha`` is the entmax exponent (1 = softmax, 1.5 = entmax15, 2 = sparsemax); ``lam`` the blend
    scale λ of ``(1-λ)·softmax + λ·entmax`` (0 = stock model, 1 = pure sparse attention, >1
    extrapolates); ``layers`` the UNet block groups to modify; ``start``/``end`` the active part of
    the sampling schedule as fractions (active while ``start <= progress < end``; ``end == 1``
    includes the last step).
    """

    enabled: bool = False
    alpha: float = 1.5
    lam: float = 2.0
    layers: tuple[str, ...] = DEFAULT_LAYERS
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        enabled = _scalar("enabled", self.enabled)  # numpy / torch bools are bools
        if not isinstance(enabled, bool):
            raise ValueError(f"PLADIS enabled: expected true or false, got {self.enabled!r}")
        object.__setattr__(self, "enabled", enabled)
        object.__setattr__(self, "alpha", _check_real("alpha", self.alpha, ALPHA_RANGE))
        object.__setattr__(self, "lam", _check_real("lambda", self.lam, LAM_RANGE))
        object.__setattr__(self, "start", _check_real("start", self.start, FRACTION_RANGE))
        object.__setattr__(self, "end", _check_real("end", self.end, FRACTION_RANGE))
        if self.end < self.start <= self.end + _PROGRESS_SLACK:
            object.__setattr__(self, "start", self.end)  # float rounding: 0.1 + 0.2 for 0.3
        if self.start > self.end:
            raise ValueError(
                f"PLADIS start/end: start ({self.start:g}) must not be greater than end ({self.end:g}); "
                f"both are fractions of the sampling schedule in {_range_text(FRACTION_RANGE)}"
            )
        object.__setattr__(self, "layers", _check_layers(self.layers))

    @property
    def changes_attention(self) -> bool:
        """True when the attention it selects differs from stock: enabled, λ > 0, α > 1, some window.

        α = 1 is softmax, so the blend is the stock attention whatever λ is: installing nothing keeps
        the model bit-identical (and free) instead of recomputing it in float32. Layers aside: Flux
        has no layer choice (every block is used).
        """
        return self.enabled and self.lam > 0.0 and not is_softmax(self.alpha) and self.end > self.start

    @property
    def acts(self) -> bool:
        """True when this setting changes a UNet at all: :attr:`changes_attention` on some layer group."""
        return self.changes_attention and bool(self.layers)

    def active_at(self, progress: float) -> bool:
        """Whether PLADIS applies at ``progress`` ∈ [0, 1] of the sampling schedule.

        Bounds within ``_PROGRESS_SLACK`` of a progress value count as equal to it: X/Y/Z writes
        "0.3" of ``0-1 (+0.1)`` as 0.30000000000000004 (``np.arange``), which must not drop the step
        at 6/20. Progress values are step fractions, far more than the slack apart.
        """
        if not self.acts or math.isnan(progress):
            return False
        if progress < self.start - _PROGRESS_SLACK:
            return False
        return self.end >= 1.0 or progress < self.end - _PROGRESS_SLACK

    def replace(self, **changes: Any) -> PladisParams:
        """A copy with some fields changed (loose values accepted, validated again)."""
        merged = {f.name: getattr(self, f.name) for f in fields(self)}
        merged.update(loose_mapping(changes))
        return parse_params(**merged)

    def layers_text(self) -> str:
        """Layer groups as written in infotext: ``down+up``; ``none`` when empty."""
        return "+".join(self.layers) if self.layers else "none"


def _check_layers(value: Any) -> tuple[str, ...]:
    allowed = ", ".join(LAYER_GROUPS)
    if isinstance(value, Mapping):  # {"mid": false} would select mid: iterating gives the keys
        raise ValueError(
            f"PLADIS layers: expected a list such as ['down', 'up'] or a string such as 'down+up', "
            f"got the mapping {dict(value)!r}"
        )
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(
            f"PLADIS layers: expected a collection of layer groups from ({allowed}), got {value!r}"
        )
    chosen = set()
    for item in value:
        if not isinstance(item, str) or item not in LAYER_GROUPS:
            raise ValueError(f"PLADIS layers: unknown layer group {item!r}; allowed groups: {allowed}")
        chosen.add(item)
    return tuple(group for group in LAYER_GROUPS if group in chosen)


def _canonical_key(key: str) -> str:
    canonical = _ALIASES.get(str(key).strip().lower())
    if canonical is None:
        raise ValueError(
            f"PLADIS: unknown parameter {key!r}; known parameters: {', '.join(sorted(_ALIASES))}"
        )
    return canonical


def _scalar(name: str, value: Any) -> Any:
    """A numpy / torch scalar as a Python one; an array of several values is a ValueError naming ``name``."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except (ValueError, RuntimeError):  # numpy: ValueError, torch: RuntimeError
            raise ValueError(f"PLADIS {name}: expected a single value, got {value!r}") from None
    return value


def parse_bool(name: str, value: Any) -> bool:
    """Loose boolean: bools, 0/1 numbers, and words such as "true"/"off"."""
    if isinstance(value, bool):
        return value
    value = _scalar(name, value)
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Real) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
        return value.strip().lower() in _TRUE_WORDS
    raise ValueError(f"PLADIS {name}: expected true or false, got {value!r}")


_NUMBER_RANGES: dict[str, tuple[float, float]] = {
    "alpha": ALPHA_RANGE,
    "lambda": LAM_RANGE,
    "start": FRACTION_RANGE,
    "end": FRACTION_RANGE,
}


def parse_number(name: str, value: Any) -> float:
    """Loose real number: ints, floats, numpy scalars and numeric strings. Range is checked later."""
    bounds = _NUMBER_RANGES.get(name)
    expected = "a number" if bounds is None else f"a number in {_range_text(bounds)}"
    value = _scalar(name, value)
    if isinstance(value, bool):
        raise ValueError(f"PLADIS {name}: expected {expected}, got the boolean {value!r}")
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:  # an int beyond float's range: ±inf, which the range check rejects by name
            return math.inf if value > 0 else -math.inf
    if isinstance(value, str) and _NUMBER_TEXT.fullmatch(value.strip()):
        number = float(value.strip())
        if math.isinf(number) and "inf" not in value.lower():  # "1e400": say what was sent
            allowed = "" if bounds is None else f" {_range_text(bounds)}"
            raise ValueError(f"PLADIS {name}: {value!r} is outside the allowed range{allowed}")
        return number
    raise ValueError(f"PLADIS {name}: expected {expected}, got {value!r}")


_NUMBER_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity)", re.IGNORECASE)
"""Decimal text: Python's ``float`` also takes "1_0" (as 10), which is no way to write 1.0."""


def parse_layers(value: Any) -> tuple[str, ...]:
    """Loose layer groups: ``"down+up"``, ``"down, up"``, ``["down", "up"]``, ``"all"``, ``"none"``."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "none"):
            return ()
        if text == "all":
            return LAYER_GROUPS
        value = [part.strip() for part in text.replace("+", ",").replace(" ", ",").split(",") if part.strip()]
    elif isinstance(value, Iterable) and not isinstance(value, Mapping) and not isinstance(value, bytes):
        value = [item.strip().lower() if isinstance(item, str) else item for item in value]
    return _check_layers(value)


def parse_params(
    enabled: Any = None,
    alpha: Any = None,
    lam: Any = None,
    layers: Any = None,
    start: Any = None,
    end: Any = None,
) -> PladisParams:
    """Build validated params from loose input; ``None`` means "use the default"."""
    values: dict[str, Any] = {}
    if enabled is not None:
        values["enabled"] = parse_bool("enabled", enabled)
    if alpha is not None:
        values["alpha"] = parse_number("alpha", alpha)
    if lam is not None:
        values["lam"] = parse_number("lambda", lam)
    if layers is not None:
        values["layers"] = parse_layers(layers)
    if start is not None:
        values["start"] = parse_number("start", start)
    if end is not None:
        values["end"] = parse_number("end", end)
    return PladisParams(**values)


def params_from_mapping(mapping: Mapping[str, Any], base: PladisParams | None = None) -> PladisParams:
    """Params from a dict such as ``{"enabled": true, "alpha": 1.5, "lambda": 2}``.

    Keys may use the aliases in ``_ALIASES`` (``lambda``/``lam``); unknown keys are an error so that
    a typo in an API request does not silently fall back to a default.
    """
    start = base or PladisParams()
    merged: dict[str, Any] = {f.name: getattr(start, f.name) for f in fields(start)}
    for key, value in loose_mapping(mapping).items():
        if value is not None:
            merged[key] = value
    return parse_params(**merged)


def loose_mapping(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a parameter dict under their field names (aliases resolved), not yet parsed.

    Unknown keys, and one field given under two names, are errors.
    """
    if not isinstance(mapping, Mapping):
        raise ValueError(f"PLADIS: expected a mapping of parameters, got {type(mapping).__name__}")
    values: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in mapping.items():
        canonical = _canonical_key(key)
        if canonical in given:  # e.g. "lam" and "lambda": which one was meant is not ours to guess
            raise ValueError(f"PLADIS: {given[canonical]!r} and {key!r} both set {canonical}; give it once")
        given[canonical] = key
        values[canonical] = value
    return values
