"""Stand-in sgm ``UNetModel``: same container names as SDXL, several transformer blocks per level."""

from torch import nn

from sgm.modules.attention import SpatialTransformer


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


class UNetModel(nn.Module):
    """SDXL-like: no attention at the first level, depth 2 below; mid depth 2; up mirrors down."""

    def __init__(self, channels=32, heads=2, dim_head=16, context_dim=40, depth=2):
        super().__init__()

        def st():
            return SpatialTransformer(channels, heads, dim_head, depth=depth, context_dim=context_dim)

        self.input_blocks = nn.ModuleList(
            [
                TimestepEmbedSequential(nn.Linear(channels, channels)),
                TimestepEmbedSequential(ResBlock(channels)),
                TimestepEmbedSequential(ResBlock(channels), st()),
            ]
        )
        self.middle_block = TimestepEmbedSequential(ResBlock(channels), st(), ResBlock(channels))
        self.output_blocks = nn.ModuleList(
            [
                TimestepEmbedSequential(ResBlock(channels), st()),
                TimestepEmbedSequential(ResBlock(channels), st()),
                TimestepEmbedSequential(ResBlock(channels)),
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
