"""Stand-in for Forge Classic/Neo ``modules/infotext_utils.py`` ``_parse_info`` (Haoming02
sd-webui-forge-classic): the UI paste of one field.

As there, a callable target is called *outside* any ``try`` (an exception aborts the whole paste);
``None`` skips the control, and only the conversion to the control's type is guarded. ``SKIP`` and
``{"value": ...}`` stand for ``gr.skip()`` and ``gr.update(value=...)``.
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
