"""Flux / Chroma on Forge: text-block PLADIS inside joint attention via a chained UNet wrapper."""

import pytest
import torch

from pladis.params import PladisParams

TEXT, IMAGE, HEADS = 3, 5, 2


def joint_inputs(seed=0, dim=8, batch=2):
    from backend.nn.flux import positions_to_pe

    g = torch.Generator().manual_seed(seed)
    length = TEXT + IMAGE
    q = torch.randn(batch, HEADS, length, dim, generator=g) * 2
    k = torch.randn(batch, HEADS, length, dim, generator=g) * 2
    v = torch.randn(batch, HEADS, length, dim, generator=g)
    ids = torch.cat(
        (torch.zeros(batch, TEXT), torch.arange(1, IMAGE + 1, dtype=torch.float32).expand(batch, IMAGE)), 1
    )
    return q, k, v, positions_to_pe(ids, dim)


def per_head(out, dim):
    b, length, _ = out.shape
    return out.reshape(b, length, HEADS, dim).transpose(1, 2)


def assert_matches_oracle(tk, out, q, k, v, pe, alpha=1.5, lam=2.0, atol=2e-5, rtol=1e-5):
    """``out`` (every row, text and image) equals the float64 oracle's joint weights applied to ``v``."""
    weights = tk.oracle_joint_weights(q.float(), k.float(), pe, TEXT, alpha, lam)
    torch.testing.assert_close(per_head(out, 8).double(), weights @ v.double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize(("alpha", "lam"), [(1.5, 2.0), (2.0, 1.0)])
def test_joint_attention_matches_the_official_flux_formulation(forge_host, alpha, lam):
    import backend.nn.flux as flux

    from pladis.hosts.flux import make_joint_attention

    q, k, v, pe = joint_inputs()
    out = make_joint_attention(flux.attention, TEXT, alpha, lam)(q, k, v, pe=pe)
    assert_matches_oracle(forge_host, out, q, k, v, pe, alpha, lam)
    stock = flux.attention(q, k, v, pe=pe)
    assert torch.equal(out[:, :TEXT], stock[:, :TEXT])  # text-query rows untouched
    assert (out[:, TEXT:] - stock[:, TEXT:]).abs().max() > 1e-2


def test_joint_attention_reads_pe_passed_by_position(forge_host):
    # The host's attention is called as the block called ours: a block passing pe by position gets
    # the same rotated-score blend as one passing pe=.
    import backend.nn.flux as flux

    from pladis.hosts.flux import make_joint_attention

    q, k, v, pe = joint_inputs()
    out = make_joint_attention(flux.attention, TEXT, 1.5, 2.0)(q, k, v, pe)
    assert_matches_oracle(forge_host, out, q, k, v, pe)


def test_joint_rows_still_sum_to_one_and_image_keys_keep_their_weight(forge_host):
    """With one-hot values (v_j = e_j) the attention output *is* the weight matrix."""
    import backend.nn.flux as flux

    from pladis.hosts.flux import make_joint_attention

    length = TEXT + IMAGE
    q, k, _, pe = joint_inputs(dim=length)
    v = torch.eye(length).expand(2, HEADS, length, length).contiguous()
    weights = per_head(make_joint_attention(flux.attention, TEXT, 1.5, 3.0)(q, k, v, pe=pe), length)
    dense = per_head(flux.attention(q, k, v, pe=pe), length)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, HEADS, length), atol=1e-5, rtol=0)
    torch.testing.assert_close(weights[:, :, TEXT:, TEXT:], dense[:, :, TEXT:, TEXT:], atol=1e-6, rtol=0)
    assert (weights[:, :, TEXT:, :TEXT] < -1e-3).any()  # λ > 1 extrapolates: negative text weights exist


def test_half_precision_is_corrected_in_float32_and_cast_back(forge_host):
    # Forge runs Flux in bf16: the correction is computed in float32 and the image rows go back in
    # the host's dtype (float32 rows would make the block's next projection a dtype error).
    import backend.nn.flux as flux

    from pladis.hosts.flux import make_joint_attention

    q, k, v, pe = joint_inputs()
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    out = make_joint_attention(flux.attention, TEXT, 1.5, 2.0)(q, k, v, pe=pe)
    assert out.dtype == torch.bfloat16
    assert_matches_oracle(forge_host, out, q, k, v, pe, atol=3e-2, rtol=2e-2)
    assert torch.equal(out[:, :TEXT], flux.attention(q, k, v, pe=pe)[:, :TEXT])


def test_the_correction_is_computed_in_chunks_of_image_queries(forge_host, monkeypatch):
    # At 1024² a joint map has ~4k image queries × 4.4k keys per head, so the logits are made a
    # chunk of image queries at a time: every chunk, the shorter last one too, gets its own rows.
    import backend.nn.flux as flux

    from pladis.hosts import flux as pladis_flux

    q, k, v, pe = joint_inputs()
    b, h, length, _ = q.shape
    monkeypatch.setattr(pladis_flux, "CHUNK_ELEMENTS", 2 * b * h * length)  # 5 queries: 2 + 2 + 1
    out = pladis_flux.make_joint_attention(flux.attention, TEXT, 1.5, 2.0)(q, k, v, pe=pe)
    assert_matches_oracle(forge_host, out, q, k, v, pe)


def test_lambda_zero_is_bit_identical(forge_host):
    import backend.nn.flux as flux

    from pladis.hosts.flux import make_joint_attention, make_wrapper

    q, k, v, pe = joint_inputs()
    assert torch.equal(
        make_joint_attention(flux.attention, TEXT, 1.5, 0.0)(q, k, v, pe=pe), flux.attention(q, k, v, pe=pe)
    )

    tk = forge_host
    patcher = tk.flux_patcher()
    x, context = torch.randn(2, IMAGE, 4), torch.randn(2, TEXT, 6)
    stock = tk.denoise(patcher, x, 0.5, context)[0]
    zero = patcher.clone()
    zero.set_model_unet_function_wrapper(
        make_wrapper(
            alpha=1.5, lam=0.0, sigma_hi=float("inf"), sigma_lo=float("-inf"), modules=("backend.nn.flux",)
        )
    )
    assert torch.equal(tk.denoise(zero, x, 0.5, context)[0], stock)


def oracle_attention(tk, text_len, alpha, lam):
    def attention(q, k, v, pe):
        weights = tk.oracle_joint_weights(q, k, pe, text_len, alpha, lam)
        out = weights @ v.double()
        b, h, length, d = out.shape
        return out.transpose(1, 2).reshape(b, length, h * d).to(q.dtype)

    return attention


@pytest.mark.parametrize("chroma", [False, True])
def test_generation_swaps_attention_only_during_the_call(forge_host, monkeypatch, chroma):
    import backend.nn.chroma
    import backend.nn.flux

    from pladis.hosts.forge import apply

    tk = forge_host
    module = backend.nn.chroma if chroma else backend.nn.flux
    other = backend.nn.flux if chroma else backend.nn.chroma
    original_attention, other_attention = module.attention, other.attention
    patcher = tk.flux_patcher(chroma=chroma)
    p = tk.processing(patcher)
    apply(p, PladisParams(enabled=True, alpha=1.5, lam=2.0))
    patched = p.sd_model.forge_objects.unet
    assert "model_function_wrapper" in patched.model_options and patcher.model_options == {
        "transformer_options": {}
    }

    x, context = torch.randn(2, IMAGE, 4), torch.randn(2, TEXT, 6)
    got = tk.denoise(patched, x, 0.5, context)[0]
    assert module.attention is original_attention and other.attention is other_attention
    stock = tk.denoise(patcher, x, 0.5, context)[0]
    assert (got - stock).abs().max() > 1e-3

    monkeypatch.setattr(module, "attention", oracle_attention(tk, TEXT, 1.5, 2.0))
    expected = tk.denoise(patcher, x, 0.5, context)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_attention_is_restored_when_the_model_call_raises(forge_host):
    import backend.nn.flux

    from pladis.hosts.forge import apply

    tk = forge_host
    patcher = tk.flux_patcher()
    seen = []

    def failing_wrapper(apply_model, args):
        seen.append(backend.nn.flux.attention)
        raise RuntimeError("interrupted")

    patcher.set_model_unet_function_wrapper(failing_wrapper)
    original_attention = backend.nn.flux.attention
    p = tk.processing(patcher)
    apply(p, PladisParams(enabled=True))
    with pytest.raises(RuntimeError, match="interrupted"):
        tk.denoise(p.sd_model.forge_objects.unet, torch.randn(1, IMAGE, 4), 0.5, torch.randn(1, TEXT, 6))
    assert seen and seen[0] is not original_attention  # it was swapped during the call ...
    assert backend.nn.flux.attention is original_attention  # ... and put back despite the exception
    assert patcher.model_options["model_function_wrapper"] is failing_wrapper


def test_existing_wrapper_is_chained_and_reapply_does_not_nest(forge_host):
    from pladis.hosts.flux import PRIOR
    from pladis.hosts.forge import apply

    tk = forge_host
    patcher = tk.flux_patcher()
    calls = []

    def tiled_diffusion_like(apply_model, args):
        calls.append(args["cond_or_uncond"])
        return apply_model(args["input"], args["timestep"], **args["c"]) * 0.5

    patcher.set_model_unet_function_wrapper(tiled_diffusion_like)
    p = tk.processing(patcher)
    apply(p, PladisParams(enabled=True))
    apply(p, PladisParams(enabled=True))  # hires fix calls the hook again
    wrapper = p.sd_model.forge_objects.unet.model_options["model_function_wrapper"]
    assert getattr(wrapper, PRIOR) is tiled_diffusion_like

    x, context = torch.randn(2, IMAGE, 4), torch.randn(2, TEXT, 6)
    got = tk.denoise(p.sd_model.forge_objects.unet, x, 0.5, context)[0]
    assert calls == [[0]]
    plain = tk.processing(tk.flux_patcher())
    apply(plain, PladisParams(enabled=True))
    torch.testing.assert_close(got, tk.denoise(plain.sd_model.forge_objects.unet, x, 0.5, context)[0] * 0.5)


def test_outside_the_window_nothing_is_swapped_and_output_is_stock(forge_host):
    import backend.nn.flux

    from pladis.hosts.forge import apply

    tk = forge_host
    patcher = tk.flux_patcher()
    p = tk.processing(patcher)
    apply(p, PladisParams(enabled=True, start=0.5, end=1.0))
    assert patcher.model.predictor.calls == [0.5]  # the host's own schedule gives sigma_hi = 0.5
    seen = []
    real = backend.nn.flux.attention

    def spy(q, k, v, pe):
        seen.append(True)
        return real(q, k, v, pe=pe)

    backend.nn.flux.attention = spy
    try:
        x, context = torch.randn(2, IMAGE, 4), torch.randn(2, TEXT, 6)
        got = tk.denoise(p.sd_model.forge_objects.unet, x, 0.75, context)[0]
        assert len(seen) == 4  # 2 double + 2 single blocks went through the unswapped function
        stock = tk.denoise(patcher, x, 0.75, context)[0]
        assert torch.equal(got, stock)
        seen.clear()
        inside = tk.denoise(p.sd_model.forge_objects.unet, x, 0.5, context)[0]
        assert len(seen) == 4  # inside, our replacement still gets the dense part from the host function
        assert (inside - tk.denoise(patcher, x, 0.5, context)[0]).abs().max() > 1e-3
    finally:
        backend.nn.flux.attention = real


def test_window_follows_a_schedule_patch_added_after_pladis(forge_host):
    # As for UNets (tests/forge/test_apply.py): the window is read on the schedule the loaded model
    # samples with. Start 0.5 is sigma 0.5 on Flux's own schedule, 0.9 on this one.
    from pladis.hosts.forge import apply

    class Shifted:
        def percent_to_sigma(self, percent):
            return 1.0 - percent / 5.0

    tk = forge_host
    patcher = tk.flux_patcher()
    p = tk.processing(patcher)
    apply(p, PladisParams(enabled=True, start=0.5, end=1.0))
    later = p.sd_model.forge_objects.unet.clone()
    later.add_object_patch("predictor", Shifted())
    x, context = torch.randn(2, IMAGE, 4), torch.randn(2, TEXT, 6)
    got = tk.denoise(later, x, 0.75, context)[0]  # inside (−inf, 0.9]; outside (−inf, 0.5]
    stock = tk.denoise(patcher, x, 0.75, context)[0]
    assert (got - stock).abs().max() > 1e-3


def test_joint_model_outside_forge_backend_is_left_alone(forge_host):
    """reForge's ldm_patched Flux has another layout (optional [img; txt] order): not patched."""
    from pladis.hosts.forge import apply

    tk = forge_host
    patcher = tk.flux_patcher()
    foreign = type("DoubleStreamBlock", (torch.nn.Module,), {"__module__": "ldm_patched.ldm.flux.layers"})
    patcher.model.diffusion_model.double_blocks[0] = foreign()
    p = tk.processing(patcher)
    apply(p, PladisParams(enabled=True))
    assert p.sd_model.forge_objects.unet is patcher
    assert patcher.model_options == {"transformer_options": {}}


def test_text_repeated_by_forges_batching_gives_the_prompt_alone(forge_host):
    """Chroma: a 3-token negative batched with a 6-token prompt is repeated ×2 by Forge. The change
    comes from the un-repeated text keys (α-entmax is not invariant to the repeat), with the text
    mass m over all keys as the host computes it; the other row is left as it is."""
    from pladis.hosts.flux import text_block_correction

    g = torch.Generator().manual_seed(0)
    b, h, d, n = 2, 2, 8, 5
    text = [torch.randn(1, h, 3, d, generator=g) * 2, torch.randn(1, h, 6, d, generator=g) * 2]
    values = [torch.randn(1, h, 3, d, generator=g), torch.randn(1, h, 6, d, generator=g)]
    kt = torch.cat((text[0].repeat(1, 1, 2, 1), text[1]))
    vt = torch.cat((values[0].repeat(1, 1, 2, 1), values[1]))
    ki, vi = torch.randn(b, h, n, d, generator=g) * 2, torch.randn(b, h, n, d, generator=g)
    q = torch.randn(b, h, 6 + n, d, generator=g) * 2
    k, v = torch.cat((kt, ki), 2), torch.cat((vt, vi), 2)
    got = text_block_correction(q, k, v, 6, 1.5, 2.0)
    want = []
    for row, (keys, vals) in enumerate(zip(text, values, strict=True)):
        logits = (q[row : row + 1, :, 6:] @ k[row : row + 1].transpose(-1, -2)).double() * d**-0.5
        mass = torch.softmax(logits, -1)[..., :6].sum(-1, keepdim=True)
        s = (q[row : row + 1, :, 6:] @ keys.transpose(-1, -2)) * d**-0.5
        change = forge_host.oracle_weights(s, 1.5, 2.0) - torch.softmax(s.double(), -1)
        want.append((mass * change) @ vals.double())
    want = torch.cat(want).transpose(1, 2).reshape(b, n, h * d)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_the_layers_option_does_not_apply_to_flux(forge_host):
    # Flux has no layer choice (every block is used), so no ticked group must not switch it off.
    from pladis.hosts.forge import apply

    tk = forge_host
    x, context = torch.randn(2, IMAGE, 4), torch.randn(2, TEXT, 6)
    outputs = []
    for layers in ((), ("mid",), ("down", "up")):
        p = tk.processing(tk.flux_patcher())
        apply(p, PladisParams(enabled=True, layers=layers))
        outputs.append(tk.denoise(p.sd_model.forge_objects.unet, x, 0.5, context)[0])
    stock = tk.denoise(tk.flux_patcher(), x, 0.5, context)[0]
    assert not torch.allclose(outputs[0], stock, atol=1e-4)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_forge_neo_signature_is_called_as_the_block_called_it(forge_host, monkeypatch):
    # Forge Neo's attention(q, k, v, pe, mask=None, transformer_options={}) is called with pe=, mask=
    # and transformer_options= keywords: the replacement forwards them (a (q, k, v, pe) signature
    # raised TypeError on every Neo step inside the window). transformer_options is the per-call dict
    # Forge's sampling built (a copy of model_options["transformer_options"] with cond_or_uncond,
    # sigmas, ...), handed down by KModel.apply_model, the model's forward and every block.
    import backend.nn.flux_neo as neo

    from pladis.hosts.forge import apply

    tk = forge_host
    host_attention = neo.attention
    patcher = tk.flux_patcher(neo=True)
    p = tk.processing(patcher)
    apply(p, PladisParams(enabled=True, alpha=1.5, lam=2.0))
    x, context = torch.randn(2, IMAGE, 4), torch.randn(2, TEXT, 6)
    got = tk.denoise(p.sd_model.forge_objects.unet, x, 0.5, context)[0]
    assert neo.attention is host_attention
    stock = tk.denoise(patcher, x, 0.5, context)[0]
    assert (got - stock).abs().max() > 1e-3

    oracle = oracle_attention(tk, TEXT, 1.5, 2.0)
    calls = []

    def neo_oracle(q, k, v, pe, mask=None, transformer_options={}):  # noqa: B006 (Neo's signature)
        calls.append((mask, transformer_options))
        return oracle(q, k, v, pe)

    monkeypatch.setattr(neo, "attention", neo_oracle)
    expected = tk.denoise(patcher, x, 0.5, context)[0]
    assert len(calls) == 4  # 2 double + 2 single blocks
    per_call = calls[0][1]
    assert "cond_or_uncond" in per_call and "sigmas" in per_call and per_call["block_type"] == "single"
    assert all(mask is None and options is per_call for mask, options in calls)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_forge_neo_hands_the_per_call_transformer_options_to_the_host_attention(forge_host, monkeypatch):
    # Neo's Flux passes the transformer_options dict KModel.apply_model received down to every
    # block, to attention(...) and on to attention_function(...): a back-end (or an extension's
    # "optimized_attention_override") reads it there. With PLADIS on, the host's functions must get
    # that same dict on every call, inside the PLADIS window (where the replacement calls the host
    # attention for the dense part) and outside it (where nothing is swapped).
    import backend.nn.flux_neo as neo

    from pladis.hosts.forge import apply

    tk = forge_host
    patcher = tk.flux_patcher(neo=True)
    p = tk.processing(patcher)
    apply(p, PladisParams(enabled=True, alpha=1.5, lam=2.0, start=0.5, end=1.0))
    unet = p.sd_model.forge_objects.unet
    sentinel = object()
    unet.model_options["transformer_options"]["optimized_attention_override"] = sentinel

    seen = {"apply_model": [], "attention": [], "attention_function": []}
    real_apply_model, real_attention, real_function = (
        unet.model.apply_model,
        neo.attention,
        neo.attention_function,
    )

    def apply_model(x, t, **kwargs):
        seen["apply_model"].append(kwargs.get("transformer_options"))
        return real_apply_model(x, t, **kwargs)

    def attention(q, k, v, pe, mask=None, transformer_options={}):  # noqa: B006 (Neo's signature)
        seen["attention"].append(transformer_options)
        return real_attention(q, k, v, pe, mask=mask, transformer_options=transformer_options)

    def attention_function(q, k, v, heads, mask=None, **kwargs):
        seen["attention_function"].append(kwargs.get("transformer_options"))
        return real_function(q, k, v, heads, mask=mask, **kwargs)

    monkeypatch.setattr(unet.model, "apply_model", apply_model)
    monkeypatch.setattr(neo, "attention", attention)
    monkeypatch.setattr(neo, "attention_function", attention_function)
    x, context = torch.randn(2, IMAGE, 4), torch.randn(2, TEXT, 6)
    outputs = {}
    for sigma in (0.75, 0.5):  # outside the window (sigma_hi = 0.5), then inside
        for calls in seen.values():
            calls.clear()
        outputs[sigma] = tk.denoise(unet, x, sigma, context)[0]
        assert neo.attention is attention
        for name in ("attention", "attention_function"):
            assert len(seen[name]) == 4, name  # 2 double + 2 single blocks
            got = [options.get("optimized_attention_override") is sentinel for options in seen[name]]
            assert got == [True] * 4, (sigma, name)
        [per_call] = seen["apply_model"]  # the very dict apply_model got, not a copy of it
        assert "cond_or_uncond" in per_call and all(
            options is per_call for name in ("attention", "attention_function") for options in seen[name]
        )
    stock = {sigma: tk.denoise(patcher, x, sigma, context)[0] for sigma in outputs}
    assert torch.equal(outputs[0.75], stock[0.75])
    assert (outputs[0.5] - stock[0.5]).abs().max() > 1e-3  # PLADIS did act inside the window


def test_forge_neo_masked_calls_are_left_as_the_host_computed_them(forge_host, monkeypatch, caplog):
    import backend.nn.flux_neo as neo

    from pladis.hosts import flux
    from pladis.hosts.flux import MASKED_WARNING, make_joint_attention

    q, k, v, pe = joint_inputs()
    mask = torch.zeros(q.shape[0], 1, q.shape[2], q.shape[2])
    mask[..., TEXT - 1] = float("-inf")  # a padded text token
    replacement = make_joint_attention(neo.attention, TEXT, 1.5, 2.0)
    monkeypatch.setattr(flux, "_warned", set())  # once per process: not said before, not kept after
    with caplog.at_level("WARNING", logger="pladis"):
        for _ in range(2):
            got = replacement(q, k, v, pe=pe, mask=mask, transformer_options={})
            assert torch.equal(got, neo.attention(q, k, v, pe=pe, mask=mask))
        assert replacement(q, k, v, pe, mask).equal(got)  # positional, as Neo's signature allows
    assert [r.getMessage() for r in caplog.records] == [MASKED_WARNING]  # once, not per call
    unmasked = replacement(q, k, v, pe=pe, mask=None, transformer_options={})
    assert (unmasked - neo.attention(q, k, v, pe=pe)).abs().max() > 1e-2  # PLADIS acts without a mask


def test_forge_neo_without_positions_blends_the_unrotated_scores(forge_host):
    # Neo skips RoPE when pe is None; zero positions rotate nothing, so the oracle takes those.
    import backend.nn.flux_neo as neo
    from backend.nn.flux import positions_to_pe

    from pladis.hosts.flux import make_joint_attention

    q, k, v, _ = joint_inputs()
    out = make_joint_attention(neo.attention, TEXT, 1.5, 2.0)(q, k, v, pe=None, mask=None)
    identity = positions_to_pe(torch.zeros(q.shape[0], q.shape[2]), q.shape[-1])
    assert_matches_oracle(forge_host, out, q, k, v, identity)


def _flip_second_block(patcher, monkeypatch):
    # Blocks built with flipped_img_txt (Neo's DoubleStreamBlock option) order [image; text]: the
    # text block is not where PLADIS looks for it.
    patcher.model.diffusion_model.double_blocks[1].flipped_img_txt = True


def _drop_apply_rope(patcher, monkeypatch):
    # The correction rotates q and k with the host's apply_rope, looked up when the wrapper first
    # runs: without it every step inside the window would raise.
    import backend.nn.flux

    monkeypatch.delattr(backend.nn.flux, "apply_rope")


def _drop_attention(patcher, monkeypatch):
    # A fork whose block module has no module-level attention: there is nothing to swap, and the
    # wrapper would fail on every step inside the window.
    import backend.nn.flux

    monkeypatch.delattr(backend.nn.flux, "attention")


def _drop_single_blocks(patcher, monkeypatch):
    # Double-stream blocks alone are not Flux's joint layout: not taken for Flux (which would fail
    # looking for the single-stream blocks), nor for a UNet.
    del patcher.model.diffusion_model.single_blocks


@pytest.mark.parametrize(
    ("neo", "unsupported", "said"),
    [
        (True, _flip_second_block, "image tokens before text tokens"),
        (False, _drop_apply_rope, "has no apply_rope function"),
        (True, _drop_apply_rope, "has no apply_rope function"),
        (False, _drop_attention, "backend.nn.flux has no attention function"),
        (False, _drop_single_blocks, "no cross-attention found in IntegratedFluxTransformer2DModel"),
    ],
    ids=[
        "image-tokens-first",
        "forge-without-apply-rope",
        "neo-without-apply-rope",
        "without-attention",
        "double-blocks-only",
    ],
)
def test_an_unsupported_joint_model_is_left_alone(forge_host, caplog, monkeypatch, neo, unsupported, said):
    from pladis.hosts.forge import apply

    tk = forge_host
    patcher = tk.flux_patcher(neo=neo)
    unsupported(patcher, monkeypatch)
    p = tk.processing(patcher)
    with caplog.at_level("WARNING", logger="pladis"):
        apply(p, PladisParams(enabled=True))
    assert p.sd_model.forge_objects.unet is patcher
    assert patcher.model_options == {"transformer_options": {}}
    assert any(said in r.getMessage() for r in caplog.records)
