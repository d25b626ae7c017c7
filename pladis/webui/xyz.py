"""X/Y/Z plot axes "[PLADIS] Enabled/Alpha/Lambda/Start/End".

Registered from ``on_before_ui`` into the ``xyz_grid.py`` module found in ``scripts.scripts_data``
(never ``import scripts.xyz_grid``: that would be a second copy). Each axis stores its value in a
*new* dict on the cell's processing copy, because X/Y/Z copies ``p`` shallowly per cell.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from pladis.params import parse_params
from pladis.webui.args import XYZ_ATTR

XYZ_MODULE_NAMES: tuple[str, ...] = ("xyz_grid.py", "scripts.xyz_grid", "xyz_grid")

AXES: tuple[tuple[str, str, type], ...] = (
    ("[PLADIS] Enabled", "enabled", str),
    ("[PLADIS] Alpha", "alpha", float),
    ("[PLADIS] Lambda", "lam", float),
    ("[PLADIS] Start", "start", float),
    ("[PLADIS] End", "end", float),
)


def find_xyz_module(scripts_data: Iterable[Any] | None = None) -> Any | None:
    """The loaded X/Y/Z plot module, under any of the names WebUI versions give it."""
    if scripts_data is None:
        try:
            from modules import scripts
        except ImportError:
            return None
        scripts_data = getattr(scripts, "scripts_data", ())
    for data in scripts_data:
        script_class = getattr(data, "script_class", None)
        if getattr(script_class, "__module__", None) in XYZ_MODULE_NAMES:
            return getattr(data, "module", None)
    return None


def make_apply(field: str) -> Callable[[Any, Any, Any], None]:
    def apply(p: Any, value: Any, _values: Any) -> None:
        setattr(p, XYZ_ATTR, {**(getattr(p, XYZ_ATTR, None) or {}), field: value})

    return apply


def make_confirm(field: str) -> Callable[[Any, Iterable[Any]], None]:
    """Validate every cell value before the grid starts; ValueError names the parameter and range."""

    def confirm(_p: Any, values: Iterable[Any]) -> None:
        values = list(values)
        for index, value in enumerate(values):
            try:
                parse_params(**{field: value})
            except ValueError as error:
                raise ValueError(f"{error}{_overshoot_hint(values, index)}") from None

    return confirm


def _overshoot_hint(values: list[Any], index: int) -> str:
    """Why a range's last value can lie past the end the user typed, and what to write instead.

    X/Y/Z expands ``a-b (+step)`` as ``np.arange(a, b + step, step)``, which can end one value past
    ``b``: through float rounding (``1.5-2 (+0.1)`` ends at 2.1000000000000005), or where the step
    does not divide the range (``0.5-0 (-0.2)`` ends at −0.1), a value the user never typed.
    Recognised as a value that continues an even spacing of at least two values before it.
    """
    if index < 2:
        return ""
    try:
        numbers = [float(value) for value in values[: index + 1]]
    except (TypeError, ValueError):
        return ""
    step = numbers[index - 1] - numbers[index - 2]

    def continues(i: int) -> bool:
        return abs((numbers[i] - numbers[i - 1]) - step) <= 1e-9 * max(1.0, abs(step))

    if step == 0 or not continues(index):
        return ""
    first = index - 2
    while first > 0 and continues(first):
        first -= 1
    return (
        f" (an X/Y/Z range 'start-end (+step)' can give one value past 'end', through float rounding"
        f" or a step that does not divide the range; write"
        f" '{numbers[first]:g}-{numbers[index - 1]:g} [{index - first}]' or list the values)"
    )


def _enabled_choices(module: Any) -> Callable[[], list[str]]:
    boolean_choice = getattr(module, "boolean_choice", None)
    if callable(boolean_choice):
        return boolean_choice(reverse=True)
    return lambda: ["True", "False"]


def register(scripts_data: Iterable[Any] | None = None) -> int:
    """Add the PLADIS axes once (labels already present are skipped); returns how many were added."""
    module = find_xyz_module(scripts_data)
    if module is None or not hasattr(module, "axis_options") or not hasattr(module, "AxisOption"):
        return 0
    existing = {getattr(option, "label", None) for option in module.axis_options}
    added = 0
    for label, field, kind in AXES:
        if label in existing:
            continue
        extra: dict[str, Any] = {"confirm": make_confirm(field)}
        if field == "enabled":
            extra["choices"] = _enabled_choices(module)
        module.axis_options.append(module.AxisOption(label, kind, make_apply(field), **extra))
        added += 1
    return added
