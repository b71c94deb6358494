"""Training support: autograd through the generated forward and backward kernels.

``flex_attention_trainable`` has ``flex_attention``'s calling convention; its result is
differentiable with respect to query, key, value, the returned log-sum-exp and every floating
captured tensor of ``score_mod`` that requires grad (learnable ALiBi slopes, bias tables).

Design (torch.compile-friendly):

* Two generic custom ops, ``attndsl::flex_fwd`` and ``attndsl::flex_bwd``, whose schema does
  not depend on the spec: captured tensors and block tables travel as ``Tensor[]`` and the spec
  as a string key (a hash of the cascade) into a registry of compiled modules filled when the
  spec is first traced.  Each op has a ``register_fake`` (shapes only), so a compiled graph
  holds them as opaque nodes and runs the Triton kernels (or the interpreter on CPU) inside.
* :class:`FlexAttentionFunction` (a ``torch.autograd.Function``) calls ``flex_fwd``, saves
  O and LSE, and calls ``flex_bwd`` in its backward.
* The backward module (codegen/backward.py) is generated, content-hashed and cached next to
  the forward module.  dK/dV are deterministic (a program per key tile loops over the query
  heads of its GQA group); dQ uses float32 atomics unless ``deterministic=True`` (a separate
  dQ kernel over the key tiles).  Captured-tensor gradients are float32 atomics.

Under ``torch.compile(fullgraph=True)`` the score/mask programs are traced once, at trace time
(``assume_constant_result``), into the spec key plus, for each captured tensor, a path from the
functions to it (closure cell, global, default, attribute, item; bound methods through their
``self``).  The compiled code re-reads the tensors along those paths, so dynamo lifts them as
graph inputs (parameters get gradients) and guards on them; ``id()`` of the functions is
guarded too, so a new score_mod object recompiles.  Limitation: a score_mod *defined inside*
the compiled function and closing over its traced tensors cannot be traced this way (dynamo
cannot make it a constant); define it outside (a module method, a closure built beforehand).
"""

from __future__ import annotations

import functools
import hashlib
import math
import types
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from attndsl.codegen.backward import generate_backward
from attndsl.codegen.tile_backward import generate_tile_backward
from attndsl.frontend.flex import lower_flex
from attndsl.ir.cascade import Cascade
from attndsl.ir.tile import TileKernel
from attndsl.key_tile_plan import KeyTilePlan
from attndsl.passes.grad import GradError
from attndsl.passes.tile_grad import derive_tile_backward
from attndsl.runtime.checks import AttentionError, check_qkv, mask_of, shapes_only
from attndsl.runtime.kernels import compiled
from attndsl.runtime.modules import VERSION, load_source, spec_hash
from attndsl.runtime.plan import block_mask_plan, check_broadcast

Tensor = torch.Tensor


@dataclass
class SpecEntry:
    """A registered spec: its cascade, the forward module, the captured tensors' IR names."""

    cascade: Cascade
    forward: ModuleType
    captured: tuple[str, ...]
    _backward: ModuleType | None = None

    @property
    def backward(self) -> ModuleType:
        if self._backward is None:
            self._backward = load_backward_module(self.cascade)
        return self._backward


_SPECS: dict[str, SpecEntry] = {}


def spec_key(cascade: Cascade) -> str:
    """The registry key of a cascade: a hash of its printed form."""
    return hashlib.sha256(str(cascade).encode()).hexdigest()[:16]


def register_spec(cascade: Cascade) -> str:
    """Compile (or find) the forward of ``cascade`` and register it under its key."""
    key = spec_key(cascade)
    if key not in _SPECS:
        _, module = compiled(cascade)
        names = tuple(t.name for t in cascade.tensors if t.kind == "captured")
        _SPECS[key] = SpecEntry(cascade, module, names)
    return key


def backward_source(cascade: Cascade) -> str:
    """The generated source of the backward module of a FlexAttention cascade."""
    return generate_backward(cascade, VERSION)


def load_backward_module(cascade: Cascade) -> ModuleType:
    """Generate, cache (by content hash) and import the backward module of ``cascade``."""
    return load_source(backward_source(cascade), "kb")


_TILE_BACKWARDS: dict[str, tuple[ModuleType | None, str | None]] = {}


def tile_backward_source(kernel: TileKernel) -> str:
    """The generated source of the fused backward of a one-pass tile kernel (GradError when
    :func:`attndsl.passes.tile_grad.derive_tile_backward` finds none)."""
    return generate_tile_backward(derive_tile_backward(kernel), VERSION)


def tile_backward_module(kernel: TileKernel) -> tuple[ModuleType | None, str | None]:
    """(the fused backward module of ``kernel``, None) or (None, why there is none)."""
    key = spec_hash(kernel)
    if key not in _TILE_BACKWARDS:
        try:
            _TILE_BACKWARDS[key] = (load_source(tile_backward_source(kernel), "kt"), None)
        except GradError as err:
            _TILE_BACKWARDS[key] = (None, str(err))
    return _TILE_BACKWARDS[key]


# -- custom ops ---------------------------------------------------------------------------------

def _entry(key: str) -> SpecEntry:
    if key not in _SPECS:
        raise AttentionError(f"attndsl spec {key!r} is not registered in this process; "
                                 f"call flex_attention_trainable (or register_spec) first")
    return _SPECS[key]


@torch.library.custom_op("attndsl::flex_fwd", mutates_args=())
def flex_fwd(query: Tensor, key: Tensor, value: Tensor, captured: list[Tensor], spec: str,
             scale: float, tables: list[Tensor], q_block: int, kv_block: int
             ) -> tuple[Tensor, Tensor]:
    """O = softmax(score_mod(scale Q K^T), masked) V and LSE (natural log, float32)."""
    entry = _entry(spec)
    out = entry.forward.launch({"Q": query, "K": key, "V": value},
                               {"scale": scale, "G": query.shape[1] // max(1, key.shape[1])},
                               dict(zip(entry.captured, captured)),
                               KeyTilePlan.from_op_args(tables, q_block, kv_block).launch_tables())
    return out["O"], out["LSE"]


@flex_fwd.register_fake
def _flex_fwd_fake(query: Tensor, key: Tensor, value: Tensor, captured: list[Tensor],
                   spec: str, scale: float, tables: list[Tensor], q_block: int, kv_block: int
                   ) -> tuple[Tensor, Tensor]:
    b, h, m, _ = query.shape
    out = query.new_empty((b, h, m, value.shape[-1]))
    return out, query.new_empty((b, h, m), dtype=torch.float32)


@torch.library.custom_op("attndsl::flex_bwd", mutates_args=())
def flex_bwd(grad_out: Tensor, grad_lse: Tensor | None, query: Tensor, key: Tensor,
             value: Tensor, out: Tensor, lse: Tensor, captured: list[Tensor], need: list[bool],
             spec: str, scale: float, tables: list[Tensor], q_block: int, kv_block: int,
             deterministic: bool) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """dQ, dK, dV and the gradients of the captured tensors flagged in ``need`` (an empty
    tensor for the others)."""
    entry = _entry(spec)
    names = [n for n, want in zip(entry.captured, need) if want]
    grads = entry.backward.launch_backward(
        {"Q": query, "K": key, "V": value}, {"O": out, "LSE": lse},
        {"O": grad_out, "LSE": grad_lse}, {"scale": scale}, dict(zip(entry.captured, captured)),
        tuple(names), KeyTilePlan.from_op_args(tables, q_block, kv_block).launch_tables(), None,
        deterministic)
    caps = []
    for name, t, want in zip(entry.captured, captured, need):
        g = grads.get(name) if want else None
        if want and g is None:  # no gather site depends on it (or not a float tensor)
            g = torch.zeros_like(t)
        caps.append(g if g is not None else t.new_empty(0))
    return grads["Q"], grads["K"], grads["V"], caps


@flex_bwd.register_fake
def _flex_bwd_fake(grad_out: Tensor, grad_lse: Tensor | None, query: Tensor, key: Tensor,
                   value: Tensor, out: Tensor, lse: Tensor, captured: list[Tensor],
                   need: list[bool], spec: str, scale: float, tables: list[Tensor],
                   q_block: int, kv_block: int, deterministic: bool
                   ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    caps = [torch.empty_like(t) if want else t.new_empty(0) for t, want in zip(captured, need)]
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), caps


# -- autograd -----------------------------------------------------------------------------------

class FlexAttentionFunction(torch.autograd.Function):
    """(O, LSE) = flex attention; backward by the generated FlashAttention-2-style kernels.

    Arguments: query, key, value, spec key, scale, tables, q/kv block sizes, deterministic,
    then the captured tensors (so that each gets its own gradient slot)."""

    @staticmethod
    def forward(ctx: Any, query: Tensor, key: Tensor, value: Tensor, spec: str, scale: float,
                tables: list[Tensor], q_block: int, kv_block: int, deterministic: bool,
                *captured: Tensor) -> tuple[Tensor, Tensor]:
        out, lse = torch.ops.attndsl.flex_fwd(query, key, value, list(captured), spec, scale,
                                              tables, q_block, kv_block)
        ctx.save_for_backward(query, key, value, out, lse, *captured)
        ctx.spec, ctx.scale, ctx.tables = spec, scale, tables
        ctx.blocks, ctx.deterministic = (q_block, kv_block), deterministic
        return out, lse

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, grad_lse: Tensor | None) -> tuple:
        query, key, value, out, lse, *captured = ctx.saved_tensors
        need = [bool(n) and t.is_floating_point()
                for n, t in zip(ctx.needs_input_grad[9:], captured)]
        dq, dk, dv, caps = torch.ops.attndsl.flex_bwd(
            grad_out, grad_lse, query, key, value, out, lse, list(captured), need, ctx.spec,
            ctx.scale, ctx.tables, ctx.blocks[0], ctx.blocks[1], ctx.deterministic)
        cap_grads = [g if want else None for g, want in zip(caps, need)]
        return (dq, dk, dv, None, None, None, None, None, None, *cap_grads)


def _prepare(score_mod: Callable | None, mask_fn: Callable | None
             ) -> tuple[str, list[Tensor]]:
    """Trace the programs, register the spec; its key and captured tensors (in op order)."""
    spec = lower_flex(score_mod, mask_fn)
    key = register_spec(spec.cascade)
    return key, [spec.captured[n] for n in _SPECS[key].captured]


Path = tuple  # (root index, (kind, arg), (kind, arg), ...)


def _split(fn: Callable | None) -> tuple[Any, Any]:
    """A callable as (function, bound object or None): dynamo converts each to a constant."""
    if isinstance(fn, types.MethodType):
        return fn.__func__, fn.__self__
    return fn, None


def _join(fn: Any, obj: Any) -> Callable | None:
    return fn if obj is None else types.MethodType(fn, obj)


def _assume_constant_result(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result(fn)`` without its import of ``torch._dynamo``
    (a second of every process's ``import attndsl``, paid again by each spawned rank and compile
    child): the decorator only marks ``fn`` with the attribute dynamo reads when it traces a
    call.  tests/test_imports.py checks the mark is the one torch's decorator sets."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


@_assume_constant_result
def _prepare_constant(score_fn: Any, score_self: Any, mask_fn: Any, mask_self: Any,
                      *ids: int) -> tuple[str, tuple[Path, ...]]:
    """Under torch.compile: the spec key and, for each captured tensor, the path that reaches
    it from ``roots`` = (score function, its self, mask function, its self) through closure
    cells, globals, attributes and items.  Runs at trace time only; ``ids`` are there so that
    dynamo guards on the objects (a new score_mod recompiles instead of reusing this key)."""
    roots = (score_fn, score_self, mask_fn, mask_self)
    key, captured = _prepare(_join(score_fn, score_self), _join(mask_fn, mask_self))
    return key, tuple(find_paths(roots, captured))


def _children(obj: Any) -> list[tuple[tuple[str, Any], Any]]:
    """The objects a score/mask program can reach from ``obj``, with the step to each."""
    out: list[tuple[tuple[str, Any], Any]] = []
    if isinstance(obj, types.FunctionType):
        for i, cell in enumerate(obj.__closure__ or ()):
            try:
                out.append((("cell", i), cell.cell_contents))
            except ValueError:  # an empty cell
                continue
        names = set(obj.__code__.co_names)
        for const in obj.__code__.co_consts:
            if isinstance(const, types.CodeType):
                names |= set(const.co_names)
        out += [(("global", n), obj.__globals__[n]) for n in sorted(names)
                if n in obj.__globals__ and not isinstance(obj.__globals__[n], types.ModuleType)]
        out += [(("default", i), d) for i, d in enumerate(obj.__defaults__ or ())]
    elif isinstance(obj, types.MethodType):
        out += [(("attr", "__self__"), obj.__self__), (("attr", "__func__"), obj.__func__)]
    elif isinstance(obj, functools.partial):
        out += [(("attr", "func"), obj.func), (("attr", "args"), obj.args)]
        out += [(("attr", "keywords"), obj.keywords)]
    elif isinstance(obj, list | tuple):
        out += [(("item", i), x) for i, x in enumerate(obj)]
    elif isinstance(obj, dict):
        out += [(("item", k), x) for k, x in obj.items() if isinstance(k, str | int)]
    elif isinstance(obj, torch.nn.Module):
        for table in (obj._parameters, obj._buffers, obj._modules):
            out += [(("attr", k), x) for k, x in table.items() if x is not None]
        out += [(("attr", k), x) for k, x in vars(obj).items() if not k.startswith("_")]
    elif not isinstance(obj, type | types.ModuleType | torch.Tensor) and hasattr(obj, "__dict__"):
        out += [(("attr", k), x) for k, x in vars(obj).items()]
    return out


def find_paths(roots: tuple, targets: list[Tensor], max_depth: int = 6,
               max_nodes: int = 20000) -> list[Path]:
    """Breadth-first search for each target tensor from the roots (by identity)."""
    want = {id(t): i for i, t in enumerate(targets)}
    found: dict[int, Path] = {}
    queue = deque((r, (i,)) for i, r in enumerate(roots) if r is not None)
    seen: set[int] = set()
    while queue and len(found) < len(want) and len(seen) < max_nodes:
        obj, path = queue.popleft()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if id(obj) in want:
                found.setdefault(id(obj), path)
            continue
        if len(path) <= max_depth:
            queue.extend((child, path + (step,)) for step, child in _children(obj))
    missing = [i for t, i in want.items() if t not in found]
    if missing:
        raise AttentionError(
            f"under torch.compile, captured tensor(s) {missing} of score_mod/mask_mod could not "
            f"be found from the functions' closures, globals or attributes; keep them there "
            f"(or call flex_attention_trainable outside the compiled region)")
    return [found[id(t)] for t in targets]


def _follow(roots: tuple, path: Path) -> Any:
    """The object at ``path`` (dynamo traces this: each step gets a source and a guard)."""
    obj = roots[path[0]]
    for kind, arg in path[1:]:
        if kind == "cell":
            obj = obj.__closure__[arg].cell_contents
        elif kind == "global":
            obj = obj.__globals__[arg]
        elif kind == "default":
            obj = obj.__defaults__[arg]
        elif kind == "attr":
            obj = getattr(obj, arg)
        else:
            obj = obj[arg]
    return obj


def flex_attention_trainable(query: Tensor, key: Tensor, value: Tensor,
                             score_mod: Callable | None = None, block_mask: Any = None,
                             scale: float | None = None, enable_gqa: bool = False,
                             return_lse: bool = False, *, mask_mod: Callable | None = None,
                             deterministic: bool = False) -> Any:
    """``flex_attention`` with gradients (see :func:`attndsl.api.flex_attention`).

    Differentiable in query, key, value, the returned lse (natural log) and the floating
    captured tensors of ``score_mod``.  Fully masked rows give out = 0, lse = -inf and zero
    gradients.  ``deterministic=True`` computes dQ without atomics (a second kernel)."""
    check_qkv(query, key, value, enable_gqa)
    lq, lkv = query.shape[2], key.shape[2]
    mask_fn = mask_of(block_mask, mask_mod)
    if torch.compiler.is_compiling():
        # traced once per (score_mod, mask_mod) object: id() guards recompile on new ones;
        # the captured tensors are re-read through their paths so that dynamo lifts them;
        # an absent root (None) needs no guard, and torch < 2.13's dynamo cannot trace id(None)
        roots = (*_split(score_mod), *_split(mask_fn))
        ids = (id(r) for r in roots if r is not None)
        entry_key, paths = _prepare_constant(*roots, *ids)
        captured = [_follow(roots, p) for p in paths]
    else:
        entry_key, captured = _prepare(score_mod, mask_fn)
        names = _SPECS[entry_key].captured
        captured = list(shapes_only(dict(zip(names, captured)), query.device).values())
    check_broadcast(block_mask, _SPECS[entry_key].cascade, query.shape[0], query.shape[1])
    tables, q_block, kv_block = block_mask_plan(block_mask, lq, lkv).op_args()
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    out, lse = FlexAttentionFunction.apply(query, key, value, entry_key, float(scale), tables,
                                           q_block, kv_block, deterministic, *captured)
    return (out, lse) if return_lse else out


__all__ = ["FlexAttentionFunction", "backward_source", "flex_attention_trainable", "flex_bwd",
           "flex_fwd", "load_backward_module", "register_spec"]
