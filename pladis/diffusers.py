"""PLADIS for diffusers: an attention processor for the cross-attention (``attn2``) of UNet pipelines.

``apply_pladis(pipe)`` swaps the processor of every cross-attention ``attn2`` in the chosen UNet block
groups (``down_blocks`` → "down", ``mid_block`` → "mid", ``up_blocks`` → "up"; the official choice is
down+up) for :class:`PladisAttnProcessor` and returns a handle that puts the previous processor objects
back. Self-attention is never touched. The processor follows the steps of diffusers' stock processor
(spatial norm, 4-D input, mask preparation, group norm, cross norm, q/k norms, output projection and
dropout, residual, output rescale) and replaces only the attention itself by the PLADIS core, whose
maths runs in float32. IP-Adapter's processors are kept underneath instead: PLADIS adds its change to
their text attention (:func:`pladis_change`). diffusers itself is imported lazily: ``import pladis``
must not need it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import pladis_attention
from .eager import not_traced
from .params import DEFAULT_LAYERS, PladisParams, parse_params

__all__ = ["PladisAttnProcessor", "PladisHandle", "apply_pladis", "cross_attention_modules"]

_GROUP_OF_BLOCK: dict[str, str] = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}
"""First component of a UNet2DConditionModel module name → PLADIS layer group."""

_WRAPPER_PREFIXES = frozenset({"_orig_mod", "module"})
"""Name components added by torch.compile / DataParallel wrappers; skipped when finding the group."""

_PLAIN_PROCESSORS = frozenset(
    {
        "AttnProcessor",
        "AttnProcessor2_0",
        "AttnProcessorNPU",
        "FusedAttnProcessor2_0",
        "SlicedAttnProcessor",
        "XFormersAttnProcessor",
        "PladisAttnProcessor",
    }
)
"""Processors that compute plain attention, so PLADIS replacing them loses nothing else."""

_CHAINED_PREFIX = "IPAdapter"
"""Processors kept under ours: PLADIS adds its change to their output (see :func:`pladis_change`)."""

_PREVIOUS_CHILD = "pladis_previous_processor"
"""Name under which a processor that is an ``nn.Module`` (IP-Adapter's, with weights) stays registered
on its ``Attention`` module while ours is installed: diffusers' ``set_processor`` unregisters it when
a non-module processor replaces it, and ``.to()`` or model offloading would then leave its weights
behind (mixed devices or dtypes)."""


_eager_pladis_attention = not_traced(pladis_attention)


class _Settings:
    """α and λ shared by all processors of one :class:`PladisHandle`, so ``handle.set`` updates them."""

    __slots__ = ("alpha", "lam")

    def __init__(self, alpha: float, lam: float) -> None:
        self.alpha = alpha
        self.lam = lam


class PladisAttnProcessor:
    """diffusers attention processor computing ``((1 − λ)·softmax + λ·entmax_α)(q·kᵀ·scale) @ v``.

    ``previous`` is the stock processor underneath: at λ = 0 the call is handed to it unchanged, so
    the output is bit-identical to the stock model (without one, λ = 0 is plain SDPA). Standalone use:
    ``attn.set_processor(PladisAttnProcessor(attn.processor, alpha=1.5, lam=2.0))``.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        """Called with no arguments, a stock processor: what diffusers' ``unload_ip_adapter`` rebuilds.

        It rebuilds every processor that is not IP-Adapter's as ``value.__class__()``; without this
        it failed on ours halfway through, leaving the image projection gone but IP-Adapter's
        processors in place. Those layers now get the stock processor a stock layer gets there, so
        PLADIS is off on them (``remove()`` warns; apply it again after an unload).
        """
        if not args and not kwargs:
            from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

            return AttnProcessor2_0() if hasattr(F, "scaled_dot_product_attention") else AttnProcessor()
        return super().__new__(cls)

    def __getnewargs__(self) -> tuple[Any, ...]:
        """Arguments for ``__new__`` when copied or pickled, so that a copy stays a PLADIS processor."""
        return (self.previous,)

    def __init__(
        self, previous: Any, alpha: Any = 1.5, lam: Any = 2.0, *, settings: Any = None, replaced: Any = None
    ) -> None:
        if settings is None:
            params = parse_params(enabled=True, alpha=alpha, lam=lam)
            settings = _Settings(params.alpha, params.lam)
        self.settings = settings
        self.previous = previous
        # What removing this processor puts back (``previous`` unless installed over another PLADIS one).
        self.replaced = previous if replaced is None else replaced

    @property
    def alpha(self) -> float:
        return self.settings.alpha

    @property
    def lam(self) -> float:
        return self.settings.lam

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Any = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args: Any,
        ip_adapter_masks: Any = None,
        **kwargs: Any,
    ) -> Tensor:
        # ``ip_adapter_masks`` is named because diffusers passes a processor only the keyword arguments
        # its ``__call__`` names (``Attention.forward``), and IP-Adapter's processor needs it.
        alpha, lam = self.settings.alpha, self.settings.lam
        if ip_adapter_masks is not None:
            kwargs["ip_adapter_masks"] = ip_adapter_masks
        text = _chained_text_context(self.previous, encoder_hidden_states)
        if (lam == 0.0 or text is not None) and self.previous is not None:
            if temb is not None:  # not every stock processor takes ``temb`` (SlicedAttnProcessor does not)
                kwargs["temb"] = temb
            # Extra positional args are the deprecated ``scale``, which stock processors ignore too.
            base = self.previous(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                **kwargs,
            )
            if lam == 0.0:
                return base
            change = pladis_change(attn, hidden_states, text, attention_mask, temb, alpha=alpha, lam=lam)
            return (base.float() + change).to(base.dtype)
        context = encoder_hidden_states if text is None else text  # standalone: the text part only
        return pladis_attention_forward(
            attn, hidden_states, context, attention_mask, temb, alpha=alpha, lam=lam
        )

    def __repr__(self) -> str:
        return f"PladisAttnProcessor(alpha={self.alpha:g}, lam={self.lam:g})"


def pladis_attention_forward(
    attn: nn.Module,
    hidden_states: Tensor,
    encoder_hidden_states: Tensor | None,
    attention_mask: Tensor | None,
    temb: Tensor | None,
    *,
    alpha: float,
    lam: float,
) -> Tensor:
    """One diffusers ``Attention`` call with PLADIS weights, step for step like the stock processor."""
    residual = hidden_states
    query, key, value, mask, layout = _attention_inputs(
        attn, hidden_states, encoder_hidden_states, attention_mask, temb
    )
    # attn.scale is head_dim**-0.5 unless the module was built with scale_qk=False (then 1.0, which the
    # stock AttnProcessor honours too; AttnProcessor2_0 leaves it to SDPA, the same for SD UNets).
    out = _eager_pladis_attention(query, key, value, alpha=alpha, lam=lam, scale=attn.scale, mask=mask)
    hidden_states = _packed(out).to(query.dtype)
    hidden_states = attn.to_out[0](hidden_states)  # output projection
    hidden_states = attn.to_out[1](hidden_states)  # dropout
    hidden_states = _to_input_layout(hidden_states, layout)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def pladis_change(
    attn: nn.Module,
    hidden_states: Tensor,
    text: Tensor,
    attention_mask: Tensor | None,
    temb: Tensor | None,
    *,
    alpha: float,
    lam: float,
) -> Tensor:
    """What PLADIS changes in a module's output, in float32: ``λ·(entmax − softmax)(q·kᵀ)·V`` over
    the ``text`` keys, through the output projection's linear part and the output rescale.

    For processors that add more than text attention (IP-Adapter's image-prompt attention): their
    output plus this change is their output with PLADIS on its text attention, as Forge's patch
    chaining does. The residual and the projection's bias are in their output already.
    """
    query, key, value, mask, layout = _attention_inputs(attn, hidden_states, text, attention_mask, temb)
    compute_dtype = query.dtype  # what the stock processor feeds the output projection
    query, key, value = query.float(), key.float(), value.float()
    if mask is not None and mask.is_floating_point():
        mask = mask.float()
    blended = _eager_pladis_attention(query, key, value, alpha=alpha, lam=lam, scale=attn.scale, mask=mask)
    dense = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scale)
    change = _linear_part(attn.to_out[0], _packed(blended - dense), compute_dtype)
    return _to_input_layout(change, layout) / attn.rescale_output_factor


def _chained_text_context(previous: Any, encoder_hidden_states: Any) -> Tensor | None:
    """The text part of an IP-Adapter call's context, or None for a plain call.

    diffusers hands IP-Adapter processors ``(text, image_prompt_states)``; the deprecated form is one
    tensor with the image-prompt tokens last (``num_tokens[0]`` of them), split the way
    ``IPAdapterAttnProcessor`` splits it.
    """
    if isinstance(encoder_hidden_states, (tuple, list)) and encoder_hidden_states:
        return encoder_hidden_states[0]
    num_tokens = getattr(previous, "num_tokens", None)
    if (
        isinstance(encoder_hidden_states, Tensor)
        and type(previous).__name__.startswith(_CHAINED_PREFIX)
        and isinstance(num_tokens, (tuple, list))
        and num_tokens
    ):
        return encoder_hidden_states[:, : encoder_hidden_states.shape[1] - int(num_tokens[0])]
    return None


def _attention_inputs(
    attn: nn.Module,
    hidden_states: Tensor,
    encoder_hidden_states: Tensor | None,
    attention_mask: Tensor | None,
    temb: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, tuple[int, ...] | None]:
    """Query, key and value ``(B, H, N/K, d)``, the SDPA-shaped mask and the 4-D input's layout, as
    the stock processor prepares them (spatial norm, group norm, cross norm, q/k norms)."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)

    layout = None
    if hidden_states.ndim == 4:
        layout = tuple(hidden_states.shape)
        batch, channels, height, width = layout
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)

    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    batch, key_length, _ = context.shape

    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, key_length, batch)
        # (batch·heads, queries or 1, keys) → (batch, heads, queries or 1, keys), as SDPA expects
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)

    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value, attention_mask, layout


def _packed(out: Tensor) -> Tensor:
    """``(B, H, N, d)`` → ``(B, N, H·d)``."""
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def _to_input_layout(hidden_states: Tensor, layout: tuple[int, ...] | None) -> Tensor:
    """Back to ``(B, C, H, W)`` when the module's input was an image."""
    if layout is None:
        return hidden_states
    return hidden_states.transpose(-1, -2).reshape(layout)


def _linear_part(projection: nn.Module, change: Tensor, compute_dtype: torch.dtype) -> Tensor:
    """``projection(x + change) − projection(x)`` for an affine ``projection``, in float32.

    A plain ``nn.Linear`` is its weight alone; wrapped ones (LoRA layers, offloaded or layerwise-cast
    layers) are affine too, so their value at ``change`` minus their value at 0 is the same thing.
    They are called in ``compute_dtype``, the dtype the stock processor feeds them: not their
    parameters' dtype, which under layerwise casting is a storage dtype (fp8) their forward casts
    the weight away from.
    """
    if _weight_is_readable(projection, change):
        return F.linear(change, projection.weight.float())
    at_change = projection(change.to(compute_dtype)).float()
    return at_change - projection(change.new_zeros((1, 1, change.shape[-1]), dtype=compute_dtype)).float()


def _weight_is_readable(projection: nn.Module, change: Tensor) -> bool:
    """Whether ``projection`` is a plain ``nn.Linear`` whose weight, read outside its forward, is the
    one its forward would use: no forward wrapper or hook, and the weight on ``change``'s device.

    Why: offloading (accelerate's ``cpu_offload`` behind ``enable_sequential_cpu_offload``, diffusers'
    group offloading) keeps weights on the ``meta`` device or elsewhere and brings them in from a
    wrapped ``forward``; read directly, the weight was uninitialised memory and the image silently
    wrong. Such modules are called instead.
    """
    return (
        type(projection) is nn.Linear
        and "forward" not in projection.__dict__
        and not projection._forward_pre_hooks
        and not projection._forward_hooks
        and projection.weight.device == change.device
    )


def _resolve_unet(unet_or_pipe: Any) -> nn.Module:
    """The UNet of a pipeline (its ``unet`` attribute) or the module itself."""
    unet = getattr(unet_or_pipe, "unet", None)
    if isinstance(unet, nn.Module):
        return unet
    if isinstance(unet_or_pipe, nn.Module):
        return unet_or_pipe
    raise TypeError(
        f"PLADIS: expected a diffusers UNet or a pipeline with a .unet, got {type(unet_or_pipe).__name__}"
    )


def _group_of(name: str) -> str | None:
    for part in name.split("."):
        if part in _WRAPPER_PREFIXES:
            continue
        return _GROUP_OF_BLOCK.get(part)
    return None


def cross_attention_modules(unet_or_pipe: Any) -> Iterator[tuple[str, str, nn.Module]]:
    """``(name, group, module)`` for every cross-attention ``attn2`` of the UNet's down/mid/up blocks.

    ``attn2`` modules built without a ``cross_attention_dim`` are self-attention (e.g. temporal
    blocks with ``double_self_attention``) and are skipped.
    """
    from diffusers.models.attention_processor import Attention

    for name, module in _resolve_unet(unet_or_pipe).named_modules():
        if not isinstance(module, Attention) or name.rsplit(".", 1)[-1] != "attn2":
            continue
        group = _group_of(name)
        if group is not None and module.is_cross_attention:
            yield name, group, module


class PladisHandle:
    """What :func:`apply_pladis` installed; ``remove()`` (or leaving the ``with`` block) undoes it.

    Restoring puts back the very processor objects that were there before. Stacked handles may be
    removed in any order (a PLADIS processor installed on top of ours is re-pointed past ours); a
    module whose processor was changed by something else since is left alone, with a warning.
    """

    def __init__(self, params: PladisParams, settings: _Settings) -> None:
        self.params = params
        self._settings = settings
        self._installed: list[tuple[str, str, nn.Module, PladisAttnProcessor]] = []
        self.active = True

    @property
    def names(self) -> list[str]:
        """Module names whose processor was replaced."""
        return [name for name, *_ in self._installed]

    @property
    def counts(self) -> dict[str, int]:
        """Replaced processors per layer group."""
        counts: dict[str, int] = {}
        for _, group, *_ in self._installed:
            counts[group] = counts.get(group, 0) + 1
        return counts

    def __len__(self) -> int:
        return len(self._installed)

    def set(self, alpha: Any = None, lam: Any = None) -> PladisParams:
        """Change α and/or λ of the installed processors in place (validated; layers stay)."""
        self.params = self.params.replace(
            alpha=self.params.alpha if alpha is None else alpha, lam=self.params.lam if lam is None else lam
        )
        self._settings.alpha, self._settings.lam = self.params.alpha, self.params.lam
        return self.params

    def remove(self) -> None:
        """Put the previous processors back (idempotent)."""
        if not self.active:
            return
        skipped = []
        for name, _, module, ours in reversed(self._installed):
            if module.processor is ours:
                module.set_processor(ours.replaced)  # a module processor is registered again there
                if not isinstance(module.processor, PladisAttnProcessor):
                    module._modules.pop(_PREVIOUS_CHILD, None)
                continue
            above = module.processor
            while isinstance(above, PladisAttnProcessor) and above.replaced is not ours:
                above = above.replaced
            if isinstance(above, PladisAttnProcessor):
                above.replaced = ours.replaced  # splice ours out of a stack of PLADIS installs
            else:
                skipped.append(name)
                current = module.processor
                kept_by_current = isinstance(
                    current, PladisAttnProcessor
                ) and current.previous is module._modules.get(_PREVIOUS_CHILD)
                if not kept_by_current and (
                    type(current).__name__ in _PLAIN_PROCESSORS or isinstance(current, nn.Module)
                ):
                    # A plain or module processor replaced ours (unload_ip_adapter,
                    # set_default_attn_processor, a new IP-Adapter): nothing delegates to the kept
                    # one any more, so its weights must not stay registered under our name. A
                    # foreign wrapper may still call through ours: then they stay. So do they when
                    # a later PLADIS install delegates to them (it registered them there itself).
                    module._modules.pop(_PREVIOUS_CHILD, None)
        self.active = False
        if skipped:
            warnings.warn(
                f"PLADIS: {len(skipped)} processor(s) were replaced by someone else after PLADIS was "
                f"installed and were left as they are (first: {skipped[-1]})",
                RuntimeWarning,
                stacklevel=2,
            )

    def __enter__(self) -> PladisHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return (
            f"PladisHandle(alpha={self.params.alpha:g}, lam={self.params.lam:g}, "
            f"layers={self.params.layers_text()}, processors={len(self)}, {state})"
        )


def apply_pladis(
    unet_or_pipe: Any,
    alpha: Any = 1.5,
    lam: Any = 2.0,
    layers: Any = DEFAULT_LAYERS,
) -> PladisHandle:
    """Install PLADIS on the cross-attention of ``layers`` ("down", "mid", "up"; default down+up).

    Accepts a ``UNet2DConditionModel`` or any pipeline with a ``.unet`` (SD1.x, SD2.x, SDXL base and
    refiner). Values are validated like every other entry point (``ValueError`` naming the
    parameter). Returns a :class:`PladisHandle`; use it as a context manager or call ``remove()``.
    """
    params = parse_params(enabled=True, alpha=alpha, lam=lam, layers=layers)
    settings = _Settings(params.alpha, params.lam)
    handle = PladisHandle(params, settings)
    foreign: dict[str, int] = {}
    for name, group, module in list(cross_attention_modules(unet_or_pipe)):
        if group not in params.layers:
            continue
        current = module.processor
        # Stacked installs delegate λ=0 straight to the processor under the PLADIS one.
        delegate = current.previous if isinstance(current, PladisAttnProcessor) else current
        kind = type(delegate).__name__
        if kind not in _PLAIN_PROCESSORS and not kind.startswith(_CHAINED_PREFIX):
            foreign[kind] = foreign.get(kind, 0) + 1
        ours = PladisAttnProcessor(delegate, settings=settings, replaced=current)
        module.set_processor(ours)
        if isinstance(delegate, nn.Module) and module._modules.get(_PREVIOUS_CHILD) is not delegate:
            module.add_module(_PREVIOUS_CHILD, delegate)  # replaces a stale one (an unloaded adapter)
        handle._installed.append((name, group, module, ours))
    if not handle._installed and params.layers:  # (no layer selected: nothing was asked for)
        # e.g. UNets of SimpleCrossAttn blocks (DeepFloyd IF, UnCLIP): an active handle that changes
        # nothing would otherwise look like PLADIS having no visible effect
        warnings.warn(
            f"PLADIS found no cross-attention (attn2) layer in {'+'.join(params.layers)} of this model: "
            "it changes nothing",
            RuntimeWarning,
            stacklevel=2,
        )
    if foreign:
        kinds = ", ".join(f"{kind} ×{count}" for kind, count in sorted(foreign.items()))
        warnings.warn(
            f"PLADIS replaces non-standard attention processors ({kinds}); whatever extra they do "
            "(custom attention) is off on those layers while PLADIS is active (λ > 0)",
            RuntimeWarning,
            stacklevel=2,
        )
    return handle
