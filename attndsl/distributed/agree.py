"""One rank's refusal raised on every rank, instead of the others waiting in a collective.

A context-parallel call checks its arguments on every rank, but a check that fails on one
rank only (a non-finite gate logit in its shard, a tensor of another shape) would leave that
rank raising while the others block in the next all-gather or ring step forever.  So each
entry point runs its rank-local work first, catching the refusal, and then every rank takes
part in ONE small all-gather of (refused, *facts) -- the facts are what the ranks must agree
on (shapes, lengths, sizes of what they are about to exchange), gathered in the same
collective, so the success path pays no extra one where a gather of lengths already exists.
Only when some rank refused does a second collective carry the messages (every rank then
raises :class:`RankRefusal` naming the first refusing rank and its reason).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from attndsl.runtime.checks import AttentionError

Tensor = torch.Tensor

#: Stable codes for the dtypes ranks compare (hash() of a name differs between processes).
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class RankRefusal(AttentionError):
    """A refusal of one rank's arguments (or a disagreement between ranks), raised on every
    rank of the group."""


def dtype_code(dtype: torch.dtype) -> int:
    """A code for ``dtype`` every process computes alike (-1 outside :data:`DTYPES`)."""
    return DTYPES.index(dtype) if dtype in DTYPES else -1


def _device(group: Any) -> torch.device:
    """Where the group's collectives take their tensors (nccl: this rank's GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def settle(group: Any, error: Exception | None, facts: Sequence[int] = ()) -> list[list[int]]:
    """Every rank's ``facts`` ([[facts of rank r] for every r]) after one all-gather that
    also carries whether the rank refused; if any did, raises :class:`RankRefusal` on every
    rank with the first refusing rank's message (``error`` chained on that rank).  Every rank
    must pass as many facts (refusing ones included: pass zeros)."""
    world = dist.get_world_size(group)
    mine = torch.tensor([error is not None, *facts], dtype=torch.int64, device=_device(group))
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    table = [t.tolist() for t in every]
    refused = [r for r, row in enumerate(table) if row[0]]
    if refused:
        messages: list[Any] = [None] * world
        dist.all_gather_object(messages, None if error is None else
                               f"{type(error).__name__}: {error}", group=group)
        others = f" (ranks {refused} refused)" if len(refused) > 1 else ""
        raise RankRefusal(f"rank {refused[0]} of {world} refused{others}: "
                          f"{messages[refused[0]]}") from error
    return [row[1:] for row in table]


def refuse_unequal(table: list[list[int]], names: Sequence[str], what: str) -> None:
    """Raise :class:`RankRefusal` (on every rank: ``table`` is the same on each) naming the
    first fact in which a rank differs from rank 0."""
    for r, row in enumerate(table):
        for name, got, want in zip(names, row, table[0]):
            if got != want:
                raise RankRefusal(f"rank {r} has {name} {_shown(name, got)} but rank 0 has "
                                  f"{_shown(name, want)}; {what}")


def _shown(name: str, value: int) -> str:
    return str(DTYPES[value]) if name == "dtype" and 0 <= value < len(DTYPES) else str(value)
