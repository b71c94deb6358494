"""How a kernel visits key tiles: one :class:`KeyTilePlan` per mask, launch and block mask.

A query tile of ``BLOCK_M`` rows needs only the key tiles of ``BLOCK_N`` columns where its mask
is not all False, and evaluates the mask only on tiles that are not all True.  The plan says
how the kernel finds them, one of four kinds:

* ``closed-form`` -- the kernel computes each query tile ``qt``'s segments
  ``[lo, full_lo) partial, [full_lo, full_hi) full, [full_hi, hi) partial`` from ``qt``, Lq
  and Lkv itself (``segments``, integer expressions); no table at all;
* ``ranges`` -- a range table ``kv_ranges`` int32 [B|1, H|1, nq, 4 * segments] holds those
  four numbers per segment (at most MAX_SEGMENTS segments per query tile);
* ``tables`` -- torch's eight BlockMask tables (:mod:`attndsl.block_tables`): kv-major for
  the forward, q-major for the backward;
* ``dense`` -- every key tile, masked (no mask, or one that cannot be analysed).

:func:`plan_key_tiles` is the one place that chooses among them.  The first that applies
wins (each is cheaper for the kernel than the next); the tables of the closed-form and range
kinds, which the forward never reads, are built on first read only (the backward reads them).
:meth:`KeyTilePlan.launch_tables` is the one place that writes the ``block_tables`` dict the
generated modules' ``launch`` / ``launch_backward`` take.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

import torch

from attndsl.block_tables import TABLE_NAMES, to_tables
from attndsl.ir.expr import Expr
from attndsl.passes.mask import (
    CLOSED_FORM,
    SPARSE_BLOCK,
    KVBounds,
    TileMap,
    classify_tiles,
    closed_form_segments,
)

Tensor = torch.Tensor
T = TypeVar("T")
CLOSED, RANGES, TABLES, DENSE = "closed-form", "ranges", "tables", "dense"  # the kinds
Tables = dict[str, Tensor | None]


class Once(Generic[T]):
    """A value made on first use, then kept (tables a kernel may never read)."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make: Callable[[], T] | None = make
        self._value: T | None = None

    def __call__(self) -> T:
        if self._make is not None:
            self._value, self._make = self._make(), None
        return self._value  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class KeyTilePlan:
    """How a kernel visits key tiles (see the module docstring), with the block sizes
    ``block`` = (Q_BLOCK_SIZE, KV_BLOCK_SIZE) and the ``mechanism`` that made it.

    ``tables`` holds torch's eight tables when they are made with the plan; ``lazy`` makes
    them (and the tile map) on first read otherwise (None: the plan has no tables); ``tiles``
    is the tile map when the plan was made from one."""

    kind: str
    block: tuple[int, int] = (SPARSE_BLOCK, SPARSE_BLOCK)
    mechanism: str = ""
    segments: tuple[KVBounds, ...] | None = None
    kv_ranges: Tensor | None = field(default=None, repr=False)
    tables: Tables | None = field(default=None, repr=False)
    lazy: Callable[[], tuple[Tables, TileMap | None]] | None = field(default=None, repr=False)
    tiles: TileMap | None = field(default=None, repr=False)

    @classmethod
    def dense(cls) -> KeyTilePlan:
        """Every key tile, masked: no tables, no ranges."""
        return cls(DENSE, mechanism="every tile")

    def block_tables(self) -> Tables:
        """torch's eight tables by name (TABLE_NAMES; None where there is none)."""
        if self.tables is not None:
            return self.tables
        if self.lazy is None:
            raise ValueError(f"this {self.kind} key-tile plan has no block tables")
        return self.lazy()[0]

    def tile_map(self) -> TileMap | None:
        """The tile classes the plan was made from (classified on first read for closed
        forms); None for a plan made from tables alone."""
        if self.tiles is not None or self.lazy is None:
            return self.tiles
        return self.lazy()[1]

    def forward_only(self) -> KeyTilePlan:
        """The plan without what the forward kernel never reads (lazily built tables, which
        would hold the captured tensors alive): what a cache keeps."""
        return replace(self, lazy=None, tiles=None)

    def launch_tables(self) -> dict | None:
        """The ``block_tables`` argument of a generated module's ``launch`` and
        ``launch_backward`` (codegen/launcher.py): None when dense."""
        sizes = {"Q_BLOCK_SIZE": int(self.block[0]), "KV_BLOCK_SIZE": int(self.block[1])}
        if self.kind == DENSE:
            return None
        if self.kind == CLOSED:
            return {"closed_form": True, **sizes}
        if self.kind == RANGES:
            return {"kv_ranges": self.kv_ranges, **sizes}
        return {**self.block_tables(), **sizes}

    def op_args(self) -> tuple[list[Tensor], int, int]:
        """The plan as custom-op arguments (a schema that cannot hold None or a dict): the
        eight tables in TABLE_NAMES order, a 1-D empty tensor for a missing one (a table is
        3-D or 4-D, and may itself be empty: a length of 0), and the block sizes; ([], 0, 0)
        when dense.  :meth:`from_op_args` reads them back."""
        if self.kind == DENSE:
            return [], 0, 0
        tables = self.block_tables()
        return ([torch.empty(0, dtype=torch.int32) if tables.get(k) is None else tables[k]
                 for k in TABLE_NAMES], int(self.block[0]), int(self.block[1]))

    @classmethod
    def from_op_args(cls, tables: list[Tensor], q_block: int, kv_block: int) -> KeyTilePlan:
        """The inverse of :meth:`op_args` (a tables plan, or dense for no tables)."""
        if not tables:
            return cls.dense()
        named = {k: (None if t.dim() == 1 else t) for k, t in zip(TABLE_NAMES, tables)}
        return cls(TABLES, (q_block, kv_block), "op arguments", tables=named)

    def __str__(self) -> str:
        """What the kernel reads to find its key tiles (``attndsl explain``'s mask section)."""
        if self.kind == CLOSED:
            assert self.segments is not None
            text = "the kernel computes each query tile's key-tile ranges in closed form:"
            for i, seg in enumerate(self.segments):
                head = f"\n  segment {i + 1}:" if len(self.segments) > 1 else ""
                pad = "    " if len(self.segments) > 1 else "  "
                text += head + "".join(f"\n{pad}{ln}" for ln in str(seg).splitlines())
            return text
        if self.kind == RANGES:
            assert self.kv_ranges is not None
            return (f"the kernel reads a range table ({self.kv_ranges.shape[-1] // 4} "
                    f"segment(s) of lo, full_lo, full_hi, hi per query tile) built by "
                    f"{self.mechanism}")
        if self.kind == TABLES:
            return f"the kernel reads block tables built by {self.mechanism}"
        return "the kernel visits every key tile and evaluates the mask on each"


def plan_key_tiles(mask: Expr, captured: Mapping[str, Tensor], B: int, H: int, lq: int,
                   lkv: int, block: tuple[int, int] = (SPARSE_BLOCK, SPARSE_BLOCK),
                   device: torch.device | str = "cpu", *, closed_form: bool = True
                   ) -> KeyTilePlan:
    """The key-tile plan of ``mask`` (indices b, h, m, n; ``captured`` its tensors) over a
    B x H x lq x lkv problem in tiles of ``block``, tensors on ``device``.

    Closed forms when the mask has them (:func:`closed_form_segments`; ``closed_form=False``
    skips them, for a kernel compiled without them); else the symbolic analysis classifies
    the tiles (O(tiles), from per-tile summaries of captured data): a range table when no
    query tile sees more than MAX_SEGMENTS segments of key tiles, block tables otherwise.
    Tables are torch's (its boundary convention); raises MaskAnalysisError (bad sizes, a mask
    the analysis cannot evaluate)."""
    bm, bn = block

    def tables_of(tm: TileMap) -> Tables:
        return dict(zip(TABLE_NAMES, (t.to(device) for t in to_tables(tm, torch_boundary=True))))

    segments = closed_form_segments(mask, bm, bn) if closed_form else None
    if segments is not None:
        def build() -> tuple[Tables, TileMap]:
            tm = classify_tiles(mask, captured, B, H, lq, lkv, bm, bn)
            return tables_of(tm), tm

        return KeyTilePlan(CLOSED, (bm, bn), CLOSED_FORM, segments=segments,
                           lazy=Once(build))
    tm = classify_tiles(mask, captured, B, H, lq, lkv, bm, bn)
    ranges = tm.kv_ranges()
    if ranges is not None:
        return KeyTilePlan(RANGES, (bm, bn), tm.mechanism, kv_ranges=ranges.to(device),
                           lazy=Once(lambda: (tables_of(tm), tm)), tiles=tm)
    return KeyTilePlan(TABLES, (bm, bn), tm.mechanism, tables=tables_of(tm), tiles=tm)


__all__ = ["CLOSED", "DENSE", "RANGES", "SPARSE_BLOCK", "TABLES", "KeyTilePlan", "Once",
           "plan_key_tiles"]
