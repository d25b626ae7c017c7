"""Per-generation control: what the script hooks and WebUI callbacks do, host-independent.

Flow (A1111 ``processing.py``): ``process`` (parse, infotext, clean up any previous generation) →
``p.init`` → per sampling pass ``process_before_every_sampling`` (arm the patch of the UNet being sampled;
on Forge/reForge hand over to ``pladis.hosts.forge.apply``) → ``on_cfg_denoiser`` before every UNet
call (progress for the start/end window, and the model that the SDXL refiner switched to) →
``postprocess`` (restore). ``postprocess`` is skipped when sampling raises, so on A1111 each
sampling pass patches only when its sampler's ``launch_sampling`` starts and restores when it
returns or raises; the next ``process``, a foreign generation seen in ``on_cfg_denoiser``, a model
(re)load and script unload restore too.

WebUI script hooks swallow exceptions, so a bad value cannot fail a request from ``process``; it is
re-raised from ``p.init``, which ``process_images_inner`` calls unwrapped right after the hooks and
before anything touched the model.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pladis import hosts
from pladis.hosts import a1111
from pladis.params import PladisParams
from pladis.webui import infotext
from pladis.webui.args import params_for

log = logging.getLogger("pladis")

FAILED_INIT_ATTR = "_pladis_error"
"""Attribute of a processing object whose request must fail (holds the validation error)."""

GENERATION_ATTR = "_pladis_generation"
"""Attribute of the processing object carrying its :class:`Generation` (set in ``process``)."""


@dataclass(eq=False)
class Generation:
    """What PLADIS does for one processing object; only valid for that very object (not its copies)."""

    owner: Callable[[], Any]
    params: PladisParams
    host: str
    skipped: bool = False
    """On Forge: whether a sampling pass was left without PLADIS before any got it (see ``_acting``)."""

    def owns(self, p: Any) -> bool:
        return p is not None and self.owner() is p


def generation_of(p: Any) -> Generation | None:
    """The generation configured for ``p`` by our ``process`` hook, if any (copies of ``p`` have none)."""
    generation = getattr(p, GENERATION_ATTR, None)
    return generation if isinstance(generation, Generation) and generation.owns(p) else None


def fail_at_init(p: Any, error: Exception) -> None:
    """Make this request fail with ``error`` when the WebUI calls ``p.init`` (outside hook wrappers)."""

    def init(*args: Any, **kwargs: Any) -> Any:
        raise error

    setattr(p, FAILED_INIT_ATTR, error)
    p.init = init


def _undo_fail_at_init(p: Any) -> None:
    state = getattr(p, "__dict__", {})
    if FAILED_INIT_ATTR in state:
        state.pop(FAILED_INIT_ATTR, None)
        state.pop("init", None)


class Controller:
    """Glue between the WebUI hooks and the host adapter; one instance per process.

    Per-generation settings live on the processing object itself, so a generation nested inside
    another one (ADetailer, X/Y/Z cells) neither inherits nor destroys the outer one's settings: the
    outer generation simply re-patches at its next sampling pass.
    """

    def __init__(self, patcher: a1111.Attn2Patcher | None = None) -> None:
        self.patcher = patcher or a1111.PATCHER

    # -- script hooks ------------------------------------------------------------------------------
    def process(self, p: Any, args: Sequence[Any]) -> PladisParams | None:
        """Parse the args (+ X/Y/Z overrides), write infotext, clean up, configure PLADIS for ``p``."""
        self.stop()  # leftovers of a crashed or enclosing generation must not leak into this one
        self.patcher.new_generation()
        _undo_fail_at_init(p)
        inherited = getattr(p, GENERATION_ATTR, None)  # a copy of p carries p's
        setattr(p, GENERATION_ATTR, None)
        extra = getattr(p, "extra_generation_params", None)
        try:
            params = params_for(p, args)
        except ValueError as error:
            if extra is not None:
                infotext.clear(extra)
            fail_at_init(p, error)
            return None
        host = hosts.detect_host()
        checked = params.acts and host == "a1111"
        unsupported = a1111.unsupported_reason(getattr(p, "sd_model", None)) if checked else None
        if unsupported:
            # Said every generation, and not written into the infotext: nothing will change.
            log.warning("PLADIS is off: %s", unsupported)
            if extra is not None:
                infotext.clear(extra)
            return params
        if extra is not None and not _skipped_by_original(p, inherited, extra):
            infotext.write(extra, params)
        # Flux on Forge has no layer choice: there PLADIS acts whenever it changes the attention.
        if params.acts or (host != "a1111" and params.changes_attention):
            setattr(p, GENERATION_ATTR, Generation(a1111.weak_owner(p), params, host))
        idle = idle_reason(params, host)
        if idle:
            log.warning("PLADIS is enabled but changes nothing: %s", idle)
        return params

    def before_sampling(self, p: Any) -> None:
        """Each sampling pass (first pass, hires pass, img2img): patch the model about to be sampled."""
        generation = generation_of(p)
        if generation is None:
            return
        if generation.host != "a1111":
            _apply_forge(p, generation)
            return
        self._activate(p, generation)
        self.patcher.set_progress(0.0)
        owner = a1111.weak_owner(p)

        def begin() -> None:  # patched when sampling starts: nothing is left installed if it never does
            current = owner()
            if current is not None:
                self.patcher.patch_model(current.sd_model)

        if not a1111.guard_sampling(getattr(p, "sampler", None), begin, self.patcher.end):
            self.patcher.patch_model(p.sd_model)  # an unguarded sampler: now (the weak owner defends)

    def postprocess(self, p: Any) -> None:
        self.patcher.end()
        _restore_switched_forge_models(p)
        if generation_of(p) is not None:
            setattr(p, GENERATION_ATTR, None)

    def stop(self) -> None:
        """Remove every patch, put back the refiner patchers PLADIS replaced on Forge, and disarm the
        running session (idempotent)."""
        self.patcher.end()
        _restore_switched_forge_models(None)

    def _activate(self, p: Any, generation: Generation) -> None:
        session = self.patcher.session
        if session is None or not session.owned_by(p) or session.params != generation.params:
            self.patcher.begin(generation.params, owner=p)

    # -- WebUI callbacks ---------------------------------------------------------------------------
    def on_cfg_denoiser(self, params: Any) -> None:
        """Before every UNet call: window progress, and patch the model the refiner may have switched to."""
        p = getattr(getattr(params, "denoiser", None), "p", None)
        if p is None:
            return
        generation = generation_of(p)
        if generation is None:
            self.patcher.unpatch_all()  # a generation we did not configure: stay out of it
            return
        if generation.host != "a1111":
            if getattr(p, "sd_model", None) is not getattr(p, FORGE_MODEL_ATTR, None):
                _apply_forge(p, generation, switched=True)  # the SDXL refiner switch (see below)
            return
        self._activate(p, generation)
        self.patcher.set_progress(a1111.progress_from_cfg_params(params))
        self.patcher.patch_model(p.sd_model)
        sampled = a1111.model_sampled_by(params.denoiser)
        if sampled is not None and sampled is not p.sd_model:
            self.patcher.patch_model(sampled)

    def on_model_loaded(self, sd_model: Any) -> None:
        """Weights (re)loaded: drop patches; the running generation re-patches before its next UNet call."""
        del sd_model
        self.patcher.unpatch_all()

    def unload(self) -> None:
        """``on_script_unloaded``: leave nothing behind before the WebUI reloads scripts."""
        self.stop()


CONTROLLER = Controller()

FORGE_MODEL_ATTR = "_pladis_forge_model"
"""Attribute of a processing object: the model PLADIS last applied to on Forge (``p.sd_model``)."""

SWITCHED_ATTR = "_pladis_switched"
"""Attribute of the ``forge_objects`` of a model a refiner switch brought in: ``(its patcher, PLADIS's
clone, the processing object's weak reference)``, to put back (:func:`_restore_switched_forge_models`)."""

_switched: weakref.WeakSet[Any] = weakref.WeakSet()
"""The ``forge_objects`` that carry a :data:`SWITCHED_ATTR` record, kept weakly: an evicted model goes."""

_switched_strongly: dict[int, Any] = {}
"""Such ``forge_objects`` that take no weak reference (Forge's do), by id, until they are restored."""


def _forge_unet(p: Any) -> Any:
    """``p.sd_model.forge_objects.unet`` (the patcher Forge's sampling reads on every call), or None."""
    return getattr(getattr(getattr(p, "sd_model", None), "forge_objects", None), "unet", None)


def _apply_forge(p: Any, generation: Generation, switched: bool = False) -> None:
    """Install PLADIS on a clone of the current UNet patcher (Forge/reForge) and remember the model.

    Why also from ``on_cfg_denoiser`` (``switched``): Forge's SDXL refiner switch loads the refiner
    mid-sampling without calling ``process_before_every_sampling``; the denoiser then reads the
    refiner's ``forge_objects.unet`` on every call, after the callback, so a clone patched there is
    used from that call on. Keyed on the model, not the patcher: an extension that swaps the patcher
    of the same model is left as it was before. The model is remembered even when applying fails, so
    a failure is not retried on every call. A switched model's own patcher is put back afterwards
    (:func:`_restore_switched_forge_models`, also after a crash: :func:`_remember_switched`): Forge
    resets ``forge_objects`` before each pass anyway, but a host that keeps the refiner object loaded
    must not keep our clone on it.
    """
    forge = importlib.import_module("pladis.hosts.forge")
    before = _forge_unet(p)
    try:
        forge.apply(p, generation.params)
    finally:
        with contextlib.suppress(AttributeError, TypeError):
            setattr(p, FORGE_MODEL_ATTR, getattr(p, "sd_model", None))
        after = _forge_unet(p)
        _record_forge_outcome(p, generation, acted=after is not before)  # also when apply raised
    if switched and after is not before:
        _remember_switched(p.sd_model.forge_objects, before, after, a1111.weak_owner(p))


def _record_forge_outcome(p: Any, generation: Generation, acted: bool) -> None:
    """Keep the PLADIS infotext keys only once a sampling pass got PLADIS (``forge.apply`` puts a
    clone back only when it installed something).

    Why: ``process`` writes them before Forge says whether it can patch the model; a skipped model
    (a compile preset PLADIS cannot run under, no layer group, no sigma schedule) made images whose
    parameters claimed PLADIS. Written again if a later pass (hires fix, the refiner) gets it.
    """
    extra = getattr(p, "extra_generation_params", None)
    if generation in _acting:
        return
    if acted:
        _acting.add(generation)
        if extra is not None:
            infotext.write(extra, generation.params)
        return
    generation.skipped = True
    if extra is not None and not _acted_on_by_another(p, extra):
        infotext.clear(extra)


_acting: weakref.WeakSet[Generation] = weakref.WeakSet()
"""Forge generations a sampling pass got PLADIS for, while their processing objects live (their
infotext keys are cleared until a pass does)."""


def _acted_on_by_another(p: Any, extra: Any) -> bool:
    """Whether another live generation that got PLADIS writes its infotext from the dict ``extra``.

    Why: ADetailer's inpainting pass is a generation of its own that shares the enclosing one's
    ``extra_generation_params``; its skipped pass (an inpainting checkpoint PLADIS cannot patch)
    must not remove the keys the enclosing generation earned. Copies of one ``p`` that share its
    script runner (X/Y/Z cells) do not count: a cell that raised stays alive (never post-processed)
    and would keep its keys on the next cell's images.
    """
    runner = getattr(p, "scripts", None)
    for generation in list(_acting):
        owner = generation.owner()
        sibling = runner is not None and getattr(owner, "scripts", None) is runner
        if not sibling and _shares_infotext(owner, p, extra):
            return True
    return False


def _shares_infotext(owner: Any, p: Any, extra: Any) -> bool:
    """Whether ``owner``, a live processing object other than ``p``, writes its infotext from ``extra``."""
    return owner is not None and owner is not p and getattr(owner, "extra_generation_params", None) is extra


def _skipped_by_original(p: Any, inherited: Any, extra: Any) -> bool:
    """Whether ``p`` is a copy of a live generation's processing object that shares its infotext dict
    and whose sampling was left without PLADIS (``inherited``: the generation the copy carries).

    Why: ADetailer re-runs the scripts' ``process`` on a copy of ``p`` after a batch's last image, before
    that image's infotext is made; writing the keys again there undid the skip's removal.
    """
    if not isinstance(inherited, Generation) or inherited in _acting or not inherited.skipped:
        return False
    return _shares_infotext(inherited.owner(), p, extra)


def _remember_switched(objects: Any, original: Any, ours: Any, owner: Callable[[], Any]) -> None:
    """Record on ``objects`` that PLADIS's clone ``ours`` replaced ``original``, for the restore.

    Why on the objects, in a process-wide weak set, and not on ``p``: ``postprocess`` is skipped when
    a generation raises after the switch (e.g. out of memory in the VAE decode), and a host with a
    checkpoint cache (reForge) hands the same refiner object to later generations without resetting
    its ``forge_objects``: they would run PLADIS's clone, even with PLADIS off. The next ``process``
    restores it. Held by the objects themselves, so an evicted model is not kept alive. A second
    record on the same objects keeps the first original: never one of PLADIS's clones.
    """
    previous = getattr(objects, SWITCHED_ATTR, None)
    if previous is not None and getattr(objects, "unet", None) is ours and previous[1] is original:
        original = previous[0]
    try:
        setattr(objects, SWITCHED_ATTR, (original, ours, owner))
    except (AttributeError, TypeError):  # objects that take no attribute
        log.warning("PLADIS: cannot remember the refiner's own UNet patcher; a crash may leave PLADIS on it")
        return
    try:
        _switched.add(objects)
    except TypeError:  # no weak reference: held until the next restore
        _switched_strongly[id(objects)] = objects


def _restore_switched_forge_models(p: Any) -> None:
    """Put back the patchers of models a refiner switch brought in, where PLADIS's clone is still on:
    those of ``p`` and of processing objects that are gone (``postprocess``), or all (``p`` None:
    a new generation, script unload)."""
    for objects in [*_switched, *_switched_strongly.values()]:
        original, ours, owner = getattr(objects, SWITCHED_ATTR, (None, None, lambda: None))
        current = owner()
        if p is not None and current is not None and current is not p:
            continue
        if ours is not None and getattr(objects, "unet", None) is ours:
            objects.unet = original
        with contextlib.suppress(AttributeError):
            delattr(objects, SWITCHED_ATTR)
        if _switched_strongly.pop(id(objects), None) is None:
            _switched.discard(objects)


def idle_reason(params: PladisParams, host: str) -> str | None:
    """Why an enabled PLADIS setting changes nothing, when that is likely a slip; else None.

    λ = 0 and α = 1 are left out: they are the stock model on purpose (an X/Y/Z column, a baseline).
    Layers are judged on A1111 only: on Forge they do not apply to Flux, and its adapter says so
    for a UNet.
    """
    if not params.enabled:
        return None
    if params.end <= params.start:
        return f"Start equals End ({params.start:g}), so its window is empty"
    if not params.layers and host == "a1111":
        return "no layer group is ticked"
    return None
