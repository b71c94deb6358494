"""Which key blocks of each sequence a decode program needs: the mask analysis on the
rewritten mask.

The new queries of sequence ``b`` sit at positions ``len[b] - Lq + i``; in logical
coordinates (before paging) the mask the kernel evaluates is::

    keep(b, h, i, n) = n < len[b]  &  len[b] - Lq + i >= 0  &  mask_mod(b, h, len[b] - Lq + i, n)

:func:`attndsl.passes.mask.classify_tiles` classifies its (one query tile of Lq rows) x
(``kv_block`` keys) tiles -- O(tiles), from per-tile summaries of the captured data, the
lengths included -- and a block is live for a packed program (b, key/value head) when it is
not EMPTY for some query head of the group.  A sliding window then reads only the window's
blocks; a mask the analysis cannot evaluate keeps every block under the length.  Only the
interval pass runs (``exact=False``): EMPTY is never wrong, and an undecided tile is merely
visited (the kernel evaluates the mask on every listed block).  It runs on the host at each
call, O(B x n_blocks) vectorised: about a second for 8 sequences of 128k keys in blocks of 16
on a busy 2-core CPU.
"""

from __future__ import annotations

import torch

from attndsl.decoding.reindex import LENGTHS, reindex
from attndsl.decoding.tables import logical_blocks
from attndsl.ir import expr as E
from attndsl.ir.expr import INT, Expr, Op
from attndsl.passes.mask import EMPTY, MaskAnalysisError, classify_tiles

Tensor = torch.Tensor


def _logical_mask(mask: Expr | None, q_len: int) -> Expr:
    b, m, n = E.index("b"), E.index("m"), E.index("n")
    length = E.load(LENGTHS, (b,), INT)
    query = length - q_len + m
    keep = E.binary(Op.AND, E.binary(Op.LT, n, length), E.binary(Op.GE, query, E.const(0)))
    if mask is None:
        return keep
    return E.binary(Op.AND, keep, reindex(mask, {"m": query}))


def live_blocks(mask: Expr | None, captured: dict[str, Tensor], lengths: Tensor,
                q_heads: int, kv_heads: int, q_len: int, kv_block: int) -> Tensor:
    """bool [B, kv_heads, n_blocks]: the logical key blocks each packed program visits."""
    b = lengths.shape[0]
    n_blocks = max(1, int(logical_blocks(lengths, kv_block).max()))
    under = torch.arange(n_blocks, device=lengths.device)[None] < \
        logical_blocks(lengths, kv_block)[:, None]
    fallback = under[:, None].expand(b, kv_heads, n_blocks)
    longest = int(lengths.max()) if b else 0
    if mask is None or longest == 0:
        return fallback
    tensors = {**captured, LENGTHS: lengths.to(torch.int64)}
    try:  # keys [0, longest): a table sized to the cache is read in range
        tm = classify_tiles(_logical_mask(mask, q_len), tensors, b, q_heads, q_len,
                            longest, q_len, kv_block, exact=False)
    except MaskAnalysisError:
        return fallback
    live = (tm.classes != EMPTY)[:, :, 0].to(lengths.device)  # [B|1, Hq|1, n_blocks]
    live = live.expand(b, q_heads, n_blocks).reshape(b, kv_heads, -1, n_blocks).any(2)
    return live & under[:, None]


__all__ = ["live_blocks"]
