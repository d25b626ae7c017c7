"""Stand-in for Forge ``backend/sampling/sampling_function.py`` ``calc_cond_uncond_batch`` (reduced).

Keeps what an attention patch observes: compatible chunks are batched in *reversed* order (so an
uncond usually comes first), chunk ``i`` occupies rows ``[i·B, (i+1)·B)``, ``transformer_options``
is a copy of ``model_options["transformer_options"]`` plus ``cond_or_uncond``, ``sigmas`` (shape
``[B]``, not repeated), ``cond_indices``/``uncond_indices``, and ``model_function_wrapper`` is called
as ``wrapper(apply_model, {"input", "timestep", "c", "cond_or_uncond"})``.
"""

import torch

from backend.sampling.condition import ConditionCrossAttn

COND = 0
UNCOND = 1


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options, batch_together=True):
    """``cond``/``uncond``: lists of context tensors ``(B, T, C)``. Returns (cond_pred, uncond_pred)."""
    to_run = [(ConditionCrossAttn(c), COND) for c in cond]
    to_run += [(ConditionCrossAttn(c), UNCOND) for c in (uncond or [])]
    out = {COND: [], UNCOND: []}
    while to_run:
        first = to_run[0][0]
        batch = [i for i in range(len(to_run)) if to_run[i][0].can_concat(first)] if batch_together else [0]
        batch.reverse()
        picked = [to_run.pop(i) for i in batch]
        cond_or_uncond = [kind for _, kind in picked]
        chunks = len(picked)
        context = picked[0][0].concat([c for c, _ in picked[1:]])
        input_x = torch.cat([x_in] * chunks)
        timestep_ = torch.cat([timestep] * chunks)
        transformer_options = model_options.get("transformer_options", {}).copy()
        transformer_options["cond_or_uncond"] = cond_or_uncond[:]
        transformer_options["sigmas"] = timestep
        rows = int(timestep.shape[0])
        transformer_options["cond_indices"] = [
            r for i, k in enumerate(cond_or_uncond) if k == COND for r in range(i * rows, (i + 1) * rows)
        ]
        transformer_options["uncond_indices"] = [
            r for i, k in enumerate(cond_or_uncond) if k == UNCOND for r in range(i * rows, (i + 1) * rows)
        ]
        c = {"c_crossattn": context, "transformer_options": transformer_options}
        if "model_function_wrapper" in model_options:
            args = {"input": input_x, "timestep": timestep_, "c": c, "cond_or_uncond": cond_or_uncond}
            output = model_options["model_function_wrapper"](model.apply_model, args)
        else:
            output = model.apply_model(input_x, timestep_, **c)
        for kind, chunk in zip(cond_or_uncond, output.chunk(chunks), strict=True):
            out[kind].append(chunk)
    cond_pred = out[COND][0] if out[COND] else None
    uncond_pred = out[UNCOND][0] if out[UNCOND] else None
    return cond_pred, uncond_pred
