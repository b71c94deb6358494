"""Block masks: torch's BlockMask tables, built by analysing the traced mask instead of a dense
evaluation.

``create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, BLOCK_SIZE=128)`` traces ``mask_mod``
into an expression (:func:`attndsl.frontend.flex.mask_expr`), classifies its tiles with
:func:`attndsl.passes.mask.classify_tiles` (interval bounds, range summaries of
captured tensors, or chunked exact evaluation) and lays the result out exactly like
``torch.nn.attention.flex_attention.create_block_mask``: the same eight int32 tables, the same
ordering (set blocks ascending, then the other columns ascending) and the same convention
that a block cut short by Q_LEN or KV_LEN is never full, with torch's [B, H, ...] shapes
(when the mask does not depend on b or h, those dims are broadcast views of one copy).

``and_masks``, ``or_masks`` and ``noop_mask`` are plain Python compositions, traceable by
attndsl and usable by torch alike.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from attndsl.block_tables import TABLE_NAMES, dense_to_ordered, ordered_to_dense
from attndsl.frontend.flex import mask_expr
from attndsl.ir import expr as E
from attndsl.ir.expr import Expr
from attndsl.key_tile_plan import CLOSED, TABLES, KeyTilePlan, plan_key_tiles
from attndsl.passes.mask import (
    FULL,
    PARTIAL,
    SPARSE_BLOCK,
    MaskAnalysisError,
    TileMap,
    kv_tile_segments,
)

Tensor = torch.Tensor
MaskMod = Callable[[Any, Any, Any, Any], Any]


@dataclass
class BlockMask:
    """A block-sparse mask in torch's BlockMask layout, plus what attndsl knows about it.

    ``kv_*`` tables are [B, H, nq] / [B, H, nq, nk], ``q_*`` their transposes [B, H, nk] /
    [B, H, nk, nq] (int32; stored once along a dim the mask does not use, read as broadcast
    views; ``kv_ranges`` stays [1, ...] there).  ``mask`` / ``captured`` are the
    traced mask expression and its captured tensors (traced lazily for masks taken from
    torch); ``mechanism`` says how the tables were made.

    A mask with closed-form key-tile ranges (``closed_form``) builds its tables only when they
    are first read: attndsl's kernels compute the ranges themselves and never need them.
    Likewise a mask whose query tiles each see at most MAX_SEGMENTS segments of key tiles
    (partial, full, partial: document masks, padding, sinks with a window, ...) keeps
    ``kv_ranges`` ([B, H, nq, 4 * segments] int32: lo, full_lo, full_hi, hi key tiles per
    segment), which is all attndsl's forward kernel reads; the torch tables (and the q-major
    ones the backward reads) are built from the tile classes when first read.
    """

    seq_lengths: tuple[int, int]
    BLOCK_SIZE: tuple[int, int]
    mask_mod: MaskMod | None = None
    mask: Expr | None = None
    captured: dict[str, Tensor] | None = None
    mechanism: str = ""
    closed_form: bool = False
    tables: dict[str, Tensor | None] | None = dataclasses.field(default=None, repr=False)
    build: Callable[[], tuple[dict, TileMap]] | None = dataclasses.field(default=None,
                                                                         repr=False)
    built_tile_map: TileMap | None = dataclasses.field(default=None, repr=False)
    kv_ranges: Tensor | None = dataclasses.field(default=None, repr=False)
    batch_heads: tuple[int, int] | None = None  # the B, H asked for (tables broadcast to them)

    @classmethod
    def from_tables(cls, seq_lengths: tuple[int, int], *tables: Tensor | None,
                    **kw: Any) -> BlockMask:
        """From the eight tables, in torch's order (TABLE_NAMES)."""
        return cls(tuple(seq_lengths), tables=dict(zip(TABLE_NAMES, tables)), **kw)

    @classmethod
    def from_plan(cls, plan: KeyTilePlan, seq_lengths: tuple[int, int], mask_mod: MaskMod,
                  mask: Expr, captured: dict[str, Tensor],
                  batch_heads: tuple[int, int]) -> BlockMask:
        """The block mask of a key-tile plan: its tables when the plan has them, else built
        from it on first read; its range table or closed forms for attndsl's kernels."""
        eager = plan.tables if plan.kind == TABLES else None
        return cls(seq_lengths, plan.block, mask_mod, mask, captured, plan.mechanism,
                   closed_form=plan.kind == CLOSED, tables=eager,
                   build=None if eager is not None else plan.lazy,
                   built_tile_map=plan.tiles, kv_ranges=plan.kv_ranges,
                   batch_heads=batch_heads)

    def _table(self, name: str) -> Tensor | None:
        """A torch-layout table, built on first read, with torch's [B, H, ...] shape (a
        broadcast view when the mask does not depend on b or h)."""
        if self.tables is None:
            assert self.build is not None
            self.tables, self.built_tile_map = self.build()
        t = self.tables[name]
        if t is not None and self.batch_heads is not None:
            t = t.expand(*self.batch_heads, *t.shape[2:])
        return t

    @property
    def tile_map(self) -> TileMap | None:
        if self.built_tile_map is None and self.tables is None and self.build is not None:
            self._table(TABLE_NAMES[0])
        return self.built_tile_map

    # -- torch interop -------------------------------------------------------------------------
    def to_torch(self) -> Any:
        """torch.nn.attention.flex_attention.BlockMask with the same tables (no recomputation)."""
        from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask
        from torch.nn.attention.flex_attention import noop_mask as torch_noop

        return TorchBlockMask(self.seq_lengths, *(self._table(k) for k in TABLE_NAMES),
                              BLOCK_SIZE=self.BLOCK_SIZE,
                              mask_mod=self.mask_mod if self.mask_mod is not None else torch_noop)

    def as_tuple(self, flatten: bool = True) -> tuple:
        """torch's BlockMask.as_tuple (what torch's flex_attention reads), so that this block
        mask can be passed to torch's flex_attention directly."""
        return self.to_torch().as_tuple(flatten)

    def to_dense(self) -> Tensor:
        """The dense block-level 0/1 matrix [B, H, nq, nk] (partial and full blocks), as torch's
        BlockMask.to_dense gives it."""
        return self.to_torch().to_dense()

    @classmethod
    def from_torch(cls, tbm: Any) -> BlockMask:
        """Wrap a torch BlockMask: keeps its tables and mask_mod; the mask is traced on demand
        (:meth:`traced`).  Missing q tables are made by transposing the kv tables."""
        tables = {k: getattr(tbm, k) for k in TABLE_NAMES}
        for pre in ("", "full_"):
            if tables[f"{pre}q_indices"] is None and tables[f"{pre}kv_indices"] is not None:
                dense = ordered_to_dense(tables[f"{pre}kv_num_blocks"],
                                          tables[f"{pre}kv_indices"])
                q = dense_to_ordered(dense.transpose(-2, -1))
                tables[f"{pre}q_num_blocks"], tables[f"{pre}q_indices"] = q
        return cls.from_tables(tuple(tbm.seq_lengths), *(tables[k] for k in TABLE_NAMES),
                               BLOCK_SIZE=tuple(tbm.BLOCK_SIZE), mask_mod=tbm.mask_mod,
                               mechanism="from torch")

    def traced(self) -> tuple[Expr, dict[str, Tensor]]:
        """The mask expression and captured tensors, tracing ``mask_mod`` the first time."""
        if self.mask is None:
            if self.mask_mod is None:
                raise MaskAnalysisError("this BlockMask has no mask_mod to trace")
            self.mask, self.captured = mask_expr(self.mask_mod)
        return self.mask, dict(self.captured or {})

    # -- views ---------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """(B, H, Q_LEN, KV_LEN), as torch's BlockMask gives it."""
        if self.batch_heads is not None:
            return (*self.batch_heads, *self.seq_lengths)
        return tuple(self.kv_indices.shape[:-2]) + tuple(self.seq_lengths)

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def sparsity(self) -> float:
        """Percentage of the block grid that the kernel skips, in [0, 100]:
        ``100 * (1 - computed / (B * H * ceil(Q_LEN / BQ) * ceil(KV_LEN / BK)))`` with
        ``computed`` the partial plus full blocks, counted from the range table or the closed
        forms when the tables are not built.

        torch >= 2.14 defines ``BlockMask.sparsity()`` the same way.  Earlier torch divides
        ``computed * BQ * BK`` by the unpadded ``B * H * Q_LEN * KV_LEN``, which counts a block
        cut short by a length at full size and goes negative (-27% for a sliding window at
        L = 300, 128-blocks); that is not a fraction of anything, so it is not followed."""
        copies = math.prod(self.shape[:-2])  # B * H (numel / Q_LEN / KV_LEN: 0 / 0 when empty)
        if self.tables is None and self.kv_ranges is not None:
            r = self.kv_ranges.reshape(*self.kv_ranges.shape[:-1], -1, 4)
            stored = r.shape[0] * r.shape[1]  # 1 along a broadcast batch or head dim
            computed = int((r[..., 3] - r[..., 0]).sum()) * copies // stored
        elif self.tables is None and self.closed_form and self.mask is not None:
            segments = kv_tile_segments(self.mask, *self.BLOCK_SIZE)
            assert segments is not None
            computed = copies * sum(int((v["hi"] - v["lo"]).sum()) for v in
                                    (seg.evaluate(*self.seq_lengths) for seg in segments))
        else:
            computed = int(self.kv_num_blocks.sum())
            if self.full_kv_num_blocks is not None:
                computed += int(self.full_kv_num_blocks.sum())
        return block_grid_sparsity(computed, copies, self.seq_lengths, self.BLOCK_SIZE)

    def classes(self) -> Tensor:
        """int8 [B, H, nq, nk]: 0 empty, 1 partial, 2 full (torch's boundary convention)."""
        nk = self.kv_indices.shape[-1]
        out = ordered_to_dense(self.kv_num_blocks, self.kv_indices, nk).to(torch.int8) * PARTIAL
        if self.full_kv_indices is not None:
            full = ordered_to_dense(self.full_kv_num_blocks, self.full_kv_indices, nk)
            out = torch.where(full.bool(), torch.tensor(FULL, dtype=torch.int8), out)
        return out

    def picture(self, max_rows: int = 16, max_cols: int = 32) -> str:
        tm = self.tile_map or TileMap(self.classes().cpu(), self.mechanism, *self.seq_lengths,
                                      *self.BLOCK_SIZE)
        return tm.picture(max_rows, max_cols)

    def to(self, device: torch.device | str) -> BlockMask:
        """A copy with every table (and captured tensor) on ``device``; tables not built yet
        are built there when first read."""
        captured = None if self.captured is None else \
            {k: v.to(device) for k, v in self.captured.items()}
        ranges = None if self.kv_ranges is None else self.kv_ranges.to(device)
        if self.tables is None:
            assert self.build is not None
            build = self.build

            def build_there() -> tuple[dict, TileMap]:
                tables, tm = build()
                return {k: None if t is None else t.to(device) for k, t in tables.items()}, tm

            return dataclasses.replace(self, captured=captured, kv_ranges=ranges,
                                       build=build_there)
        moved = {k: None if t is None else t.to(device) for k, t in self.tables.items()}
        return dataclasses.replace(self, tables=moved, captured=captured, kv_ranges=ranges,
                                   build=None)

    def __repr__(self) -> str:
        what = E.render(self.mask) if self.mask is not None else \
            getattr(self.mask_mod, "__name__", repr(self.mask_mod))
        return (f"BlockMask(shape={self.shape}, BLOCK_SIZE={self.BLOCK_SIZE}, "
                f"sparsity={self.sparsity():.2f}%, mechanism={self.mechanism!r}, "
                f"kernel_reads={self.kernel_reads()!r}, mask={what})")

    def kernel_reads(self) -> str:
        """What attndsl's forward kernel reads to find its key tiles."""
        if self.closed_form:
            return "closed-form ranges (no table)"
        if self.kv_ranges is not None:
            return f"range table ({self.kv_ranges.shape[-1] // 4} segment(s) per query tile)"
        return "block tables"


def block_grid_sparsity(computed: int, copies: int, seq_lengths: tuple[int, int],
                        block_size: tuple[int, int]) -> float:
    """``100 * (1 - computed / total)``: the percentage of the ``copies`` (B * H) block grids
    of ``ceil(Q_LEN / BQ) x ceil(KV_LEN / BK)`` blocks that are not among the ``computed``."""
    total = copies
    for length, block in zip(seq_lengths, block_size, strict=True):
        total *= -(-length // block)
    return 100 * (1 - computed / max(1, total))



def _block_size(bs: int | tuple[int, int]) -> tuple[int, int]:
    pair = (bs, bs) if not isinstance(bs, tuple | list) else tuple(bs)
    if len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                 for x in pair):
        raise MaskAnalysisError(f"BLOCK_SIZE must be a positive int or a pair of positive ints "
                                f"(Q_BLOCK_SIZE, KV_BLOCK_SIZE), got {bs!r}")
    return pair  # type: ignore[return-value]


def _size(name: str, v: int | None, default: int | None = None) -> int:
    if v is None and default is not None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise MaskAnalysisError(f"{name} must be a positive int{' or None' if default else ''}, "
                                f"got {v!r}")
    return v


def _length(name: str, v: int) -> int:
    """A sequence length: an int >= 0 (0, as torch allows: an empty grid of blocks)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise MaskAnalysisError(f"{name} must be an int >= 0, got {v!r}")
    return v


def _empty_block_mask(seq_lengths: tuple[int, int], block: tuple[int, int],
                      batch_heads: tuple[int, int], mask_mod: MaskMod, mask: Expr,
                      captured: dict[str, Tensor], device: torch.device) -> BlockMask:
    """The block mask of a grid with no query or no key blocks: every table empty along its
    zero dim, with torch's shapes ([1, 1, nq] counts, [1, 1, nq, nk] indices and their
    q-major transposes, broadcast to B, H), so nothing is classified."""
    nq, nk = (-(-length // size) for length, size in zip(seq_lengths, block, strict=True))

    def zeros(*shape: int) -> Tensor:
        return torch.zeros((1, 1, *shape), dtype=torch.int32, device=device)

    kv, q = (zeros(nq), zeros(nq, nk)), (zeros(nk), zeros(nk, nq))
    return BlockMask.from_tables(seq_lengths, *kv, *kv, *q, *q, BLOCK_SIZE=block,
                                 mask_mod=mask_mod, mask=mask, captured=captured,
                                 mechanism="empty grid", batch_heads=batch_heads)


def _default_device(device: Any) -> torch.device:
    """``device``, else the current accelerator when one is usable, else the CPU (a CUDA build
    of torch on a machine without a driver names CUDA as its accelerator but cannot use it)."""
    if device is not None:
        return torch.device(device)
    acc = getattr(torch, "accelerator", None)
    if acc is None or not acc.is_available() or acc.current_accelerator() is None:
        return torch.device("cpu")
    return torch.device(acc.current_accelerator())


def create_block_mask(mask_mod: MaskMod, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int,
                      device: torch.device | str | None = None,
                      BLOCK_SIZE: int | tuple[int, int] = SPARSE_BLOCK,
                      _compile: bool = False) -> BlockMask:
    """torch's ``create_block_mask``, by mask analysis (B / H None: broadcast, as in torch).

    The device defaults to the current accelerator (else CPU), like torch; the analysis runs
    on the CPU and only the tables are moved.  ``_compile`` is accepted for drop-in use and
    has no effect: the mask is never evaluated densely, so there is nothing to compile."""
    if not callable(mask_mod):
        raise MaskAnalysisError(f"mask_mod must be callable, got {type(mask_mod).__name__}")
    bm, bn = _block_size(BLOCK_SIZE)
    b, h = _size("B", B, 1), _size("H", H, 1)
    q_len, kv_len = _length("Q_LEN", Q_LEN), _length("KV_LEN", KV_LEN)
    mask, captured = mask_expr(mask_mod)
    if q_len == 0 or kv_len == 0:
        return _empty_block_mask((q_len, kv_len), (bm, bn), (b, h), mask_mod, mask, captured,
                                 _default_device(device))
    plan = plan_key_tiles(mask, captured, b, h, q_len, kv_len, (bm, bn),
                          _default_device(device))
    return BlockMask.from_plan(plan, (q_len, kv_len), mask_mod, mask, captured, (b, h))


for _name in TABLE_NAMES:
    setattr(BlockMask, _name, property(lambda self, _k=_name: self._table(_k),
                                       doc=f"torch BlockMask table {_name} (built on first read)"))


# -- composition ---------------------------------------------------------------------------------

def _check_callables(fns: tuple[Any, ...]) -> None:
    bad = [f for f in fns if not callable(f)]
    if bad:
        raise MaskAnalysisError(f"all arguments must be mask_mod functions, got {bad!r}")


def _constant(b: Any, value: bool) -> Any:
    """A constant mask value: a 0-d bool tensor for torch, a Python bool for the tracer."""
    if isinstance(b, Tensor):
        return torch.full((), value, dtype=torch.bool, device=b.device)
    return value


def noop_mask(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
    """Every key is visible."""
    return _constant(b, True)


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """The intersection of mask_mods (all visible); no argument: noop_mask."""
    _check_callables(mask_mods)
    if not mask_mods:
        return noop_mask

    def and_mask(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        result = mask_mods[0](b, h, q_idx, kv_idx)
        for fn in mask_mods[1:]:
            result = result & fn(b, h, q_idx, kv_idx)
        return result

    and_mask.__name__ = "_and_".join(getattr(m, "__name__", "mask") for m in mask_mods)
    return and_mask


def or_masks(*mask_mods: MaskMod) -> MaskMod:
    """The union of mask_mods (any visible); no argument: nothing visible."""
    _check_callables(mask_mods)

    def or_mask(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        if not mask_mods:
            return _constant(b, False)
        result = mask_mods[0](b, h, q_idx, kv_idx)
        for fn in mask_mods[1:]:
            result = result | fn(b, h, q_idx, kv_idx)
        return result

    if mask_mods:
        or_mask.__name__ = "_or_".join(getattr(m, "__name__", "mask") for m in mask_mods)
    return or_mask


__all__ = ["BlockMask", "and_masks", "create_block_mask", "noop_mask", "or_masks"]
