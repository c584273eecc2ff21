"""Triton kernels beside their torch references.

With no GPU, Triton can only run its interpreter (the CPU tests). TRITON_INTERPRET
must be set before `import triton` (triton.language's own helpers are decorated at
import), so it is decided here, before any kernel module is imported.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
