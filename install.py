"""WebUI installer hook (run as ``python install.py`` with the WebUI root on PYTHONPATH).

PLADIS needs only torch, numpy and gradio, which every supported WebUI already ships; the entmax maths is
implemented in ``pladis/``. So this installs nothing; it only warns when torch is missing, which
would mean the extension was installed outside a WebUI.
"""

import importlib.util


def main() -> None:
    if importlib.util.find_spec("torch") is None:
        print("[PLADIS] torch is not installed: run this extension inside the Stable Diffusion WebUI.")


if __name__ == "__main__":
    main()
