"""Sequence layouts: which global positions each rank of a context-parallel group holds.

A layout maps a sequence of length ``L`` over ``W`` ranks.  Rank ``r`` holds the rows at
``positions(layout, L, W, r)`` (ascending), and :func:`shard` / :func:`unshard` split and
restore tensors along the sequence dimension.  Uneven lengths are allowed: pieces differ by at
most one row (``torch.tensor_split``'s rule), and a rank may hold no row at all.

* ``contiguous``: rank r holds the r-th of W consecutive pieces (plain ring attention);
* ``striped``:    rank r holds positions r, r + W, r + 2W, ... (Striped Attention,
  Brandon et al. 2023): under a causal mask every rank does about the same work;
* ``zigzag``:     the sequence is cut into 2W pieces and rank r holds pieces r and 2W-1-r
  (head-tail, as torch's context_parallel and Llama-3's training): each rank gets one early
  and one late piece of a causal mask.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor
LAYOUTS = ("contiguous", "striped", "zigzag")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    return layout


def _pieces(length: int, count: int) -> list[range]:
    """``count`` consecutive ranges covering 0..length, sizes differing by at most one."""
    base, extra = divmod(length, count)
    out, start = [], 0
    for i in range(count):
        size = base + (1 if i < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def positions(layout: str, length: int, world: int, rank: int) -> Tensor:
    """The global positions (int64, ascending) rank ``rank`` of ``world`` holds."""
    check_layout(layout)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a group of {world} ranks")
    if layout == "contiguous":
        piece = _pieces(length, world)[rank]
        return torch.arange(piece.start, piece.stop, dtype=torch.int64)
    if layout == "striped":
        return torch.arange(rank, max(rank, length), world, dtype=torch.int64)  # L <= r: none
    pieces = _pieces(length, 2 * world)
    head, tail = pieces[rank], pieces[2 * world - 1 - rank]
    return torch.cat([torch.arange(head.start, head.stop), torch.arange(tail.start, tail.stop)])


def all_positions(layout: str, length: int, world: int) -> list[Tensor]:
    """Every rank's positions (each rank can compute all of them: no communication)."""
    return [positions(layout, length, world, r) for r in range(world)]


def shard(x: Tensor, layout: str, world: int, rank: int, dim: int = 2) -> Tensor:
    """Rank ``rank``'s rows of ``x`` along ``dim`` (contiguous in memory)."""
    pos = positions(layout, x.shape[dim], world, rank).to(x.device)
    return x.index_select(dim, pos).contiguous()


def unshard(pieces: list[Tensor], layout: str, dim: int = 2) -> Tensor:
    """The full sequence from every rank's shard (the inverse of :func:`shard`)."""
    world = len(pieces)
    length = sum(p.shape[dim] for p in pieces)
    out = pieces[0].new_empty((*pieces[0].shape[:dim], length, *pieces[0].shape[dim + 1:]))
    for rank, p in enumerate(pieces):
        pos = positions(layout, length, world, rank).to(p.device)
        if pos.numel() != p.shape[dim]:
            raise ValueError(f"rank {rank}'s shard has {p.shape[dim]} rows along dim {dim}; "
                             f"the {layout} layout of {length} rows over {world} ranks gives "
                             f"it {pos.numel()}")
        out.index_copy_(dim, pos, p)
    return out
