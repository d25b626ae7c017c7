"""WebUI glue shared by A1111, Forge and reForge.

UI, script args, infotext, X/Y/Z axes and per-generation control.

Imports WebUI modules (``modules.*``, ``gradio``) only inside functions.
"""
