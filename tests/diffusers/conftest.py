"""Fixtures for the diffusers adapter: tiny random UNets built from config and an independent oracle.

The oracle processor recomputes PLADIS from the module's own projections with ``torch.softmax`` and
the ``entmax`` package in float64; it shares no code with ``pladis``. Tests install it with diffusers'
own ``set_attn_processor`` on processor names chosen by string matching, so layer selection is
checked independently too.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch

pytest.importorskip("diffusers")
entmax_pkg = pytest.importorskip("entmax")

CROSS_DIM = 32
TEXT_EMBED_DIM = 8
TIME_EMBED_DIM = 4
PREFIX_OF_GROUP = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}


def sparse_map(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """α-entmax over the last dim with the reference ``entmax`` package."""
    if alpha == 1.5:
        return entmax_pkg.entmax15(scores, dim=-1)
    if alpha == 2.0:
        return entmax_pkg.sparsemax(scores, dim=-1)
    return entmax_pkg.entmax_bisect(scores, alpha=alpha, dim=-1, n_iter=200)


class OracleProcessor:
    """Independent PLADIS attention: float64, explicit softmax/entmax blend, module norms applied.

    ``attention_mask`` is used as diffusers hands it to the module: an additive bias or a boolean
    keep-mask shaped ``(B, 1 or N, K)``.
    """

    def __init__(self, alpha: float, lam: float) -> None:
        self.alpha, self.lam = alpha, lam
        self.calls = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        self.calls += 1
        residual = hidden_states
        x = hidden_states
        if attn.spatial_norm is not None:
            x = attn.spatial_norm(x, temb)
        image = x.ndim == 4
        if image:
            b, c, h, w = x.shape
            x = x.reshape(b, c, h * w).permute(0, 2, 1)
        if attn.group_norm is not None:
            x = attn.group_norm(x.permute(0, 2, 1)).permute(0, 2, 1)
        if encoder_hidden_states is None:
            context = x
        elif attn.norm_cross is not None:
            context = attn.norm_cross(encoder_hidden_states)  # LayerNorm in these tests
        else:
            context = encoder_hidden_states
        heads = attn.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3)

        q, k, v = split(attn.to_q(x)), split(attn.to_k(context)), split(attn.to_v(context))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        q, k, v = q.double(), k.double(), v.double()
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if attention_mask is not None:
            bias = attention_mask.unsqueeze(1)  # (B, 1, 1 or N, K)
            if bias.dtype == torch.bool:
                scores = scores.masked_fill(~bias, float("-inf"))
            else:
                scores = scores + bias.double()
        weights = (1 - self.lam) * torch.softmax(scores, dim=-1) + self.lam * sparse_map(scores, self.alpha)
        out = (weights @ v).permute(0, 2, 1, 3).reshape(q.shape[0], q.shape[2], -1).to(x.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if image:
            out = out.permute(0, 2, 1).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_oracle(unet, groups, alpha: float, lam: float) -> OracleProcessor:
    """Put one oracle on every ``…attn2.processor`` whose name starts with a chosen group's prefix."""
    oracle = OracleProcessor(alpha, lam)
    prefixes = tuple(PREFIX_OF_GROUP[g] for g in groups)
    processors = dict(unet.attn_processors)
    for name in processors:
        if name.endswith(".attn2.processor") and name.startswith(prefixes):
            processors[name] = oracle
    unet.set_attn_processor(processors)
    return oracle


@pytest.fixture(autouse=True)
def _one_thread():
    """2 shared CPU cores: keep each test on one thread and deterministic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_sd_unet(**config):
    """SD1.5/2.x-shaped: cross-attn down block, mid block, cross-attn up block (1+1+2 attn2);
    ``config`` overrides or adds ``UNet2DConditionModel`` arguments."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(1234)
    return UNet2DConditionModel(
        **{
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 1,
            "block_out_channels": (16, 32),
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": CROSS_DIM,
            "attention_head_dim": 2,
            "norm_num_groups": 8,
            **config,
        }
    ).eval()


def build_sdxl_unet(**config):
    """SDXL-shaped: no attention in the first level, transformer depth per level, text_time embeds;
    ``config`` overrides or adds ``UNet2DConditionModel`` arguments.

    attn2 counts: down 1+2 = 3, mid 2, up 4+2 = 6.
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(4321)
    return UNet2DConditionModel(
        **{
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 1,
            "block_out_channels": (16, 32, 32),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 1, 2),
            "cross_attention_dim": CROSS_DIM,
            "attention_head_dim": (2, 2, 4),
            "norm_num_groups": 8,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": TIME_EMBED_DIM,
            "projection_class_embeddings_input_dim": TEXT_EMBED_DIM + 6 * TIME_EMBED_DIM,
            **config,
        }
    ).eval()


_BUILDERS = {"sd": build_sd_unet, "sdxl": build_sdxl_unet}
_CACHE: dict[str, torch.nn.Module] = {}


def make_unet(kind: str, **config):
    """A fresh copy of the cached tiny UNet (tests mutate processors and dtypes); with ``config``
    (``UNet2DConditionModel`` arguments over the kind's), a new one, not cached."""
    if config:
        return _BUILDERS[kind](**config)
    if kind not in _CACHE:
        _CACHE[kind] = _BUILDERS[kind]()
    return copy.deepcopy(_CACHE[kind])


def make_inputs(kind: str, batch: int = 1, tokens: int = 77, dtype=torch.float32, seed: int = 7):
    """Positional and keyword UNet inputs; SDXL also gets pooled text embeds and time ids."""
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=gen).to(dtype)
    context = torch.randn(batch, tokens, CROSS_DIM, generator=gen).to(dtype)
    kwargs = {}
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, TEXT_EMBED_DIM, generator=gen).to(dtype),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch).to(dtype),
        }
    return sample, context, kwargs


def run_unet(unet, sample, context, kwargs, **extra) -> torch.Tensor:
    with torch.no_grad():
        return unet(sample, 500, encoder_hidden_states=context, **kwargs, **extra).sample


@pytest.fixture
def kit():
    """The helpers above, handed to tests (conftest is not importable under importlib mode)."""
    return types.SimpleNamespace(
        OracleProcessor=OracleProcessor,
        install_oracle=install_oracle,
        make_unet=make_unet,
        make_inputs=make_inputs,
        run_unet=run_unet,
        CROSS_DIM=CROSS_DIM,
    )
