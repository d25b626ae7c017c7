"""Layer selection on the real SD1.5 / SD2.1 / SDXL base / SDXL refiner UNet topologies.

The UNets are built on the ``meta`` device (no weights, no download, no memory), with the
architecture fields of each model's published ``unet/config.json``. The SDXL count reproduces the
official PLADIS choice: 60 of the 70 attn2 processors (down 24 + up 36, mid 10 excluded).
"""

from __future__ import annotations

import pytest
import torch

from pladis.diffusers import apply_pladis

_SD_BLOCKS = {
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
}
CONFIGS = {
    "sd15": {**_SD_BLOCKS, "attention_head_dim": 8, "cross_attention_dim": 768},
    "sd21": {
        **_SD_BLOCKS,
        "attention_head_dim": (5, 10, 20, 20),
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
    },
    "sdxl_base": {
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (320, 640, 1280),
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20),
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
    "sdxl_refiner": {
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (384, 768, 1536, 1536),
        "transformer_layers_per_block": 4,
        "attention_head_dim": (6, 12, 24, 24),
        "cross_attention_dim": 1280,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2560,
    },
}
# attn2 processors per group: (down, mid, up)
EXPECTED = {"sd15": (6, 1, 9), "sd21": (6, 1, 9), "sdxl_base": (24, 10, 36), "sdxl_refiner": (16, 4, 24)}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_default_layers_cover_down_and_up_attn2_only(name):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(layers_per_block=2, **CONFIGS[name])
    down, mid, up = EXPECTED[name]
    before = dict(unet.attn_processors)
    assert sum(key.endswith(".attn2.processor") for key in before) == down + mid + up

    with apply_pladis(unet) as handle:
        assert handle.counts == {"down": down, "up": up}
        during = unet.attn_processors
        changed = sorted(key for key in before if during[key] is not before[key])
        assert changed == sorted(f"{n}.processor" for n in handle.names)
        assert all(".attn2." in key and not key.startswith("mid_block.") for key in changed)
    with apply_pladis(unet, layers="all") as handle:
        assert handle.counts == {"down": down, "mid": mid, "up": up}
    assert all(unet.attn_processors[key] is before[key] for key in before)
