"""Which key-tile plan a launch uses (:class:`attndsl.key_tile_plan.KeyTilePlan`).

* a block mask given (torch's or attndsl's): its own tables, range table or closed forms
  (:func:`block_mask_plan`);
* a mask without a block mask: :func:`attndsl.key_tile_plan.plan_key_tiles`, cached
  (:func:`mask_plan`);
* a compiled kernel called on named inputs: the mask with the launch's parameter values
  (:func:`kernel_plan`).

Plans are cached by the captured tensors' values (small CPU tensors) or live identity and
version (:mod:`attndsl.runtime.plan_cache`): a new tensor at a freed one's address never
reuses the old plan.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from attndsl.block_tables import TABLE_NAMES
from attndsl.eager import EagerError, bind_extents
from attndsl.ir import expr as E
from attndsl.ir.cascade import Cascade
from attndsl.ir.expr import INT, Expr, Op
from attndsl.key_tile_plan import (
    CLOSED,
    RANGES,
    SPARSE_BLOCK,
    TABLES,
    KeyTilePlan,
    Once,
    plan_key_tiles,
)
from attndsl.passes.mask import CLOSED_FORM, MaskAnalysisError
from attndsl.runtime.checks import AttentionError, no_work
from attndsl.runtime.plan_cache import TensorKeyedCache

Tensor = torch.Tensor
_PLANS = TensorKeyedCache(max_entries=64)  # by captured values or live identity, never id()


def mask_plan(mask: Expr, captured: dict[str, Tensor], B: int, H: int, lq: int, lkv: int,
              device: torch.device, closed_form: bool = True) -> KeyTilePlan:
    """The forward's key-tile plan of a mask given without a block mask, in blocks of
    SPARSE_BLOCK (see :func:`~attndsl.key_tile_plan.plan_key_tiles`); dense when there is
    nothing to launch.  The cache keeps what the forward reads only."""
    if no_work(device, B, H, lq, lkv):
        return KeyTilePlan.dense()
    parts = (mask, B, H, lq, lkv, str(device), closed_form)
    plan = _PLANS.get(parts, captured)
    if plan is None:
        plan = plan_key_tiles(mask, captured, B, H, lq, lkv, (SPARSE_BLOCK, SPARSE_BLOCK),
                              device, closed_form=closed_form).forward_only()
        _PLANS.put(parts, captured, plan)
    return plan


def _block_sizes(block_mask: Any, lq: int, lkv: int) -> tuple[int, int]:
    for attr in ("kv_num_blocks", "kv_indices", "BLOCK_SIZE"):  # on the class: tables may be
        if not hasattr(type(block_mask), attr) and \
                attr not in getattr(block_mask, "__dict__", {}):  # built lazily
            raise AttentionError(f"block_mask must be a BlockMask (torch's or attndsl's); "
                                 f"{type(block_mask).__name__} has no {attr}")
    seq = getattr(block_mask, "seq_lengths", None)
    if seq is not None and tuple(seq) != (lq, lkv):
        raise AttentionError(f"block_mask was built for (Q_LEN, KV_LEN) = {tuple(seq)}, but "
                             f"the inputs have ({lq}, {lkv}); rebuild it with "
                             f"create_block_mask(..., {lq}, {lkv})")
    bs = block_mask.BLOCK_SIZE
    q_bs, kv_bs = (bs, bs) if isinstance(bs, int) else bs
    return int(q_bs), int(kv_bs)


def check_broadcast(block_mask: Any, cascade: Cascade, batch: int, heads: int) -> None:
    """A block mask built for B = 1 or H = 1 (or None) broadcasts its tables over the inputs'
    batch or heads: its tile classes (which tiles are skipped, which run unmasked) were found
    for batch 0 / head 0.  They hold for every batch / head only if the mask does not read
    that index; otherwise a tile full for head 0 would skip another head's mask (and an empty
    one skip its keys), a silently wrong result.  Refused, naming the index."""
    shape = getattr(block_mask, "shape", None)
    if block_mask is None or cascade.mask is None or shape is None or len(shape) != 4:
        return
    reads = cascade.mask.expr.free_indices()
    for d, (role, actual, name) in enumerate((("batch", batch, "B"), ("head", heads, "H"))):
        index = cascade.role(role)
        if int(shape[d]) == 1 and actual > 1 and index in reads:
            raise AttentionError(
                f"block_mask was built for {name} = 1 (broadcast over the inputs' {actual}), "
                f"but its mask_mod reads the {role} index ({index}): tile classes found for "
                f"{role} 0 do not hold for the others; build it for the inputs' B = {batch}, "
                f"H = {heads}")


def block_mask_plan(block_mask: Any, lq: int, lkv: int) -> KeyTilePlan:
    """The plan a block mask (torch's or attndsl's: the same field names) gives inputs of
    lengths (lq, lkv): its closed forms when it has them at the kernels' SPARSE_BLOCK, its
    range table, else its tables; the eight tables (the backward's) are read from it when
    first needed.  Dense without a block mask."""
    if block_mask is None:
        return KeyTilePlan.dense()
    block = _block_sizes(block_mask, lq, lkv)
    every = Once(lambda: ({k: getattr(block_mask, k, None) for k in TABLE_NAMES}, None))
    what = getattr(block_mask, "mechanism", "") or "the block mask"
    if getattr(block_mask, "closed_form", False) and block == (SPARSE_BLOCK, SPARSE_BLOCK):
        return KeyTilePlan(CLOSED, block, what, lazy=every)
    if getattr(block_mask, "kv_ranges", None) is not None:
        return KeyTilePlan(RANGES, block, what, kv_ranges=block_mask.kv_ranges, lazy=every)
    return KeyTilePlan(TABLES, block, what, tables=every()[0])


def _bound_mask(c: Cascade, params: dict) -> Expr | None:
    """The cascade's mask with the launch's parameter values and its indices renamed by role
    (b, h, m, n), or None when a parameter is unbound or an index is not one of those."""
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
    return None if mask.free_indices() - set(rename.values()) else mask


def kernel_plan(c: Cascade, module: ModuleType, tensors: dict[str, Tensor], params: dict,
                device: torch.device) -> KeyTilePlan:
    """The plan of a compiled kernel launched without a block mask: its own closed forms
    when it was compiled with them; else tables from the mask analysis of the mask with the
    launch's parameter values and its tensors bound; dense when the mask cannot be analysed
    (it reads data or parameters the launch does not give)."""
    if c.mask is None:
        return KeyTilePlan.dense()
    if getattr(module, "BOUNDS_BLOCK", None) is not None:
        return KeyTilePlan(CLOSED, (module.BOUNDS_BLOCK, module.BOUNDS_BLOCK), CLOSED_FORM)
    mask = _bound_mask(c, params)
    if mask is None:
        return KeyTilePlan.dense()
    used = {x.arg for x in mask.walk() if x.op is Op.LOAD}
    if not used <= set(tensors):
        return KeyTilePlan.dense()
    roles = {i.role: i for i in c.indices}
    try:
        sizes = bind_extents(c, tensors)
        extent = {r: sizes.get(roles[r].extent, 1) if r in roles else 1
                  for r in ("batch", "head", "query", "key")}
        return mask_plan(mask, {k: tensors[k] for k in sorted(used)}, extent["batch"],
                         extent["head"], extent["query"], extent["key"], device,
                         closed_form=False)
    except (EagerError, MaskAnalysisError):
        return KeyTilePlan.dense()
