"""The compiled-kernel cache and the forward launch of ``flex_attention``.

A cascade is compiled (the pass pipeline, then code generation) and its module loaded once per
process: :func:`compiled` keys the cache by the cascade itself (frozen, compared by content),
so equal specs traced from different functions share one kernel.
"""

from __future__ import annotations

from types import ModuleType

import torch

from attndsl.ir.cascade import Cascade
from attndsl.key_tile_plan import KeyTilePlan
from attndsl.passes.pipeline import Compiled, compile_cascade
from attndsl.runtime.checks import AttentionError
from attndsl.runtime.gpu_report import install_static_pruning
from attndsl.runtime.modules import load_kernel_module

Tensor = torch.Tensor
_COMPILED: dict[Cascade, tuple[Compiled, ModuleType]] = {}


def compiled(cascade: Cascade) -> tuple[Compiled, ModuleType | None]:
    """The compilation record and the loaded forward module of ``cascade`` (cached; None
    when the cascade has only its chunked linear form, ``Compiled.quadratic_error``); the
    module's autotuner drops configs by their static report before timing any."""
    if cascade not in _COMPILED:
        comp = compile_cascade(cascade)
        module = None if comp.kernel is None else load_kernel_module(comp.kernel)
        if module is not None:
            install_static_pruning(module)
        _COMPILED[cascade] = (comp, module)
    return _COMPILED[cascade]


def launch_attention(module: ModuleType, query: Tensor, key: Tensor, value: Tensor,
                     scale: float, captured: dict[str, Tensor], plan: KeyTilePlan,
                     options: dict) -> dict[str, Tensor]:
    """Run a FlexAttention module on Q, K, V (G = query heads per key/value head) with the
    key-tile plan ``plan``; the launcher's input errors become AttentionErrors."""
    try:
        return module.launch({"Q": query, "K": key, "V": value},
                             {"scale": float(scale),
                              "G": query.shape[1] // max(1, key.shape[1])},
                             captured, plan.launch_tables(), options)
    except module.AttentionInputError as err:
        raise AttentionError(str(err)) from None
