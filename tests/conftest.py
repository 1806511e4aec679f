"""Session-wide test setup.

Without a CUDA device the Triton kernels are tested through Triton's CPU interpreter. Triton reads
TRITON_INTERPRET when a kernel is decorated, i.e. when its module is first imported, which can be
during collection of any test module, so it is set here, before any test module is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
