"""Stand-in for Forge Classic/Neo ``modules/infotext_utils.py`` (Haoming02 sd-webui-forge-classic):
the UI paste, ``connect_paste``'s ``paste_func`` → ``_parse_info`` per field.

As there, ``_parse_info`` calls a callable target *outside* any ``try`` (an exception aborts the
whole paste); ``None`` skips the control, and only the conversion to the control's type is guarded.
``SKIP`` and ``{"value": ...}`` stand for ``gr.skip()`` and ``gr.update(value=...)``.
"""

SKIP = "skip"


def _parse_info(output, key, params):
    v = key(params) if callable(key) else params.get(key, None)  # not guarded, as there

    if v is None:
        return SKIP

    try:
        valtype = type(output.value)
        if valtype is bool and v == "False":
            val = False
        elif valtype is int:
            val = float(v)
        else:
            val = valtype(v)
        return {"value": val}
    except Exception:
        return SKIP


def paste_func(paste_fields, params):
    """``connect_paste``'s inner ``paste_func`` from its parsed params on (same name and module as
    A1111's guarded one, which is why PLADIS judges the target's direct caller)."""
    return [_parse_info(output, key, params) for output, key in paste_fields]
