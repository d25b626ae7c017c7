"""Process-wide test setup.

Triton reads ``TRITON_INTERPRET`` when it is first imported, and other test suites import it early
(diffusers → torch utilities probe for Triton). The kernel tests run on CPU through the interpreter,
so the variable is set here, before any test module is collected. It has no effect on the rest of
the suite: the kernel is only dispatched for CUDA tensors, and the GPU check in
``tests/triton/test_cuda_check.py`` runs in a subprocess with the variable removed.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
