"""Context-parallel entry points: ring attention over sequence shards and tree decoding.

::

    out = context_parallel_attention(q, k, v, score_mod, mask_mod, group=pg, layout="zigzag")

    q: (B, Hq, L_r, E)   k: (B, Hkv, S_r, E)   v: (B, Hkv, S_r, Ev)  ->  out: (B, Hq, L_r, Ev)

on every rank of ``group`` (a ProcessGroup, a 1-D DeviceMesh, or None for the default
group), where rank r holds the rows its ``layout`` gives it (:func:`shard`).  ``score_mod`` /
``mask_mod`` are FlexAttention programs; they see *global* q/kv positions, and tensors they
capture (document ids, bias tables, ALiBi slopes) must hold the same values on every rank.
``sinks`` (a per-head logit [Hq]) adds ``exp(sinks[h])`` to every row's denominator once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from attndsl.distributed.additive import AdditivePairs, is_additive
from attndsl.distributed.agree import RankRefusal, dtype_code, refuse_unequal, settle
from attndsl.distributed.kernels import PairKernels
from attndsl.distributed.layout import all_positions, check_layout
from attndsl.distributed.merge import add_sink
from attndsl.distributed.normaliser import SoftmaxForm, softmax_form
from attndsl.distributed.pairs import best_layout, classify_pair, pair_classes
from attndsl.distributed.positions import positioned
from attndsl.distributed.ring import Replicated, Ring, RingFunction
from attndsl.frontend.flex import lower_flex
from attndsl.ir.cascade import Cascade
from attndsl.passes.mask import EMPTY
from attndsl.runtime.checks import AttentionError, check_qkv, check_scale

Tensor = torch.Tensor


def process_group(group: Any) -> Any:
    """A ProcessGroup from ``group``: itself, a 1-D DeviceMesh's group, or the default one."""
    if not dist.is_available() or not dist.is_initialized():
        raise AttentionError("context parallelism needs torch.distributed initialised "
                             "(dist.init_process_group, e.g. under torchrun)")
    if hasattr(group, "get_group"):  # a DeviceMesh
        if getattr(group, "ndim", 1) != 1:
            raise AttentionError(f"pass a 1-D DeviceMesh (the sequence dimension's), got "
                                 f"{group.ndim} dimensions; slice it: mesh['cp']")
        return group.get_group()
    return group


def _check_lengths(lengths: list[list[int]], pos: list[Tensor], what: str, col: int,
                   layout: str) -> None:
    for rank, (got, p) in enumerate(zip((x[col] for x in lengths), pos)):
        if got != p.numel():
            raise AttentionError(f"rank {rank} holds {got} {what} rows, but the {layout} "
                                 f"layout of {sum(x[col] for x in lengths)} rows over "
                                 f"{len(pos)} ranks gives it {p.numel()}; shard with "
                                 f"attndsl.distributed.shard(x, {layout!r}, world, rank)")


def context_parallel_attention(query: Tensor, key: Tensor, value: Tensor,
                               score_mod: Callable | None = None,
                               mask_mod: Callable | None = None, *, group: Any = None,
                               layout: str = "contiguous", seq_dim: int = 2,
                               scale: float | None = None, enable_gqa: bool = False,
                               sinks: Tensor | None = None, return_lse: bool = False,
                               cascade: Cascade | None = None,
                               captured: dict[str, Tensor] | None = None,
                               params: dict | None = None) -> Any:
    """Attention over a sequence sharded across ``group`` (see the module docstring).

    Differentiable in query, key, value, the lse, ``sinks`` and floating captured tensors
    (their gradients are summed over the ranks).  Returns ``out`` or ``(out, lse)``; lse is
    in natural log, -inf (and out 0) for rows no key reaches; with ``sinks`` it is the log of
    the whole denominator (sink included).  With ``cascade=`` (a text or
    builder spec of the softmax family, :mod:`.normaliser`, or one with no normaliser over
    the keys -- sigmoid, ReLU^2 -- whose shard outputs add, :mod:`.additive`; its tensors in
    ``captured``, its scalars in ``params``) it returns the cascade's outputs by name
    instead."""
    group = process_group(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    try:  # every rank-local refusal before any communication, then agreed by every rank
        scale = check_scale("context_parallel_attention", scale)
        layout = check_layout(layout)
        q, k, v = (x.movedim(seq_dim, 2) for x in (query, key, value))
        check_qkv(q, k, v, enable_gqa or cascade is not None)
        _check_arguments(cascade, score_mod, mask_mod, sinks, params, captured)
        facts, error = _facts(q, k, v), None
    except Exception as err:  # noqa: BLE001 - re-raised on every rank by settle
        facts, error = [0] * len(_FACTS), err
    table = settle(group, error, facts)  # the gather of lengths, carrying the refusals
    refuse_unequal([row[2:] for row in table], _FACTS[2:],
                   "every rank must pass the same batch, heads, head dims and dtype")
    lengths = [row[:2] for row in table]
    q_pos = all_positions(layout, sum(x[0] for x in lengths), world)
    k_pos = all_positions(layout, sum(x[1] for x in lengths), world)
    _check_lengths(lengths, q_pos, "query", 0, layout)
    _check_lengths(lengths, k_pos, "key", 1, layout)
    try:  # the kernels and the pair classes, agreed before the ring (module docstring)
        form = None
        if cascade is None:
            kernels = PairKernels.of(score_mod, mask_mod)
        elif is_additive(cascade):
            kernels = AdditivePairs.of(cascade, captured, params, sum(x[0] for x in lengths),
                                       sum(x[1] for x in lengths))
        else:
            extents = {cascade.index(cascade.role("query")).extent: sum(x[0] for x in lengths),
                       cascade.index(cascade.role("key")).extent: sum(x[1] for x in lengths)}
            form = _softmax_form(cascade, params, captured, extents, q, k)
            kernels = PairKernels.of_cascade(form.flex, form.captured)
            sinks = form.sink_logit(q.shape[1])
            scale = (params or {}).get("scale", scale) if form.scaled else 1.0
        classes, error = pair_classes(kernels.mask, kernels.captured, q.shape[0], q.shape[1],
                                      q_pos, k_pos), None
    except Exception as err:  # noqa: BLE001 - re-raised on every rank by settle
        classes, error = [[EMPTY] * world for _ in range(world)], err
    _refuse_other_classes(settle(group, error, [c for row in classes for c in row]), world)
    ring = Ring(kernels, group, rank, world, q_pos, k_pos, classes,
                1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale))
    names = tuple(kernels.captured)
    out, lse = RingFunction.apply(ring, names, q, k, v, *kernels.captured.values())
    sums_lse = lse  # log sum(n) exp(X): what a cascade's own LSE output is
    if sinks is not None:
        out, lse = add_sink(out, lse, Replicated.apply(sinks, group))
    out = out.movedim(2, seq_dim)
    if isinstance(kernels, AdditivePairs):
        return {kernels.output: out}
    if form is not None:
        return {name: out if kind == "O" else sums_lse for name, kind in form.outputs.items()}
    return (out, lse) if return_lse else out


def _refuse_other_classes(table: list[list[int]], world: int) -> None:
    """Every rank must classify every (query shard, key shard) pair alike: the classes decide
    who sends K/V to whom, so a rank that disagrees (its mask reads captured tensors that
    differ from rank 0's) would wait for a shard that is never sent."""
    for r, row in enumerate(table):
        for at, (got, want) in enumerate(zip(row, table[0])):
            if got != want:
                raise RankRefusal(f"rank {r} classifies the pair of query shard {at // world} "
                                  f"and key shard {at % world} differently from rank 0 (the "
                                  f"mask reads captured tensors that differ between the "
                                  f"ranks); captured tensors must hold the same values on "
                                  f"every rank")


def _softmax_form(cascade: Cascade, params: dict | None, captured: dict | None,
                  extents: dict[str, int], q: Tensor, k: Tensor) -> SoftmaxForm:
    """The cascade's softmax form; a group size ``G`` defaults to the head ratio."""
    params = dict(params or {})
    if any(p.name == "G" for p in cascade.params):
        params.setdefault("G", q.shape[1] // max(1, k.shape[1]))
    return softmax_form(cascade, params, captured, extents)


def tree_decode(query: Tensor, key: Tensor, value: Tensor, score_mod: Callable | None = None,
                mask_mod: Callable | None = None, *, group: Any = None,
                kv_positions: Tensor | None = None, q_positions: Tensor | None = None,
                scale: float | None = None, enable_gqa: bool = False,
                sinks: Tensor | None = None, return_lse: bool = False) -> Any:
    """Decoding against a K/V cache sharded across ``group`` (Tree Attention, Shyam et al.
    2024): the few new queries (B, Hq, Lq, E) are on every rank, each rank attends over its
    K/V shard (rows at ``kv_positions``; default: the contiguous layout), and the partial
    states merge with an all-reduce of the row maxima and one all-reduce of the rescaled
    (sum, acc) -- two collectives, no ring.  The queries sit at ``q_positions`` (default:
    the last Lq positions of the whole cache).  Forward only."""
    group = process_group(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    try:  # every rank-local refusal before any communication, then agreed by every rank
        scale = check_scale("tree_decode", scale)
        check_qkv(query, key, value, enable_gqa)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
            raise AttentionError("tree_decode is forward-only (decoding); call it under "
                                 "torch.no_grad() or use context_parallel_attention to train")
        if kv_positions is not None and kv_positions.numel() != key.shape[2]:
            raise AttentionError(f"kv_positions has {kv_positions.numel()} entries for a key "
                                 f"shard of {key.shape[2]} rows")
        facts, error = _facts(query, key, value), None
    except Exception as err:  # noqa: BLE001 - re-raised on every rank by settle
        facts, error = [0] * len(_FACTS), err
    table = settle(group, error, facts)
    refuse_unequal([[row[0], *row[2:]] for row in table], (_FACTS[0], *_FACTS[2:]),
                   "every rank must pass the same queries, heads, head dims and dtype")
    total = sum(row[1] for row in table)
    if kv_positions is None:
        pos = all_positions("contiguous", total, world)
        _check_lengths(table, pos, "key", 1, "contiguous")
        kv_positions = pos[rank]
    if q_positions is None:
        q_positions = torch.arange(total - query.shape[2], total)
    try:  # this rank's shard, agreed before the all-reduces (else a peer waits in them)
        out, lse = _tree_shard(query, key, value, PairKernels.of(score_mod, mask_mod),
                               q_positions.cpu(), kv_positions.cpu(), scale)
        error = None
    except Exception as err:  # noqa: BLE001 - re-raised on every rank by settle
        out = lse = None
        error = err
    settle(group, error)
    out, lse = _all_reduce_merge(out, lse, group)
    if sinks is not None:
        out, lse = add_sink(out, lse, sinks)
    out = out.to(query.dtype)
    return (out, lse) if return_lse else out


def _tree_shard(query: Tensor, key: Tensor, value: Tensor, kernels: PairKernels,
                q_positions: Tensor, kv_positions: Tensor, scale: float | None
                ) -> tuple[Tensor, Tensor]:
    """This rank's (O, lse) in float32 over its key shard (0 and -inf where the mask keeps
    none of it)."""
    cls = classify_pair(kernels.mask, kernels.captured, query.shape[0], query.shape[1],
                        q_positions, kv_positions)
    b, h, lq = query.shape[:3]
    if cls == EMPTY:
        return (torch.zeros((b, h, lq, value.shape[-1]), dtype=torch.float32,
                            device=query.device),
                torch.full((b, h, lq), float("-inf"), dtype=torch.float32, device=query.device))
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    o, s = kernels.forward(query, key, value, q_positions, kv_positions, cls, scale)
    return o.float(), s.float()


def _all_reduce_merge(out: Tensor, lse: Tensor, group: Any) -> tuple[Tensor, Tensor]:
    """The merge rule of :mod:`.merge` as collectives: M = max_r lse_r, then one sum of
    (e^{lse_r - M} O_r, e^{lse_r - M}) over the ranks."""
    top = lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    finite = torch.isfinite(top)
    w = torch.where(finite, torch.exp(lse - torch.where(finite, top, 0.0)), 0.0)
    packed = torch.cat([out * w.unsqueeze(-1), w.unsqueeze(-1)], dim=-1)
    dist.all_reduce(packed, group=group)
    acc, den = packed[..., :-1], packed[..., -1]
    merged = torch.where(den.unsqueeze(-1) > 0, acc / den.clamp_min(1e-38).unsqueeze(-1), 0.0)
    return merged, torch.where(den > 0, top + torch.log(den.clamp_min(1e-38)), float("-inf"))


def choose_layout(mask_mod: Callable | None, B: int, H: int, seq_len: int, world: int,
                  block: int = 128) -> str:
    """The layout whose busiest rank computes the fewest non-empty tiles for this mask
    (:func:`attndsl.distributed.pairs.best_layout`); shard with it before the call."""
    if mask_mod is None:
        return "contiguous"
    flex = lower_flex(None, mask_mod)
    mask = positioned(flex.cascade).mask.expr
    return best_layout(mask, flex.captured, B, H, seq_len, world, block)


#: What every rank gathers: its lengths, then what the ranks must agree on.
_FACTS = ("query length", "key length", "batch", "query heads", "key/value heads",
          "head dim", "value head dim", "dtype")


def _facts(q: Tensor, k: Tensor, v: Tensor) -> list[int]:
    """This rank's values of :data:`_FACTS`."""
    return [q.shape[2], k.shape[2], q.shape[0], q.shape[1], k.shape[1], q.shape[3],
            v.shape[3], dtype_code(q.dtype)]


def _check_arguments(cascade: Cascade | None, score_mod: Callable | None,
                     mask_mod: Callable | None, sinks: Tensor | None, params: dict | None,
                     captured: dict | None) -> None:
    """cascade= excludes the programs and sinks; without it params= / captured= would be
    ignored."""
    if cascade is not None:
        _programs_refused(score_mod, mask_mod, sinks)
        return
    for name, given in (("params", params), ("captured", captured)):
        if given:
            raise AttentionError(f"context_parallel_attention: {name}= holds a cascade's "
                                 f"own {name}; with score_mod / mask_mod it would be "
                                 f"ignored (their tensors are captured from the functions)")


def _programs_refused(score_mod: Callable | None, mask_mod: Callable | None,
                      sinks: Tensor | None) -> None:
    if score_mod is not None or mask_mod is not None or sinks is not None:
        raise AttentionError("pass either cascade= or score_mod / mask_mod / sinks, not both "
                             "(the cascade holds its own score, mask and sinks)")
