"""Range summaries of captured tensors: min / max over any index interval in O(1).

A mask that reads captured data (``doc[m] == doc[n]``, ``lengths[b]``) is bounded over a tile
by the range of the data the tile reads: over the query interval [mlo, mhi] of a tile,
``doc[m]`` lies in [min doc[mlo..mhi], max doc[mlo..mhi]].  A sparse table answers such range
queries with two gathers (O(L) to build per window size used); ranges that are aligned blocks
of one power-of-two size -- the tiles of a grid -- read per-block min / max directly.
"""

from __future__ import annotations

import torch

from attndsl.passes.mask.intervals import _F64, Iv, _clean

Tensor = torch.Tensor


class RangeTable:
    """Range min / max along the last dim of ``rows`` [R, S] (a lazily built sparse table).

    Level k holds min and max over every window of 2**k consecutive entries (level k from
    level k - 1: min of two overlapping halves).  A range [lo, hi] is the union of the two
    windows of size 2**k, k = floor(log2(hi - lo + 1)), that start at lo and end at hi, so a
    query costs two gathers.  Only the levels that queries use are kept (tile-aligned queries
    of a tile grid use one level: the per-tile min / max of the tensor over each tile's range),
    so memory is O(R * S) per level used, not O(R * S * log S).
    """

    def __init__(self, rows: Tensor) -> None:
        self.R, self.S = rows.shape
        self.levels: dict[int, tuple[Tensor, Tensor]] = {0: (rows, rows)}
        self.blocks: dict[int, tuple[Tensor, Tensor]] = {0: (rows, rows)}

    def block(self, k: int) -> tuple[Tensor, Tensor]:
        """(min, max) over the aligned blocks [j * 2**k, (j + 1) * 2**k) (the last one cut
        short by S): O(S) per block size used."""
        if k not in self.blocks:
            rows, w = self.blocks[0][0], 1 << k
            pad = -self.S % w  # the last block repeats its last entry
            if pad:
                rows = torch.cat([rows, rows[:, -1:].expand(self.R, pad)], 1)
            blocks = rows.view(self.R, -1, w)
            self.blocks[k] = (blocks.amin(-1), blocks.amax(-1))
        return self.blocks[k]

    def level(self, k: int) -> tuple[Tensor, Tensor]:
        """(min, max) over the windows of 2**k entries starting at 0 .. S - 2**k."""
        if k not in self.levels:
            j = max(i for i in self.levels if i < k)
            mn, mx = self.levels[j]
            while j < k:
                w, n = 1 << j, self.S - (1 << (j + 1)) + 1
                mn = torch.minimum(mn[:, :n], mn[:, w:w + n])
                mx = torch.maximum(mx[:, :n], mx[:, w:w + n])
                j += 1
            self.levels[k] = (mn, mx)
        return self.levels[k]

    def query(self, row: Tensor, lo: Tensor, hi: Tensor) -> Iv:
        """[min, max] of rows[row, lo..hi] (int64 tensors, broadcast; 0 <= lo <= hi < S).
        Ranges that are aligned blocks of one power-of-two size (tiles) read the block summaries."""
        length = hi - lo + 1
        top = int(length.max()) if length.numel() else 1
        k = top.bit_length() - 1
        if top == 1 << k and bool(((lo % top == 0) & (hi == (lo + top).clamp(max=self.S) - 1))
                                  .all()):
            tmin, tmax = self.block(k)
            j = lo >> k
            return _clean(tmin[row, j], tmax[row, j])
        k = torch.floor(torch.log2(length.to(_F64))).to(torch.int64)
        one = torch.ones_like(k)
        k = k - (torch.bitwise_left_shift(one, k) > length).to(torch.int64)
        k = k + (torch.bitwise_left_shift(one, k + 1) <= length).to(torch.int64)
        mn, mx = torch.empty(k.shape, dtype=_F64), torch.empty(k.shape, dtype=_F64)
        for kv in k.unique().tolist():
            sel = k == kv
            tmin, tmax = self.level(kv)
            r, i1 = row[sel], lo[sel]
            i2 = hi[sel] - (1 << kv) + 1
            mn[sel] = torch.minimum(tmin[r, i1], tmin[r, i2])
            mx[sel] = torch.maximum(tmax[r, i1], tmax[r, i2])
        return _clean(mn, mx)
