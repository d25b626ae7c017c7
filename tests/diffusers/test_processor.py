"""PladisAttnProcessor on single diffusers ``Attention`` modules that use every optional step.

The module has a spatial norm, group norm, cross norm, q/k norms, a residual connection, an output
rescale and 4-D input, so the processor's pre/post steps are checked against the stock processor
(α = 1 makes PLADIS weights plain softmax whatever λ) and against the independent oracle.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pladis.diffusers import PladisAttnProcessor, apply_pladis

TOL = {"rtol": 1e-4, "atol": 1e-5}
BATCH, CHANNELS, SIDE, TOKENS = 2, 32, 4, 154  # SpatialNorm's GroupNorm needs 32 | CHANNELS


def _attention(**overrides):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(11)
    options = {
        "query_dim": CHANNELS,
        "cross_attention_dim": 32,
        "heads": 2,
        "dim_head": 8,
        "bias": True,
        "residual_connection": True,
        "rescale_output_factor": 2.0,
        "norm_num_groups": 4,
        "spatial_norm_dim": 6,
        "cross_attention_norm": "layer_norm",
        "qk_norm": "layer_norm",
    }
    options.update(overrides)
    return Attention(**options).eval()


def _call(attn, processor, *, cross=True, mask=None):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(BATCH, CHANNELS, SIDE, SIDE, generator=gen)
    temb = torch.randn(BATCH, 6, 2, 2, generator=gen)  # spatial-norm conditioning (VAE-decoder style)
    context = torch.randn(BATCH, TOKENS, 32, generator=gen) if cross else None
    attn.set_processor(processor)
    with torch.no_grad():
        return attn(hidden, encoder_hidden_states=context, attention_mask=mask, temb=temb)


def _masks():
    additive = torch.zeros(BATCH, 1, TOKENS)
    additive[0, :, 90:] = -10000.0
    additive[1, :, 5:40] = -10000.0
    keep = torch.rand(BATCH, SIDE * SIDE, TOKENS, generator=torch.Generator().manual_seed(5)) > 0.5
    keep[..., 0] = True  # no fully masked rows (stock SDPA would give NaN there)
    return {"none": None, "additive": additive, "bool_per_query": keep}


@pytest.mark.parametrize(
    ("mask_kind", "cross"), [("none", True), ("additive", True), ("bool_per_query", True), ("none", False)]
)
def test_alpha_one_reproduces_stock_pre_and_post_processing(mask_kind, cross):
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn = _attention() if cross else _attention(cross_attention_dim=None, cross_attention_norm=None)
    mask = _masks()[mask_kind]
    stock = AttnProcessor2_0()
    expected = _call(attn, stock, cross=cross, mask=mask)
    ours = _call(attn, PladisAttnProcessor(stock, alpha=1.0, lam=3.0), cross=cross, mask=mask)
    assert ours.shape == expected.shape == (BATCH, CHANNELS, SIDE, SIDE)
    torch.testing.assert_close(ours, expected, **TOL)


@pytest.mark.parametrize("mask_kind", ["none", "additive", "bool_per_query"])
@pytest.mark.parametrize(("alpha", "lam"), [(1.5, 2.0), (2.0, 0.5)])
def test_module_matches_oracle(kit, mask_kind, alpha, lam):
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn = _attention()
    mask = _masks()[mask_kind]
    stock = _call(attn, AttnProcessor2_0(), mask=mask)
    ours = _call(attn, PladisAttnProcessor(AttnProcessor2_0(), alpha=alpha, lam=lam), mask=mask)
    expected = _call(attn, kit.OracleProcessor(alpha, lam), mask=mask)
    assert (expected - stock).abs().max() > 1e-3
    torch.testing.assert_close(ours, expected, **TOL)


def test_lambda_zero_hands_the_call_to_the_previous_processor():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    attn = _attention()
    mask = _masks()["additive"]
    for stock in (AttnProcessor2_0(), AttnProcessor()):
        expected = _call(attn, stock, mask=mask)
        assert torch.equal(_call(attn, PladisAttnProcessor(stock, lam=0.0), mask=mask), expected)


def test_processor_validates_its_parameters():
    with pytest.raises(ValueError, match="PLADIS alpha"):
        PladisAttnProcessor(None, alpha=0.5)
    with pytest.raises(ValueError, match="PLADIS lambda"):
        PladisAttnProcessor(None, lam=float("nan"))


def test_self_attention_attn2_is_not_touched():
    """attn2 built without cross_attention_dim (double self-attention blocks) is self-attention."""
    from diffusers.models.attention import BasicTransformerBlock

    model = torch.nn.Module()
    model.down_blocks = torch.nn.ModuleList(
        [
            BasicTransformerBlock(16, 2, 8, cross_attention_dim=None, double_self_attention=True),
            BasicTransformerBlock(16, 2, 8, cross_attention_dim=32),
        ]
    )
    before = model.down_blocks[0].attn2.processor
    with apply_pladis(model) as handle:
        assert handle.names == ["down_blocks.1.attn2"]
        assert model.down_blocks[0].attn2.processor is before


def test_pladis_does_not_import_diffusers_at_import_time():
    import subprocess
    import sys

    code = "import sys, pladis, pladis.diffusers; assert 'diffusers' not in sys.modules, 'imported'"
    # From the repository root, so the child imports this tree, not an installed copy.
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_keyword_construction_and_defaults_give_a_pladis_processor(kit):
    # Only a call with no arguments at all is diffusers' unload rebuild (a stock processor).
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn = _attention()
    by_keyword = PladisAttnProcessor(previous=AttnProcessor2_0(), alpha=2.0, lam=0.5)
    assert isinstance(by_keyword, PladisAttnProcessor) and (by_keyword.alpha, by_keyword.lam) == (2.0, 0.5)
    torch.testing.assert_close(_call(attn, by_keyword), _call(attn, kit.OracleProcessor(2.0, 0.5)), **TOL)

    default = PladisAttnProcessor(AttnProcessor2_0())
    assert (default.alpha, default.lam) == (1.5, 2.0)  # README: alpha=1.5, lam=2.0
    assert repr(default) == "PladisAttnProcessor(alpha=1.5, lam=2)"
    torch.testing.assert_close(_call(attn, default), _call(attn, kit.OracleProcessor(1.5, 2.0)), **TOL)


def test_without_a_previous_processor_lambda_zero_is_plain_attention_and_text_is_used(kit):
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn = _attention()
    mask = _masks()["additive"]
    stock = _call(attn, AttnProcessor2_0(), mask=mask)
    torch.testing.assert_close(_call(attn, PladisAttnProcessor(None, lam=0.0), mask=mask), stock, **TOL)

    # An IP-Adapter-style (text, image-prompt states) context: standalone, only the text part counts.
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(BATCH, CHANNELS, SIDE, SIDE, generator=gen)
    temb = torch.randn(BATCH, 6, 2, 2, generator=gen)
    text = torch.randn(BATCH, TOKENS, 32, generator=gen)
    image = torch.randn(BATCH, 4, 32, generator=gen)
    attn.set_processor(PladisAttnProcessor(None, alpha=1.5, lam=2.0))
    with torch.no_grad():
        got = attn(hidden, encoder_hidden_states=(text, [image]), temb=temb)
    attn.set_processor(kit.OracleProcessor(1.5, 2.0))
    with torch.no_grad():
        expected = attn(hidden, encoder_hidden_states=text, temb=temb)
    torch.testing.assert_close(got, expected, **TOL)


def test_output_dropout_is_applied_like_the_stock_processor():
    # In train mode (still under no_grad) the output projection's dropout acts: same seed, same mask.
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn = _attention(dropout=0.5).train()
    torch.manual_seed(21)
    expected = _call(attn, AttnProcessor2_0())
    torch.manual_seed(21)
    ours = _call(attn, PladisAttnProcessor(AttnProcessor2_0(), alpha=1.0, lam=3.0))
    attn.eval()
    assert (_call(attn, AttnProcessor2_0()) - expected).abs().max() > 1e-3  # the dropout did something
    torch.testing.assert_close(ours, expected, **TOL)


def test_module_scale_is_honoured_when_built_without_scale_qk():
    # scale_qk=False gives attn.scale = 1.0, which the stock AttnProcessor uses (α = 1: plain softmax).
    # That processor applies no q/k norms, so the module is built without them.
    from diffusers.models.attention_processor import AttnProcessor

    attn = _attention(scale_qk=False, qk_norm=None)
    assert attn.scale == 1.0
    expected = _call(attn, AttnProcessor())
    torch.testing.assert_close(
        _call(attn, PladisAttnProcessor(AttnProcessor(), alpha=1.0, lam=3.0)), expected, **TOL
    )
