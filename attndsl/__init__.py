"""attndsl: a compiler from attention variants to fused Triton kernels."""

import os as _os

import torch as _torch

# CPU tensors run in Triton's interpreter, which must be chosen before triton is imported;
# ATTNDSL_NO_INTERPRET=1 keeps the real compiler (ahead-of-time GPU compiles on a CPU).
if not _torch.cuda.is_available() and not _os.environ.get("ATTNDSL_NO_INTERPRET"):
    _os.environ.setdefault("TRITON_INTERPRET", "1")
    from attndsl.runtime.versions import warn_if_interpreter_broken as _warn

    _warn()

from attndsl.api import (  # noqa: E402
    AttentionError,
    AuxOutput,
    AuxRequest,
    Kernel,
    compile,
    flex_attention,
)
from attndsl.block_mask import (  # noqa: E402
    BlockMask,
    and_masks,
    create_block_mask,
    noop_mask,
    or_masks,
)
from attndsl.decoding import PagedKVCache, decode  # noqa: E402
from attndsl.eager import run_cascade  # noqa: E402
from attndsl.errors import AttnDSLError, SubscriptError  # noqa: E402
from attndsl.frontend.builder import CascadeBuilder, cascade  # noqa: E402
from attndsl.frontend.text import SpecError, parse_file, parse_text  # noqa: E402
from attndsl.frontend.trace import TraceError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["AttentionError", "AttnDSLError", "AuxOutput", "AuxRequest", "BlockMask", "and_masks",
           "create_block_mask", "decode", "noop_mask", "or_masks", "CascadeBuilder", "Kernel",
           "PagedKVCache", "SpecError",
           "SubscriptError", "TraceError", "cascade", "compile", "flex_attention", "parse_file",
           "parse_text", "run_cascade", "__version__"]
