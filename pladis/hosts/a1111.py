"""AUTOMATIC1111 adapter: an instance-level PLADIS ``forward`` on the UNet's attn2 ``CrossAttention``s.

Why instance-level: A1111 assigns ``CrossAttention.forward`` on the *class* (ldm and sgm) whenever a
cross-attention optimisation is applied, which would wipe a class patch; an entry in
``module.__dict__`` shadows the class attribute and is never touched by the WebUI. It also keeps
ControlNet's own CrossAttention modules (outside ``diffusion_model``) untouched.

Restore discipline: every patched module is tracked (weakly) and :meth:`Attn2Patcher.unpatch_all`
puts back exactly what was there before. A patch that could not be removed (another extension wrapped
it afterwards) belongs to a dead :class:`Session` and therefore calls the stock forward, which is
looked up on ``type(module)`` at call time so that the current A1111 optimisation is used.

WebUI modules (``modules.*``, ``ldm``, ``sgm``) are imported lazily inside functions only.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import sys
import types
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pladis.attention import pladis_attention_packed
from pladis.params import PladisParams

log = logging.getLogger(__name__)

GROUP_OF_BLOCK: dict[str, str] = {"input_blocks": "down", "middle_block": "mid", "output_blocks": "up"}
"""Top-level UNet container (ldm and sgm ``UNetModel``) → PLADIS layer group."""

RECORD_ATTR = "_pladis_patch"
"""Attribute on a patched module holding its :class:`_Record` (for inspection and idempotence)."""

# kwargs the sgm forward accepts that PLADIS does not implement; non-default values fall back to stock.
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {"additional_tokens": None, "n_times_crossframe_attn_in_self": 0}


@dataclass(frozen=True)
class HostFunctions:
    """WebUI functions the patched forward needs, resolved once per generation (not per call)."""

    apply_hypernetworks: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None
    loaded_hypernetworks: Callable[[], list]
    without_autocast: Callable[[], contextlib.AbstractContextManager]


def _torch_without_autocast() -> contextlib.AbstractContextManager:
    """Fallback for ``devices.without_autocast``: leave CUDA autocast only if it is on."""
    if torch.is_autocast_enabled():
        return torch.autocast("cuda", enabled=False)
    return contextlib.nullcontext()


def resolve_host_functions() -> HostFunctions:
    """Look up hypernetwork and autocast helpers in the running WebUI (stock fallbacks if absent)."""
    try:
        from modules.hypernetworks import hypernetwork

        apply_hypernetworks = hypernetwork.apply_hypernetworks
    except ImportError:
        apply_hypernetworks = None
    try:
        from modules import shared

        def loaded_hypernetworks() -> list:
            return list(getattr(shared, "loaded_hypernetworks", None) or ())
    except ImportError:

        def loaded_hypernetworks() -> list:
            return []

    try:
        from modules import devices

        without_autocast = devices.without_autocast
    except (ImportError, AttributeError):
        without_autocast = _torch_without_autocast
    return HostFunctions(apply_hypernetworks, loaded_hypernetworks, without_autocast)


@dataclass(eq=False)
class Session:
    """One generation's PLADIS state. ``live`` turns False when it ends, disarming its patches.

    ``owner`` is a weak reference to the generation's processing object (None: not tied to one).
    Once that object is gone the session no longer applies, even while still ``live``: a second line
    of defence after :func:`guard_sampling` for a pass it could not guard. When sampling raises,
    ``postprocess`` never runs, and the patches stay installed until the next generation; meanwhile
    UNet calls that bypass the samplers (textual-inversion or hypernetwork training call
    ``sd_model.forward`` directly) must run stock.
    """

    params: PladisParams
    host: HostFunctions
    owner: Callable[[], Any] | None = None
    progress: float = 0.0
    live: bool = True

    def applies(self) -> bool:
        """Whether PLADIS replaces attention right now: live, owner alive, inside the start/end window."""
        return (
            self.live
            and (self.owner is None or self.owner() is not None)
            and self.params.active_at(self.progress)
        )

    def owned_by(self, p: Any) -> bool:
        return p is not None and self.owner is not None and self.owner() is p


@dataclass(eq=False)
class _Record:
    """What one patch installed on one module, and what was there before it."""

    session: Session
    group: str
    previous: Callable[..., Any] | None  # another extension's instance forward, if any
    forward: Callable[..., Any] | None = None  # our bound forward (identity marks ownership)
    armed: bool = True  # False once restore could not remove it (wrapped by someone else)


GUARD_ATTR = "_pladis_guards_pass"
"""Marks a sampler's ``launch_sampling`` wrapped by :func:`guard_sampling` (set on the wrapper)."""


def guard_sampling(sampler: Any, begin: Callable[[], Any], end: Callable[[], Any]) -> bool:
    """Call ``begin`` when this sampler's pass starts sampling and ``end`` when it is over, however it
    ends; True if its ``launch_sampling`` is guarded (wrapped now, or already by an earlier call,
    which is not wrapped again), False if it cannot be wrapped.

    Why ``end``: when sampling raises (out of memory, an error in some extension's forward), A1111
    skips ``postprocess``, and the patches stayed installed, applying until the garbage collector
    freed the processing object (the sampler and its denoiser hold it in a reference cycle).
    Meanwhile UNet calls that bypass the samplers (textual-inversion or hypernetwork training) ran
    PLADIS. Why ``begin`` (patching there, not in ``process_before_every_sampling``): between that
    hook and ``launch_sampling`` A1111 still encodes the image conditioning (a VAE pass for
    inpainting models), computes the sigmas and initialises the sampler (``processing.py``
    ``sample``, ``sd_samplers_kdiffusion.py`` ``sample``); an error there would leave the patches
    installed with nothing to remove them. Every UNet call of a pass is made inside
    ``launch_sampling`` (A1111's k-diffusion and timestep samplers alike; the refiner switch too).
    The wrapper is an instance attribute of this sampler object only (a new one is made for every
    pass).
    """
    launch = getattr(sampler, "launch_sampling", None)
    if not callable(launch):
        return False
    if getattr(launch, GUARD_ATTR, False):
        return True

    @functools.wraps(launch)
    def launch_sampling(*args: Any, **kwargs: Any) -> Any:
        try:
            begin()
            return launch(*args, **kwargs)
        finally:
            end()

    setattr(launch_sampling, GUARD_ATTR, True)
    try:
        sampler.launch_sampling = launch_sampling
    except (AttributeError, TypeError):  # a sampler with slots or a read-only attribute: not guarded
        return False
    return True


def weak_owner(p: Any) -> Callable[[], Any]:
    """A weak reference to ``p`` (a strong one for objects that cannot be weakly referenced)."""
    try:
        return weakref.ref(p)
    except TypeError:
        return lambda: p


def _fallback(record: _Record, module: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """Whatever would have run without us: the chained instance forward or the class forward *now*."""
    if record.previous is not None:
        return record.previous(x, *args, **kwargs)
    return type(module).forward(module, x, *args, **kwargs)


_bypass_warned: list[bool] = []
"""Set once the warning about a bypassed earlier instance forward was logged (once per process)."""


def _split_call(args: tuple, kwargs: dict) -> tuple[Any, Any, bool]:
    """(context, mask, supported) from a ``forward(x, context=None, mask=None, ...)`` call."""
    context = args[0] if len(args) > 0 else kwargs.get("context")
    mask = args[1] if len(args) > 1 else kwargs.get("mask")
    supported = len(args) <= 2 and mask is None
    for key, value in kwargs.items():
        if key in ("context", "mask"):
            continue
        if key not in _UNSUPPORTED_DEFAULTS or not _is_default(value, _UNSUPPORTED_DEFAULTS[key]):
            supported = False
    return context, mask, supported


def _is_default(value: Any, default: Any) -> bool:
    """``value == default`` for plain values; anything else (a tensor, say) is not the default."""
    return value is default or (type(value) in (int, float, bool) and value == default)


def _pladis_forward(
    record: _Record, module: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """Patched attn2 forward; identical call to the original whenever PLADIS does not apply."""
    session = record.session
    context, _mask, supported = _split_call(args, kwargs)
    if not (supported and record.armed and session.applies()):
        return _fallback(record, module, x, args, kwargs)
    chained = record.previous is not None and _adds_to_text_attention(module, record.previous)
    if (
        not _bypass_warned
        and record.previous is not None
        and not chained
        and not _is_class_forward(module, record.previous)
    ):
        _bypass_warned.append(True)
        log.warning(
            "PLADIS: another extension's cross-attention forward is installed on %s layers; while PLADIS "
            "is active there (λ > 0, inside start/end), PLADIS computes their attention and that "
            "extension's change is not applied",
            type(module).__name__,
        )
    params = session.params
    query = module.to_q(x)
    context = x if context is None else context
    if chained:  # ControlNet's IP-Adapter forward projects the text context as it is (no hypernetworks)
        context_k = context_v = context
    elif session.host.apply_hypernetworks is not None:
        # No ``layer`` argument, as the WebUI's optimised forwards (sdp, xformers, sub-quadratic …)
        # call it: with one, the hypernetwork modules would be attached to attn2 for good
        # (``layer.hyper_k``), joining the model's state_dict and its .to()/.half() moves.
        context_k, context_v = session.host.apply_hypernetworks(session.host.loaded_hypernetworks(), context)
    else:
        context_k = context_v = context
    key = module.to_k(context_k)
    value = module.to_v(context_v)
    # The core computes scores and weights in float32 whatever the dtype and returns q's dtype; the
    # inputs stay in the model dtype so the fused GPU kernel can read fp16/bf16 directly.
    with session.host.without_autocast():
        out = pladis_attention_packed(
            query,
            key.to(query.dtype),
            value.to(query.dtype),
            module.heads,
            alpha=params.alpha,
            lam=params.lam,
            scale=getattr(module, "scale", None),
        )
        if chained:
            stock = pladis_attention_packed(  # λ = 0: exactly stock SDPA on the same inputs
                query,
                key.to(query.dtype),
                value.to(query.dtype),
                module.heads,
                alpha=params.alpha,
                lam=0.0,
                scale=getattr(module, "scale", None),
            )
    if not chained:
        return module.to_out(out)
    # Their output is to_out(text attention + image-prompt attention); to_out is affine, so adding
    # to_out's linear part of PLADIS's change to the text attention gives PLADIS on it, image prompt kept.
    base = record.previous(x, *args, **kwargs)
    change = module.to_out(out - stock) - module.to_out(out.new_zeros((1, 1, out.shape[-1])))
    return base + change


def _adds_to_text_attention(module: nn.Module, previous: Callable[..., Any]) -> bool:
    """Whether ``previous`` (the instance forward under ours) is ControlNet's IP-Adapter one, active:
    stock text attention plus image-prompt attention terms (``ipadapter_hacks``), then ``to_out``.

    Why: that forward is what A1111 users most often have under ours; computing the layer ourselves
    dropped the image prompt on every PLADIS layer. ControlNet binds its ``attn_forward_hacked`` to
    the module (``plugable_ipadapter.hack_blk``); the list alone is not enough, as another
    extension's forward (Regional Prompter's, say) may sit on top of it and is not known to be
    additive: PLADIS still replaces such forwards (and says so once).
    """
    hacks = getattr(module, "ipadapter_hacks", None)
    function = _function_bound_to(module, previous)
    return (
        isinstance(hacks, list)
        and len(hacks) > 0
        and getattr(function, "__name__", "") == "attn_forward_hacked"
    )


def _function_bound_to(module: nn.Module, forward: Callable[..., Any]) -> Any:
    """The function of ``forward`` when it is a method bound to ``module``, else None."""
    return getattr(forward, "__func__", None) if getattr(forward, "__self__", None) is module else None


_STOCK_FORWARD_MODULES = ("modules.sd_hijack_optimizations", "ldm.modules.attention", "sgm.modules.attention")
"""Where the WebUI's own cross-attention forwards live (the stock ones and the optimised ones)."""


def _is_class_forward(module: nn.Module, previous: Callable[..., Any]) -> bool:
    """Whether ``previous`` is only a stock forward bound to ``module``, which replacing loses nothing.

    Why: ControlNet's ``clear_all_ip_adapter`` puts back the instance forward it saved, the class
    forward bound to the module, so after one IP-Adapter generation every attn2 keeps one; warning
    that "another extension's" forward was bypassed was wrong there.
    """
    function = _function_bound_to(module, previous)
    if function is None:
        return False
    return (
        function is getattr(type(module), "forward", None)
        or getattr(function, "__module__", "") in _STOCK_FORWARD_MODULES
    )


def _cross_attention_classes() -> tuple[type, ...]:
    """ldm and sgm ``CrossAttention`` classes of the running WebUI (already imported there)."""
    found = []
    for name in ("ldm.modules.attention", "sgm.modules.attention"):
        module = sys.modules.get(name)
        if module is None:
            try:
                module = importlib.import_module(name)
            except Exception:
                continue
        cls = getattr(module, "CrossAttention", None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def _looks_like_cross_attention(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("heads", "to_q", "to_k", "to_v", "to_out"))


def find_attn2(unet: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``(name, group, module)`` for every attn2 CrossAttention under ``unet`` (a ``diffusion_model``).

    Counted dynamically (SD1/SD2: 16, SDXL: 70, refiner: 44, SD3: 0). Matched by the attribute name
    ``attn2`` and the module class, never by the parent's class (tomesd swaps that one).
    """
    classes = _cross_attention_classes()
    found = []
    for name, module in unet.named_modules():
        if name.rsplit(".", 1)[-1] != "attn2":
            continue
        if classes and not isinstance(module, classes):
            continue
        if not _looks_like_cross_attention(module):
            continue
        group = GROUP_OF_BLOCK.get(name.split(".", 1)[0])
        if group is not None:
            found.append((name, group, module))
    return found


def diffusion_model_of(sd_model: Any) -> nn.Module | None:
    """``sd_model.model.diffusion_model`` (ldm DiffusionWrapper or sgm OpenAIWrapper) or None."""
    unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    return unet if isinstance(unet, nn.Module) else None


def model_sampled_by(denoiser: Any) -> Any:
    """The model an A1111 ``CFGDenoiser`` calls (``model_wrap.inner_model``), or None if not built.

    Why: the denoiser keeps the model it was built on until a refiner switch drops it. img2img builds
    its sampler once, in ``p.init``, so after batch 1 switched to the refiner, batch 2 (which starts
    on the base model, ``p.sd_model``) still calls the refiner. The ``model_wrap`` attribute is read,
    not the ``inner_model`` property, which would build one.
    """
    model = getattr(getattr(denoiser, "model_wrap", None), "inner_model", None)
    return model if diffusion_model_of(model) is not None else None


def unsupported_reason(sd_model: Any) -> str | None:
    """Why this A1111-style WebUI cannot run PLADIS on ``sd_model``, or None.

    Why: SD.Next loads A1111 extensions but calls neither ``process_before_every_sampling`` nor
    ``on_cfg_denoiser`` with the denoiser (so PLADIS never patched), and its diffusers backend has no
    ``sd_model.model.diffusion_model``. PLADIS then changed nothing while the infotext said it was on.
    Only what is there is judged: a host module that cannot be found counts as supported.
    """
    if sd_model is not None and diffusion_model_of(sd_model) is None:
        return (
            "the loaded model has no ldm/sgm UNet (sd_model.model.diffusion_model), e.g. a diffusers pipeline"
        )
    scripts = sys.modules.get("modules.scripts")
    callbacks = sys.modules.get("modules.script_callbacks")
    runner = getattr(scripts, "ScriptRunner", None)
    params_class = getattr(callbacks, "CFGDenoiserParams", None)
    if runner is None or params_class is None:
        return None
    if hasattr(runner, "process_before_every_sampling"):
        return None
    try:
        has_denoiser = "denoiser" in inspect.signature(params_class).parameters
    except (TypeError, ValueError):
        return None
    if has_denoiser:
        return None
    return "this WebUI calls neither process_before_every_sampling nor on_cfg_denoiser with the denoiser"


def progress_from_cfg_params(params: Any) -> float:
    """Fraction of the sampling schedule done, from an ``on_cfg_denoiser`` ``CFGDenoiserParams``.

    Preferred: ``denoiser.step / denoiser.total_steps``. ``CFGDenoiser.step`` counts completed
    denoiser calls of this sampling pass and ``total_steps`` is the sampler's planned number of
    calls (``launch_sampling``), so Euler at 20 steps gives 0, 1/20, …, 19/20 — exactly
    step_index/total_steps — and second-order samplers count their extra evaluations. The fallback
    ``sampling_step / total_sampling_steps`` comes from ``shared.state``, whose step is only updated
    by the sampler callback *after* a step, i.e. it lags by one.
    """
    denoiser = getattr(params, "denoiser", None)
    step, total = getattr(denoiser, "step", None), getattr(denoiser, "total_steps", None)
    if not (isinstance(step, int) and isinstance(total, int) and total > 0):
        step, total = getattr(params, "sampling_step", 0), getattr(params, "total_sampling_steps", 0)
    try:
        fraction = float(step) / float(total) if total else 0.0
    except (TypeError, ValueError):
        fraction = 0.0
    return min(max(fraction, 0.0), 1.0)


class Attn2Patcher:
    """Owns every PLADIS instance patch in the process; one generation (:class:`Session`) at a time."""

    def __init__(self) -> None:
        self.session: Session | None = None
        self._patched: list[weakref.ReferenceType[nn.Module]] = []
        self._targets: weakref.WeakKeyDictionary[nn.Module, list[tuple[str, str, nn.Module]]] = (
            weakref.WeakKeyDictionary()
        )
        self._warned: set[str] = set()

    # -- session lifecycle -------------------------------------------------------------------------
    def new_generation(self) -> None:
        """Forget the warnings given: each generation says once why PLADIS did nothing (SD3, TensorRT).

        Called from the script's ``process``, once per generation, not from :meth:`begin`, which
        every sampling pass (each batch, hires fix) calls again after the previous pass ended.
        """
        self._warned.clear()

    def begin(self, params: PladisParams, owner: Any = None, host: HostFunctions | None = None) -> Session:
        """End any previous generation (removing its patches), then start a new one."""
        self.end()
        owner_ref = None if owner is None else weak_owner(owner)
        self.session = Session(params, host or resolve_host_functions(), owner_ref)
        return self.session

    def end(self) -> int:
        """Disarm the current session and remove every patch; returns how many modules were restored."""
        if self.session is not None:
            self.session.live = False
            self.session = None
        return self.unpatch_all()

    def set_progress(self, progress: float) -> None:
        if self.session is not None:
            self.session.progress = min(max(float(progress), 0.0), 1.0)

    # -- patching ----------------------------------------------------------------------------------
    def patch_model(self, sd_model: Any) -> int:
        """Patch attn2 of the selected groups of ``sd_model``'s UNet for the live session (idempotent)."""
        session = self.session
        if session is None or not session.live or not session.params.acts:
            return 0
        unet = diffusion_model_of(sd_model)
        if unet is None:
            self._warn_once("no-unet", "PLADIS: this model has no UNet diffusion_model; PLADIS is inactive.")
            return 0
        self._warn_if_unet_bypassed()
        targets = self._targets.get(unet)
        if targets is None:
            targets = find_attn2(unet)
            self._targets[unet] = targets
        if not targets:
            self._warn_once(
                f"no-attn2-{type(unet).__name__}",
                "PLADIS: no cross-attention (attn2) layers in this model (e.g. SD3); PLADIS is inactive.",
            )
        count = 0
        for _name, group, module in targets:
            if group in session.params.layers:
                self._ensure(module, group, session)
                count += 1
        return count

    def _ensure(self, module: nn.Module, group: str, session: Session) -> None:
        current = module.__dict__.get("forward")
        record = module.__dict__.get(RECORD_ATTR)
        if isinstance(record, _Record) and current is not None and current is record.forward:
            if record.session is not session or not record.armed:  # our old patch on top: re-arm, don't stack
                record.session, record.armed = session, True
                self._track(module)
            return
        record = _Record(session=session, group=group, previous=current)
        record.forward = types.MethodType(functools.partial(_pladis_forward, record), module)
        module.__dict__[RECORD_ATTR] = record
        module.__dict__["forward"] = record.forward
        self._track(module)

    def _track(self, module: nn.Module) -> None:
        if not any(ref() is module for ref in self._patched):
            self._patched.append(weakref.ref(module))

    def unpatch_all(self) -> int:
        """Remove our patches from every module ever patched (any model object, refiner included)."""
        restored = 0
        for ref in self._patched:
            module = ref()
            if module is not None and unpatch_module(module):
                restored += 1
        self._patched.clear()
        self._targets = weakref.WeakKeyDictionary()
        return restored

    def patched_modules(self) -> Iterator[nn.Module]:
        """Modules currently carrying a PLADIS forward of ours on top (diagnostics and tests)."""
        for ref in self._patched:
            module = ref()
            if module is not None and is_patched(module):
                yield module

    # -- warnings ----------------------------------------------------------------------------------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def _warn_if_unet_bypassed(self) -> None:
        sd_unet = sys.modules.get("modules.sd_unet")
        if getattr(sd_unet, "current_unet", None) is not None:
            self._warn_once(
                "sd-unet",
                "PLADIS: an alternative UNet (e.g. TensorRT) is active; it bypasses attention patches.",
            )


def is_patched(module: nn.Module) -> bool:
    """Whether ``module``'s instance forward is a PLADIS patch."""
    record = module.__dict__.get(RECORD_ATTR)
    return isinstance(record, _Record) and module.__dict__.get("forward") is record.forward


def unpatch_module(module: nn.Module) -> bool:
    """Put back what was there before our patch, if our patch is still on top; True if restored.

    When another extension wrapped our forward afterwards we leave the chain intact and disarm our
    link, so it just passes the call through.
    """
    record = module.__dict__.get(RECORD_ATTR)
    if not isinstance(record, _Record):
        return False
    if module.__dict__.get("forward") is not record.forward:
        record.armed = False
        return False
    if record.previous is not None:
        module.__dict__["forward"] = record.previous
    else:
        del module.__dict__["forward"]
    del module.__dict__[RECORD_ATTR]
    return True


PATCHER = Attn2Patcher()
"""The process-wide patcher (the WebUI runs one generation at a time under its queue lock)."""
