"""Stand-in for AUTOMATIC1111 ``modules`` (v1.10.1), reduced to what an always-on attn2 script touches.

Signatures and behaviour follow /work/shared/docs/a1111.md (file:line of the real WebUI).
"""
