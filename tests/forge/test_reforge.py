"""reForge (ldm_patched UNet): same patch protocol, its own attention function and schedule object."""

import pytest
import torch

from pladis.params import PladisParams


@pytest.mark.parametrize("precision", [None, torch.float32])
def test_reforge_pass_through_calls_optimized_attention_with_attn_precision(
    forge_host, monkeypatch, precision
):
    # The block's own precision (float32 where the model config upcasts attention) reaches the host
    # function outside the window, as stock CrossAttention.forward passes it.
    import ldm_patched.ldm.modules.attention as attention

    from pladis.hosts.forge import apply, installed_sites

    for cls in (attention.CrossAttention, attention.BasicTransformerBlock):
        monkeypatch.setattr(cls, "attn_precision", precision)
    tk = forge_host
    original = tk.reforge_patcher()
    schedule = original.model.model_sampling
    p = tk.processing(original)
    apply(p, PladisParams(enabled=True, start=0.5))
    assert schedule.calls == [0.5]
    patched = p.sd_model.forge_objects.unet
    assert {fn.pladis_settings["host"] for fn in installed_sites(patched).values()} == {"reforge"}

    calls = []
    real = attention.optimized_attention

    def spy(q, k, v, heads, **kwargs):
        calls.append(kwargs)
        return real(q, k, v, heads, **kwargs)

    monkeypatch.setattr(attention, "optimized_attention", spy)
    g = torch.Generator().manual_seed(0)
    x, cond, uncond = (
        torch.randn(2, 6, 8, generator=g),
        torch.randn(2, 4, 6, generator=g),
        torch.randn(2, 4, 6, generator=g),
    )
    outside = schedule.percent_to_sigma(0.25)
    got = tk.denoise(patched, x, outside, cond, uncond)
    stock = tk.denoise(original, x, outside, cond, uncond)
    assert all(torch.equal(a, b) for a, b in zip(got, stock, strict=True))
    # stock: 2 (attn1 + attn2) per block × 8 blocks; patched: the same count, 6 of them from our pass-through
    assert len(calls) == 32 and all(c == {"attn_precision": precision} for c in calls)

    # Inside the window: PLADIS itself (α 1.5, λ 2 on down+up), as the float64 oracle computes it.
    inside = schedule.percent_to_sigma(0.75)
    got = tk.denoise(patched, x, inside, cond, uncond)
    expected = tk.denoise(
        tk.with_oracle(original, tk.sites_of("down", "up"), 1.5, 2.0), x, inside, cond, uncond
    )
    stock = tk.denoise(original, x, inside, cond, uncond)
    for g, e, s in zip(got, expected, stock, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
        assert (g - s).abs().max() > 1e-3


def test_pass_through_on_pre_august_2024_forge_omits_attn_precision(forge_host, monkeypatch):
    # Old Forge routes through ldm_patched like reForge, but its optimized_attention is
    # (q, k, v, heads, mask=None) and its blocks put no attn_precision in extra_options.
    import ldm_patched.ldm.modules.attention as attention

    from pladis.hosts.forge_attn2 import REFORGE_HOST, host_attention

    calls = []

    def old_forge_attention(q, k, v, heads, mask=None):
        calls.append(heads)
        return q + 1

    monkeypatch.setattr(attention, "optimized_attention", old_forge_attention)
    q = torch.zeros(1, 2, 4)
    assert torch.equal(host_attention(REFORGE_HOST, q, q, q, {"n_heads": 2}), q + 1)
    assert calls == [2]


def test_unknown_model_is_left_alone(forge_host):
    from pladis.hosts.forge import apply

    tk = forge_host
    patcher = tk.unet_patcher()
    patcher.model.diffusion_model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    p = tk.processing(patcher)
    apply(p, PladisParams(enabled=True))
    assert p.sd_model.forge_objects.unet is patcher
