"""torch's BlockMask table layout, made from tile classes (and read back).

torch's ``BlockMask`` stores a block-sparse mask as eight int32 tables: for each (b, h) and
query block, the number of partial key blocks (``kv_num_blocks``) and their indices
(``kv_indices``), the same for full blocks (``full_kv_*``), and the transposes, key block by
key block (``q_*``, ``full_q_*``: what the backward reads).  Indices are ordered: the set
blocks in ascending order, then the other columns in ascending order (what a stable
descending argsort of the 0/1 block matrix gives).  torch pads the dense mask with False
before summing blocks, so a block cut short by Q_LEN or KV_LEN is never full there
(:func:`torch_classes`); the analysis's classes keep the in-range convention.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from attndsl.passes.mask import FULL, PARTIAL, TileMap

Tensor = torch.Tensor


class BlockTables(NamedTuple):
    """torch's BlockMask tables (int32): kv_* are [B, H, nq(, nk)], q_* are [B, H, nk(, nq)]."""

    kv_num_blocks: Tensor
    kv_indices: Tensor
    full_kv_num_blocks: Tensor
    full_kv_indices: Tensor
    q_num_blocks: Tensor
    q_indices: Tensor
    full_q_num_blocks: Tensor
    full_q_indices: Tensor


TABLE_NAMES: tuple[str, ...] = BlockTables._fields  # torch's order (BlockMask.__init__, as_tuple)


def dense_to_ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """torch's ordered layout of a 0/1 block matrix [.., rows, cols]: per row the number of set
    blocks, and the column indices of the set blocks in ascending order followed by the other
    columns in ascending order -- what torch's _dense_to_ordered gets from a stable descending
    argsort, computed here in O(cols) per row: set column j goes to position (set columns
    before it), unset column j to num + (unset columns before it)."""
    d = dense.to(torch.int32)
    num = d.sum(dim=-1, dtype=torch.int32)
    cols = d.shape[-1]
    before = d.cumsum(dim=-1, dtype=torch.int32) - d
    j = torch.arange(cols, dtype=torch.int32, device=d.device)
    pos = torch.where(d.bool(), before, num.unsqueeze(-1) + j - before)
    idx = torch.empty_like(d).scatter_(-1, pos.long(), j.expand_as(d).contiguous())
    return num.contiguous(), idx


def ordered_to_dense(num: Tensor, idx: Tensor, cols: int | None = None) -> Tensor:
    """The 0/1 [.., rows, cols] matrix of an ordered table (entries past num are ignored):
    the inverse of :func:`dense_to_ordered`."""
    cols = idx.shape[-1] if cols is None else cols
    valid = torch.arange(idx.shape[-1], device=idx.device) < num.unsqueeze(-1)
    dense = torch.zeros(*idx.shape[:-1], cols + 1, dtype=torch.int32, device=idx.device)
    dense.scatter_(-1, torch.where(valid, idx, cols).long(), 1)
    return dense[..., :cols]


def torch_classes(tm: TileMap) -> Tensor:
    """The classes of ``tm`` under torch's convention: a tile cut short by Lq or Lkv is never
    FULL."""
    c = tm.classes.clone()
    if tm.Lq % tm.BLOCK_M:
        last = c[:, :, -1, :]
        last[last == FULL] = PARTIAL
    if tm.Lkv % tm.BLOCK_N:
        last = c[:, :, :, -1]
        last[last == FULL] = PARTIAL
    return c


def to_tables(tm: TileMap, torch_boundary: bool = True) -> BlockTables:
    """The eight tables of torch's BlockMask for ``tm``, in its layout and ordering (see
    :func:`dense_to_ordered`); q_* are the transposes, as BlockMask.from_kv_blocks makes.
    ``torch_boundary`` applies torch's convention for cut-short tiles (:func:`torch_classes`)."""
    c = torch_classes(tm) if torch_boundary else tm.classes
    ct = c.transpose(-2, -1).contiguous()  # row-wise work on contiguous rows is 2x faster
    kv = dense_to_ordered(c == PARTIAL) + dense_to_ordered(c == FULL)
    q = dense_to_ordered(ct == PARTIAL) + dense_to_ordered(ct == FULL)
    return BlockTables(*kv, *q)


__all__ = ["TABLE_NAMES", "BlockTables", "dense_to_ordered", "ordered_to_dense", "to_tables",
           "torch_classes"]
