"""``pladis.entmax`` and its submodules as one namespace, for tests that read or patch solver internals."""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import pladis.entmax  # noqa: F401  (loads the package and its submodules)


class SolverNamespace:
    """Reads a name from whichever of ``pladis.entmax``'s modules binds it; sets it in all of them.

    Why: the solvers' modules import each other's helpers and constants by name, so a name patched in
    one module would not reach callers in another. ``monkeypatch.setattr`` on this object rebinds the
    name everywhere it is bound (and restores it everywhere), as on a single module. A name no module
    binds is an ``AttributeError``, so a patch cannot silently miss.
    """

    # No instance __dict__: monkeypatch then takes the value to restore from getattr, not from it.
    __slots__ = ("_modules",)

    def __init__(self) -> None:
        names = sorted(
            name for name in sys.modules if name == "pladis.entmax" or name.startswith("pladis.entmax.")
        )
        object.__setattr__(self, "_modules", tuple(sys.modules[name] for name in names))

    def _holders(self, name: str) -> list[ModuleType]:
        return [module for module in self._modules if name in vars(module)]

    def __getattr__(self, name: str) -> Any:
        holders = self._holders(name)
        if not holders:
            raise AttributeError(f"no module of pladis.entmax binds {name!r}")
        return getattr(holders[0], name)

    def __setattr__(self, name: str, value: Any) -> None:
        holders = self._holders(name)
        if not holders:
            raise AttributeError(f"no module of pladis.entmax binds {name!r}")
        for module in holders:
            setattr(module, name, value)


def solver_namespace() -> SolverNamespace:
    """A :class:`SolverNamespace` over the modules loaded now."""
    return SolverNamespace()
