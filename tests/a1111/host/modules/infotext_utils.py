"""Stand-in ``modules.infotext_utils``.

Quoting (:56-61), the parse regex (:16-17), the paste conversion (:476-517) and the API's use of the
same paste fields (``modules/api/api.py`` ``apply_infotext``).
"""

import json
import re

from modules import errors

re_param_code = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
re_param = re.compile(re_param_code)


def quote(text):
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x: str):
    """Key/value pairs of the last line (prompt parsing is not modelled)."""
    res = {}
    *_lines, lastline = x.strip().split("\n")
    for k, v in re_param.findall(lastline):
        try:
            if v and v[0] == '"' and v[-1] == '"':
                v = unquote(v)
            res[k] = v
        except Exception:
            print(f'Error parsing "{k}: {v}"')
    return res


def paste_values(paste_fields, params):
    """What ``connect_paste`` sends to each component: a value, or None for ``gr.update()`` (unchanged)."""
    return paste_func(paste_fields, params)


def paste_func(paste_fields, params):
    """``connect_paste``'s inner ``paste_func`` (same name: PLADIS raises only to callers it knows
    report the error), from its parsed params on."""
    res = []
    for output, key in paste_fields:
        if callable(key):
            try:
                v = key(params)
            except Exception:  # as upstream (v1.10): reported, and the control is left as it was
                errors.report(f"Error executing {key}", exc_info=True)
                v = None
        else:
            v = params.get(key, None)

        if v is None:
            res.append(None)
        else:
            try:
                valtype = type(output.value)
                if valtype == bool and v == "False":  # noqa: E721 - as upstream
                    val = False
                elif valtype == int:  # noqa: E721
                    val = float(v)
                else:
                    val = valtype(v)
                res.append(val)
            except Exception:
                res.append(None)
    return res


def api_script_values(paste_fields, infotext):
    """What the API's ``infotext`` request field gives each script control (``api.py``
    ``apply_infotext`` → ``get_field_value``): the target's value converted to the type of the
    control's value, or None (not mentioned). Nothing is caught: an exception fails the request."""
    return apply_infotext(paste_fields, infotext)


def apply_infotext(paste_fields, infotext):
    """``Api.apply_infotext`` → ``get_field_value`` (same name as there), for script controls."""
    params = parse_generation_parameters(infotext)
    res = []
    for component, key in paste_fields:
        value = key(params) if callable(key) else params.get(key)
        if value is not None:
            target_type = type(component.value)
            if not isinstance(value, target_type):
                value = target_type(value)
        res.append(value)
    return res


BUILTIN_SEND_NAMES = ["Prompt", "Negative prompt", "Steps", "Face restoration"]


def send_to_pairs(source_fields, target_fields, script_paste_field_names):
    """The components "Send to img2img" copies, as ``connect_paste_params_buttons`` wires them
    (:168-174): source and target fields whose target (string or callable) is ``in`` the names,
    paired in order. A callable only matches when the list holds that very object."""
    names = BUILTIN_SEND_NAMES + list(script_paste_field_names)
    inputs = [field for field, name in source_fields if name in names]
    outputs = [field for field, name in target_fields if name in names]
    assert len(inputs) == len(outputs), "gradio would fail: inputs and outputs differ in length"
    return list(zip(inputs, outputs, strict=True))
