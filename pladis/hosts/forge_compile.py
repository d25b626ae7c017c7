"""Forge Neo's ``guard_filter_fn`` torch.compile preset, under which PLADIS leaves SD/SDXL UNets alone.

Neo's built-in compile extension (``extensions-builtin/sd_forge_compile``) offers a preset that
compiles the diffusion model with a guard filter dropping every guard whose name contains
``transformer_options`` (taken from ComfyUI); some forks use it for every preset. The UNet's attn2
patch lookup reads that dict, so its outcome is baked into the compiled code without a guard.
PLADIS's replacement leaves the graph (a graph break), and the code after the break is shared by
the transformer blocks, so what was traced for the first patched block was reused for the others.
Measured on the stand-ins (eager and inductor back-ends): PLADIS set for the down layers ran on
every layer, mid included; a change of Layers or turning PLADIS on had no effect in later
generations, and turning it off raised ``KeyError('attn2')``. Presets without the filter keep their
guards, and their compiled code is not shared with the filtered one's.

Flux is not affected by Neo's filter (it goes by guard name): PLADIS swaps its attention, a module
global, whose guard stays. Filters that drop global guards would break it too; no Forge compile
script uses one.

How the filter is recognised, on the ``KModel`` (the compile script's forks differ):

* the preset recorded by name: ``_torch_compile_config`` or ``_compile_config`` is
  ``"guard_filter_fn"``, or a tuple starting with it (``(preset,)``, ``(preset, lora_hash)``), or the
  ``torch.compile`` arguments, whose ``options`` hold the filter or were emptied of it by
  ``torch.compile`` (``backend="inductor"``, ``dynamic=False``, no ``mode``: no other preset has that);
* a compiled module held by the model (``diffusion_model``, a cached compiled copy) whose Dynamo
  context carries a guard filter that drops the guards on the patches;
* ``apply_model`` wrapped around arguments not yet given to ``torch.compile`` whose ``options`` hold
  such a filter (a wrapper that compiles on the first call, after PLADIS has been applied).

Any guard filter found counts unless it keeps a stand-in guard on
``transformer_options['patches_replace']`` when asked; one that cannot be asked (torch's own
``skip_guard_on_all_nn_modules_unsafe`` wants Dynamo's real entries) counts as dropping it. This is
a heuristic, not a proof that a filter keeps every guard PLADIS needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import torch

PRESET = "guard_filter_fn"

SKIPPED = (
    "PLADIS is off for this UNet: it is compiled with a torch.compile guard filter that drops the "
    "guards on attention patches (Forge's Torch Compile preset 'guard_filter_fn'), so PLADIS would run "
    "on layers it is not set for and miss later changes; choose a preset without that filter (Neo: "
    "'dynamic'; forks that filter every preset: 'Disable') to use PLADIS"
)

_MARKERS = ("_torch_compile_config", "_compile_config")

_PATCH_GUARD = SimpleNamespace(
    name="L['transformer_options']['patches_replace']",
    has_value=False,
    value=None,
    guard_type="DICT_CONTAINS",
    derived_guard_types=(),
    is_global=False,
    orig_guard=None,
)
"""A stand-in guard entry (the fields of Dynamo's ``GuardFilterEntry``) on the patch dict."""


def guard_filtered(kmodel: Any) -> bool:
    """Whether ``kmodel``'s diffusion model is (or is about to be) compiled with a guard filter that
    drops the guards on ``transformer_options`` (see the module docstring)."""
    if any(_names_the_preset(getattr(kmodel, name, None)) for name in _MARKERS):
        return True
    return any(_drops_patch_guards(fn) for fn in _guard_filters(kmodel))


def _names_the_preset(marker: Any) -> bool:
    if isinstance(marker, str):
        return marker == PRESET
    if isinstance(marker, tuple | list):
        return bool(marker) and marker[0] == PRESET
    if not isinstance(marker, dict):
        return False
    options = marker.get("options") or {}
    if not isinstance(options, dict):
        return False
    if PRESET in options:
        return True
    return (
        not options
        and marker.get("backend") == "inductor"
        and marker.get("dynamic") is False
        and "mode" not in marker
    )


def _guard_filters(kmodel: Any) -> Iterator[Any]:
    """The guard filters of the compiled modules ``kmodel`` holds and of the ``torch.compile``
    arguments its ``apply_model`` wrapper holds."""
    children = getattr(kmodel, "_modules", None)  # nn.Module attributes: a cached compiled copy
    held = [
        getattr(kmodel, "diffusion_model", None),
        *(children.values() if isinstance(children, dict) else ()),
    ]
    for module in held:
        if isinstance(module, torch.nn.Module):
            hooks = getattr(getattr(module, "dynamo_ctx", None), "_hooks", None)
            fn = getattr(hooks, "guard_filter_fn", None)
            if fn is not None:
                yield fn
    apply_model = getattr(kmodel, "apply_model", None)
    for cell in getattr(apply_model, "__closure__", None) or ():
        with contextlib.suppress(ValueError):  # an empty cell
            value = cell.cell_contents
            options = value.get("options") if isinstance(value, dict) else None
            if isinstance(options, dict) and options.get(PRESET) is not None:
                yield options[PRESET]


def _drops_patch_guards(guard_filter: Any) -> bool:
    """Whether ``guard_filter`` drops a guard on ``transformer_options['patches_replace']``."""
    try:
        kept = list(guard_filter([_PATCH_GUARD]))
    except Exception:  # a filter that cannot be asked: assume the worst
        return True
    return not (len(kept) == 1 and bool(kept[0]))
