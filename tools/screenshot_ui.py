"""Screenshot the PLADIS accordion as gradio renders it → docs/images/accordion.png.

Builds the real controls (``pladis.webui.ui.build``) in a tiny gradio Blocks app with the
extension's ``style.css``, serves it on 127.0.0.1 and photographs it with headless Chromium
(``apt-get install -y chromium`` if missing). The WebUI's ``modules.ui_components.InputAccordion``
comes from the test stand-in (tests/a1111/host), rendered open so the controls are visible.

Usage: ``.venv/bin/python tools/screenshot_ui.py [output.png]``
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
HOST = os.path.join(ROOT, "tests", "a1111", "host")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=10000",
]


class _TabScript:
    """Just enough of ``modules.scripts.Script`` for ``ui.build``: title and per-tab elem ids."""

    is_img2img = False
    infotext_fields = None
    paste_field_names = None

    def title(self) -> str:
        return "PLADIS"

    def elem_id(self, item_id: str) -> str:
        return f"script_txt2img_pladis_{item_id}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("headless Chromium not found: apt-get install -y chromium")


def _shim_new_starlette() -> None:
    """Let gradio 3.41's ``TemplateResponse(name, context)`` call work on a newer starlette.

    The WebUI pins fastapi 0.94 where the old form works; this repository's tool venv may carry a
    newer starlette, so adapt the call for this screenshot server only.
    """
    import inspect

    from gradio import routes

    original = routes.templates.TemplateResponse
    if next(iter(inspect.signature(original).parameters), None) != "request":
        return

    def template_response(*args, **kwargs):
        if args and isinstance(args[0], str):
            name, context, *rest = args
            return original(context["request"], name, context, *rest, **kwargs)
        return original(*args, **kwargs)

    routes.templates.TemplateResponse = template_response


def _accept_local_url() -> None:
    """gradio's pre-launch probe of the local URL fails under some sandboxes; we poll it ourselves."""
    from gradio import networking

    networking.url_ok = lambda url: True


def build_demo():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    for key in ("NO_PROXY", "no_proxy"):  # gradio probes http://127.0.0.1 before serving; never via a proxy
        os.environ[key] = ",".join(filter(None, [os.environ.get(key), "127.0.0.1", "localhost"]))
    sys.path[:0] = [HOST, ROOT]
    import gradio as gr

    from pladis.webui import ui

    with open(os.path.join(ROOT, "style.css"), encoding="utf-8") as handle:
        css = (
            handle.read()
            + "\n.gradio-container { max-width: 760px !important; }\nfooter { display: none !important; }\n"
        )
    with gr.Blocks(css=css, title="PLADIS", analytics_enabled=False) as demo:
        controls = ui.build(_TabScript(), is_img2img=False)
    enabled = controls[0]
    accordion = getattr(enabled, "accordion", None)
    if accordion is not None:
        accordion.open = True  # shown as a user sees it after ticking the header checkbox
    return demo


def main(path: str) -> None:
    chromium = _chromium()  # before starting a server: without it there is nothing to do
    demo = build_demo()
    _shim_new_starlette()
    _accept_local_url()
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(50):
            try:
                urllib.request.urlopen(url, timeout=1).read()
                break
            except OSError:
                time.sleep(0.2)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run(
                [
                    chromium,
                    *CHROMIUM_FLAGS,
                    f"--user-data-dir={profile}",
                    "--window-size=800,462",
                    f"--screenshot={path}",
                    url,
                ],
                check=True,
                timeout=120,
                capture_output=True,
            )
    finally:
        demo.close()
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "docs", "images", "accordion.png"))
