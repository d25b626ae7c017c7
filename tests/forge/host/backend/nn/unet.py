"""Stand-in for Forge ``backend/nn/unet.py``: a tiny UNet with the real module names and attn2 protocol.

Module paths match Forge (``input_blocks.{id}.1.transformer_blocks.{k}``,
``middle_block.1.transformer_blocks.{k}``, ``output_blocks.{id}.1.transformer_blocks.{k}``) and
``BasicTransformerBlock`` follows Forge's attn2 path: look up ``patches_replace["attn2"]`` with the
3-tuple ``(block, number, block_index)`` first, then the 2-tuple ``block``; if found, project q/k/v
and call ``patch(q, k, v, extra_options)``, then ``to_out``; else run ``attn2`` (which calls the
``attention_function`` imported *by name*, as Forge does). ``patches["attn2_patch"]`` run before
and ``patches["attn2_output_patch"]`` after, as in Forge. Tokens stand in for feature maps.
"""

import torch
from torch import nn

from backend.attention import attention_function


class CrossAttention(nn.Module):
    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):  # noqa: B006
        q = self.to_q(x)
        context = x if context is None else context
        k = self.to_k(context)
        v = self.to_v(context if value is None else value)
        return self.to_out(self.attend(q, k, v, mask))

    def attend(self, q, k, v, mask):
        return attention_function(q, k, v, self.heads, mask)


class BasicTransformerBlock(nn.Module):
    attention_class = CrossAttention

    def __init__(self, dim, n_heads, d_head, context_dim=None):
        super().__init__()
        self.attn1 = self.attention_class(dim, None, n_heads, d_head)
        self.attn2 = self.attention_class(dim, context_dim, n_heads, d_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Linear(dim, dim)
        self.n_heads = n_heads
        self.d_head = d_head

    def extra_options(self, transformer_options):
        # every key but "patches" and "patches_replace" (forge.md §2.3, Forge unet.py:185-198)
        extra = {k: v for k, v in transformer_options.items() if k not in ("patches", "patches_replace")}
        extra["n_heads"] = self.n_heads
        extra["dim_head"] = self.d_head
        return extra

    def forward(self, x, context=None, transformer_options={}):  # noqa: B006
        extra_options = self.extra_options(transformer_options)
        replace = transformer_options.get("patches_replace", {})
        block = transformer_options.get("block", None)
        block_index = transformer_options.get("block_index", 0)
        transformer_block = (block[0], block[1], block_index) if block is not None else None

        x = x + self.attn1(self.norm1(x))

        n = self.norm2(x)
        # As Forge's _forward: pre-projection attn2_patch (ControlLLLite, Forge Couple), then the
        # replacement on to_q/to_k/to_v of its outputs (value_attn2 for v), then attn2_output_patch.
        patches = transformer_options.get("patches", {})
        context_attn2, value_attn2 = context, None
        if "attn2_patch" in patches:
            value_attn2 = context_attn2
            for patch in patches["attn2_patch"]:
                n, context_attn2, value_attn2 = patch(n, context_attn2, value_attn2, extra_options)
        attn2_replace = replace.get("attn2", {})
        key = transformer_block if transformer_block in attn2_replace else block
        if key in attn2_replace:
            if value_attn2 is None:
                value_attn2 = context_attn2
            q = self.attn2.to_q(n)
            k = self.attn2.to_k(context_attn2)
            v = self.attn2.to_v(value_attn2)
            n = self.attn2.to_out(attn2_replace[key](q, k, v, extra_options))
        else:
            n = self.attn2(n, context=context_attn2, value=value_attn2, transformer_options=extra_options)
        for patch in patches.get("attn2_output_patch", []):
            n = patch(n, extra_options)
        x = x + n
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    block_class = BasicTransformerBlock

    def __init__(self, dim, n_heads, d_head, depth, context_dim):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(
            [self.block_class(dim, n_heads, d_head, context_dim) for _ in range(depth)]
        )

    def forward(self, x, context, transformer_options):
        for i, block in enumerate(self.transformer_blocks):
            transformer_options["block_index"] = i
            x = block(x, context=context, transformer_options=transformer_options)
        return x


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, context, transformer_options):
        for layer in self:
            if isinstance(layer, SpatialTransformer):
                x = layer(x, context, transformer_options)
                transformer_options["transformer_index"] = transformer_options.get("transformer_index", 0) + 1
            else:
                x = layer(x)
        return x


class IntegratedUNet2DConditionModel(nn.Module):
    """SDXL-shaped in miniature: input 1 (depth 1), 2 (depth 2); middle (depth 2); output 0 (2), 1 (1)."""

    transformer_class = SpatialTransformer

    def __init__(self, dim=8, n_heads=2, d_head=4, context_dim=6):
        super().__init__()

        def st(depth):
            return self.transformer_class(dim, n_heads, d_head, depth, context_dim)

        self.input_blocks = nn.ModuleList(
            [
                TimestepEmbedSequential(nn.Linear(dim, dim)),
                TimestepEmbedSequential(nn.Linear(dim, dim), st(1)),
                TimestepEmbedSequential(nn.Linear(dim, dim), st(2)),
            ]
        )
        self.middle_block = TimestepEmbedSequential(nn.Linear(dim, dim), st(2), nn.Linear(dim, dim))
        self.output_blocks = nn.ModuleList(
            [
                TimestepEmbedSequential(nn.Linear(dim, dim), st(2)),
                TimestepEmbedSequential(nn.Linear(dim, dim), st(1)),
                TimestepEmbedSequential(nn.Linear(dim, dim)),
            ]
        )

    def forward(self, x, timesteps=None, context=None, transformer_options={}, **kwargs):  # noqa: B006
        transformer_options["original_shape"] = list(x.shape)
        transformer_options["transformer_index"] = 0
        for i, block in enumerate(self.input_blocks):
            transformer_options["block"] = ("input", i)
            x = block(x, context, transformer_options)
        transformer_options["block"] = ("middle", 0)
        x = self.middle_block(x, context, transformer_options)
        for i, block in enumerate(self.output_blocks):
            transformer_options["block"] = ("output", i)
            x = block(x, context, transformer_options)
        return torch.tanh(x)


EXPECTED_SITES = {
    "down": [("input", 1, 0), ("input", 2, 0), ("input", 2, 1)],
    "mid": [("middle", 0, 0), ("middle", 0, 1)],
    "up": [("output", 0, 0), ("output", 0, 1), ("output", 1, 0)],
}
"""The attn2 patch keys of this stand-in, per PLADIS layer group (the tests' ground truth)."""
