"""Suite-wide settings.

TRITON_INTERPRET=1 is set before anything imports triton: a @triton.jit function created
without it cannot run on CPU tensors later in the session (test order must not matter). On a
CUDA machine run ``TRITON_INTERPRET=0 pytest tests`` to test the compiled kernels instead.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
