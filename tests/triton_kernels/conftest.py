"""Triton kernel tests run on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before the kernel modules are imported (Triton decides at
decoration time whether a kernel is compiled or interpreted), so it is set here, before pytest
imports the test modules of this folder.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
