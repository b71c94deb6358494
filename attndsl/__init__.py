"""attndsl: a compiler from attention variants to fused Triton kernels."""

import os as _os

import torch as _torch

if not _torch.cuda.is_available():  # CPU tensors run in Triton's interpreter
    _os.environ.setdefault("TRITON_INTERPRET", "1")
