"""PLADIS: sparse (α-entmax) cross-attention blend for diffusion UNets.

Host-independent core: imports torch and numpy only. WebUI adapters live in ``pladis.hosts`` and import
host modules lazily, inside functions.
"""

from .attention import pladis_attention, pladis_attention_packed, pladis_weights
from .entmax import entmax
from .params import DEFAULT_LAYERS, LAYER_GROUPS, PladisParams, params_from_mapping, parse_params

__all__ = [
    "DEFAULT_LAYERS",
    "LAYER_GROUPS",
    "PladisParams",
    "entmax",
    "params_from_mapping",
    "parse_params",
    "pladis_attention",
    "pladis_attention_packed",
    "pladis_weights",
]
__version__ = "0.1.0"
