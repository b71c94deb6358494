"""Masks and scores printed relative to the start of the loop's tile.

A kernel's loop moves one index over tiles (the *moving* index v = start + j, with j the
constant offsets 0..BLOCK-1 of the tile) and holds the other (the *fixed* index f, one vector
per program).  Where an expression reads v only against f (their difference, a comparison of
the two, their distance against a constant) or in bounds ``v OP A`` with A free of v that move
with the tile, it is printed on the rows ``rel = f - start`` against the constant columns j:

    f - v = rel - j,    f OP v  <=>  rel OP j,    v OP A  <=>  j OP (A - start)

int32 is exact, as f - v of indices below 2**31 fits.  No value of the moving index then lives
across tiles: an absolute compare of ``start + j`` in a loop whose index also addresses memory
lets LLVM widen the induction variable to int64 and compare in 64 bits (the fused sigmoid
backward's dQ loop at D=64 on sm90: 351 instructions, 26 of them 64-bit compare halves; 328
relative, the hand-written kernel 336; static SASS, triton 3.9).  With constant columns the
compiler also sees that rows r and r + 8 of a thread meet the same distances (ALiBi's
``slope * (n - m)`` converted and scaled once per distinct distance).

The forward and the fused backward's loops over key tiles move the key index over
[BLOCK_M, BLOCK_N] tiles (:data:`KEYS_MOVE`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from attndsl.codegen.expr import Env, render_at
from attndsl.codegen.key_bounds import distance_bound, key_bound, relative_bound
from attndsl.codegen.launch_common import _LANES as LENGTH_MARGIN
from attndsl.codegen.writer import Lines

from attndsl.ir.expr import INT, Expr, Op
from attndsl.passes.int_range import int_ranges


@dataclass(frozen=True)
class Frame:
    """How one kernel's tiles lie against its loop: the fixed index's offsets vector
    ``offs`` on axis ``fixed_axis`` and the moving index's tile ``start`` and ``block`` on
    ``moving_axis`` (broadcast suffixes ``[:, None]`` / ``[None, :]``)."""

    offs: str
    start: str
    block: str
    moving: str  # the moving index's role, for comments
    fixed: str
    fixed_axis: str = "[:, None]"
    moving_axis: str = "[None, :]"

    @property
    def rel(self) -> str:
        """The name of the relative rows vector ``offs - start``."""
        return f"{self.offs}_rel"

    @property
    def rows(self) -> str:
        return f"{self.rel}{self.fixed_axis}"

    @property
    def cols(self) -> str:
        return f"tl.arange(0, {self.block}){self.moving_axis}"


# the key index moves: the forward and the fused backward's rows and queries kernels
KEYS_MOVE = Frame("offs_m", "start_n", "BLOCK_N", "key", "query")


@dataclasses.dataclass
class IndexPairs:
    """How a mask or score reads the moving index v, when only relative to the fixed index
    f (:func:`index_pairs`): each node -> how it is printed on the tile."""

    pairs: dict[Expr, tuple[Op, bool]]  # f OP v / v OP f (f - v, f >= v): (OP, v first)
    bounds: dict[Expr, tuple[Op, Expr]]  # v OP A, A free of v: (OP, A)
    distances: dict[Expr, tuple[Op, int]]  # (f - v) OP K for a small constant K: (OP, K)


# |K| of a distance compare read as f - start OP j + K (int32-exact beside the columns j)
_SMALL_DISTANCE = 2**30
# |K| of one read as (f - start - K) OP j: the margin below 2**31 the launchers keep lengths
_ROW_SHIFT = LENGTH_MARGIN

# f - v and the comparisons of f with v
PAIRED = {Op.SUB: "-", Op.LT: "<", Op.LE: "<=", Op.GT: ">", Op.GE: ">=", Op.EQ: "==",
          Op.NE: "!="}


def opaque_reads(env: Env) -> frozenset[Expr]:
    """The nodes ``env`` prints from values already at hand, not from the indices they read:
    the row values hoisted above the loop (``doc[m]``) and the captured reads gathered per
    tile (``doc[n]``, through a pointer tile that moves with the loop)."""
    return frozenset(env.hoisted) | frozenset(env.gathers)


def _distance_compare(x: Expr, f: str, v: str) -> tuple[Op, int] | None:
    """(OP, K) when ``x`` is ``(f - v) OP K`` with a constant |K| <= 2**30
    (:func:`codegen.key_bounds.distance_bounds` writes them), else None."""
    if x.op not in PAIRED or x.op is Op.SUB:
        return None
    d, k = x.src
    if d.op is not Op.SUB or k.op is not Op.CONST or k.dtype != INT or \
            abs(k.arg) > _SMALL_DISTANCE:
        return None
    if tuple(s.arg if s.op is Op.INDEX else None for s in d.src) != (f, v):
        return None
    return x.op, k.arg


def index_pairs(e: Expr, f: str, v: str, opaque: frozenset[Expr] = frozenset()
                ) -> IndexPairs | None:
    """When ``e`` reads the moving index v only in pairs with the fixed index f (``f - v``,
    ``v - f``, a comparison of the two, or of their distance with a constant), in bounds
    ``v OP A`` that move with the tile (:func:`codegen.key_bounds.relative_bound`) and inside
    ``opaque`` nodes (printed from values at hand, :func:`opaque_reads`): those nodes.  Else
    None.  The fixed index read alone (``m < 100``) is a row value and stays as it is."""
    found = IndexPairs({}, {}, {})
    ranges = int_ranges(e)
    seen: set[Expr] = set()
    todo = [e]
    while todo:
        x = todo.pop()
        if x in seen or x in opaque:
            continue
        seen.add(x)
        distance = _distance_compare(x, f, v)
        if distance is not None:
            found.distances[x] = distance
            continue
        ops = tuple(s.arg if s.op is Op.INDEX else None for s in x.src)
        if x.op in PAIRED and ops in ((f, v), (v, f)):
            found.pairs[x] = (x.op, ops == (v, f))
            continue
        bound = key_bound(x, v)
        if bound is not None and relative_bound(bound, ranges):
            found.bounds[x] = bound
            continue
        if x.op is Op.INDEX and x.arg == v:
            return None  # read alone (cap0[n], n // 64): not relative to the tile
        todo.extend(x.src)
    return found if found.pairs or found.bounds or found.distances else None


def relative_mask(L: Lines, depth: int, mask: Expr, f: str, v: str, env: Env,
                  frame: Frame) -> Env:
    """``env`` printing ``mask`` (lowered by :func:`codegen.key_bounds.lowered_mask` for the
    fixed index ``f`` and the moving ``v``) on the rows relative to the tile start, the
    rows vector (or diag) written to ``L``; ``env`` itself when the mask reads v otherwise."""
    relative = index_pairs(mask, f, v, opaque_reads(env))
    if relative is None:
        return env
    L(depth, f"# the mask reads the {frame.moving} index only against the {frame.fixed} "
             f"index or bounds free of it:\n# rows and bounds relative to {frame.start} "
             f"against the constant columns 0..{frame.block}-1\n# (no {frame.moving} index "
             f"lives across tiles)")
    if relative.pairs or relative.distances:
        L(depth, _relative_rows(relative, frame))
    hoisted = {x: _pair_source(op, swap, relative, frame)
               for x, (op, swap) in relative.pairs.items()}
    for x, (op, a) in relative.bounds.items():
        hoisted[x] = f"({frame.cols} {PAIRED[op]} ({render_at(L, depth, a, env)} - " \
                     f"{frame.start}))"
    for x, (op, dist) in relative.distances.items():
        hoisted[x] = _distance_source(op, dist, relative, frame)
    return dataclasses.replace(env, hoisted={**env.hoisted, **hoisted})


def relative_score(L: Lines, depth: int, e: Expr, f: str, v: str, env: Env,
                   frame: Frame) -> Env:
    """``env`` printing a score ``e`` that reads v only in pairs with f (``n - m``,
    ``m >= n``) and in bounds (``n <= m - 3``), :func:`index_pairs`, on the rows relative to
    the tile start against the constant columns (inline: no rows vector is written)."""
    lowered = {}  # comparisons of sums that are distance compares (codegen.key_bounds)
    for x in e.walk():
        d = distance_bound(x, f, v)
        if d is not None and _distance_compare(d, f, v) is not None:
            lowered[x] = _distance_compare(d, f, v)
    relative = index_pairs(e, f, v, opaque_reads(env) | frozenset(lowered))
    rows = f"({frame.offs} - {frame.start}){frame.fixed_axis}"
    distances = {**lowered, **(relative.distances if relative else {})}
    hoisted = {x: _score_distance(op, k, frame) for x, (op, k) in distances.items()}
    if relative is not None:
        for x, (op, swap) in relative.pairs.items():
            hoisted[x] = f"({frame.cols} {PAIRED[op]} {rows})" if swap else \
                f"({rows} {PAIRED[op]} {frame.cols})"
        for x, (op, a) in relative.bounds.items():
            hoisted[x] = f"({frame.cols} {PAIRED[op]} ({render_at(L, depth, a, env)} - " \
                         f"{frame.start}))"
    if not hoisted:
        return env
    return dataclasses.replace(env, hoisted={**env.hoisted, **hoisted})


def _score_distance(op: Op, k: int, frame: Frame) -> str:
    """(f - v) OP k inside a score, on the rows relative to the start (see
    :func:`_distance_source`)."""
    if abs(k) <= _ROW_SHIFT:
        shift = "" if k == 0 else f" {'-' if k > 0 else '+'} {abs(k)}"
        return f"(({frame.offs} - {frame.start}{shift}){frame.fixed_axis} {PAIRED[op]} " \
               f"{frame.cols})"
    return f"(({frame.offs} - {frame.start}){frame.fixed_axis} {PAIRED[op]} " \
           f"{_shifted_cols(k, frame)})"


def _distance_source(op: Op, k: int, relative: IndexPairs, frame: Frame) -> str:
    """(f - v) OP k of a mask on the tile: on diag, or as the relative rows moved by k
    against the constant columns (one compare per element, the shift once per row), or, for
    a larger k, the rows against the columns moved by k.  The launchers refuse lengths past
    2**31 - _ROW_SHIFT, so (f - start) - k of a row in the sequence is int32-exact for
    |k| <= _ROW_SHIFT (a padded row past the length is never stored)."""
    if _diagonal(relative):
        return f"(diag {PAIRED[op]} {k})"
    if abs(k) <= _ROW_SHIFT:
        rows = frame.rows if k == 0 else \
            f"({frame.rel} {'-' if k > 0 else '+'} {abs(k)}){frame.fixed_axis}"
        return f"({rows} {PAIRED[op]} {frame.cols})"
    return f"({frame.rows} {PAIRED[op]} {_shifted_cols(k, frame)})"


def _shifted_cols(k: int, frame: Frame) -> str:
    """The constant columns moved by ``k``: f - v OP k  =  (f - start) OP (j + k)."""
    if k == 0:
        return frame.cols
    return f"(tl.arange(0, {frame.block}) {'+' if k > 0 else '-'} {abs(k)}){frame.moving_axis}"


def _diagonal(relative: IndexPairs) -> bool:
    """A mask that subtracts the indices, or compares their distance more than once (a
    window ``0 <= m - n <= w``), is printed on diag = f - v, comparisons included (LLVM merges
    0 <= diag <= w into one unsigned compare); one that only compares them once compares the
    relative rows with the (shifted) columns directly (no subtraction per element)."""
    if any(op is Op.SUB for op, _ in relative.pairs.values()):
        return True
    return bool(relative.distances) and len(relative.distances) + len(relative.pairs) >= 2


def _relative_rows(relative: IndexPairs, frame: Frame) -> str:
    if _diagonal(relative):
        return f"diag = ({frame.offs} - {frame.start}){frame.fixed_axis} - {frame.cols}"
    return f"{frame.rel} = {frame.offs} - {frame.start}"


def _pair_source(op: Op, swap: bool, relative: IndexPairs, frame: Frame) -> str:
    """f OP v (v OP f when swapped) in terms of the relative rows and constant columns."""
    if _diagonal(relative):
        if op is Op.SUB:
            return "(-diag)" if swap else "diag"
        return f"(0 {PAIRED[op]} diag)" if swap else f"(diag {PAIRED[op]} 0)"
    return f"({frame.cols} {PAIRED[op]} {frame.rows})" if swap else \
        f"({frame.rows} {PAIRED[op]} {frame.cols})"
