"""Forge Neo's ``guard_filter_fn`` torch.compile preset, under which PLADIS leaves SD/SDXL UNets alone.

Neo's built-in compile extension (``extensions-builtin/sd_forge_compile``) offers a preset that
compiles the diffusion model with a guard filter dropping every guard whose name contains
``transformer_options`` (taken from ComfyUI). The UNet's attn2 patch lookup reads that dict, so its
outcome is baked into the compiled code without a guard. PLADIS's replacement leaves the graph (a
graph break), and the code after the break is shared by the transformer blocks, so what was traced
for the first patched block was reused for the others. Measured on the stand-ins (eager and inductor
backends): PLADIS set for the down layers ran on every layer, mid included; a change of Layers or
turning PLADIS on had no effect in later generations, and turning it off raised ``KeyError('attn2')``.
Other presets keep their guards, and their compiled code is not shared with this preset's.

Flux is not affected: its attention is a module global, whose guard stays.

How the preset is recognised on the ``KModel`` (Neo's compile script): ``_torch_compile_config ==
("guard_filter_fn",)``; in earlier revisions ``_compile_config``, the ``torch.compile`` arguments,
whose ``options`` dict ``torch.compile`` empties of ``guard_filter_fn`` (``backend="inductor"``,
``dynamic=False``, no ``mode``: no other preset has that).
"""

from __future__ import annotations

from typing import Any

PRESET = "guard_filter_fn"

SKIPPED = (
    "PLADIS is off for this UNet: Forge's Torch Compile preset 'guard_filter_fn' compiles without the "
    "guards on attention patches, so PLADIS would run on layers it is not set for and miss later "
    "changes; choose another preset (e.g. 'dynamic') or 'Disable' to use PLADIS"
)


def guard_filtered(kmodel: Any) -> bool:
    """Whether ``kmodel`` is compiled by Neo's compile extension with its ``guard_filter_fn`` preset."""
    config = getattr(kmodel, "_torch_compile_config", None)
    if isinstance(config, tuple):
        return config == (PRESET,)
    config = getattr(kmodel, "_compile_config", None)
    if not isinstance(config, dict):
        return False
    options = config.get("options") or {}
    return (
        config.get("backend") == "inductor"
        and config.get("dynamic") is False
        and "mode" not in config
        and isinstance(options, dict)
        and set(options) <= {PRESET}
    )
