"""Without a GPU, Triton kernels run in its interpreter. The switch is read when a kernel is defined (at import of
its module), so it is set here, before any test module imports the package."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
