"""Stand-in ``scripts/xyz_grid.py`` (xyz_grid.py:30-235, 538-731), loaded by path as module "xyz_grid.py".

Per cell: ``pc = copy(p)`` (shallow: ``extra_generation_params`` is shared) → ``apply`` →
``process_images(pc)``; per-cell exceptions are reported and the grid goes on. Values are split on
commas; for int and float axes the range forms ``a-b`` / ``a-b (+step)`` (float: ``np.arange(a,
b + step, step)``, int: ``range(a, b + 1, step)``) and ``a-b [count]`` (``np.linspace``) are expanded
as xyz_grid.py:547-609 does, so float ranges carry np.arange's rounding (0.30000000000000004).
Values are then converted with ``opt.type`` and checked by ``opt.confirm`` before any cell runs.
"""

import re
from copy import copy

import numpy as np
from modules import errors, processing, scripts

_NUMBER = r"([+-]?\s*\d+(?:\.\d*)?)"
_STEPPED = re.compile(rf"\s*{_NUMBER}\s*-\s*{_NUMBER}(?:\s*\(([+-]\d+(?:\.\d*)?)\s*\))?\s*")
_COUNTED = re.compile(rf"\s*{_NUMBER}\s*-\s*{_NUMBER}(?:\s*\[(\d+(?:\.\d*)?)\s*\])?\s*")


def expand_ranges(kind, values):
    """The axis text's values, with int/float ranges expanded as the real script does."""
    out = []
    for value in (v.strip() for v in values.split(",")):
        if value == "":
            continue
        stepped, counted = _STEPPED.fullmatch(value), _COUNTED.fullmatch(value)
        if kind not in (int, float) or (stepped is None and counted is None):
            out.append(value)
        elif stepped is not None:
            start, end = (kind(g.replace(" ", "")) for g in stepped.group(1, 2))
            step = kind(stepped.group(3)) if stepped.group(3) is not None else 1
            if kind is int:
                out += list(range(start, end + 1, step))
            else:
                out += np.arange(start, end + step, step).tolist()
        else:
            start, end = (kind(g.replace(" ", "")) for g in counted.group(1, 2))
            num = int(counted.group(3)) if counted.group(3) is not None else 1
            spaced = np.linspace(start=start, stop=end, num=num).tolist()
            out += [int(x) for x in spaced] if kind is int else spaced
    return out


def apply_field(field):
    def fun(p, x, xs):
        setattr(p, field, x)

    return fun


def do_nothing(p, x, xs):
    pass


def format_value_add_label(p, opt, x):
    return f"{opt.label}: {x}"


def boolean_choice(reverse: bool = False):
    def choice():
        return ["False", "True"] if reverse else ["True", "False"]

    return choice


class AxisOption:
    def __init__(
        self,
        label,
        type,
        apply,
        format_value=format_value_add_label,
        confirm=None,
        cost=0.0,
        choices=None,
        prepare=None,
    ):
        self.label = label
        self.type = type
        self.apply = apply
        self.format_value = format_value
        self.confirm = confirm
        self.cost = cost
        self.prepare = prepare
        self.choices = choices


axis_options = [
    AxisOption("Nothing", str, do_nothing),
    AxisOption("Steps", int, apply_field("steps")),
]


class Script(scripts.Script):
    def title(self):
        return "X/Y/Z plot"

    def ui(self, is_img2img):
        self.current_axis_options = list(axis_options)

    def run_axis(self, p, label, values):
        """One-axis grid: returns the per-cell ``Processed`` (None for a failed cell)."""
        opt = next(o for o in axis_options if o.label == label)
        xs = [opt.type(v) for v in expand_ranges(opt.type, values)]
        if opt.choices is not None:
            valid = opt.choices()
            for x in xs:
                assert x in valid, f"invalid value {x} for {label}"
        if opt.confirm:
            opt.confirm(p, xs)
        results = []
        for x in xs:
            pc = copy(p)
            opt.apply(pc, x, xs)
            try:
                results.append(processing.process_images(pc))
            except Exception:
                errors.report("Failed to process X/Y/Z cell", exc_info=True)
                results.append(None)
        return results
