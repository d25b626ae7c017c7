"""Stand-in ldm ``UNetModel``: the upstream module tree names on a token-sequence toy network.

``input_blocks`` / ``middle_block`` / ``output_blocks`` are ``TimestepEmbedSequential`` lists whose
attention entries are ``SpatialTransformer``s, so attn2 names read e.g.
``input_blocks.1.1.transformer_blocks.0.attn2`` like SD1.x.
"""

import torch
from torch import nn

from ldm.modules.attention import SpatialTransformer


class ResBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.in_layers = nn.Sequential(nn.LayerNorm(channels), nn.SiLU(), nn.Linear(channels, channels))
        self.emb_layers = nn.Linear(1, channels)

    def forward(self, x, emb):
        return x + self.in_layers(x) + self.emb_layers(emb)[:, None, :]


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _transformer(channels, heads, dim_head, depth, context_dim):
    return SpatialTransformer(channels, heads, dim_head, depth=depth, context_dim=context_dim)


class UNetModel(nn.Module):
    """Down: 2 attention blocks, mid: 1, up: 3 (depth per block from ``transformer_depth``)."""

    def __init__(self, channels=32, heads=4, dim_head=8, context_dim=24, transformer_depth=1):
        super().__init__()
        st = lambda: _transformer(channels, heads, dim_head, transformer_depth, context_dim)  # noqa: E731
        self.input_blocks = nn.ModuleList(
            [
                TimestepEmbedSequential(nn.Linear(channels, channels)),
                TimestepEmbedSequential(ResBlock(channels), st()),
                TimestepEmbedSequential(ResBlock(channels), st()),
                TimestepEmbedSequential(ResBlock(channels)),
            ]
        )
        self.middle_block = TimestepEmbedSequential(ResBlock(channels), st(), ResBlock(channels))
        self.output_blocks = nn.ModuleList(
            [
                TimestepEmbedSequential(ResBlock(channels)),
                TimestepEmbedSequential(ResBlock(channels), st()),
                TimestepEmbedSequential(ResBlock(channels), st()),
                TimestepEmbedSequential(ResBlock(channels), st()),
            ]
        )
        self.out = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, channels))

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        emb = timesteps.reshape(-1, 1).to(x.dtype).expand(x.shape[0], 1)
        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(h + hs.pop(), emb, context)
        return self.out(h)


_ = torch
