"""Checks of the arguments of ``flex_attention`` and compiled kernels, before any launch.

Everything here raises :class:`AttentionError` with what was expected: tensors of the wrong
kind, shape, dtype or device, head counts that do not group, kernel options attndsl does not
read.  It also says which inputs need no launch at all (empty or meta problems).
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch

from attndsl.errors import AttnDSLError

Tensor = torch.Tensor
KERNEL_OPTIONS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
# torch's spelling and attndsl's of the forward's load path (codegen/loads.py)
LOAD_OPTIONS = ("USE_TMA", "tma")
IGNORED_FLEX_OPTIONS = ("PRESCALE_QK", "ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS",
                        "OUTPUT_LOGSUMEXP", "OUTPUT_MAX", "FORCE_USE_FLEX_ATTENTION",
                        "WRITE_DQ", "BACKEND")


class AttentionError(AttnDSLError, ValueError):
    """Bad arguments to flex_attention / a compiled kernel: says what was expected."""


def _check_tensor(name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise AttentionError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise AttentionError(f"{name} must have shape (B, H, L, E), got {tuple(t.shape)}")
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise AttentionError(f"{name} has dtype {t.dtype}; expected float16, bfloat16 or "
                             f"float32")


def check_qkv(query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool) -> None:
    """query (B, Hq, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev): one float dtype, one
    device, head dims 16..256, Hq a multiple of Hkv (and equal unless ``enable_gqa``)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, t)
    if not (query.dtype == key.dtype == value.dtype):
        raise AttentionError(f"query, key and value must share a dtype, got {query.dtype}, "
                             f"{key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        raise AttentionError(f"query, key and value must be on one device, got {query.device}, "
                             f"{key.device}, {value.device}")
    (b, hq, _, e), (bk, hk, s, ek), (bv, hv, sv, ev) = query.shape, key.shape, value.shape
    if not (b == bk == bv):
        raise AttentionError(f"batch sizes differ: query {b}, key {bk}, value {bv}")
    if hk != hv or s != sv:
        raise AttentionError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree "
                             f"on heads and length")
    if e != ek:
        raise AttentionError(f"query head dim {e} != key head dim {ek}")
    for name, d in (("query/key", e), ("value", ev)):
        if not 16 <= d <= 256:
            raise AttentionError(f"{name} head dim is {d}; attndsl supports 16 to 256")
    if (hk == 0) != (hq == 0) or hk and hq % hk:  # no heads at all: an empty problem
        raise AttentionError(f"{hq} query heads are not a multiple of {hk} key/value heads")
    if hq != hk and not enable_gqa:
        raise AttentionError(f"query has {hq} heads but key/value have {hk}; pass "
                             f"enable_gqa=True for grouped-query attention")


def kernel_options(options: dict | None) -> dict:
    """The launch settings among torch's ``kernel_options`` (tile sizes powers of two >= 16,
    warps and stages >= 1); torch's other options are accepted and ignored."""
    out = {}
    for k, v in (options or {}).items():
        if k in LOAD_OPTIONS:  # tensor-descriptor (TMA) tile loads: on, off, or by target
            if v is not None and not isinstance(v, bool):
                raise AttentionError(f"kernel option {k}={v!r} must be True, False or None")
            out["tma"] = v
        elif k in KERNEL_OPTIONS:
            out[k] = _whole(k, v)
            if k.startswith("BLOCK") and (out[k] < 16 or out[k] & (out[k] - 1)):
                raise AttentionError(f"kernel option {k}={v}: tile sizes must be powers of two "
                                     f">= 16")
            if not k.startswith("BLOCK") and out[k] < 1:
                raise AttentionError(f"kernel option {k}={v} must be >= 1")
        elif k not in IGNORED_FLEX_OPTIONS and k != "deterministic":
            raise AttentionError(f"unknown kernel option {k!r}; attndsl reads "
                                 f"{KERNEL_OPTIONS + LOAD_OPTIONS}")
    return out


def _whole(name: str, value: Any) -> int:
    """An integer option's value: an int (or an integer-like such as a numpy int), never a
    bool, a float or a string, which ``int()`` would have truncated or parsed silently."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise AttentionError(f"kernel option {name}={value!r} must be an integer") from None


def mask_of(block_mask: Any, mask_mod: Callable | None) -> Callable | None:
    """The mask function to trace: ``mask_mod``, else the block mask's (none for noop_mask)."""
    if mask_mod is not None:
        return mask_mod
    fn = getattr(block_mask, "mask_mod", None)
    if fn is None or getattr(fn, "__name__", "") == "noop_mask":
        return None
    return fn


def no_work(device: torch.device, *sizes: int) -> bool:
    """An empty problem (a batch, head or length of 0) or shapes only (meta tensors, as in
    model initialisation): outputs are made without a launch, so no tile plan is needed
    (and meta tensors hold no data to analyse)."""
    return device.type == "meta" or 0 in sizes


def shapes_only(captured: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Captured tensors as meta tensors when the inputs are (the launcher checks that devices
    agree; a meta launch reads shapes only).  A tensor with data is detached on its way: meta
    inputs compute nothing, so it gets no gradient (rather than an uninitialised one)."""
    if device.type != "meta":
        return captured
    return {n: t if t.device.type == "meta" else t.detach().to("meta")
            for n, t in captured.items()}


def check_scale(where: str, scale: Any) -> float | None:
    """The score scale given to ``where``: None (1/sqrt(E)) or a real number (a 0-d tensor
    is read as its value), as a float; a string was parsed by float() and a bool taken as
    0 or 1, silently."""
    if scale is None or isinstance(scale, (torch.SymFloat, torch.SymInt)):  # traced: as is
        return scale
    if isinstance(scale, torch.Tensor) and scale.dim() == 0 and scale.is_floating_point():
        return float(scale)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise AttentionError(f"{where}: scale must be None or a real number, got {scale!r} "
                             f"({type(scale).__name__})")
    return float(scale)


def check_params(name: str, declared: Mapping[str, str], params: Any) -> dict:
    """``params`` of a run of the spec ``name``, whose parameters are ``declared`` ({name:
    "int" | "float"}): a dict (or None) naming only declared parameters -- a misspelt name
    would leave the parameter at its default, silently -- each None (the default) or a
    number of its type: an int parameter an integer (2.0 and 2.5 are refused, not
    truncated) that int64 holds, a float one any real number, never a bool, a string or a
    tensor."""
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise AttentionError(f"{name}: params must be a dict by name, got "
                             f"{type(params).__name__}")
    for key, value in params.items():
        if key not in declared:
            raise AttentionError(f"{name}: params names {key!r}, which is not a parameter of "
                                 f"this cascade; its parameters are {sorted(declared)}")
        kind = numbers.Integral if declared[key] == "int" else numbers.Real
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            want = "an int" if declared[key] == "int" else "a number"
            raise AttentionError(f"{name}: parameter {key!r} must be {want}, got {value!r} "
                                 f"({type(value).__name__})")
        if declared[key] == "int" and value is not None and not -2**63 <= value < 2**63:
            raise AttentionError(f"{name}: parameter {key!r} is {value}; expected an int in "
                                 f"[-2**63, 2**63) (the kernels compute in int64)")
    return dict(params)


def check_initial_states(initial: Any, names: tuple[str, ...]) -> dict[str, Tensor]:
    """The initial states given to a linear or recurrent run, by state name: a mapping whose
    names are among ``names`` (a misspelt name would leave its state at zero, silently);
    each checked against its shape by :func:`check_state` when the run knows it."""
    if initial is None:
        return {}
    if not isinstance(initial, Mapping):
        raise AttentionError(f"initial_state must be a dict {{state name: tensor}} (the final "
                             f"states of a previous run), got {type(initial).__name__}")
    unknown = sorted(str(n) for n in initial if n not in names)
    if unknown:
        raise AttentionError(f"initial_state names {unknown}, which are not states of this "
                             f"cascade; its states are {list(names)}")
    return dict(initial)


def check_state(name: str, state: Any, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """One initial state: a floating-point tensor of exactly ``shape`` ([B, H, E, F], the
    shape of the final state a run returns) on ``device``."""
    if not isinstance(state, torch.Tensor) or not state.is_floating_point():
        got = state.dtype if isinstance(state, torch.Tensor) else type(state).__name__
        raise AttentionError(f"the initial state of {name} must be a floating-point tensor, "
                             f"got {got}")
    if tuple(state.shape) != tuple(shape):
        raise AttentionError(f"the initial state of {name} must have shape {tuple(shape)} "
                             f"[B, H, E, F], got {tuple(state.shape)}")
    if state.device != device:
        raise AttentionError(f"the initial state of {name} is on {state.device}; the inputs "
                             f"are on {device}")
    return state
