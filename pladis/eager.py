"""Keeping PLADIS's attention out of ``torch.compile`` graphs (diffusers, Forge/reForge hosts)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def not_traced(function: F) -> F:
    """``function`` made to run eagerly inside a compiled model (a graph break around it).

    Why: the entmax solvers use numpy, ``.item()``, data-dependent shapes and views that may fail
    (caught as ``RuntimeError`` in eager mode, raised differently under Dynamo's fake tensors), none of
    which Dynamo can trace; a compiled UNet (diffusers' ``torch.compile``, reForge's
    ``--torch-compile``) otherwise failed on its first call with PLADIS. Callers exclude only the
    PLADIS computation: the projections, the λ = 0 delegation and the pass-through outside the
    start/end window stay in the graph (``fullgraph=True`` cannot hold PLADIS).
    """
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    if disable is None:  # torch < 2.1
        try:
            from torch._dynamo import disable
        except ImportError:
            return function
    return disable(function)
