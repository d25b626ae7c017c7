"""``pladis.hosts.forge.apply`` on Forge stand-ins: sites, cloning, window, chaining, tiling, restore."""

import copy
import importlib
import math
import sys

import pytest
import torch

from pladis.params import PladisParams


def params(**changes):
    return PladisParams(enabled=True).replace(**changes)


def inputs(seed=0, batch=2, tokens=6, cond_len=4, uncond_len=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, 8, generator=g)
    cond = torch.randn(batch, cond_len, 6, generator=g) * 2
    uncond = torch.randn(batch, uncond_len, 6, generator=g) * 2
    return x, cond, uncond


@pytest.mark.parametrize("layers", [("down", "up"), ("down", "mid", "up"), ("mid",), ("up",)])
def test_installs_one_replacement_per_attn2_site_of_the_selected_groups(forge_host, layers):
    from pladis.hosts.forge import apply, installed_sites

    tk = forge_host
    original = tk.unet_patcher()
    p = tk.processing(original)
    apply(p, params(layers=layers))
    clone = p.sd_model.forge_objects.unet
    assert clone is not original and clone.model is original.model
    assert set(installed_sites(clone)) == set(tk.sites_of(*layers))
    assert set(tk.attn2_table(clone)) == set(tk.sites_of(*layers))
    assert original.model_options == {"transformer_options": {}}


@pytest.mark.parametrize(
    "settings",
    [dict(enabled=False), dict(lam=0.0), dict(layers=()), dict(start=0.5, end=0.5), dict(alpha=1.0)],
)
def test_installs_nothing_when_it_cannot_act(forge_host, settings):
    from pladis.hosts.forge import apply

    tk = forge_host
    original = tk.unet_patcher()
    p = tk.processing(original)
    apply(p, PladisParams(enabled=True).replace(**settings))
    assert p.sd_model.forge_objects.unet is original
    assert original.model_options == {"transformer_options": {}}


@pytest.mark.parametrize(
    ("alpha", "lam", "layers"), [(1.5, 2.0, ("down", "up")), (2.0, 1.0, ("down", "mid", "up"))]
)
def test_generation_equals_the_pladis_oracle_on_the_selected_sites(forge_host, alpha, lam, layers):
    from pladis.hosts.forge import apply

    tk = forge_host
    original = tk.unet_patcher()
    x, cond, uncond = inputs()
    p = tk.processing(original)
    apply(p, params(alpha=alpha, lam=lam, layers=layers))
    got = tk.denoise(p.sd_model.forge_objects.unet, x, 3.0, cond, uncond)
    expected = tk.denoise(tk.with_oracle(original, tk.sites_of(*layers), alpha, lam), x, 3.0, cond, uncond)
    stock = tk.denoise(original, x, 3.0, cond, uncond)
    for g, e, s in zip(got, expected, stock, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
        assert (g - s).abs().max() > 1e-3


def test_window_uses_the_hosts_percent_to_sigma_and_passes_through_bit_identically(forge_host, monkeypatch):
    import backend.nn.unet

    from pladis.hosts.forge import apply

    tk = forge_host
    original = tk.unet_patcher()
    predictor = original.model.predictor
    p = tk.processing(original)
    apply(p, params(start=0.25, end=0.75))
    assert predictor.calls == [0.25, 0.75]
    sigma_hi, sigma_lo = predictor.percent_to_sigma(0.25), predictor.percent_to_sigma(0.75)
    patched = p.sd_model.forge_objects.unet
    x, cond, uncond = inputs()
    sites = len(tk.sites_of("down", "up"))

    # The name stock CrossAttention.forward calls (imported by name into backend.nn.unet): it runs
    # attn1 and the sites PLADIS leaves alone too, so counts are compared with a stock evaluation.
    calls = []
    real = backend.nn.unet.attention_function

    def spy(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    def counted(patcher, sigma):
        calls.clear()
        out = tk.denoise(patcher, x, sigma, cond, uncond)
        return out, len(calls)

    monkeypatch.setattr(backend.nn.unet, "attention_function", spy)
    for sigma in (sigma_hi * 1.01, sigma_lo, sigma_lo * 0.5):  # outside (sigma_lo, sigma_hi]
        got, got_calls = counted(patched, sigma)
        stock, stock_calls = counted(original, sigma)
        assert all(torch.equal(g, s) for g, s in zip(got, stock, strict=True))
        assert got_calls == stock_calls > sites  # one batched call per site, patched ones included

    for sigma in (sigma_hi, (sigma_hi + sigma_lo) / 2):  # inside
        got, got_calls = counted(patched, sigma)
        _, stock_calls = counted(original, sigma)
        expected = tk.denoise(
            tk.with_oracle(original, tk.sites_of("down", "up"), 1.5, 2.0), x, sigma, cond, uncond
        )
        assert got_calls == stock_calls - sites
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_pass_through_runs_an_attention_function_rebound_in_the_unet_module(forge_host, monkeypatch):
    # Attention back-end switchers rebind the copy of attention_function that backend.nn.unet
    # imported by name (the one stock CrossAttention.forward calls), not only backend.attention's.
    # Outside the window PLADIS must run that same function: bit-identical to a stock run.
    import backend.attention
    import backend.nn.unet

    from pladis.hosts.forge import apply

    tk = forge_host
    original = tk.unet_patcher()
    p = tk.processing(original)
    apply(p, params(start=0.25, end=0.75))
    patched = p.sd_model.forge_objects.unet
    outside = original.model.predictor.percent_to_sigma(0.25) * 1.01
    x, cond, uncond = inputs()
    real = backend.attention.attention_function

    def rebound(q, k, v, heads, mask=None):
        return real(q, k, v, heads, mask) * 0.5 + 0.25  # visibly not the stock attention

    monkeypatch.setattr(backend.nn.unet, "attention_function", rebound)
    got = tk.denoise(patched, x, outside, cond, uncond)
    stock = tk.denoise(original, x, outside, cond, uncond)
    assert all(torch.equal(g, s) for g, s in zip(got, stock, strict=True))
    monkeypatch.undo()
    assert not torch.equal(tk.denoise(original, x, outside, cond, uncond)[0], stock[0])  # it mattered


@pytest.mark.parametrize("missing", ["name", "module"])
def test_pass_through_falls_back_to_backend_attention_without_the_unet_name(forge_host, monkeypatch, missing):
    # A fork whose UNet module does not hold the name, or whose UNet lives in another module:
    # Forge's canonical backend.attention is used.
    import backend.attention
    import backend.nn.unet

    from pladis.hosts.forge_attn2 import FORGE_HOST, host_attention

    q = torch.randn(2, 3, 4)
    masks = []

    def canonical(q, k, v, heads, mask=None):
        masks.append(mask)
        return q * heads

    if missing == "name":
        monkeypatch.delattr(backend.nn.unet, "attention_function")
    else:
        monkeypatch.setitem(sys.modules, "backend.nn.unet", None)  # importing it raises ImportError
    monkeypatch.setattr(backend.attention, "attention_function", canonical)
    assert torch.equal(host_attention(FORGE_HOST, q, q, q, {"n_heads": 2}), q * 2)
    assert masks == [None]


def test_pass_through_passes_the_mask_as_stock_does(forge_host, monkeypatch):
    # Stock CrossAttention.forward calls attention_function(q, k, v, self.heads, mask): a function
    # rebound there whose mask has no default must work outside the window as it does in stock.
    import backend.nn.unet

    from pladis.hosts.forge_attn2 import FORGE_HOST, host_attention

    q = torch.randn(2, 3, 4)
    monkeypatch.setattr(backend.nn.unet, "attention_function", lambda q, k, v, heads, mask: q + heads)
    assert torch.equal(host_attention(FORGE_HOST, q, q, q, {"n_heads": 2}), q + 2)


def test_repeated_hook_calls_patch_once(forge_host):
    """Hires fix calls the hook again, with or without Forge resetting forge_objects in between."""
    from pladis.hosts.forge import apply, installed_sites
    from pladis.hosts.forge_attn2 import PRIOR

    tk = forge_host
    original = tk.unet_patcher()
    x, cond, uncond = inputs()
    p = tk.processing(original)
    apply(p, params())
    once = tk.denoise(p.sd_model.forge_objects.unet, x, 3.0, cond, uncond)

    apply(p, params())  # no reset: the clone already carries our patches
    apply(p, params())
    twice = p.sd_model.forge_objects.unet
    assert all(getattr(fn, PRIOR) is None for fn in installed_sites(twice).values())
    again = tk.denoise(twice, x, 3.0, cond, uncond)
    assert all(torch.equal(a, b) for a, b in zip(once, again, strict=True))

    tk.reset(p)  # Forge's reset before the second hires call
    apply(p, params())
    assert all(
        torch.equal(a, b)
        for a, b in zip(once, tk.denoise(p.sd_model.forge_objects.unet, x, 3.0, cond, uncond), strict=True)
    )
    assert original.model_options == {"transformer_options": {}}


def test_reapply_with_new_settings_replaces_ours(forge_host):
    from pladis.hosts.forge import apply, installed_sites

    tk = forge_host
    p = tk.processing(tk.unet_patcher())
    apply(p, params(lam=2.0))
    apply(p, params(lam=4.0, layers=("down", "mid", "up")))
    sites = installed_sites(p.sd_model.forge_objects.unet)
    assert set(sites) == set(tk.sites_of("down", "mid", "up"))
    assert {fn.pladis_settings["lam"] for fn in sites.values()} == {4.0}


def ip_adapter_like(tk, calls, scale):
    """A replacement like Forge's IP-Adapter: dense text attention plus an extra term."""

    def patch(q, k, v, extra_options):
        calls.append(extra_options["block"])
        return tk.oracle_dense(q, k, v, extra_options["n_heads"]).to(q.dtype) + scale * q

    return patch


def test_existing_replacements_are_chained_and_still_applied(forge_host):
    from pladis.hosts.forge import apply, installed_sites
    from pladis.hosts.forge_attn2 import PRIOR

    tk = forge_host
    base = tk.unet_patcher()
    calls = []
    two_tuple = ip_adapter_like(tk, calls, 0.3)  # SD1.x-style key: ("input", 2) covers both index 0 and 1
    three_tuple = ip_adapter_like(tk, calls, -0.2)
    unrelated = ip_adapter_like(tk, calls, 0.1)  # on a mid site PLADIS does not touch (default layers)
    base.set_model_attn2_replace(two_tuple, "input", 2)
    base.set_model_attn2_replace(three_tuple, "output", 0, 1)
    base.set_model_attn2_replace(unrelated, "middle", 0, 0)
    before = copy.copy(tk.attn2_table(base))

    p = tk.processing(base)
    apply(p, params())
    clone = p.sd_model.forge_objects.unet
    ours = installed_sites(clone)
    assert set(ours) == set(tk.sites_of("down", "up"))  # the others' entries are not counted as ours
    assert getattr(ours[("input", 2, 0)], PRIOR) is two_tuple
    assert getattr(ours[("input", 2, 1)], PRIOR) is two_tuple
    assert getattr(ours[("output", 0, 1)], PRIOR) is three_tuple
    assert getattr(ours[("input", 1, 0)], PRIOR) is None
    assert tk.attn2_table(clone)[("middle", 0, 0)] is unrelated

    x, cond, uncond = inputs()
    got = tk.denoise(clone, x, 3.0, cond, uncond)
    assert sorted(calls) == sorted([("input", 2), ("input", 2), ("output", 0), ("middle", 0)])
    priors = {("input", 2, 0): two_tuple, ("input", 2, 1): two_tuple, ("output", 0, 1): three_tuple}
    expected = tk.denoise(
        tk.with_oracle(base, tk.sites_of("down", "up"), 1.5, 2.0, priors), x, 3.0, cond, uncond
    )
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)

    assert tk.attn2_table(base) == before  # same keys, same objects: the original patcher is untouched
    apply(p, params())  # re-applying keeps the same priors (never ours wrapped in ours)
    assert getattr(installed_sites(p.sd_model.forge_objects.unet)[("input", 2, 0)], PRIOR) is two_tuple


def test_chained_pass_through_outside_window_is_the_prior_alone(forge_host):
    from pladis.hosts.forge import apply

    tk = forge_host
    base = tk.unet_patcher()
    base.set_model_attn2_replace(ip_adapter_like(tk, [], 0.3), "input", 2)
    p = tk.processing(base)
    apply(p, params(start=0.5))
    sigma = base.model.predictor.percent_to_sigma(0.25)  # earlier than start: outside
    x, cond, uncond = inputs()
    got = tk.denoise(p.sd_model.forge_objects.unet, x, sigma, cond, uncond)
    stock = tk.denoise(base, x, sigma, cond, uncond)
    assert all(torch.equal(g, s) for g, s in zip(got, stock, strict=True))


def test_batched_tiled_contexts_match_separate_untiled_calls(forge_host, monkeypatch):
    """cond 8 tokens + uncond 4 tokens: Forge batches them, repeating the uncond context to 8."""
    from pladis.hosts import forge_attn2
    from pladis.hosts.forge import apply

    tk = forge_host
    x, cond, uncond = inputs(cond_len=8, uncond_len=4)
    p = tk.processing(tk.unet_patcher())
    apply(p, params(layers=("down", "mid", "up")))
    patched = p.sd_model.forge_objects.unet
    batched = tk.denoise(patched, x, 3.0, cond, uncond)
    separate = tk.denoise(patched, x, 3.0, cond, uncond, batch_together=False)
    for b, s in zip(batched, separate, strict=True):
        torch.testing.assert_close(b, s, atol=1e-5, rtol=1e-5)

    # Control: without cutting the repeat back, the batched uncond result differs.
    monkeypatch.setattr(forge_attn2, "untiled_lengths", lambda k, v: [k.shape[1]] * k.shape[0])
    naive = tk.denoise(patched, x, 3.0, cond, uncond)
    assert (naive[1] - separate[1]).abs().max() > 1e-4
    torch.testing.assert_close(naive[0], separate[0], atol=1e-5, rtol=1e-5)  # cond was never repeated


def test_original_patcher_is_clean_after_a_generation_and_after_an_exception(forge_host):
    from pladis.hosts.forge import apply

    tk = forge_host
    original = tk.unet_patcher()
    x, cond, uncond = inputs()
    stock = tk.denoise(original, x, 3.0, cond, uncond)

    p = tk.processing(original)
    apply(p, params())
    tk.denoise(p.sd_model.forge_objects.unet, x, 3.0, cond, uncond)
    assert original.model_options == {"transformer_options": {}}

    tk.reset(p)
    apply(p, params())

    def failing(q, k, v, extra_options):
        raise RuntimeError("out of memory")

    boom = p.sd_model.forge_objects.unet
    boom.set_model_attn2_replace(failing, "output", 1, 0)  # a later extension's patch fails mid-generation
    with pytest.raises(RuntimeError, match="out of memory"):
        tk.denoise(boom, x, 3.0, cond, uncond)
    assert original.model_options == {"transformer_options": {}}
    tk.reset(p)
    after = tk.denoise(p.sd_model.forge_objects.unet, x, 3.0, cond, uncond)
    assert all(torch.equal(a, s) for a, s in zip(after, stock, strict=True))


def test_patched_options_survive_forge_deep_copies(forge_host):
    from pladis.hosts.forge import apply, installed_sites

    tk = forge_host
    p = tk.processing(tk.unet_patcher())
    apply(p, params())
    clone = p.sd_model.forge_objects.unet
    later = clone.clone()  # e.g. an extension running after us
    later.model_patches_to("cpu")
    assert installed_sites(later) == installed_sites(clone)
    x, cond, uncond = inputs()
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            tk.denoise(later, x, 3.0, cond, uncond), tk.denoise(clone, x, 3.0, cond, uncond), strict=True
        )
    )


def test_keys_repeated_by_an_earlier_attn2_patch_at_cfg_1(forge_host):
    """Forge Couple-like attn2_patch tiling the context ×3 before the projections, with CFG 1 (one
    chunk, nothing batched): PLADIS gives the answer of the un-repeated context, as stock does."""
    from pladis.hosts.forge import apply

    tk = forge_host
    x, cond, _ = inputs()

    def tile(n, context, value, extra_options):
        return n, context.repeat(1, 3, 1), value.repeat(1, 3, 1)

    tiling = tk.unet_patcher()
    tiling.set_model_attn2_patch(tile)
    plain = tk.unet_patcher()
    stock = [tk.denoise(patcher, x, 3.0, cond)[0] for patcher in (tiling, plain)]
    torch.testing.assert_close(stock[0], stock[1], atol=1e-5, rtol=1e-5)  # softmax ignores the repeat
    got = []
    for patcher in (tiling, plain):
        p = tk.processing(patcher)
        apply(p, params())
        got.append(tk.denoise(p.sd_model.forge_objects.unet, x, 3.0, cond)[0])
    torch.testing.assert_close(got[0], got[1], atol=1e-5, rtol=1e-5)
    assert (got[1] - stock[1]).abs().max() > 1e-3  # PLADIS did act


class _EdmSchedule:
    """A continuous EDM schedule (sigma 0.002–80, Playground v2.5), as a schedule-swapping extension
    installs it: Forge's ``PredictionContinuousEDM.percent_to_sigma``."""

    sigma_min, sigma_max = 0.002, 80.0

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        low = math.log(self.sigma_min)
        return math.exp((math.log(self.sigma_max) - low) * (1.0 - percent) + low)


@pytest.mark.parametrize("name", ["predictor", "model_sampling"])
def test_window_follows_a_schedule_swapped_in_by_an_object_patch(forge_host, monkeypatch, name):
    # reForge's built-in Advanced Model Sampling (and ComfyUI-style sampling nodes) run before PLADIS
    # and record their schedule as an object patch of the clone; it reaches unet.model only when the
    # patcher is loaded for sampling. The window must be on the schedule that will be sampled.
    from pladis.hosts.forge import apply, installed_sites

    tk = forge_host
    base = tk.unet_patcher() if name == "predictor" else tk.reforge_patcher()
    own_schedule = getattr(base.model, name)
    unet = base.clone()
    unet.add_object_patch(name, _EdmSchedule())
    p = tk.processing(unet)
    apply(p, params(start=0.25, end=0.5))
    settings = {
        fn.pladis_settings["sigma_lo"] for fn in installed_sites(p.sd_model.forge_objects.unet).values()
    }
    assert settings == {_EdmSchedule().percent_to_sigma(0.5)}
    assert {
        fn.pladis_settings["sigma_hi"] for fn in installed_sites(p.sd_model.forge_objects.unet).values()
    } == {_EdmSchedule().percent_to_sigma(0.25)}
    assert own_schedule.calls == []  # the model's own schedule is not asked
    # Loaded and evaluated (the window then in force is read on the loaded model): PLADIS acts
    # inside EDM's (0.4, 5.66] only, not inside the model's own window.
    patched = p.sd_model.forge_objects.unet
    host = "backend.nn.unet" if name == "predictor" else "ldm_patched.ldm.modules.attention"
    sites = len(tk.sites_of("down", "up"))
    own_hi, own_lo = own_schedule.percent_to_sigma(0.25), own_schedule.percent_to_sigma(0.5)
    assert not own_lo < 0.5 <= own_hi and not own_lo < 5.0 <= own_hi  # these tell the two apart
    assert _pladis_sites(tk, monkeypatch, patched, 8.0, host) == 0
    assert _pladis_sites(tk, monkeypatch, patched, 0.3, host) == 0
    assert _pladis_sites(tk, monkeypatch, patched, 0.5, host) == sites
    assert _pladis_sites(tk, monkeypatch, patched, 5.0, host) == sites


def _host_attention_calls(tk, monkeypatch, patcher, sigma, host) -> int:
    """How many times the host's own attention ran in one evaluation.

    ``host``: the module whose attention function stock ``CrossAttention.forward`` calls (Forge's
    ``backend.nn.unet.attention_function``, reForge's ``optimized_attention``)."""
    module = importlib.import_module(host)
    name = "attention_function" if host == "backend.nn.unet" else "optimized_attention"
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    x, cond, uncond = inputs()
    tk.denoise(patcher, x, sigma, cond, uncond)
    monkeypatch.setattr(module, name, real)
    return len(calls)


def _pladis_sites(tk, monkeypatch, patcher, sigma, host="backend.nn.unet") -> int:
    """How many attention sites PLADIS took over in one evaluation of ``patcher``: the host's own
    attention calls of a stock UNet of the same kind minus those of ``patcher`` (the host function
    also runs attn1 and the sites PLADIS leaves alone)."""
    stock_unet = tk.unet_patcher() if host == "backend.nn.unet" else tk.reforge_patcher()
    stock = _host_attention_calls(tk, monkeypatch, stock_unet, sigma, host)
    assert stock > 0
    return stock - _host_attention_calls(tk, monkeypatch, patcher, sigma, host)


def test_window_follows_a_schedule_patch_added_after_pladis(forge_host, monkeypatch):
    # An extension running after PLADIS clones the patched UNet and swaps the schedule with an object
    # patch; it reaches the model when the clone is loaded for sampling. The window (start 0.25, end
    # 0.5) is then read on that schedule: EDM (0.4, 5.66] instead of the model's own (1.62, 4.09].
    from pladis.hosts.forge import apply

    tk = forge_host
    p = tk.processing(tk.unet_patcher())
    apply(p, params(start=0.25, end=0.5))
    later = p.sd_model.forge_objects.unet.clone()
    later.add_object_patch("predictor", _EdmSchedule())
    sites = len(tk.sites_of("down", "up"))
    assert _pladis_sites(tk, monkeypatch, later, 1.0) == sites  # inside EDM's window only
    assert _pladis_sites(tk, monkeypatch, later, 5.0) == sites
    assert _pladis_sites(tk, monkeypatch, later, 0.3) == 0  # below it
    # The PLADIS clone itself shares those replacements; loaded in turn it samples the model's own
    # schedule again (loading it takes the other clone's patch off), and so does its window.
    pladis_clone = p.sd_model.forge_objects.unet
    assert _pladis_sites(tk, monkeypatch, pladis_clone, 1.0) == 0
    assert _pladis_sites(tk, monkeypatch, pladis_clone, 3.0) == sites


def test_window_ignores_a_schedule_patch_an_earlier_generation_left_on_the_model(forge_host, monkeypatch):
    # A clone of an earlier generation swapped the schedule and was loaded: its patch stays on the
    # shared model until another clone loads. Read at apply time the window was on that schedule;
    # loading this generation's clone takes the patch off, and the window follows (start 0.5, end
    # 0.75: the model's own (0.70, 1.62], not EDM's (0.03, 0.4]). Forge's sampler still takes that
    # generation's σ range from the leftover schedule (upstream, README); the model denoises with
    # its own, and the window follows the model.
    from pladis.hosts.forge import apply

    tk = forge_host
    base = tk.unet_patcher()
    earlier = base.clone()
    earlier.add_object_patch("predictor", _EdmSchedule())
    tk.load(earlier)
    assert isinstance(base.model.predictor, _EdmSchedule)  # left on the model
    p = tk.processing(base)
    apply(p, params(start=0.5, end=0.75))
    patched = p.sd_model.forge_objects.unet
    sites = len(tk.sites_of("down", "up"))
    assert _pladis_sites(tk, monkeypatch, patched, 1.0) == sites  # inside the model's own window
    assert _pladis_sites(tk, monkeypatch, patched, 0.3) == 0  # inside EDM's only


@pytest.mark.parametrize("flux", [False, True])
def test_a_window_on_a_model_without_a_schedule_is_skipped_and_says_so(forge_host, caplog, flux):
    # Start/end need the host's percent_to_sigma; a model without one is left alone with a line
    # saying why, not failed (and not patched without its window).
    from pladis.hosts.forge import apply

    tk = forge_host
    original = tk.flux_patcher() if flux else tk.unet_patcher()
    del original.model.predictor
    p = tk.processing(original)
    with caplog.at_level("WARNING", logger="pladis"):
        apply(p, params(start=0.25))
    assert p.sd_model.forge_objects.unet is original
    assert original.model_options == {"transformer_options": {}}
    assert [r.getMessage() for r in caplog.records] == [
        "PLADIS: this model has no percent_to_sigma (model.predictor / model.model_sampling); "
        "cannot apply a start/end window; skipped"
    ]


def test_a_unet_with_no_layer_group_ticked_is_left_alone_and_says_so(forge_host, caplog):
    from pladis.hosts.forge import apply

    tk = forge_host
    original = tk.unet_patcher()
    p = tk.processing(original)
    message = "PLADIS is enabled but changes nothing: no layer group is ticked"
    with caplog.at_level("WARNING", logger="pladis"):
        for _ in range(3):  # every sampling pass of one generation (batches, hires fix): said once
            apply(p, params(layers=()))
        assert p.sd_model.forge_objects.unet is original
        assert [r.getMessage() for r in caplog.records] == [message]
        apply(tk.processing(original), params(layers=()))  # the next generation says it again
    assert [r.getMessage() for r in caplog.records] == [message, message]


@pytest.mark.parametrize("reforge", [False, True])
def test_a_torch_compiled_unet_is_patched_through_the_module_it_wraps(forge_host, reforge):
    # reForge's --torch-compile puts the OptimizedModule in diffusion_model: its module names carry an
    # "_orig_mod." prefix, and no site was found (PLADIS said "no cross-attention found" and did nothing).
    from pladis.hosts.forge import apply, installed_sites

    tk = forge_host
    plain = tk.reforge_patcher() if reforge else tk.unet_patcher()
    compiled = tk.reforge_patcher() if reforge else tk.unet_patcher()
    compiled.model.diffusion_model = torch.compile(compiled.model.diffusion_model, backend="eager")
    p = tk.processing(compiled)
    apply(p, params())
    patched = p.sd_model.forge_objects.unet
    assert set(installed_sites(patched)) == set(tk.sites_of("down", "up"))
    x, cond, uncond = inputs()
    got = tk.denoise(patched, x, 3.0, cond, uncond)
    expected = tk.denoise(tk.with_oracle(plain, tk.sites_of("down", "up"), 1.5, 2.0), x, 3.0, cond, uncond)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_a_hypernetwork_applied_inside_cross_attention_is_warned_about(forge_host, monkeypatch, caplog):
    # Some reForge backend/ builds apply shared.loaded_hypernetworks inside CrossAttention.forward;
    # the attn2 replacement bypasses forward, so the patched layers lose it: said once, not silently.
    import types

    from backend.nn.unet import CrossAttention

    from pladis.hosts.forge import HYPERNETWORK_WARNING, apply

    class HypernetworkCrossAttention(CrossAttention):
        def forward(self, x, context=None, value=None, mask=None, transformer_options={}):  # noqa: B006
            for _hypernetwork in shared.loaded_hypernetworks:  # noqa: F821 (the fork's global)
                pass
            return super().forward(x, context, value, mask, transformer_options)

    def warnings_for(patcher, loaded):
        monkeypatch.setitem(sys.modules, "modules.shared", types.SimpleNamespace(loaded_hypernetworks=loaded))
        caplog.clear()
        with caplog.at_level("WARNING", logger="pladis"):
            apply(forge_host.processing(patcher), params())
        return [r.getMessage() for r in caplog.records]

    fork = forge_host.unet_patcher()
    for module in fork.model.diffusion_model.modules():
        if isinstance(getattr(module, "attn2", None), CrossAttention):
            module.attn2.__class__ = HypernetworkCrossAttention
    assert warnings_for(fork, [object()]) == [HYPERNETWORK_WARNING]
    assert warnings_for(fork, []) == []  # none loaded
    assert warnings_for(forge_host.unet_patcher(), [object()]) == []  # stock Forge applies none there
