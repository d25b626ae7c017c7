"""IP-Adapter under PLADIS in diffusers: its processor stays, PLADIS changes only its text attention.

diffusers hands IP-Adapter's processor ``(text, image_prompt_states)`` as the context (a crash for a
plain replacement), and its processor is an ``nn.Module`` with weights of its own, which must move
with the UNet and come back in place. The expected output is built from diffusers' own processors and
the independent oracle: IP-Adapter's output minus its text-only stock output gives the image-prompt
term, and the oracle gives PLADIS text attention.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from pladis.diffusers import PladisAttnProcessor, apply_pladis

CROSS = 32


def _ip_attention(**options):
    from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

    torch.manual_seed(5)
    attn = Attention(
        query_dim=16, cross_attention_dim=CROSS, heads=2, dim_head=8, bias=True, **options
    ).eval()
    ip = IPAdapterAttnProcessor2_0(
        hidden_size=16, cross_attention_dim=CROSS, num_tokens=(4,), scale=0.7
    ).eval()
    with torch.no_grad():
        for p in ip.parameters():
            p.normal_(0, 0.3)
    attn.set_processor(ip)
    return attn, ip


def _inputs():
    gen = torch.Generator().manual_seed(9)
    hidden = torch.randn(2, 12, 16, generator=gen)
    text = torch.randn(2, 77, CROSS, generator=gen)
    image = torch.randn(2, 4, CROSS, generator=gen)
    return hidden, text, image


def _run(attn, processor, hidden, context, mask=None):
    attn.set_processor(processor)
    with torch.no_grad():
        return attn(hidden, encoder_hidden_states=context, attention_mask=mask)


@pytest.mark.filterwarnings("ignore:You have passed a tensor as `encoder_hidden_states`:FutureWarning")
@pytest.mark.parametrize(("alpha", "lam"), [(1.5, 2.0), (2.0, 1.0), (1.75, 3.0)])
@pytest.mark.parametrize("form", ["tuple", "concatenated"])  # concatenated: diffusers' deprecated form
def test_pladis_changes_only_the_text_attention_of_ip_adapter(kit, alpha, lam, form):
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn, ip = _ip_attention()
    hidden, text, image = _inputs()
    context = (text, [image]) if form == "tuple" else torch.cat([text, image], dim=1)
    stock_ip = _run(attn, ip, hidden, context)
    image_term = stock_ip.double() - _run(attn, AttnProcessor2_0(), hidden, text).double()
    expected = _run(attn, kit.OracleProcessor(alpha, lam), hidden, text).double() + image_term

    got = _run(attn, PladisAttnProcessor(ip, alpha=alpha, lam=lam), hidden, context)
    assert (got.double() - expected).abs().max().item() <= 2e-5
    assert (got - stock_ip).abs().max().item() > 1e-3  # PLADIS did something
    zero = _run(attn, PladisAttnProcessor(ip, alpha=alpha, lam=0.0), hidden, context)
    assert torch.equal(zero, stock_ip)


def test_ip_adapter_masks_reach_the_ip_processor_at_lambda_zero():
    # diffusers passes a processor only the keyword arguments its __call__ names.
    attn, ip = _ip_attention()
    hidden, text, image = _inputs()
    images = [image.unsqueeze(1)]  # with masks: (batch, images, tokens, dim) per adapter
    masks = [torch.zeros(2, 1, 3, 4)]  # (batch, images, height, width) over the 12 = 3 × 4 queries
    masks[0][0, :, :2] = 1.0
    attn.set_processor(ip)
    with torch.no_grad():
        stock = attn(hidden, encoder_hidden_states=(text, images), ip_adapter_masks=masks)
        unmasked = attn(hidden, encoder_hidden_states=(text, images))
        attn.set_processor(PladisAttnProcessor(ip, alpha=1.5, lam=0.0))
        got = attn(hidden, encoder_hidden_states=(text, images), ip_adapter_masks=masks)
    assert not torch.equal(stock, unmasked)  # the masks matter here
    assert torch.equal(got, stock)


def _unet_with_ip_adapter(kit):
    """A tiny SD UNet set up the way ``load_ip_adapter`` leaves it (IP processors on every attn2)."""
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    unet = kit.make_unet("sd")
    _load_ip_processors(unet, seed=3)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection(
        [ImageProjection(image_embed_dim=16, cross_attention_dim=CROSS, num_image_text_embeds=4)]
    )
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    return unet.eval()


def _load_ip_processors(unet, seed):
    """IP-Adapter processors on every attn2 (new weights), stock ones on attn1, as load_ip_adapter does."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    torch.manual_seed(seed)
    processors = {}
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            processors[name] = AttnProcessor2_0()
        else:
            module = unet.get_submodule(name.rsplit(".processor", 1)[0])
            processors[name] = IPAdapterAttnProcessor2_0(
                hidden_size=module.to_q.out_features, cross_attention_dim=CROSS, scale=1.0, num_tokens=4
            )
    unet.set_attn_processor(processors)


def test_unet_with_ip_adapter_runs_and_comes_back_whole(kit):
    unet = _unet_with_ip_adapter(kit)
    sample, context, kwargs = kit.make_inputs("sd")
    kwargs["added_cond_kwargs"] = {
        "image_embeds": [torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(4))]
    }
    stock = kit.run_unet(unet, sample, context, kwargs)
    keys = sorted(unet.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # IP-Adapter's processors are kept: nothing to warn about
        handle = apply_pladis(unet)
    out = kit.run_unet(unet, sample, context, kwargs)
    assert torch.isfinite(out).all() and (out - stock).abs().max().item() > 1e-4
    handle.set(lam=0.0)
    assert torch.equal(kit.run_unet(unet, sample, context, kwargs), stock)
    # IP-Adapter's weights stay registered while PLADIS is on: they move and cast with the UNet.
    unet.to(torch.float64)
    assert {p.dtype for p in unet.parameters()} == {torch.float64}
    handle.remove()
    unet.to(torch.float32)
    assert sorted(unet.state_dict()) == keys
    assert torch.equal(kit.run_unet(unet, sample, context, kwargs), stock)


def test_ip_adapter_weights_do_not_stay_under_our_name_after_an_unload(kit):
    # unload_ip_adapter (or set_attn_processor) replaces the processors while PLADIS is on:
    # remove() leaves those layers alone (with a warning) and drops its reference to IP-Adapter's.
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = _unet_with_ip_adapter(kit)
    handle = apply_pladis(unet)
    assert any(".pladis_previous_processor." in key for key in unet.state_dict())
    unet.set_attn_processor(AttnProcessor2_0())
    with pytest.warns(RuntimeWarning, match="replaced by someone else"):
        handle.remove()
    assert not any("pladis_previous_processor" in key for key in unet.state_dict())
    assert not any("pladis_previous_processor" in name for name, _ in unet.named_modules())


def test_diffusers_unload_ip_adapter_works_while_pladis_is_on(kit):
    # diffusers rebuilds every processor that is not IP-Adapter's as value.__class__(): ours used to
    # fail there halfway, leaving the image projection gone and IP-Adapter's processors in place.
    from types import SimpleNamespace

    from diffusers.loaders.ip_adapter import IPAdapterMixin
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = _unet_with_ip_adapter(kit)
    stock = kit.make_unet("sd").eval()  # same seed: the same weights, never given IP-Adapter
    handle = apply_pladis(unet)
    IPAdapterMixin.unload_ip_adapter(SimpleNamespace(unet=unet))
    assert unet.encoder_hid_proj is None
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}
    with pytest.warns(RuntimeWarning, match="replaced by someone else"):
        handle.remove()
    assert sorted(unet.state_dict()) == sorted(stock.state_dict())
    sample, context, kwargs = kit.make_inputs("sd")
    assert torch.equal(
        kit.run_unet(unet, sample, context, kwargs), kit.run_unet(stock, sample, context, kwargs)
    )


def _ip_inputs(kit):
    sample, context, kwargs = kit.make_inputs("sd")
    kwargs["added_cond_kwargs"] = {
        "image_embeds": [torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(4))]
    }
    return sample, context, kwargs


def test_a_foreign_wrapper_over_ours_keeps_ip_adapter_weights_registered(kit):
    # A hook processor wrapped around ours still calls through it to IP-Adapter's: after remove()
    # skips those layers, IP-Adapter's weights must still move with the UNet.
    class Hook:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, attn, hidden_states, *args, **kwargs):
            return self.inner(attn, hidden_states, *args, **kwargs)

    unet = _unet_with_ip_adapter(kit)
    handle = apply_pladis(unet, lam=0.0)
    for module in unet.modules():
        if isinstance(getattr(module, "processor", None), PladisAttnProcessor):
            module.set_processor(Hook(module.processor))
    with pytest.warns(RuntimeWarning, match="replaced by someone else"):
        handle.remove()
    unet.to(torch.float64)
    assert {p.dtype for p in unet.parameters()} == {torch.float64}
    sample, context, kwargs = _ip_inputs(kit)
    kwargs["added_cond_kwargs"]["image_embeds"][0] = kwargs["added_cond_kwargs"]["image_embeds"][0].double()
    assert torch.isfinite(kit.run_unet(unet, sample.double(), context.double(), kwargs)).all()


def test_a_reloaded_ip_adapter_is_the_one_kept_registered(kit):
    # PLADIS on, IP-Adapter unloaded and another loaded, PLADIS applied again: the new adapter's
    # weights (not the unloaded one's) are registered and move with the UNet.
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = _unet_with_ip_adapter(kit)
    first = apply_pladis(unet)
    unet.set_attn_processor(AttnProcessor2_0())
    _load_ip_processors(unet, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = apply_pladis(unet)
    for module in unet.modules():
        ours = getattr(module, "processor", None)
        if isinstance(ours, PladisAttnProcessor):  # the new adapter is the one registered under ours
            assert module.pladis_previous_processor is ours.previous
    unet.to(torch.float64)
    assert {p.dtype for p in unet.parameters()} == {torch.float64}
    unet.to(torch.float32)
    with pytest.warns(RuntimeWarning, match="replaced by someone else"):
        first.remove()
    second.remove()
    assert not any("pladis_previous_processor" in key for key in unet.state_dict())


def _offloaded_like_accelerate(linear: torch.nn.Linear) -> None:
    """What sequential CPU offload (accelerate's ``cpu_offload``) does to a layer: its parameters sit on
    the ``meta`` device and a wrapped instance ``forward`` brings them in for the call only."""
    stored = {name: p.detach().clone() for name, p in linear.named_parameters()}

    def place(real: bool) -> None:
        for name, value in stored.items():
            setattr(
                linear, name, torch.nn.Parameter(value if real else torch.empty_like(value, device="meta"))
            )

    inner = linear.forward

    def forward(*args, **kwargs):
        place(True)
        try:
            return inner(*args, **kwargs)
        finally:
            place(False)

    place(False)
    linear.forward = forward


@pytest.mark.filterwarnings("ignore:You have passed a tensor as `encoder_hidden_states`:FutureWarning")
def test_pladis_over_ip_adapter_works_with_offloaded_output_projections():
    # PLADIS adds its change through the output projection; read directly, an offloaded layer's weight
    # was uninitialised memory (silently wrong images with enable_sequential_cpu_offload).
    attn, ip = _ip_attention()
    hidden, text, image = _inputs()
    context = (text, [image])
    expected = _run(attn, PladisAttnProcessor(ip, alpha=1.5, lam=2.0), hidden, context)
    stock = _run(attn, ip, hidden, context)
    _offloaded_like_accelerate(attn.to_out[0])
    assert attn.to_out[0].weight.device.type == "meta"
    assert torch.equal(_run(attn, ip, hidden, context), stock)  # the stand-in offload is faithful
    got = _run(attn, PladisAttnProcessor(ip, alpha=1.5, lam=2.0), hidden, context)
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.filterwarnings("ignore:You have passed a tensor as `encoder_hidden_states`:FutureWarning")
def test_pladis_over_ip_adapter_works_with_layerwise_casting():
    # diffusers' layerwise casting stores the projection in fp8 and casts it to the compute dtype in
    # a wrapped forward: called with an input in its parameters' (storage) dtype, it failed.
    import copy

    from diffusers.hooks import apply_layerwise_casting

    attn, ip = _ip_attention()
    attn, ip = attn.to(torch.bfloat16), ip.to(torch.bfloat16)
    hidden, text, image = (t.to(torch.bfloat16) for t in _inputs())
    context = (text, [image])
    reference, ref_ip = copy.deepcopy(attn), copy.deepcopy(ip)
    with torch.no_grad():  # what the casting does to the stored values: fp8, then back
        for p in reference.to_out[0].parameters():
            p.copy_(p.to(torch.float8_e4m3fn).to(torch.bfloat16))
    expected = _run(reference, PladisAttnProcessor(ref_ip, alpha=1.5, lam=2.0), hidden, context)
    apply_layerwise_casting(attn.to_out[0], storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    assert attn.to_out[0].weight.dtype == torch.float8_e4m3fn
    got = _run(attn, PladisAttnProcessor(ip, alpha=1.5, lam=2.0), hidden, context)
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected.float()).abs().max().item() <= 3e-2  # bf16 rounding of the change
    assert (got.float() - _run(attn, ip, hidden, context).float()).abs().max().item() > 0.1  # PLADIS acted


@pytest.mark.parametrize("image_input", [False, True], ids=["tokens", "4d"])
def test_pladis_over_ip_adapter_honours_mask_residual_rescale_and_4d_input(kit, image_input):
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn, ip = _ip_attention(residual_connection=True, rescale_output_factor=2.0)
    hidden, text, image = _inputs()
    if image_input:  # (batch, channels, height, width) over the 12 = 3 × 4 queries
        hidden = hidden.transpose(1, 2).reshape(2, 16, 3, 4)
    mask = torch.zeros(2, 1, 77)
    mask[0, :, 50:] = -10000.0
    mask[1, :, 10:30] = -10000.0

    stock_ip = _run(attn, ip, hidden, (text, [image]), mask)
    image_term = stock_ip.double() - _run(attn, AttnProcessor2_0(), hidden, text, mask).double()
    expected = _run(attn, kit.OracleProcessor(1.5, 2.0), hidden, text, mask).double() + image_term
    unmasked = _run(attn, kit.OracleProcessor(1.5, 2.0), hidden, text).double() + image_term
    assert (expected - unmasked).abs().max().item() > 1e-3  # the mask matters here

    got = _run(attn, PladisAttnProcessor(ip, alpha=1.5, lam=2.0), hidden, (text, [image]), mask)
    assert got.shape == stock_ip.shape == hidden.shape
    assert (got.double() - expected).abs().max().item() <= 2e-5


def test_pladis_over_ip_adapter_with_a_half_precision_mask():
    # A half-precision UNet makes encoder_attention_mask a bias in its own dtype; PLADIS's change runs
    # in float32 and must take the mask along.
    attn, ip = _ip_attention()
    hidden, text, image = _inputs()
    mask = torch.zeros(2, 1, 77)
    mask[0, :, 50:] = -10000.0

    expected = _run(attn, PladisAttnProcessor(ip, alpha=1.5, lam=2.0), hidden, (text, [image]), mask)
    attn, ip = attn.to(torch.bfloat16), ip.to(torch.bfloat16)
    low = [t.to(torch.bfloat16) for t in (hidden, text, image, mask)]
    stock = _run(attn, ip, low[0], (low[1], [low[2]]), low[3])
    got = _run(attn, PladisAttnProcessor(ip, alpha=1.5, lam=2.0), low[0], (low[1], [low[2]]), low[3])
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max().item() <= 3e-2
    assert (got.float() - stock.float()).abs().max().item() > 0.1  # PLADIS acted


def _halve_weight_inside_forward(linear):
    inner = linear.forward
    linear.forward = lambda x: inner(x) * 0.5


class _HalvingLinear(torch.nn.Linear):
    """A Linear subclass whose forward uses other weights than it stores (like LoRA-compatible layers)."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight * 0.5, self.bias * 0.5)


def _as_halving_subclass(attn):
    old = attn.to_out[0]
    new = _HalvingLinear(old.in_features, old.out_features)
    new.load_state_dict(old.state_dict())
    attn.to_out[0] = new


_FORWARD_CHANGES = {
    # what is done to the output projection, and which of its parameters that scales by 0.5
    "instance_forward": (lambda attn: _halve_weight_inside_forward(attn.to_out[0]), ("weight", "bias")),
    "forward_hook": (
        lambda attn: attn.to_out[0].register_forward_hook(lambda m, args, out: out * 0.5),
        ("weight", "bias"),
    ),
    "forward_pre_hook": (
        lambda attn: attn.to_out[0].register_forward_pre_hook(lambda m, args: (args[0] * 0.5,)),
        ("weight",),
    ),
    "subclass": (_as_halving_subclass, ("weight", "bias")),
}


@pytest.mark.filterwarnings("ignore:You have passed a tensor as `encoder_hidden_states`:FutureWarning")
@pytest.mark.parametrize("kind", sorted(_FORWARD_CHANGES))
def test_pladis_over_ip_adapter_goes_through_the_projection_forward(kind):
    # An output projection whose forward is not its stored weight (hooks, wrappers, subclasses): the
    # change must go through the forward, as the IP-Adapter output itself does.
    import copy

    attn, ip = _ip_attention()
    hidden, text, image = _inputs()
    context = (text, [image])
    reference = copy.deepcopy(attn)
    change, halved = _FORWARD_CHANGES[kind]
    with torch.no_grad():
        for name in halved:
            getattr(reference.to_out[0], name).mul_(0.5)
    change(attn)
    assert torch.allclose(_run(attn, ip, hidden, context), _run(reference, ip, hidden, context), atol=1e-6)
    expected = _run(reference, PladisAttnProcessor(ip, alpha=1.5, lam=2.0), hidden, context)
    got = _run(attn, PladisAttnProcessor(ip, alpha=1.5, lam=2.0), hidden, context)
    assert (got - expected).abs().max().item() <= 1e-5


def _ip_state_keys(unet):
    return [key for key in unet.state_dict() if ".pladis_previous_processor." in key]


def _assert_ip_weights_move_with_the_unet(kit, unet, inputs, expected):
    """The kept IP-Adapter weights are registered under our name, so ``.to()`` moves them with the
    UNet: a round trip through float64 leaves every parameter converted and the output unchanged."""
    assert _ip_state_keys(unet)
    unet.to(torch.float64)
    assert {p.dtype for p in unet.parameters()} == {torch.float64}
    unet.to(torch.float32)
    assert torch.equal(kit.run_unet(unet, *inputs), expected)


def test_removing_an_outer_stacked_handle_keeps_ip_adapter_weights_registered(kit):
    unet = _unet_with_ip_adapter(kit)
    sample, context, kwargs = _ip_inputs(kit)
    outer = apply_pladis(unet, lam=2.0)
    expected = kit.run_unet(unet, sample, context, kwargs)
    inner = apply_pladis(unet, lam=5.0)
    inner.remove()  # back to `outer`, which still runs IP-Adapter's processors underneath
    _assert_ip_weights_move_with_the_unet(kit, unet, (sample, context, kwargs), expected)
    outer.remove()
    assert not _ip_state_keys(unet)


@pytest.mark.parametrize("replacement", ["new_ip_adapter", "standalone_pladis"])
def test_a_replacement_over_ours_drops_the_old_ip_adapter_weights_on_remove(kit, replacement):
    # A new IP-Adapter (module processors), or a PLADIS processor set by hand over a stock one,
    # replaced ours: nothing calls the old adapter any more, so its weights kept under our name go.
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = _unet_with_ip_adapter(kit)
    handle = apply_pladis(unet)
    if replacement == "new_ip_adapter":
        _load_ip_processors(unet, seed=5)
    else:
        for name in handle.names:
            unet.get_submodule(name).set_processor(PladisAttnProcessor(AttnProcessor2_0()))
    with pytest.warns(RuntimeWarning, match="replaced by someone else"):
        handle.remove()
    assert not _ip_state_keys(unet)
    adapter_on_our_layers = [
        key
        for key in unet.state_dict()
        for name in handle.names
        if key.startswith(f"{name}.processor.to_k_ip.")
    ]
    assert bool(adapter_on_our_layers) == (replacement == "new_ip_adapter")


def test_removing_an_older_handle_keeps_a_newer_handles_ip_adapter_weights(kit):
    # Regression: PLADIS on, IP-Adapter replaced by another, PLADIS applied again; removing the first
    # handle dropped the registration the second handle made for the new adapter, so its weights no
    # longer moved with the UNet (a dtype or device mismatch at the next run).
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = _unet_with_ip_adapter(kit)
    first = apply_pladis(unet)
    unet.set_attn_processor(AttnProcessor2_0())
    _load_ip_processors(unet, seed=5)
    second = apply_pladis(unet)
    sample, context, kwargs = _ip_inputs(kit)
    expected = kit.run_unet(unet, sample, context, kwargs)
    with pytest.warns(RuntimeWarning, match="replaced by someone else"):
        first.remove()
    assert second.active
    _assert_ip_weights_move_with_the_unet(kit, unet, (sample, context, kwargs), expected)
    second.remove()
    assert not _ip_state_keys(unet)
