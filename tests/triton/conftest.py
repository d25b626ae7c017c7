"""Triton kernel tests run on CPU through Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before Triton is imported (the kernel module is imported lazily by
``pladis.triton_kernel``, so setting it here, at collection time, is early enough).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
