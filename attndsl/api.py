"""The public Python API: ``flex_attention`` (drop-in for torch's) and ``compile``.

``flex_attention(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse,
kernel_options, *, mask_mod, return_aux)`` follows the calling convention and semantics of
``torch.nn.attention.flex_attention.flex_attention``::

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor
    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor  # bool

    query: (B, Hq, L, E)   key: (B, Hkv, S, E)   value: (B, Hkv, S, Ev)   ->   out: (B, Hq, L, Ev)

The functions are traced once into the Cascade IR (never called per element), compiled into a
fused Triton kernel (cached by content), and run: natively on a GPU, through Triton's
interpreter on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

import torch

from attndsl.block_mask import has_closed_form
from attndsl.block_tables import to_tables
from attndsl.eager import EagerError, bind_extents, run_cascade
from attndsl.errors import AttnDSLError
from attndsl.frontend.flex import lower_flex
from attndsl.ir import expr as E
from attndsl.ir.cascade import Cascade
from attndsl.ir.expr import INT, Expr, Op
from attndsl.passes.index_bounds import names_captured_tensors
from attndsl.passes.mask import MaskAnalysisError, classify_tiles
from attndsl.passes.pipeline import Compiled, compile_cascade
from attndsl.runtime.modules import load_kernel_module, module_source
from attndsl.runtime.plan_cache import TensorKeyedCache

Tensor = torch.Tensor
_COMPILED: dict[Cascade, tuple[Compiled, ModuleType]] = {}
KERNEL_OPTIONS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
_IGNORED_FLEX_OPTIONS = ("PRESCALE_QK", "ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS",
                         "OUTPUT_LOGSUMEXP", "OUTPUT_MAX", "FORCE_USE_FLEX_ATTENTION",
                         "WRITE_DQ", "BACKEND")


class AuxRequest(NamedTuple):
    """Which auxiliary outputs to return (as torch's AuxRequest)."""

    lse: bool = False
    max_scores: bool = False


class AuxOutput(NamedTuple):
    lse: Tensor | None = None
    max_scores: Tensor | None = None


class AttentionError(AttnDSLError, ValueError):
    """Bad arguments to flex_attention / a compiled kernel: says what was expected."""


def _compiled(cascade: Cascade) -> tuple[Compiled, ModuleType]:
    if cascade not in _COMPILED:
        comp = compile_cascade(cascade)
        _COMPILED[cascade] = (comp, load_kernel_module(comp.kernel))
    return _COMPILED[cascade]


def _check_qkv(query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise AttentionError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise AttentionError(f"{name} must have shape (B, H, L, E), got {tuple(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise AttentionError(f"{name} has dtype {t.dtype}; expected float16, bfloat16 or "
                                 f"float32")
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


def _block_tables(block_mask: Any, lq: int, lkv: int) -> dict | None:
    """Tables of torch's BlockMask or attndsl's (same field names)."""
    if block_mask is None:
        return None
    for attr in ("kv_num_blocks", "kv_indices", "BLOCK_SIZE"):  # on the class: tables may be
        if not hasattr(type(block_mask), attr) and attr not in vars(block_mask):  # built lazily
            raise AttentionError(f"block_mask must be a BlockMask (torch's or attndsl's); "
                                 f"{type(block_mask).__name__} has no {attr}")
    seq = getattr(block_mask, "seq_lengths", None)
    if seq is not None and tuple(seq) != (lq, lkv):
        raise AttentionError(f"block_mask was built for (Q_LEN, KV_LEN) = {tuple(seq)}, but "
                             f"the inputs have ({lq}, {lkv}); rebuild it with "
                             f"create_block_mask(..., {lq}, {lkv})")
    bs = block_mask.BLOCK_SIZE
    q_bs, kv_bs = (bs, bs) if isinstance(bs, int) else bs
    if getattr(block_mask, "closed_form", False) and (q_bs, kv_bs) == (SPARSE_BLOCK,) * 2:
        return {"closed_form": True, "Q_BLOCK_SIZE": q_bs, "KV_BLOCK_SIZE": kv_bs}
    if getattr(block_mask, "kv_ranges", None) is not None:
        return {"kv_ranges": block_mask.kv_ranges, "Q_BLOCK_SIZE": int(q_bs),
                "KV_BLOCK_SIZE": int(kv_bs)}
    return {"kv_num_blocks": block_mask.kv_num_blocks, "kv_indices": block_mask.kv_indices,
            "full_kv_num_blocks": getattr(block_mask, "full_kv_num_blocks", None),
            "full_kv_indices": getattr(block_mask, "full_kv_indices", None),
            "Q_BLOCK_SIZE": int(q_bs), "KV_BLOCK_SIZE": int(kv_bs)}


_PLANS = TensorKeyedCache(max_entries=64)  # by captured values or live identity, never id()
SPARSE_BLOCK = 128


def _no_work(device: torch.device, *sizes: int) -> bool:
    """An empty problem (a batch, head or length of 0) or shapes only (meta tensors, as in
    model initialisation): outputs are made without a launch, so no tile plan is needed
    (and meta tensors hold no data to analyse)."""
    return device.type == "meta" or 0 in sizes


def _shapes_only(captured: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Captured tensors as meta tensors when the inputs are (the launcher checks that devices
    agree; a meta launch reads shapes only).  A tensor with data is detached on its way: meta
    inputs compute nothing, so it gets no gradient (rather than an uninitialised one)."""
    if device.type != "meta":
        return captured
    return {n: t if t.device.type == "meta" else t.detach().to("meta")
            for n, t in captured.items()}


def _sparsity_plan(mask: Expr, captured: dict[str, Tensor], B: int, H: int, lq: int, lkv: int,
                   device: torch.device, closed_form: bool = True) -> dict | None:
    """How the kernel skips key tiles for a mask given without a block mask: closed-form
    key-tile ranges computed by the kernel from its query-tile index when the mask has them
    (no table at all), else tables built by the symbolic analysis (O(tiles), from per-tile
    summaries of captured data): four key-tile bounds per segment of key tiles when no query
    tile sees more than MAX_SEGMENTS segments, block tables otherwise.  Cached by the captured
    tensors' values (small CPU tensors) or live identity and version (attndsl.runtime.
    plan_cache): a new tensor at a freed one's address never reuses the old plan."""
    if _no_work(device, B, H, lq, lkv):
        return None
    parts = (mask, B, H, lq, lkv, str(device), closed_form)
    plan = _PLANS.get(parts, captured)
    if plan is not None:
        return plan
    if closed_form and has_closed_form(mask, SPARSE_BLOCK, SPARSE_BLOCK):
        plan = {"closed_form": True}  # the kernel computes its key-tile ranges itself
    else:
        tiles = classify_tiles(mask, captured, B, H, lq, lkv, SPARSE_BLOCK, SPARSE_BLOCK)
        ranges = tiles.kv_ranges()
        if ranges is not None:  # a few segments of key tiles per query tile
            plan = {"kv_ranges": ranges.to(device)}
        else:
            t = to_tables(tiles)
            plan = {"kv_num_blocks": t.kv_num_blocks.to(device),
                    "kv_indices": t.kv_indices.to(device),
                    "full_kv_num_blocks": t.full_kv_num_blocks.to(device),
                    "full_kv_indices": t.full_kv_indices.to(device)}
    plan.update(Q_BLOCK_SIZE=SPARSE_BLOCK, KV_BLOCK_SIZE=SPARSE_BLOCK)
    _PLANS.put(parts, captured, plan)
    return plan


def _mask_of(block_mask: Any, mask_mod: Callable | None) -> Callable | None:
    if mask_mod is not None:
        return mask_mod
    fn = getattr(block_mask, "mask_mod", None)
    if fn is None or getattr(fn, "__name__", "") == "noop_mask":
        return None
    return fn


def _options(kernel_options: dict | None) -> dict:
    out = {}
    for k, v in (kernel_options or {}).items():
        if k in KERNEL_OPTIONS:
            out[k] = int(v)
            if k.startswith("BLOCK") and (out[k] < 16 or out[k] & (out[k] - 1)):
                raise AttentionError(f"kernel option {k}={v}: tile sizes must be powers of two "
                                     f">= 16")
            if not k.startswith("BLOCK") and out[k] < 1:
                raise AttentionError(f"kernel option {k}={v} must be >= 1")
        elif k not in _IGNORED_FLEX_OPTIONS and k != "deterministic":
            raise AttentionError(f"unknown kernel option {k!r}; attndsl reads {KERNEL_OPTIONS}")
    return out


@names_captured_tensors
def flex_attention(query: Tensor, key: Tensor, value: Tensor,
                   score_mod: Callable | None = None, block_mask: Any = None,
                   scale: float | None = None, enable_gqa: bool = False,
                   return_lse: bool = False, kernel_options: dict | None = None, *,
                   mask_mod: Callable | None = None, return_aux: Any = None) -> Any:
    """Attention with a traced ``score_mod`` and ``mask_mod`` (see the module docstring).

    ``block_mask`` may be torch's ``BlockMask`` or attndsl's: its tables choose the key tiles
    (partial tiles evaluate the mask, full tiles do not) and its ``mask_mod`` is traced.
    ``mask_mod=`` alone needs no block mask.  Returns ``out``, ``(out, lse)`` with
    ``return_lse``, or ``(out, AuxOutput(lse, max_scores))`` with ``return_aux``.  The
    log-sum-exp is in natural log; fully masked rows give 0 and lse = -inf.
    """
    _check_qkv(query, key, value, enable_gqa)
    if torch.compiler.is_compiling():  # custom ops with fake kernels: no graph breaks
        return _trainable(query, key, value, score_mod, block_mask, scale, enable_gqa,
                          return_lse, kernel_options, mask_mod, return_aux)
    lq, lkv = query.shape[2], key.shape[2]
    tables = _block_tables(block_mask, lq, lkv)
    spec = lower_flex(score_mod, _mask_of(block_mask, mask_mod))
    if torch.is_grad_enabled() and any(t.requires_grad for t in
                                       (query, key, value, *spec.captured.values())):
        return _trainable(query, key, value, score_mod, block_mask, scale, enable_gqa,
                          return_lse, kernel_options, mask_mod, return_aux)
    _, module = _compiled(spec.cascade)
    if tables is None and spec.cascade.mask is not None:
        tables = _sparsity_plan(spec.cascade.mask.expr, spec.captured, query.shape[0],
                                query.shape[1], lq, lkv, query.device)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    try:
        out = module.launch({"Q": query, "K": key, "V": value},
                            {"scale": float(scale), "G": query.shape[1] // max(1, key.shape[1])},
                            _shapes_only(spec.captured, query.device), tables,
                            _options(kernel_options))
    except module.AttentionInputError as err:
        raise AttentionError(str(err)) from None
    if return_aux is not None:
        return out["O"], AuxOutput(out["LSE"] if return_aux.lse else None,
                                   out["MAX"] if return_aux.max_scores else None)
    if return_lse:
        return out["O"], out["LSE"]
    return out["O"]


def _trainable(query: Tensor, key: Tensor, value: Tensor, score_mod: Callable | None,
               block_mask: Any, scale: float | None, enable_gqa: bool, return_lse: bool,
               kernel_options: dict | None, mask_mod: Callable | None, return_aux: Any) -> Any:
    """The differentiable path (generated backward kernels, a torch custom op)."""
    from attndsl.autograd import flex_attention_trainable

    options = dict(kernel_options or {})
    deterministic = bool(options.pop("deterministic", False))
    if block_mask is None and mask_mod is not None and not torch.compiler.is_compiling() \
            and not _no_work(query.device, *query.shape[:3], key.shape[2]):
        from attndsl.block_mask import create_block_mask

        block_mask = create_block_mask(mask_mod, query.shape[0], query.shape[1],
                                       query.shape[2], key.shape[2], device=query.device)
    if _options(options):
        raise AttentionError(f"kernel options {sorted(_options(options))} are not supported "
                             f"when gradients are needed")
    out, lse = flex_attention_trainable(query, key, value, score_mod, block_mask, scale,
                                        enable_gqa, True, mask_mod=mask_mod,
                                        deterministic=deterministic)
    if return_aux is not None:
        max_scores = None
        if return_aux.max_scores:  # not differentiable: a forward-only run provides it
            if torch.compiler.is_compiling():
                raise AttentionError("return_aux=AuxRequest(max_scores=True) is not supported "
                                     "inside torch.compile; request lse only")
            with torch.no_grad():
                _, aux = flex_attention(query.detach(), key.detach(), value.detach(), score_mod,
                                        block_mask, scale, enable_gqa, mask_mod=mask_mod,
                                        return_aux=AuxRequest(max_scores=True))
            max_scores = aux.max_scores
        return out, AuxOutput(lse if return_aux.lse else None, max_scores)
    return (out, lse) if return_lse else out


@dataclass
class Kernel:
    """A compiled spec: its IR at every stage, the generated source and the loaded module."""

    compiled: Compiled
    module: ModuleType
    captured: dict[str, Tensor]

    @property
    def source(self) -> str:
        return module_source(self.compiled.kernel)

    def __call__(self, inputs: dict[str, Tensor], params: dict | None = None,
                 captured: dict[str, Tensor] | None = None, block_mask: Any = None,
                 kernel_options: dict | None = None) -> dict[str, Tensor]:
        """Run on named inputs; returns every output of the cascade by name.

        Differentiable: when an input or captured tensor requires grad, the backward pass
        recomputes the cascade with the eager executor (float32, chunked over queries) and
        differentiates it -- correct for every cascade, but not a fused kernel (FlexAttention
        specs called through ``flex_attention`` get generated backward kernels instead)."""
        first = next(iter(inputs.values()))
        lq = first.shape[-2]
        tables = None
        cap = _shapes_only({**self.captured, **(captured or {})}, first.device)
        if block_mask is not None:
            key = next(t for n, t in inputs.items() if n != next(iter(inputs)))
            tables = _block_tables(block_mask, lq, key.shape[-2])
        else:
            tables = self._mask_plan({**inputs, **cap}, params or {}, first.device)
        run = lambda: self.module.launch(  # noqa: E731
            inputs, params, cap, tables, _options(kernel_options))
        tensors = {**inputs, **cap}
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values())):
            return run()
        names = list(tensors)
        outs = _EagerBackward.apply(self, run, names, dict(params or {}), *tensors.values())
        return dict(zip(self.compiled.cascade.outputs, outs))

    def _mask_plan(self, tensors: dict[str, Tensor], params: dict,
                   device: torch.device) -> dict | None:
        """Key-tile tables from the mask analysis, for a launch without a block mask when the
        kernel has no closed-form ranges of its own (masks reading data or parameters): the
        mask with the launch's parameter values, indices renamed by role, its tensors bound.
        None (every key tile visited, masked) when the mask cannot be analysed."""
        c = self.compiled.cascade
        if c.mask is None or getattr(self.module, "BOUNDS_BLOCK", None) is not None:
            return None
        roles = {i.role: i for i in c.indices}
        rename = {roles[r].name: x for r, x in (("batch", "b"), ("head", "h"), ("query", "m"),
                                                ("key", "n")) if r in roles}
        values = {p.name: p.default for p in c.params if p.default is not None}
        values.update({k: v for k, v in params.items() if v is not None})
        if any(x.op is Op.PARAM and x.arg not in values for x in c.mask.expr.walk()):
            return None

        def bind(node: Expr) -> Expr | None:
            if node.op is Op.INDEX and node.arg in rename:
                return E.index(rename[node.arg])
            if node.op is Op.PARAM:
                value = values[node.arg]
                return E.const(int(value) if node.dtype == INT else float(value))
            return None

        mask = c.mask.expr.replace(bind)
        used = {x.arg for x in mask.walk() if x.op is Op.LOAD}
        if mask.free_indices() - set(rename.values()) or not used <= set(tensors):
            return None
        try:
            sizes = bind_extents(c, tensors)
            extent = {r: sizes.get(roles[r].extent, 1) if r in roles else 1
                      for r in ("batch", "head", "query", "key")}
            return _sparsity_plan(mask, {k: tensors[k] for k in sorted(used)},
                                  extent["batch"], extent["head"], extent["query"],
                                  extent["key"], device, closed_form=False)
        except (EagerError, MaskAnalysisError):
            return None


class _EagerBackward(torch.autograd.Function):
    """Forward: the generated kernel.  Backward: autograd through the eager executor."""

    @staticmethod
    def forward(ctx: Any, kernel: Kernel, run: Callable, names: list[str], params: dict,
                *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.kernel, ctx.names, ctx.params = kernel, names, params
        ctx.save_for_backward(*tensors)
        out = run()
        return tuple(out[o] for o in kernel.compiled.cascade.outputs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple:
        tensors = ctx.saved_tensors
        leaves = [t.detach().requires_grad_(t.requires_grad and t.is_floating_point())
                  for t in tensors]
        cascade = ctx.kernel.compiled.cascade
        params = dict(ctx.params)
        with torch.enable_grad():
            ref = run_cascade(cascade, dict(zip(ctx.names, leaves)),
                              _default_params(cascade, params, dict(zip(ctx.names, tensors))),
                              dtype=torch.float32)
            pairs = [(ref[o], g) for o, g in zip(cascade.outputs, grads)
                     if g is not None and ref[o].requires_grad]
            wanted = [x for x in leaves if x.requires_grad]
            got = torch.autograd.grad([o for o, _ in pairs], wanted,
                                      [g.to(o.device, o.dtype) for o, g in pairs],
                                      allow_unused=True) if pairs else [None] * len(wanted)
        it = iter(got)
        out = [next(it) if x.requires_grad else None for x in leaves]
        # a tensor no output depends on (e.g. in an empty problem) has a zero gradient
        out = [None if not x.requires_grad else torch.zeros_like(t) if g is None else
               g.to(t.device, t.dtype) for g, x, t in zip(out, leaves, tensors)]
        return (None, None, None, None, *out)


def _default_params(cascade: Cascade, params: dict, tensors: dict[str, Tensor]) -> dict:
    """The scalars the kernel's launcher would use: scale = 1/sqrt(qk dim), G from heads."""
    from attndsl.eager import bind_extents

    sizes = bind_extents(cascade, tensors)
    out = dict(params)
    qk = next((i.extent for i in cascade.indices if i.role == "qk"), None)
    head = next((i.extent for i in cascade.indices if i.role == "head"), None)
    if any(p.name == "scale" for p in cascade.params) and out.get("scale") is None:
        out["scale"] = 1.0 / math.sqrt(sizes.get(qk, 1))
    if any(p.name == "G" for p in cascade.params) and "G" not in out and "HKV" in sizes:
        out["G"] = sizes[head] // sizes["HKV"] if sizes["HKV"] else 1  # 0 heads: empty
    return out


def compile(spec: Cascade | None = None, *, score_mod: Callable | None = None,  # noqa: A001
            mask_mod: Callable | None = None) -> Kernel:
    """Compile a cascade, or FlexAttention-style functions, into a reusable kernel."""
    captured: dict[str, Tensor] = {}
    if spec is None:
        flex = lower_flex(score_mod, mask_mod)
        spec, captured = flex.cascade, flex.captured
    elif score_mod is not None or mask_mod is not None:
        raise AttentionError("pass either a cascade or score_mod/mask_mod, not both")
    comp, module = _compiled(spec)
    return Kernel(comp, module, captured)
