"""The bandwidth model of a decode launch: the bytes it moves over the bytes it must move.

Decoding is memory-bound: the floor is reading every cached K/V byte once.  The launch moves

* K/V: every key block its tables list, ``kv_block`` whole rows (the tail of a sequence's
  last block included), once per (sequence, key/value head, split, query tile) program --
  with GQA packing a group's G query heads share that read;
* Q: read by every split's program (the packed copy: written once, read S times);
* the partial states: O (value dim, in the input dtype), LSE and MAX (float32) per split,
  written by the kernel and read by the merge, which writes the final O and LSE;
* the tables: a program reads its kv_indices row and kv_num_blocks entry, and one
  physical -> logical page entry per listed block (paged) plus the sequence length.

Without packing (one program per query head, as a prefill-shaped kernel runs) each K/V
block is read G times.  ``ratio = moved / kv_once``; the target for GQA decode at 8k-128k
context is <= 1.05.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attndsl.decoding.pruning import live_blocks
from attndsl.decoding.tables import split_tables


@dataclass(frozen=True)
class Traffic:
    """Bytes by kind for one launch and its merge; ``kv_once`` is the floor."""

    kv: int
    queries: int
    states: int
    tables: int
    kv_once: int

    @property
    def moved(self) -> int:
        return self.kv + self.queries + self.states + self.tables

    @property
    def ratio(self) -> float:
        return self.moved / self.kv_once if self.kv_once else float("inf")


def decode_traffic(lengths: torch.Tensor, *, q_heads: int, kv_heads: int, q_len: int,
                   head_dim: int, v_dim: int, elem: int, page: int, kv_block: int,
                   splits: int, packed: bool = True, paged: bool = True) -> Traffic:
    """The model above for sequences of ``lengths`` (``elem`` bytes per element)."""
    group = q_heads // kv_heads
    rows = group * q_len if packed else q_len
    heads = kv_heads if packed else q_heads
    q_tiles = -(-rows // min(128, max(16, 1 << (rows - 1).bit_length())))
    t = split_tables(live_blocks(None, {}, lengths, 1, 1, q_len, kv_block), None, splits, 1,
                     kv_block, page, page)
    blocks = int(t["kv_num_blocks"].sum())
    row_bytes = (head_dim + v_dim) * elem
    kv = blocks * kv_block * row_bytes * heads * q_tiles
    b = lengths.shape[0]
    q_once = b * q_heads * q_len * head_dim * elem
    queries = q_once * (1 + 2 * splits) if splits > 1 else q_once  # copied S times, read
    partial = b * splits * q_heads * q_len * (v_dim * elem + 8)
    final = b * q_heads * q_len * (v_dim * elem + 4)
    states = 2 * partial + final if splits > 1 else final
    programs = b * splits * heads * q_tiles
    chunk = t["kv_indices"].shape[-1]
    tables = programs * (4 * chunk + 8) + (blocks * heads * q_tiles * 4 if paged else 0)
    kv_once = int(lengths.sum()) * row_bytes * kv_heads
    return Traffic(kv, queries, states, tables, kv_once)


__all__ = ["Traffic", "decode_traffic"]
