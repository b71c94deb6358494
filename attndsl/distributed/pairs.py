"""Which (query shard, key shard) pairs need work, decided by the mask analysis before any
communication, and the work per rank of a layout (its load balance).

A pair is one block of the global mask: the query rows of rank i against the key rows of rank
j, both at global positions.  :func:`classify_pair` runs the tile classifier of
:mod:`attndsl.passes.mask` on the positioned mask (QPOS, KPOS as captured tensors) with one
tile covering the whole block: EMPTY pairs launch nothing (and K/V of rank j travel to rank i
only when some pair needs them), FULL pairs run the kernel without its mask, PARTIAL ones with
it.  :func:`work` counts the non-empty tiles (of ``block`` rows by ``block`` keys) each rank
computes, the number the default layout is chosen by.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from attndsl.distributed.layout import LAYOUTS, all_positions
from attndsl.distributed.positions import KPOS, QPOS
from attndsl.ir.expr import Expr, Op
from attndsl.passes.mask import EMPTY, FULL, PARTIAL, classify_tiles

Tensor = torch.Tensor
NAMES = {EMPTY: "empty", PARTIAL: "partial", FULL: "full"}


def _captured(mask: Expr, captured: Mapping[str, Tensor], qpos: Tensor, kpos: Tensor
              ) -> dict[str, Tensor]:
    used = {x.arg for x in mask.walk() if x.op is Op.LOAD}
    out = {n: t for n, t in captured.items() if n in used}
    out.update({QPOS: qpos, KPOS: kpos})
    return out


def classify_pair(mask: Expr | None, captured: Mapping[str, Tensor], B: int, H: int,
                  qpos: Tensor, kpos: Tensor) -> int:
    """EMPTY, PARTIAL or FULL for the block of ``mask`` (positioned: reads QPOS / KPOS) at
    query positions ``qpos`` and key positions ``kpos``; EMPTY when either side has no row."""
    if qpos.numel() == 0 or kpos.numel() == 0:
        return EMPTY
    if mask is None:
        return FULL
    tm = classify_tiles(mask, _captured(mask, captured, qpos, kpos), B, H, qpos.numel(),
                        kpos.numel(), qpos.numel(), kpos.numel())
    classes = tm.classes
    if bool((classes == EMPTY).all()):
        return EMPTY
    return FULL if bool((classes == FULL).all()) else PARTIAL


def pair_classes(mask: Expr | None, captured: Mapping[str, Tensor], B: int, H: int,
                 q_positions: Sequence[Tensor], k_positions: Sequence[Tensor]) -> list[list[int]]:
    """``classes[i][j]``: the pair (query shard i, key shard j) -- every rank computes the
    same matrix from the layout alone, so no rank waits on another to know what to send."""
    return [[classify_pair(mask, captured, B, H, qp, kp) for kp in k_positions]
            for qp in q_positions]


def work(mask: Expr | None, captured: Mapping[str, Tensor], B: int, H: int, length: int,
         world: int, layout: str, block: int = 128) -> list[int]:
    """Non-empty (block x block) tiles each rank computes over all its pairs (self-attention
    of a sequence of ``length`` sharded by ``layout``)."""
    pos = all_positions(layout, length, world)
    out = []
    for qp in pos:
        total = 0
        for kp in pos:
            if qp.numel() == 0 or kp.numel() == 0:
                continue
            if mask is None:
                total += B * H * (-(-qp.numel() // block)) * (-(-kp.numel() // block))
                continue
            tm = classify_tiles(mask, _captured(mask, captured, qp, kp), B, H, qp.numel(),
                                kp.numel(), block, block)
            scale = (B // tm.classes.shape[0]) * (H // tm.classes.shape[1])
            total += scale * int((tm.classes != EMPTY).sum())
        out.append(total)
    return out


def imbalance(per_rank: Sequence[int]) -> float:
    """max / mean of the per-rank work (1.0 is perfectly balanced)."""
    mean = sum(per_rank) / max(1, len(per_rank))
    return max(per_rank) / mean if mean else 1.0


def best_layout(mask: Expr | None, captured: Mapping[str, Tensor], B: int, H: int,
                length: int, world: int, block: int = 128) -> str:
    """The layout whose busiest rank has the least work (ties: the order of LAYOUTS, so
    contiguous wins when nothing is gained: it keeps closed-form-friendly positions)."""
    scores = {lay: max(work(mask, captured, B, H, length, world, lay, block))
              for lay in LAYOUTS}
    return min(LAYOUTS, key=lambda lay: scores[lay])
