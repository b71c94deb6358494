"""Tiles and their classes: the grid a mask is cut into and the result of the analysis.

A mask ``Keep[b, h, m, n]`` (a boolean :class:`~attndsl.ir.expr.Expr` over b, h, m = query
position, n = key position, as traced by :func:`attndsl.frontend.flex.mask_expr`) is cut into
tiles of BLOCK_M queries x BLOCK_N keys.  A tile is

* EMPTY (0)   when the mask is false at every in-range point of the tile,
* FULL (2)    when it is true at every in-range point,
* PARTIAL (1) otherwise.

"In range" means ``m < Lq`` and ``n < Lkv``: the last row and column of tiles are cut short
and their out-of-range points take no part.  There are ceil(Lq / BLOCK_M) x ceil(Lkv / BLOCK_N)
tiles, so every tile has in-range queries and keys (a tile without in-range keys never exists;
torch's ``create_block_mask`` uses the same ceil tiling).  torch's convention that a cut-short
tile is never FULL belongs to its table layout (:mod:`attndsl.block_tables`); ``classes``
keeps the in-range one.

:meth:`TileMap.kv_ranges` gives each query tile's non-empty key tiles as a few segments
(partial*, full*, partial*), from the classes, for any mask whose rows have at most
MAX_SEGMENTS of them: what a kernel reads instead of a block table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from attndsl.errors import AttnDSLError

Tensor = torch.Tensor

EMPTY, PARTIAL, FULL = 0, 1, 2
_MAYBE = 3  # internal: undecided by the interval pass (FULL = _MAYBE - 1)


class MaskAnalysisError(AttnDSLError, ValueError):
    """The mask or the tiling is not valid for analysis; the message says what is wrong."""


@dataclass(frozen=True)
class Geometry:
    """Lq x Lkv points cut into ceil(Lq / BM) x ceil(Lkv / BN) tiles."""

    Lq: int
    Lkv: int
    BM: int
    BN: int

    @property
    def nq(self) -> int:
        return -(-self.Lq // self.BM)

    @property
    def nk(self) -> int:
        return -(-self.Lkv // self.BN)

    def rows(self, qt: Tensor) -> tuple[Tensor, Tensor]:
        """In-range query span [qt * BM, min(qt * BM + BM, Lq) - 1] of query tiles qt."""
        lo = qt * self.BM
        return lo, torch.clamp(lo + self.BM, max=self.Lq) - 1

    def cols(self, kt: Tensor) -> tuple[Tensor, Tensor]:
        """In-range key span [kt * BN, min(kt * BN + BN, Lkv) - 1] of key tiles kt."""
        lo = kt * self.BN
        return lo, torch.clamp(lo + self.BN, max=self.Lkv) - 1


_PICTURE = {EMPTY: " ", PARTIAL: "░", FULL: "█"}
MAX_SEGMENTS = 4  # key-tile segments per query tile a range table may hold


def _segments(c: Tensor, max_segments: int) -> Tensor | None:
    """The general case of :meth:`TileMap.kv_ranges` (rows of several segments).

    A segment starts at a non-empty tile after an empty one (or at column 0), and at the
    first full tile of a block of full tiles when its run of non-empty tiles already had a
    full block; each segment is then partial* full* partial*.  Per segment, lo / hi are the
    min / max + 1 of its columns and full_lo / full_hi those of its full tiles (hi, hi when
    it has none), by scatter-min / max over (row, segment)."""
    nonempty, full = c.bool(), (c >> 1).bool()
    col = torch.arange(c.shape[-1])
    run_start = nonempty & ~_shifted(nonempty)
    block_start = full & ~_shifted(full)
    blocks = block_start.to(torch.int32).cumsum(-1)
    before_run = torch.where(run_start, blocks - block_start.to(torch.int32), 0).cummax(-1).values
    later_block = block_start & (blocks - before_run > 1)
    seg = (run_start | later_block).to(torch.int32).cumsum(-1) - 1  # segment of each tile
    k = int(seg.max()) + 1 if c.numel() else 1
    if k > max_segments:
        return None
    k = max(k, 1)
    rows = c.shape[:-1]
    flat = (torch.arange(math.prod(rows)).reshape(*rows, 1) * k + seg.clamp(min=0)).reshape(-1)
    big = c.shape[-1]

    def reduce(sel: Tensor, value: Tensor, how: str, empty: int) -> Tensor:
        v = torch.where(sel, value, empty).reshape(-1)
        out = torch.full((math.prod(rows) * k,), empty, dtype=torch.int64)
        return out.scatter_reduce(0, flat, v, how).reshape(*rows, k)

    lo = reduce(nonempty, col, "amin", big)
    hi = reduce(nonempty, col + 1, "amax", 0)
    flo = reduce(full, col, "amin", big)
    fhi = reduce(full, col + 1, "amax", 0)
    used = hi > 0
    lo = torch.where(used, lo, 0)
    flo, fhi = torch.where(fhi > 0, flo, hi), torch.where(fhi > 0, fhi, hi)
    return torch.stack([lo, flo, fhi, hi], -1).reshape(*rows, 4 * k).to(torch.int32).contiguous()


def _shifted(x: Tensor) -> Tensor:
    """A boolean x shifted one column right along the last dim (column j holds x[j - 1])."""
    return torch.cat([torch.zeros_like(x[..., :1]), x[..., :-1]], -1)


@dataclass
class TileMap:
    """Classes of every tile: ``classes`` int8 [Bm, Hm, nq, nk] (0 empty, 1 partial, 2 full);
    Bm is 1 when the mask does not depend on b (broadcast), likewise Hm for h."""

    classes: Tensor
    mechanism: str
    Lq: int
    Lkv: int
    BLOCK_M: int
    BLOCK_N: int
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.classes.shape)

    @property
    def counts(self) -> dict[str, int]:
        c = self.classes
        return {"empty": int((c == EMPTY).sum()), "partial": int((c == PARTIAL).sum()),
                "full": int((c == FULL).sum())}

    @property
    def fractions(self) -> dict[str, float]:
        total = max(1, self.classes.numel())
        return {k: v / total for k, v in self.counts.items()}

    def kv_ranges(self, max_segments: int = MAX_SEGMENTS) -> Tensor | None:
        """Key-tile ranges of every query tile as segments, int32 [Bm, Hm, nq, 4 * K]: K
        segments (lo, full_lo, full_hi, hi) in increasing order, each made of partial tiles
        [lo, full_lo), full tiles [full_lo, full_hi) and partial tiles [full_hi, hi), together
        exactly the row's non-empty tiles (rows with fewer segments are padded with empty
        (0, 0, 0, 0) ones).  K is the most any row needs (a new segment starts after an empty
        tile or at a second block of full tiles); None when that exceeds ``max_segments``.
        A kernel then reads 4 * K numbers per query tile instead of a block table."""
        c = self.classes
        nk = c.shape[-1]
        small = torch.int16 if nk < 1 << 15 else torch.int32  # less memory to touch
        after = torch.arange(1, nk + 1, dtype=small)  # 1 + column
        before = nk - after + 1  # nk - column
        out = []
        for sel in (c.bool(), (c >> 1).bool()):  # non-empty, full (EMPTY 0, PARTIAL 1, FULL 2)
            count = sel.sum(-1, dtype=torch.int32)
            lo = nk - (sel * before).amax(-1).to(torch.int32)
            hi = (sel * after).amax(-1).to(torch.int32)
            if not bool(((hi - lo == count) | (count == 0)).all()):
                return _segments(c, max_segments)
            out.append((lo, hi, count))
        (lo, hi, n), (flo, fhi, nf) = out
        lo, hi = torch.where(n == 0, 0, lo), torch.where(n == 0, 0, hi)
        flo, fhi = torch.where(nf == 0, hi, flo), torch.where(nf == 0, hi, fhi)
        return torch.stack([lo, flo, fhi, hi], -1).contiguous()

    def picture(self, max_rows: int = 16, max_cols: int = 32, b: int = 0, h: int = 0) -> str:
        """ASCII picture of the (b, h) slice: one character per group of tiles, ' ' all empty,
        '█' all full, '░' otherwise (tiles are grouped when the grid is larger)."""
        c = self.classes[min(b, self.shape[0] - 1), min(h, self.shape[1] - 1)]
        nq, nk = c.shape
        rs, cs = -(-nq // max(1, max_rows)), -(-nk // max(1, max_cols))
        lines = []
        for r in range(0, nq, rs):
            cells = []
            for k in range(0, nk, cs):
                block = c[r:r + rs, k:k + cs]
                kind = FULL if bool((block == FULL).all()) else \
                    EMPTY if bool((block == EMPTY).all()) else PARTIAL
                cells.append(_PICTURE[kind])
            lines.append("|" + "".join(cells) + "|")
        width = len(lines[0]) - 2
        f = self.fractions
        head = (f"{nq}x{nk} tiles of {self.BLOCK_M}x{self.BLOCK_N} (b={b}, h={h}), "
                f"{self.mechanism}: {f['empty']:.0%} empty, {f['partial']:.0%} partial, "
                f"{f['full']:.0%} full" + (f"; {rs}x{cs} tiles per cell" if rs * cs > 1 else ""))
        border = "+" + "-" * width + "+"
        return "\n".join([head, border, *lines, border])

    def __repr__(self) -> str:
        return (f"TileMap(shape={self.shape}, BLOCK=({self.BLOCK_M}, {self.BLOCK_N}), "
                f"seq=({self.Lq}, {self.Lkv}), mechanism={self.mechanism!r}, "
                f"counts={self.counts})")
