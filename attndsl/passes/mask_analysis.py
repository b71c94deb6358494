"""Mask analysis: which (batch, head, query tile, key tile) blocks of a mask are empty or full.

A mask ``Keep[b, h, m, n]`` (a boolean :class:`~attndsl.ir.expr.Expr` over b, h, m = query
position, n = key position, as traced by :func:`attndsl.frontend.flex.mask_expr`) is cut into
tiles of BLOCK_M queries x BLOCK_N keys.  A tile is

* EMPTY (0)   when the mask is false at every in-range point of the tile,
* FULL (2)    when it is true at every in-range point,
* PARTIAL (1) otherwise.

"In range" means ``m < Lq`` and ``n < Lkv``: the last row and column of tiles are cut short
and their out-of-range points take no part.  There are ceil(Lq / BLOCK_M) x ceil(Lkv / BLOCK_N)
tiles, so every tile has in-range queries and keys (a tile without in-range keys never exists;
torch's ``create_block_mask`` uses the same ceil tiling).  torch pads the dense mask with False
before summing blocks, so a cut-short tile is never FULL there: :meth:`TileMap.torch_classes`
and :meth:`TileMap.to_tables` apply that convention (cut-short FULL tiles become PARTIAL),
``classes`` keeps the in-range one.

How tiles are classified (``TileMap.mechanism``):

* ``"closed-form bounds"`` -- the mask uses no captured data.  It is evaluated in interval
  arithmetic (:class:`IntervalEvaluator`) over every tile at once (broadcast over the tile
  grid; above COARSE_BOXES tiles first over boxes of 4 x 4 tiles, then only inside the
  undecided ones): each index becomes the interval it spans in the tile, booleans become
  three-valued (always / never / maybe), and a tile is FULL when the mask is *always* true,
  EMPTY when *never*.  The rules are sound (a
  bound always contains every value), so FULL and EMPTY are never wrong; "maybe" tiles are
  then refined (below) so that the final classes are exact.
* ``"table from summaries"`` -- the mask reads captured tensors.  Reads are bounded by range
  summaries: a sparse table gives min and max of a tensor over any index interval in O(1)
  (O(L) per window size used; aligned power-of-two blocks, such as tiles, read block min /
  max directly), so ``doc[m]`` over a tile is [min, max] of the ids in it; reads at exact
  indices (``win[h]``, ``lengths[b]``) are exact.
* ``"chunked evaluation"`` -- when a bound had to fall back to a data-blind rule (a gather at
  a non-monotone index such as ``doc[perm[m]]``, a read ranging over two dimensions) and
  therefore *every* tile of a data-dependent mask came out "maybe", the mask is evaluated
  exactly with :func:`attndsl.eager.eval_expr` over blocks of tiles (at most ``max_elements``
  points at a time) and reduced per tile.

Refinement of "maybe" tiles (exact, still interval arithmetic): a few exact points of each
tile are evaluated first (corners, centre, short runs along a row and a column) -- a true
and a false point prove PARTIAL; the rest are split into quarters recursively, a quarter
that is always/never true is decided, and a tile is decided as soon as it has a true and a
false witness or all its pieces are decided.  Pieces that stay "maybe" at a single point
(NaN data, 0/0), or work beyond ``REFINE_BUDGET`` pieces, are finished by exact evaluation of
those tiles (``stats["exact_tiles"]`` counts them).  Cost: O(number of tiles) for the first
pass, plus about O(log BLOCK) pieces per maybe tile for the masks of the test-suite.

:func:`kv_tile_bounds` gives, for masks made of linear constraints on ``m - n``, ``m``, ``n``
(causal, sliding windows, prefix-LM ...) or tile arithmetic ``m // C  op  n // C`` (chunked,
chunked causal ...), closed forms of the non-empty / full kv tile ranges of each query tile,
as integer expressions; :func:`kv_tile_segments` extends them to two segments (sinks beside a
window).  :meth:`TileMap.kv_ranges` gives the same segments as data, from the classes, for
any mask whose rows have at most MAX_SEGMENTS of them.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from attndsl.eager import eval_expr
from attndsl.ir import expr as E
from attndsl.ir.expr import BOOL, INT, Expr, Op

Tensor = torch.Tensor

EMPTY, PARTIAL, FULL = 0, 1, 2
_MAYBE = 3  # internal: undecided by the interval pass (FULL = _MAYBE - 1)
CLOSED_FORM = "closed-form bounds"
SUMMARIES = "table from summaries"
CHUNKED = "chunked evaluation"
MAX_ELEMENTS = 1 << 24  # dense mask points evaluated at a time
MAX_BOXES = 1 << 20  # interval boxes evaluated at a time
REFINE_BUDGET = 1 << 23  # boxes a refinement may evaluate in all
_TABLE_LIMIT = 1 << 26  # entries of a tensor given range summaries
_F64 = torch.float64
_INF = math.inf
_AXES = ("b", "h", "m", "n")


class MaskAnalysisError(ValueError):
    """The mask or the tiling is not valid for analysis; the message says what is wrong."""


# -- intervals -------------------------------------------------------------------------------

class Iv(NamedTuple):
    """Bounds ``lo <= value <= hi`` over each box (float64 tensors; booleans are 0 / 1).

    Integers are exact in float64 below 2**53; ``-inf`` / ``inf`` stand for "unbounded".
    A boolean is *always* true when ``lo == 1``, *never* when ``hi == 0``, else *maybe*.
    """

    lo: Tensor
    hi: Tensor


def _scalar(v: float) -> Tensor:
    return torch.tensor(float(v), dtype=_F64)


def _point(v: float) -> Iv:
    t = _scalar(v)
    return _clean(t, t)


def _clean(lo: Tensor, hi: Tensor) -> Iv:
    """A NaN bound (inf - inf, log of a negative, NaN data) makes the value unknown: (-inf, inf)."""
    bad = torch.isnan(lo) | torch.isnan(hi)
    if bool(bad.any()):
        lo = torch.where(bad, -_INF, lo)
        hi = torch.where(bad, _INF, hi)
    return Iv(lo, hi)


def _truth(always: Tensor, never: Tensor) -> Iv:
    """A boolean as bool tensors (lo = always, hi = not never): 8x less memory than float64."""
    return Iv(always, ~never)


def _bool(t: Tensor) -> Tensor:
    return t if t.dtype == torch.bool else t > 0.5


def _numeric(v: Iv) -> Iv:
    """A boolean interval as float64 0 / 1, for arithmetic."""
    return Iv(v.lo.to(_F64), v.hi.to(_F64)) if v.lo.dtype == torch.bool else v


def _known(v: Iv) -> Tensor:
    """Not the unknown value (-inf, inf), which may be NaN: only known values prove 'always'."""
    return ~((v.lo == -_INF) & (v.hi == _INF))


def _is_point(v: Iv) -> Tensor:
    return v.lo == v.hi


def _where(c: Tensor, a: Tensor | float, b: Tensor | float) -> Tensor:
    a = a if isinstance(a, Tensor) else _scalar(a)
    b = b if isinstance(b, Tensor) else _scalar(b)
    return torch.where(c, a, b)


@dataclass(frozen=True)
class Boxes:
    """Point sets {b} x {h} x [mlo, mhi] x [nlo, nhi]: one per element of broadcastable tensors."""

    b: Tensor
    h: Tensor
    mlo: Tensor
    mhi: Tensor
    nlo: Tensor
    nhi: Tensor
    grid: Geometry | None = None  # set when the boxes are the tiles of this geometry

    @staticmethod
    def from_rows(rows: Tensor) -> Boxes:
        """Boxes from a [P, 6] float64 tensor of (b, h, mlo, mhi, nlo, nhi) rows."""
        return Boxes(*rows.unbind(1))


# -- interval rules --------------------------------------------------------------------------

def _r_neg(node: Expr, a: Iv) -> Iv:
    """-x: [-hi, -lo]."""
    return Iv(-a.hi, -a.lo)


def _r_abs(node: Expr | None, a: Iv) -> Iv:
    """|x|: [lo, hi] when lo >= 0, [-hi, -lo] when hi <= 0, else [0, max(-lo, hi)]."""
    lo = _where(a.lo >= 0, a.lo, _where(a.hi <= 0, -a.hi, 0.0))
    return Iv(lo, torch.maximum(a.lo.abs(), a.hi.abs()))


def _r_add(node: Expr, a: Iv, b: Iv) -> Iv:
    """x + y: [lo_x + lo_y, hi_x + hi_y]."""
    return _clean(a.lo + b.lo, a.hi + b.hi)


def _r_sub(node: Expr, a: Iv, b: Iv) -> Iv:
    """x - y: [lo_x - hi_y, hi_x - lo_y]."""
    return _clean(a.lo - b.hi, a.hi - b.lo)


def _corners(fn: Callable[[Tensor, Tensor], Tensor], a: Iv, b: Iv) -> Iv:
    """[min, max] of fn over the four corners (x, y) in {lo_x, hi_x} x {lo_y, hi_y}."""
    vals = torch.stack(torch.broadcast_tensors(*(fn(x, y) for x in a for y in b)))
    return Iv(vals.amin(0), vals.amax(0))


def _times(x: Tensor, y: Tensor) -> Tensor:
    return torch.nan_to_num(x * y, nan=0.0, posinf=_INF, neginf=-_INF)


def _r_mul(node: Expr, a: Iv, b: Iv) -> Iv:
    """x * y: extremes of a bilinear function over a box are at its corners (0 * inf = 0)."""
    return _corners(_times, a, b)


def _one_sign(b: Iv) -> Tensor:
    """The divisor keeps one sign and is finite: x / y is then monotone in x and in y."""
    return ((b.lo > 0) | (b.hi < 0)) & torch.isfinite(b.lo) & torch.isfinite(b.hi)


def _r_div(node: Expr, a: Iv, b: Iv) -> Iv:
    """x / y: corners when y keeps one sign; (-inf, inf) when y may be 0.  Points are exact
    (with the IR's convention 0 / 0 = 0)."""
    ok = _one_sign(b)
    q = _corners(torch.div, a, b)
    lo, hi = _where(ok, q.lo, -_INF), _where(ok, q.hi, _INF)
    point = _is_point(a) & _is_point(b)
    exact = _where((a.lo == 0) & (b.lo == 0), 0.0, a.lo / b.lo)
    return _clean(_where(point, exact, lo), _where(point, exact, hi))


def _r_truediv(node: Expr, a: Iv, b: Iv) -> Iv:
    """x / y in IEEE arithmetic: as _r_div, but a point 0 / 0 is NaN (unknown)."""
    ok = _one_sign(b)
    q = _corners(torch.div, a, b)
    lo, hi = _where(ok, q.lo, -_INF), _where(ok, q.hi, _INF)
    point = _is_point(a) & _is_point(b)
    return _clean(_where(point, a.lo / b.lo, lo), _where(point, a.lo / b.lo, hi))


def _floor_div(x: Tensor, y: Tensor) -> Tensor:
    return torch.div(x, y, rounding_mode="floor")


def _r_floordiv(node: Expr, a: Iv, b: Iv) -> Iv:
    """x // y = floor(x / y): for y of one sign, x / y is monotone in x and in y over the box
    and floor is monotone, so the extremes are at the corners (for a positive constant c:
    [floor(lo / c), floor(hi / c)]); a divisor that may be 0 gives (-inf, inf)."""
    ok = _one_sign(b)
    q = _corners(_floor_div, a, b)
    return _clean(_where(ok, q.lo, -_INF), _where(ok, q.hi, _INF))


def _r_mod(node: Expr, a: Iv, b: Iv) -> Iv:
    """x % y (floor semantics: the result has the sign of y).

    * y a non-zero constant c and x within one period (floor(lo / c) == floor(hi / c)):
      x % c = x - c * floor(x / c) is increasing there, so [lo % c, hi % c];
    * y > 0: [0, hi_y - 1] for integers ([0, hi_y] for floats), or x itself when
      0 <= x < lo_y;  y < 0: the mirror image;  y that may be 0: (-inf, inf).
    """
    gap = 1.0 if node.dtype == INT else 0.0
    fin = torch.isfinite(b.lo) & torch.isfinite(b.hi)
    pos, neg = (b.lo > 0) & fin, (b.hi < 0) & fin
    lo = _where(pos, 0.0, _where(neg, b.lo + gap, -_INF))
    hi = _where(pos, b.hi - gap, _where(neg, 0.0, _INF))
    keep = (pos & (a.lo >= 0) & (a.hi < b.lo)) | (neg & (a.hi <= 0) & (a.lo > b.hi))
    lo, hi = _where(keep, a.lo, lo), _where(keep, a.hi, hi)
    c = b.lo
    period = (_is_point(b) & (c != 0) & fin & torch.isfinite(a.lo) & torch.isfinite(a.hi)
              & (_floor_div(a.lo, c) == _floor_div(a.hi, c)))
    lo = _where(period, torch.remainder(a.lo, c), lo)
    hi = _where(period, torch.remainder(a.hi, c), hi)
    return _clean(lo, hi)


def _r_max(node: Expr, a: Iv, b: Iv) -> Iv:
    """max(x, y): [max(lo_x, lo_y), max(hi_x, hi_y)]."""
    return Iv(torch.maximum(a.lo, b.lo), torch.maximum(a.hi, b.hi))


def _r_min(node: Expr, a: Iv, b: Iv) -> Iv:
    """min(x, y): [min(lo_x, lo_y), min(hi_x, hi_y)]."""
    return Iv(torch.minimum(a.lo, b.lo), torch.minimum(a.hi, b.hi))


def _r_pow(node: Expr, a: Iv, b: Iv) -> Iv:
    """x ** y: exact at points; y a constant integer k >= 0: |x| ** k bounds (k even) or
    [lo ** k, hi ** k] (k odd, monotone); x > 0 and y constant: monotone in x; else unknown."""
    k = b.lo
    const = _is_point(b) & torch.isfinite(k)
    whole = const & (k == torch.floor(k)) & (k >= 0)
    even = whole & (torch.remainder(k, 2) == 0)
    odd = whole & ~even
    ax = _r_abs(None, a)
    lo, hi = _where(even, ax.lo ** k, -_INF), _where(even, ax.hi ** k, _INF)
    lo, hi = _where(odd, a.lo ** k, lo), _where(odd, a.hi ** k, hi)
    pos = const & ~whole & (a.lo > 0)
    lo = _where(pos, torch.minimum(a.lo ** k, a.hi ** k), lo)
    hi = _where(pos, torch.maximum(a.lo ** k, a.hi ** k), hi)
    point = _is_point(a) & _is_point(b)
    return _clean(_where(point, a.lo ** k, lo), _where(point, a.lo ** k, hi))


def _monotone(fn: Callable[[Tensor], Tensor]) -> Callable[[Expr, Iv], Iv]:
    def rule(node: Expr, a: Iv) -> Iv:
        """f(x) for increasing f (exp, log, sqrt, tanh, sigmoid): [f(lo), f(hi)]; a domain
        error (log of a negative) gives NaN, which makes the value unknown."""
        return _clean(fn(a.lo), fn(a.hi))
    return rule


def _r_lt(node: Expr, a: Iv, b: Iv) -> Iv:
    """x < y: always when hi_x < lo_y, never when lo_x >= hi_y."""
    return _truth((a.hi < b.lo) & _known(a) & _known(b), a.lo >= b.hi)


def _r_le(node: Expr, a: Iv, b: Iv) -> Iv:
    """x <= y: always when hi_x <= lo_y, never when lo_x > hi_y."""
    return _truth((a.hi <= b.lo) & _known(a) & _known(b), a.lo > b.hi)


def _r_gt(node: Expr, a: Iv, b: Iv) -> Iv:
    """x > y is y < x."""
    return _r_lt(node, b, a)


def _r_ge(node: Expr, a: Iv, b: Iv) -> Iv:
    """x >= y is y <= x."""
    return _r_le(node, b, a)


def _point_value(v: Iv) -> Tensor:
    """The value where v is a single point, NaN (equal to nothing) elsewhere."""
    return v.lo if v.lo is v.hi else torch.where(_is_point(v), v.lo, _scalar(math.nan))


def _eq_parts(a: Iv, b: Iv) -> tuple[Tensor, Tensor]:
    """(always, possibly) equal.  Non-points become NaN before the broadcast comparison, so
    the full-size work is one comparison for each part."""
    always = _point_value(a) == _point_value(b)
    possibly = (a.hi >= b.lo) & (b.hi >= a.lo)
    return always, possibly


def _r_eq(node: Expr, a: Iv, b: Iv) -> Iv:
    """x == y: always when both are the same single value, never when disjoint."""
    always, possibly = _eq_parts(a, b)
    return Iv(always, possibly)


def _r_ne(node: Expr, a: Iv, b: Iv) -> Iv:
    """x != y: the negation of x == y."""
    always, possibly = _eq_parts(a, b)
    return Iv(~possibly, ~always)


def _bitwise(fn: Callable[[Tensor, Tensor], Tensor], is_and: bool, a: Iv, b: Iv) -> Iv:
    """Integer & / |: exact at points; for non-negative x, y: x & y in [0, min(hi)], x | y in
    [max(lo), 2 ** bits(max(hi)) - 1]; otherwise unknown."""
    nonneg = (a.lo >= 0) & (b.lo >= 0) & torch.isfinite(a.hi) & torch.isfinite(b.hi)
    top = torch.maximum(a.hi, b.hi)
    lo = _where(nonneg, 0.0 if is_and else torch.maximum(a.lo, b.lo), -_INF)
    cap = torch.minimum(a.hi, b.hi) if is_and else torch.exp2(torch.ceil(torch.log2(top + 1))) - 1
    hi = _where(nonneg, cap, _INF)
    point = _is_point(a) & _is_point(b) & torch.isfinite(a.lo) & torch.isfinite(b.lo)
    safe = _where(point, 1.0, 0.0)
    exact = fn((a.lo * safe).to(torch.int64), (b.lo * safe).to(torch.int64)).to(_F64)
    return Iv(_where(point, exact, lo), _where(point, exact, hi))


def _r_and(node: Expr, a: Iv, b: Iv) -> Iv:
    """p & q on booleans: [min(lo), min(hi)] (always iff both always, never iff one never)."""
    if node.dtype == BOOL:
        return Iv(torch.minimum(a.lo, b.lo), torch.minimum(a.hi, b.hi))
    return _bitwise(torch.bitwise_and, True, a, b)


def _r_or(node: Expr, a: Iv, b: Iv) -> Iv:
    """p | q on booleans: [max(lo), max(hi)] (always iff one always, never iff both never)."""
    if node.dtype == BOOL:
        return Iv(torch.maximum(a.lo, b.lo), torch.maximum(a.hi, b.hi))
    return _bitwise(torch.bitwise_or, False, a, b)


def _r_xor(node: Expr, a: Iv, b: Iv) -> Iv:
    """p ^ q on booleans: always iff one is always and the other never, never iff both are
    known and equal; on integers exact at points, else within the operands' bit width."""
    if node.dtype == BOOL:
        a_on, a_off, b_on, b_off = a.lo > 0.5, a.hi < 0.5, b.lo > 0.5, b.hi < 0.5
        return _truth((a_on & b_off) | (a_off & b_on), (a_on & b_on) | (a_off & b_off))
    nonneg = (a.lo >= 0) & (b.lo >= 0) & torch.isfinite(a.hi) & torch.isfinite(b.hi)
    top = torch.maximum(a.hi, b.hi)
    cap = torch.exp2(torch.ceil(torch.log2(top + 1))) - 1
    point = _is_point(a) & _is_point(b) & torch.isfinite(a.lo) & torch.isfinite(b.lo)
    safe = _where(point, 1.0, 0.0)
    exact = torch.bitwise_xor((a.lo * safe).to(torch.int64),
                              (b.lo * safe).to(torch.int64)).to(_F64)
    return Iv(_where(point, exact, _where(nonneg, 0.0, -_INF)),
              _where(point, exact, _where(nonneg, cap, _INF)))


def _r_invert(node: Expr, a: Iv) -> Iv:
    """~x = -x - 1 (decreasing)."""
    return Iv(-a.hi - 1, -a.lo - 1)


def _r_shift(node: Expr, a: Iv, b: Iv) -> Iv:
    """x << y, x >> y: exact at points (torch's rules for large shifts), else unknown."""
    point = _is_point(a) & _is_point(b) & torch.isfinite(a.lo) & torch.isfinite(b.lo)
    safe = _where(point, 1.0, 0.0)
    fn = torch.bitwise_left_shift if node.op is Op.LSHIFT else torch.bitwise_right_shift
    exact = fn((a.lo * safe).to(torch.int64), (b.lo * safe).to(torch.int64)).to(_F64)
    return Iv(_where(point, exact, -_INF), _where(point, exact, _INF))


def _r_round(node: Expr, a: Iv) -> Iv:
    """Rounding to a 16-bit format is monotone."""
    dt = getattr(torch, node.arg)
    return Iv(a.lo.to(dt).to(_F64), a.hi.to(dt).to(_F64))


def _r_not(node: Expr, a: Iv) -> Iv:
    """~p (p == 0): always when p is the single value 0, never when 0 is outside [lo, hi]."""
    return _truth((a.lo == 0) & (a.hi == 0), (a.lo > 0) | (a.hi < 0))


def _r_cast(node: Expr, a: Iv) -> Iv:
    """bool(x) is x != 0; int(x) truncates toward 0 (monotone); float(x) is x."""
    if node.arg == BOOL:
        return _truth((a.lo > 0) | (a.hi < 0), (a.lo == 0) & (a.hi == 0))
    if node.arg == INT:
        return Iv(torch.trunc(a.lo), torch.trunc(a.hi))
    return a


def _r_where(node: Expr, c: Iv, a: Iv, b: Iv) -> Iv:
    """where(p, x, y): x when p is always true, y when never, else the hull of x and y."""
    always, never = c.lo > 0.5, c.hi < 0.5
    lo = _where(always, a.lo, _where(never, b.lo, torch.minimum(a.lo, b.lo)))
    hi = _where(always, a.hi, _where(never, b.hi, torch.maximum(a.hi, b.hi)))
    return Iv(lo, hi)


# rules that take boolean intervals (bool tensors) as they are; the others get float64
_LOGICAL = frozenset({Op.AND, Op.OR, Op.NOT, Op.WHERE, Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT,
                      Op.GE, Op.XOR})
_RULES: dict[Op, Callable[..., Iv]] = {
    Op.NEG: _r_neg, Op.ABS: _r_abs, Op.ADD: _r_add, Op.SUB: _r_sub, Op.MUL: _r_mul,
    Op.DIV: _r_div, Op.TRUEDIV: _r_truediv, Op.XOR: _r_xor, Op.INVERT: _r_invert,
    Op.LSHIFT: _r_shift, Op.RSHIFT: _r_shift, Op.ROUND: _r_round, Op.FLOORDIV: _r_floordiv,
    Op.MOD: _r_mod, Op.MAX: _r_max, Op.MIN: _r_min,
    Op.POW: _r_pow, Op.LT: _r_lt, Op.LE: _r_le, Op.GT: _r_gt, Op.GE: _r_ge, Op.EQ: _r_eq,
    Op.NE: _r_ne, Op.AND: _r_and, Op.OR: _r_or, Op.NOT: _r_not, Op.CAST: _r_cast,
    Op.WHERE: _r_where, Op.EXP: _monotone(torch.exp), Op.EXP2: _monotone(torch.exp2),
    Op.LOG: _monotone(torch.log), Op.LOG2: _monotone(torch.log2),
    Op.TANH: _monotone(torch.tanh), Op.SIGMOID: _monotone(torch.sigmoid),
    Op.SQRT: _monotone(torch.sqrt),
}


# -- range summaries of captured tensors -------------------------------------------------------

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


# -- the evaluator -----------------------------------------------------------------------------

class IntervalEvaluator:
    """Evaluates an expression in interval arithmetic over many boxes at once.

    Every node becomes an :class:`Iv` broadcast over the boxes' shape (so a node that depends
    on m only is a [.., nq, 1] tensor over a tile grid).  ``coarse`` is set when a bound fell
    back to a data-blind rule (a read ranging over two dimensions of a tensor).
    """

    def __init__(self, captured: Mapping[str, Tensor],
                 params: Mapping[str, float] | None = None) -> None:
        self.data = {k: v.detach().cpu() for k, v in captured.items()}  # converted on use
        self.params = dict(params or {})
        self.tables: dict[tuple[str, int], RangeTable | None] = {}
        self.coarse = False

    def evaluate(self, e: Expr, boxes: Boxes) -> Iv:
        memo: dict[Expr, Iv] = {}
        for node in e.walk():
            memo[node] = self._node(node, [memo[s] for s in node.src], boxes)
        return memo[e]

    def codes(self, mask: Expr, boxes: Boxes) -> Tensor:
        """FULL where the mask is always true on the box, EMPTY where never, else _MAYBE."""
        v = self.evaluate(mask, boxes)
        always, maybe = (_bool(x).view(torch.int8) for x in v)
        return maybe * _MAYBE - always  # (1, 1) FULL, (0, 1) MAYBE, (0, 0) EMPTY

    def _node(self, node: Expr, args: list[Iv], boxes: Boxes) -> Iv:
        op = node.op
        if op is Op.CONST:
            return _point(node.arg)
        if op is Op.INDEX:
            return _index(node.arg, boxes)
        if op is Op.PARAM:
            if node.arg in self.params:
                return _point(self.params[node.arg])
            return Iv(_scalar(-_INF), _scalar(_INF))
        if op is Op.LOAD:
            tiled = self._tiled_load(node, boxes)
            return tiled if tiled is not None else self._load(node, args)
        rule = _RULES.get(op)
        if rule is None:
            raise MaskAnalysisError(f"{E.render(node)}: a mask cannot contain {op.name}")
        if op not in _LOGICAL:
            args = [_numeric(a) for a in args]
        return rule(node, *args)

    def _load(self, node: Expr, idx: list[Iv]) -> Iv:
        """t[i0, i1, ..]: exact at exact indices; a range in one dimension reads the range
        summary of t along it (min / max over [lo, hi]); ranges in several dimensions fall
        back to [min t, max t] (coarse).  Indices are clamped to the tensor's extent (an
        in-range mask only reads in range, so clamping keeps every real value)."""
        t = self.data.get(node.arg)
        if t is None:
            raise MaskAnalysisError(f"captured tensor {node.arg!r} is not bound")
        if t.dim() != len(idx):
            raise MaskAnalysisError(f"{node.arg} has {t.dim()} dims, indexed with {len(idx)}")
        if t.dim() == 0:
            return _point(float(t.to(_F64)))
        los = [v.lo.clamp(0, s - 1) for v, s in zip(idx, t.shape)]
        his = [lo if v.hi is v.lo else v.hi.clamp(0, s - 1)  # points: one tensor for both
               for v, lo, s in zip(idx, los, t.shape)]
        ranged = [d for d in range(t.dim()) if his[d] is not los[d]
                  and not torch.equal(los[d], his[d])]
        if not ranged:
            vals = t[tuple(i.to(torch.int64) for i in torch.broadcast_tensors(*los))].to(_F64)
            return _clean(vals, vals) if t.is_floating_point() else Iv(vals, vals)
        if len(ranged) == 1:
            table = self._table(node.arg, ranged[0])
            if table is not None:
                return self._ranged(t, ranged[0], table, los, his)
        self.coarse = True
        return _clean(t.min().to(_F64).reshape(()), t.max().to(_F64).reshape(()))

    def _tiled_load(self, node: Expr, boxes: Boxes) -> Iv | None:
        """t[m] (or t[n]) over the tiles of a grid, t 1-D of the axis' length: the per-tile
        min / max of t, straight from its block summaries (what _load computes, in a few
        operations)."""
        g, t = boxes.grid, self.data.get(node.arg)
        if g is None or t is None or t.dim() != 1 or node.src[0].op is not Op.INDEX:
            return None
        axis = node.src[0].arg
        length, size = (g.Lq, g.BM) if axis == "m" else (g.Lkv, g.BN) if axis == "n" else (0, 0)
        if t.shape[0] != length or size & (size - 1):
            return None
        table = self._table(node.arg, 0)
        if table is None:
            return None
        mn, mx = table.block(size.bit_length() - 1)
        shape = (1, 1, -1, 1) if axis == "m" else (1, 1, 1, -1)
        mn, mx = mn[0].view(shape), mx[0].view(shape)
        return _clean(mn, mx) if t.is_floating_point() else Iv(mn, mx)

    def _ranged(self, t: Tensor, d: int, table: RangeTable, los: list[Tensor],
                his: list[Tensor]) -> Iv:
        others = [i for i in range(t.dim()) if i != d]
        row = torch.zeros((), dtype=torch.int64)
        for i in others:
            row = row * t.shape[i] + los[i].to(torch.int64)
        lo, hi = los[d].to(torch.int64), his[d].to(torch.int64)
        row, lo, hi = torch.broadcast_tensors(row, lo, hi)
        return table.query(row, lo, hi)

    def _table(self, name: str, d: int) -> RangeTable | None:
        key = (name, d)
        if key not in self.tables:
            t = self.data[name]
            ok = t.numel() <= _TABLE_LIMIT
            rows = t.movedim(d, -1).reshape(-1, t.shape[d]).to(_F64) if ok else None
            self.tables[key] = RangeTable(rows) if rows is not None else None
        return self.tables[key]


def _index(name: str, boxes: Boxes) -> Iv:
    if name == "b":
        return Iv(boxes.b, boxes.b)
    if name == "h":
        return Iv(boxes.h, boxes.h)
    if name == "m":
        return Iv(boxes.mlo, boxes.mhi)
    if name == "n":
        return Iv(boxes.nlo, boxes.nhi)
    raise MaskAnalysisError(f"a mask may only use the indices b, h, m, n; got {name!r}")


def _monotonicity(e: Expr) -> dict[str, int] | None:
    """Sign (+1 / -1) of the monotonicity of e in each index it uses, or None when it is not
    monotone in some index (%, abs, products of indices, gathers ...)."""
    op = e.op
    if op in (Op.CONST, Op.PARAM):
        return {}
    if op is Op.INDEX:
        return {e.arg: 1}
    if op is Op.CAST and e.arg != BOOL:
        return _monotonicity(e.src[0])
    if op is Op.NEG:
        inner = _monotonicity(e.src[0])
        return None if inner is None else {k: -v for k, v in inner.items()}
    if op in (Op.ADD, Op.SUB, Op.MIN, Op.MAX):
        a, b = _monotonicity(e.src[0]), _monotonicity(e.src[1])
        if a is None or b is None:
            return None
        if op is Op.SUB:
            b = {k: -v for k, v in b.items()}
        return None if any(a.get(k, v) != v for k, v in b.items()) else {**a, **b}
    if op in (Op.MUL, Op.FLOORDIV):
        x, c = e.src
        if op is Op.MUL and x.op is Op.CONST:
            x, c = c, x
        if c.op is not Op.CONST or not isinstance(c.arg, int | float) or c.arg == 0:
            return None
        if op is Op.FLOORDIV and c.arg < 0:
            return None
        inner = _monotonicity(x)
        sign = 1 if c.arg > 0 else -1
        return None if inner is None else {k: v * sign for k, v in inner.items()}
    return None


def _blind_gathers(mask: Expr) -> bool:
    """Some read of a captured tensor is at an index that is not monotone in m or n."""
    for node in mask.walk():
        if node.op is Op.LOAD:
            for s in node.src:
                if s.free_indices() & {"m", "n"} and _monotonicity(s) is None:
                    return True
    return False


# -- tiling ------------------------------------------------------------------------------------

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


@functools.lru_cache(maxsize=16)
def _grid_boxes(g: Geometry, Bm: int, Hm: int) -> Boxes:
    """The tiles of g as boxes, broadcast over [Bm, Hm, nq, nk] (cached: never modified)."""
    qt = torch.arange(g.nq, dtype=_F64).reshape(1, 1, -1, 1)
    kt = torch.arange(g.nk, dtype=_F64).reshape(1, 1, 1, -1)
    mlo, mhi = g.rows(qt)
    nlo, nhi = g.cols(kt)
    b = torch.arange(Bm, dtype=_F64).reshape(-1, 1, 1, 1)
    h = torch.arange(Hm, dtype=_F64).reshape(1, -1, 1, 1)
    return Boxes(b, h, mlo, mhi, nlo, nhi, g)


COARSE_BOXES = 65536  # boxes of the first, coarsest level of the interval pass
_SPLIT = 4  # each level cuts a box into _SPLIT x _SPLIT boxes of the next


def _coarse_to_fine(ev: IntervalEvaluator, mask: Expr, g: Geometry, Bm: int, Hm: int,
                    stats: dict[str, int]) -> Tensor:
    """Interval codes [Bm, Hm, nq, nk] of every tile, coarse to fine.

    The first level evaluates boxes of s x s tiles (s a power of _SPLIT, at most about
    COARSE_BOXES boxes); a box that is always (never) true decides all its tiles at once, and
    only the boxes of the next level inside undecided ones are evaluated, down to single
    tiles.  Work is proportional to the undecided boundary of the mask, not to the number of
    tiles (a level that is mostly undecided is evaluated as a whole grid, by broadcasting)."""
    s = 1
    while -(-g.nq // (s * _SPLIT)) * -(-g.nk // (s * _SPLIT)) * Bm * Hm >= COARSE_BOXES:
        s *= _SPLIT
    level = Geometry(g.Lq, g.Lkv, g.BM * s, g.BN * s)
    codes = ev.codes(mask, _grid_boxes(level, Bm, Hm)).expand(Bm, Hm, level.nq, level.nk)
    stats["coarse_boxes"] = codes.numel()
    while s > 1:
        s //= _SPLIT
        level = Geometry(g.Lq, g.Lkv, g.BM * s, g.BN * s)
        codes = codes.repeat_interleave(_SPLIT, 2)[:, :, :level.nq]
        codes = codes.repeat_interleave(_SPLIT, 3)[:, :, :, :level.nk]
        maybe = (codes & 1).bool()  # codes are 0, FULL or _MAYBE
        count = int(maybe.sum())
        stats["coarse_boxes"] += count
        if 4 * count > codes.numel():  # mostly undecided: the whole grid, by broadcasting
            grid = ev.codes(mask, _grid_boxes(level, Bm, Hm)).expand_as(codes)
            codes = torch.where(maybe, grid, codes)
        elif count:
            roots = maybe.nonzero()
            codes[tuple(roots.unbind(1))] = _codes_of(ev, mask, _root_boxes(roots, level))
    return codes.contiguous()


def _root_boxes(roots: Tensor, g: Geometry) -> Tensor:
    """[R, 6] boxes (b, h, mlo, mhi, nlo, nhi) of tiles given as [R, 4] (b, h, qt, kt) rows."""
    r = roots.to(_F64)
    mlo, mhi = g.rows(r[:, 2])
    nlo, nhi = g.cols(r[:, 3])
    return torch.stack([r[:, 0], r[:, 1], mlo, mhi, nlo, nhi], 1)


def _codes_of(ev: IntervalEvaluator, mask: Expr, rows: Tensor) -> Tensor:
    """Codes of [P, 6] boxes, MAX_BOXES at a time."""
    out = torch.empty(rows.shape[0], dtype=torch.int8)
    for s in range(0, rows.shape[0], MAX_BOXES):
        chunk = rows[s:s + MAX_BOXES]
        out[s:s + MAX_BOXES] = ev.codes(mask, Boxes.from_rows(chunk)).expand(chunk.shape[0])
    return out


def _sample_codes(ev: IntervalEvaluator, mask: Expr, boxes: Tensor, runs: bool) -> Tensor:
    """Exact codes [P, k] at k points of each of the [P, 6] boxes: its corners and centre,
    or (``runs``) 7 steps along the last row from the left and 7 along the last column from
    the top.  The points of a box share its b and h, so they are evaluated as [P, k] point
    boxes broadcast against [P, 1] (MAX_BOXES points at a time)."""
    out = []
    step = max(1, MAX_BOXES // 16)
    for s in range(0, boxes.shape[0], step):
        b, h, mlo, mhi, nlo, nhi = (x[:, None] for x in boxes[s:s + step].unbind(1))
        if runs:
            j = torch.arange(1, 8, dtype=_F64)
            m = torch.cat([mhi.expand(-1, 7), torch.minimum(mlo + j, mhi)], 1)
            n = torch.cat([torch.minimum(nlo + j, nhi), nhi.expand(-1, 7)], 1)
        else:
            mmid, nmid = torch.floor((mlo + mhi) / 2), torch.floor((nlo + nhi) / 2)
            m = torch.cat([mlo, mlo, mhi, mhi, mmid], 1)
            n = torch.cat([nlo, nhi, nlo, nhi, nmid], 1)
        out.append(ev.codes(mask, Boxes(b, h, m, m, n, n)).expand(m.shape))
    return torch.cat(out)


def _split(boxes: Tensor, owner: Tensor) -> tuple[Tensor, Tensor]:
    """Quarters of each box (halves along a dimension of length 1 are not split)."""
    b, h, mlo, mhi, nlo, nhi = boxes.unbind(1)
    mmid, nmid = torch.floor((mlo + mhi) / 2), torch.floor((nlo + nhi) / 2)
    ms = [(mlo, mmid, torch.ones_like(mlo, dtype=torch.bool)), (mmid + 1, mhi, mhi > mlo)]
    ns = [(nlo, nmid, torch.ones_like(nlo, dtype=torch.bool)), (nmid + 1, nhi, nhi > nlo)]
    kids, owners = [], []
    for ml, mh, mok in ms:
        for nl, nh, nok in ns:
            ok = mok & nok
            kids.append(torch.stack([b, h, ml, mh, nl, nh], 1)[ok])
            owners.append(owner[ok])
    return torch.cat(kids), torch.cat(owners)


@dataclass
class _Witness:
    """Per maybe tile: a true point was seen, a false point was seen, it must be done exactly."""

    true: Tensor
    false: Tensor
    stuck: Tensor

    def see(self, codes: Tensor, owner: Tensor) -> None:
        self.true.index_fill_(0, owner[codes == FULL], True)
        self.false.index_fill_(0, owner[codes == EMPTY], True)

    @property
    def partial(self) -> Tensor:
        return self.true & self.false


def _refine(ev: IntervalEvaluator, mask: Expr, roots: Tensor, g: Geometry,
            stats: dict[str, int], budget: int) -> Tensor:
    """Exact codes (or _MAYBE where exact evaluation is needed) of the maybe tiles ``roots``."""
    boxes = _root_boxes(roots, g)
    n = boxes.shape[0]
    w = _Witness(*(torch.zeros(n, dtype=torch.bool) for _ in range(3)))
    undecided = torch.arange(n)
    for runs in (False, True):  # corners and centre first, then short runs from a corner
        codes = _sample_codes(ev, mask, boxes[undecided], runs)  # a row per box
        w.true[undecided] |= (codes == FULL).any(1)
        w.false[undecided] |= (codes == EMPTY).any(1)
        stats["sample_points"] += codes.numel()
        undecided = undecided[~w.partial[undecided]]
        if not undecided.numel():
            break
    frontier, owner = boxes[undecided], undecided
    spent = 0
    while frontier.shape[0]:
        frontier, owner = _split(frontier, owner)
        spent += frontier.shape[0]
        if spent > budget:
            w.stuck[owner] = True
            break
        codes = _codes_of(ev, mask, frontier)
        w.see(codes, owner)
        live = (codes == _MAYBE) & ~w.partial[owner]
        point = (frontier[:, 2] == frontier[:, 3]) & (frontier[:, 4] == frontier[:, 5])
        w.stuck[owner[live & point]] = True
        keep = live & ~point & ~w.stuck[owner]
        frontier, owner = frontier[keep], owner[keep]
    stats["refine_boxes"] += spent
    decided = torch.where(w.true, FULL, EMPTY)
    out = torch.where(w.stuck, _MAYBE, decided)
    return torch.where(w.partial, PARTIAL, out).to(torch.int8)


# -- exact evaluation --------------------------------------------------------------------------

def _exact_tiles(mask: Expr, captured: Mapping[str, Tensor], g: Geometry, b: Tensor, h: Tensor,
                 qts: Tensor, kts: Tensor) -> Tensor:
    """Exact codes [len(b), len(h), len(qts), len(kts)] by dense evaluation of those tiles.

    Each tile's positions are padded to a full block by repeating its last in-range position,
    which changes no any / all."""
    mpos = (qts[:, None] * g.BM + torch.arange(g.BM)).clamp(max=g.Lq - 1).reshape(-1)
    npos = (kts[:, None] * g.BN + torch.arange(g.BN)).clamp(max=g.Lkv - 1).reshape(-1)
    ranges = {"b": b, "h": h, "m": mpos, "n": npos}
    v = eval_expr(mask, list(_AXES), ranges, captured).to(torch.bool)
    v = v.expand(len(b), len(h), len(mpos), len(npos))
    v = v.reshape(len(b), len(h), len(qts), g.BM, len(kts), g.BN)
    full = v.all(dim=5).all(dim=3)
    some = v.any(dim=5).any(dim=3)
    return torch.where(full, FULL, torch.where(some, PARTIAL, EMPTY)).to(torch.int8)


def _chunks(total: int, size: int) -> list[Tensor]:
    return [torch.arange(s, min(s + size, total)) for s in range(0, total, max(1, size))]


def _exact_grid(mask: Expr, captured: Mapping[str, Tensor], Bm: int, Hm: int, g: Geometry,
                max_elements: int) -> Tensor:
    """Every tile by dense evaluation, at most ``max_elements`` points at a time (one tile at
    a time at least)."""
    tile = g.BM * g.BN
    ck = min(g.nk, max(1, max_elements // tile))
    cq = min(g.nq, max(1, max_elements // (tile * ck)))
    ch = min(Hm, max(1, max_elements // (tile * ck * cq)))
    cb = min(Bm, max(1, max_elements // (tile * ck * cq * ch)))
    out = torch.empty(Bm, Hm, g.nq, g.nk, dtype=torch.int8)
    for b in _chunks(Bm, cb):
        for h in _chunks(Hm, ch):
            for q in _chunks(g.nq, cq):
                for k in _chunks(g.nk, ck):
                    codes = _exact_tiles(mask, captured, g, b, h, q, k)
                    out[b[0]:b[-1] + 1, h[0]:h[-1] + 1, q[0]:q[-1] + 1, k[0]:k[-1] + 1] = codes
    return out


def _exact_roots(mask: Expr, captured: Mapping[str, Tensor], roots: Tensor, g: Geometry,
                 max_elements: int) -> Tensor:
    """Exact codes of the tiles ``roots`` ([R, 4] rows b, h, qt, kt), query tile by query tile."""
    out = torch.empty(roots.shape[0], dtype=torch.int8)
    for qt in roots[:, 2].unique():
        sel = (roots[:, 2] == qt).nonzero().squeeze(1)
        sub = roots[sel]
        bs, hs, kts = sub[:, 0].unique(), sub[:, 1].unique(), sub[:, 3].unique()
        step = max(1, max_elements // (len(bs) * len(hs) * g.BM * g.BN))
        for s in range(0, len(kts), step):
            ks = kts[s:s + step]
            codes = _exact_tiles(mask, captured, g, bs, hs, qt.reshape(1), ks)
            inside = (sub[:, 3] >= ks[0]) & (sub[:, 3] <= ks[-1])
            part = sub[inside].T.contiguous()
            out[sel[inside]] = codes[torch.searchsorted(bs, part[0]),
                                     torch.searchsorted(hs, part[1]), 0,
                                     torch.searchsorted(ks, part[3])]
    return out


# -- the result --------------------------------------------------------------------------------

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

    def torch_classes(self) -> Tensor:
        """Classes under torch's convention: a tile cut short by Lq or Lkv is never FULL."""
        c = self.classes.clone()
        if self.Lq % self.BLOCK_M:
            last = c[:, :, -1, :]
            last[last == FULL] = PARTIAL
        if self.Lkv % self.BLOCK_N:
            last = c[:, :, :, -1]
            last[last == FULL] = PARTIAL
        return c

    def to_tables(self, torch_boundary: bool = True) -> BlockTables:
        """The eight tables of torch's BlockMask, in its layout and ordering (see
        :func:`dense_to_ordered`); q_* are the transposes, as BlockMask.from_kv_blocks makes."""
        c = self.torch_classes() if torch_boundary else self.classes
        ct = c.transpose(-2, -1).contiguous()  # row-wise work on contiguous rows is 2x faster
        kv = dense_to_ordered(c == PARTIAL) + dense_to_ordered(c == FULL)
        q = dense_to_ordered(ct == PARTIAL) + dense_to_ordered(ct == FULL)
        return BlockTables(*kv, *q)

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


# -- classification ----------------------------------------------------------------------------

def _positive(name: str, v: Any) -> int:
    if isinstance(v, bool):
        raise MaskAnalysisError(f"{name} must be a positive integer, got {v!r}")
    try:
        iv = operator.index(v)
    except TypeError:
        raise MaskAnalysisError(f"{name} must be a positive integer, got {v!r}") from None
    if iv <= 0:
        raise MaskAnalysisError(f"{name} must be a positive integer, got {iv}")
    return iv


def check_mask(mask: Any, captured: Mapping[str, Tensor] | None) -> Expr:
    """A boolean expression over b, h, m, n whose captured tensors are all bound (not checked
    when ``captured`` is None)."""
    if not isinstance(mask, Expr):
        raise MaskAnalysisError(f"the mask must be an Expr, got {type(mask).__name__}")
    if mask.dtype != BOOL:
        raise MaskAnalysisError(f"the mask must be boolean (a comparison, &, |, ~), got a "
                                f"{mask.dtype} expression: {E.render(mask)}")
    extra = mask.free_indices() - set(_AXES)
    if extra:
        raise MaskAnalysisError(f"a mask may only use the indices b, h, m, n; "
                                f"{E.render(mask)} uses {sorted(extra)}")
    for node in mask.walk():
        if node.op is Op.LOAD and captured is not None and node.arg not in captured:
            raise MaskAnalysisError(f"captured tensor {node.arg!r} is not bound")
        if node.op in (Op.REDUCE_SUM, Op.REDUCE_MAX, Op.SOFTMAX, Op.ROW):
            raise MaskAnalysisError(f"a mask cannot contain {node.op.name}: {E.render(node)}")
    return mask


def classify_tiles(mask: Expr, captured: Mapping[str, Tensor], B: int, H: int, Lq: int,
                   Lkv: int, BLOCK_M: int, BLOCK_N: int, *, exact: bool = True,
                   max_elements: int = MAX_ELEMENTS, budget: int = REFINE_BUDGET) -> TileMap:
    """Classify every (b, h, query tile, kv tile) of ``mask`` as EMPTY, PARTIAL or FULL.

    With ``exact=False`` only the interval pass runs: FULL and EMPTY are still never wrong, but
    tiles the bounds cannot decide are reported PARTIAL.
    """
    B, H, Lq, Lkv = (_positive(k, v) for k, v in (("B", B), ("H", H), ("Lq", Lq), ("Lkv", Lkv)))
    g = Geometry(Lq, Lkv, _positive("BLOCK_M", BLOCK_M), _positive("BLOCK_N", BLOCK_N))
    captured = {k: v.detach().cpu() for k, v in captured.items()}
    free = check_mask(mask, captured).free_indices()
    Bm, Hm = (B if "b" in free else 1), (H if "h" in free else 1)
    uses_data = any(node.op is Op.LOAD for node in mask.walk())
    ev = IntervalEvaluator(captured)
    stats = {"tiles": Bm * Hm * g.nq * g.nk, "coarse_boxes": 0, "decided_by_bounds": 0,
             "sample_points": 0, "refine_boxes": 0, "exact_tiles": 0}
    classes = _coarse_to_fine(ev, mask, g, Bm, Hm, stats)
    roots = (classes & 1).bool().nonzero()  # the interval pass gives 0, FULL = 2 or _MAYBE = 3
    stats["decided_by_bounds"] = classes.numel() - roots.shape[0]
    if uses_data and (ev.coarse or _blind_gathers(mask)) and \
            roots.shape[0] == classes.numel():
        stats["exact_tiles"] = classes.numel()
        classes = _exact_grid(mask, captured, Bm, Hm, g, max_elements)
        return TileMap(classes, CHUNKED, Lq, Lkv, g.BM, g.BN, stats)
    mechanism = SUMMARIES if uses_data else CLOSED_FORM
    if roots.shape[0]:
        if exact:
            codes = _refine(ev, mask, roots, g, stats, budget)
            stuck = codes == _MAYBE
            if bool(stuck.any()):
                codes[stuck] = _exact_roots(mask, captured, roots[stuck], g, max_elements)
                stats["exact_tiles"] = int(stuck.sum())
        else:
            codes = torch.full((roots.shape[0],), PARTIAL, dtype=torch.int8)
        classes[tuple(roots.unbind(1))] = codes
    return TileMap(classes, mechanism, Lq, Lkv, g.BM, g.BN, stats)


def exact_classes(mask: Expr, captured: Mapping[str, Tensor], B: int, H: int, Lq: int, Lkv: int,
                  BLOCK_M: int, BLOCK_N: int, max_elements: int = MAX_ELEMENTS) -> Tensor:
    """Reference classes [B', H', nq, nk] by chunked dense evaluation (no interval reasoning)."""
    g = Geometry(Lq, Lkv, _positive("BLOCK_M", BLOCK_M), _positive("BLOCK_N", BLOCK_N))
    free = check_mask(mask, captured).free_indices()
    Bm, Hm = (B if "b" in free else 1), (H if "h" in free else 1)
    return _exact_grid(mask, {k: v.cpu() for k, v in captured.items()}, Bm, Hm, g, max_elements)


# -- closed-form kv tile ranges ----------------------------------------------------------------

@dataclass(frozen=True)
class KVBounds:
    """For query tile ``qt``: the non-empty kv tiles are exactly [lo, hi) and the full ones
    exactly [full_lo, full_hi) (inside [lo, hi); lo == hi when none).  Integer expressions over
    INDEX ``qt``, PARAM ``M`` (= Lq) and PARAM ``N`` (= Lkv).  Full means full over in-range
    points (a kernel must still bound-check keys >= N in the last tile), or under torch's
    convention (cut-short tiles never full) when ``torch_boundary``."""

    lo: Expr
    hi: Expr
    full_lo: Expr
    full_hi: Expr
    BLOCK_M: int
    BLOCK_N: int
    torch_boundary: bool = False

    def evaluate(self, Lq: int, Lkv: int) -> dict[str, Tensor]:
        """The four bounds for every query tile, int64 [nq] tensors."""
        nq = -(-Lq // self.BLOCK_M)
        ranges = {"qt": torch.arange(nq)}
        params = {"M": Lq, "N": Lkv}
        return {k: eval_expr(getattr(self, k), ["qt"], ranges, {}, params).long().expand(nq)
                for k in ("lo", "hi", "full_lo", "full_hi")}

    def __str__(self) -> str:
        """The four bounds, with subexpressions used more than once named t0, t1, ..."""
        names = ("lo", "hi", "full_lo", "full_hi")
        roots = [getattr(self, k) for k in names]
        shared = _shared_nodes(roots)
        lines = [f"{v} = {E.render(_named(node, shared))}" for node, v in shared.items()]
        lines += [f"{k} = {shared[r] if r in shared else E.render(_named(r, shared))}"
                  for k, r in zip(names, roots)]
        return "\n".join(lines)


def _shared_nodes(roots: list[Expr]) -> dict[Expr, str]:
    """Non-leaf nodes referenced more than once across ``roots``, children first."""
    refs: dict[Expr, int] = {}
    order: list[Expr] = []
    for r in roots:
        refs[r] = refs.get(r, 0) + 1
        for node in r.walk():
            if node not in order:
                order.append(node)
                for s in node.src:
                    refs[s] = refs.get(s, 0) + 1
    shared = [x for x in order if refs.get(x, 0) > 1 and x.src and x.op is not Op.NEG]
    return {x: f"t{i}" for i, x in enumerate(shared)}


def _named(e: Expr, names: dict[Expr, str]) -> Expr:
    """e with its named proper subexpressions replaced by their names."""
    memo: dict[Expr, Expr] = {}
    for node in e.walk():
        if node in names and node is not e:
            memo[node] = E.param(names[node], node.dtype)
            continue
        src = tuple(memo[s] for s in node.src)
        memo[node] = node if src == node.src else Expr(node.op, src, node.arg, node.dtype)
    return memo[e]


def _c(v: int) -> Expr:
    return E.const(int(v))


def _const(e: Expr) -> int | None:
    return e.arg if e.op is Op.CONST and isinstance(e.arg, int) and \
        not isinstance(e.arg, bool) else None


def _add(a: Expr, k: int | Expr) -> Expr:
    k = _c(k) if isinstance(k, int) else k
    ca, ck = _const(a), _const(k)
    if ca is not None and ck is not None:
        return _c(ca + ck)
    if ck == 0:
        return a
    if ck is not None and ck < 0:
        return E.binary(Op.SUB, a, _c(-ck))
    return E.binary(Op.ADD, a, k)


def _sub(a: Expr, k: int | Expr) -> Expr:
    if isinstance(k, int):
        return _add(a, -k)
    ca, ck = _const(a), _const(k)
    if ca is not None and ck is not None:
        return _c(ca - ck)
    return a if ck == 0 else E.binary(Op.SUB, a, k)


def _mul(a: Expr, k: int) -> Expr:
    ca = _const(a)
    return _c(ca * k) if ca is not None else a if k == 1 else E.binary(Op.MUL, a, _c(k))


def _fdiv(a: Expr, k: int) -> Expr:
    ca = _const(a)
    return _c(ca // k) if ca is not None else a if k == 1 else E.binary(Op.FLOORDIV, a, _c(k))


def _lower(e: Expr) -> int | None:
    """A lower bound of e given qt >= 0, M >= 1, N >= 1 (None: unknown); used to fold."""
    op, src = e.op, e.src
    if op is Op.CONST:
        return _const(e)
    if op is Op.INDEX:
        return 0 if e.arg == "qt" else None
    if op is Op.PARAM:
        return 1
    lows = [_lower(s) for s in src]
    if op is Op.WHERE:
        lows = lows[1:]
    if op is Op.MAX:
        known = [x for x in lows if x is not None]
        return max(known) if known else None
    if None in lows:
        return None
    if op is Op.ADD:
        return lows[0] + lows[1]
    if op is Op.SUB and _const(src[1]) is not None:
        return lows[0] - src[1].arg
    if op is Op.MUL and _const(src[1]) is not None and src[1].arg >= 0:
        return lows[0] * src[1].arg
    if op is Op.FLOORDIV and _const(src[1]) is not None and src[1].arg > 0:
        return lows[0] // src[1].arg
    if op in (Op.MIN, Op.WHERE):
        return min(lows)
    return None


def _at_least(e: Expr, c: int | None) -> bool:
    low = _lower(e)
    return c is not None and low is not None and low >= c


def _max(a: Expr, b: Expr) -> Expr:
    ca, cb = _const(a), _const(b)
    if ca is not None and cb is not None:
        return _c(max(ca, cb))
    if a == b or _at_least(a, cb):
        return a
    return b if _at_least(b, ca) else E.binary(Op.MAX, a, b)


def _min(a: Expr, b: Expr) -> Expr:
    ca, cb = _const(a), _const(b)
    if ca is not None and cb is not None:
        return _c(min(ca, cb))
    if a == b or _at_least(b, ca):
        return a
    return b if _at_least(a, cb) else E.binary(Op.MIN, a, b)


def _le(a: Expr, b: Expr) -> Expr | None:
    """a <= b, or None when it is a constant truth (callers treat None as True)."""
    ca, cb = _const(a), _const(b)
    if ca is not None and cb is not None:
        return None if ca <= cb else E.const(False)
    return None if _at_least(b, ca) else E.binary(Op.LE, a, b)


def _and(a: Expr | None, b: Expr | None) -> Expr | None:
    if a is None or b is None:
        return b if a is None else a
    return E.binary(Op.AND, a, b)


def _if(c: Expr | None, a: Expr, b: Expr) -> Expr:
    if c is None or a == b:
        return a
    if c.op is Op.CONST:
        return a if c.arg else b
    return E.where(c, a, b)


def _opt(fn: Callable[[int, int], int], a: int | None, b: int | None) -> int | None:
    if a is None or b is None:
        return b if a is None else a
    return fn(a, b)


@dataclass(frozen=True)
class _Lin:
    """A conjunction of linear constraints: dlo <= m - n <= dhi, mlo <= m <= mhi,
    nlo <= n <= nhi (None: unbounded); ``empty`` when unsatisfiable."""

    dlo: int | None = None
    dhi: int | None = None
    mlo: int | None = None
    mhi: int | None = None
    nlo: int | None = None
    nhi: int | None = None
    empty: bool = False

    def meet(self, o: _Lin) -> _Lin:
        c = _Lin(_opt(max, self.dlo, o.dlo), _opt(min, self.dhi, o.dhi),
                 _opt(max, self.mlo, o.mlo), _opt(min, self.mhi, o.mhi),
                 _opt(max, self.nlo, o.nlo), _opt(min, self.nhi, o.nhi), self.empty or o.empty)
        bad = any(lo is not None and hi is not None and lo > hi
                  for lo, hi in ((c.dlo, c.dhi), (c.mlo, c.mhi), (c.nlo, c.nhi)))
        return _Lin(empty=True) if bad or c.empty else c


Linear = dict[str, int]  # coefficients of m, n and the constant ""


def _linear(e: Expr) -> Linear | None:
    """e as an integer linear form a*m + b*n + c, or None."""
    op = e.op
    if op is Op.CONST:
        return {"": e.arg} if _const(e) is not None else None
    if op is Op.INDEX:
        return {e.arg: 1} if e.arg in ("m", "n") else None
    if op is Op.CAST and e.arg == INT:
        return _linear(e.src[0])
    if op is Op.NEG:
        x = _linear(e.src[0])
        return None if x is None else _scale(x, -1)
    if op in (Op.ADD, Op.SUB):
        x, y = _linear(e.src[0]), _linear(e.src[1])
        if x is None or y is None:
            return None
        return _plus(x, y if op is Op.ADD else _scale(y, -1))
    if op is Op.MUL:
        x, y = _linear(e.src[0]), _linear(e.src[1])
        if x is None or y is None:
            return None
        if set(y) <= {""}:
            return _scale(x, y.get("", 0))
        if set(x) <= {""}:
            return _scale(y, x.get("", 0))
    return None


def _scale(x: Linear, k: int) -> Linear:
    return {v: c * k for v, c in x.items()}


def _plus(x: Linear, y: Linear) -> Linear:
    return {v: x.get(v, 0) + y.get(v, 0) for v in set(x) | set(y)}


def _ceil_div(p: int, q: int) -> int:
    return -((-p) // q)


def _nonneg(x: Linear) -> _Lin | None:
    """The constraint a*m + b*n + c >= 0 when it bounds m, n or m - n alone, else None."""
    a, b, c = x.get("m", 0), x.get("n", 0), x.get("", 0)
    if a == 0 and b == 0:
        return _Lin() if c >= 0 else _Lin(empty=True)
    if b == 0:
        return _Lin(mlo=_ceil_div(-c, a)) if a > 0 else _Lin(mhi=c // -a)
    if a == 0:
        return _Lin(nlo=_ceil_div(-c, b)) if b > 0 else _Lin(nhi=c // -b)
    if a == -b:
        return _Lin(dlo=_ceil_div(-c, a)) if a > 0 else _Lin(dhi=c // -a)
    return None


def _compare(op: Op, x: Linear, y: Linear) -> _Lin | None:
    """x op y for linear forms, as constraints (x < y is y - x - 1 >= 0 over the integers)."""
    d = _plus(x, _scale(y, -1))  # x - y
    if op is Op.EQ:
        p, q = _nonneg(d), _nonneg(_scale(d, -1))
        return None if p is None or q is None else p.meet(q)
    forms = {Op.LT: _plus(_scale(d, -1), {"": -1}), Op.LE: _scale(d, -1),
             Op.GT: _plus(d, {"": -1}), Op.GE: d}
    return _nonneg(forms[op]) if op in forms else None


_FLIP = {Op.LT: Op.GT, Op.GT: Op.LT, Op.LE: Op.GE, Op.GE: Op.LE, Op.EQ: Op.EQ, Op.NE: Op.NE}
_NEGATE = {Op.LT: Op.GE, Op.GE: Op.LT, Op.LE: Op.GT, Op.GT: Op.LE, Op.EQ: Op.NE, Op.NE: Op.EQ}


def _lin_of(e: Expr) -> _Lin | None:
    """A conjunction of linear constraints equivalent to e, or None."""
    op = e.op
    if op is Op.CONST and e.dtype == BOOL:
        return _Lin() if e.arg else _Lin(empty=True)
    if op is Op.AND and e.dtype == BOOL:
        x, y = _lin_of(e.src[0]), _lin_of(e.src[1])
        return None if x is None or y is None else x.meet(y)
    if op is Op.NOT:
        inner = e.src[0]
        if inner.op in _NEGATE:
            return _lin_of(E.binary(_NEGATE[inner.op], *inner.src))
        if inner.op is Op.NOT:
            return _lin_of(inner.src[0])
        return None
    if op not in _FLIP:
        return None
    a, b = e.src
    if op in (Op.GT, Op.GE):
        a, b, op = b, a, _FLIP[op]
    if op in (Op.LT, Op.LE) and a.op is Op.ABS:  # |x| <= y  <=>  x <= y & -x <= y
        x, y = _linear(a.src[0]), _linear(b)
        if x is None or y is None:
            return None
        p, q = _compare(op, x, y), _compare(op, _scale(x, -1), y)
        return None if p is None or q is None else p.meet(q)
    x, y = _linear(a), _linear(b)
    return None if x is None or y is None else _compare(op, x, y)


@dataclass(frozen=True)
class _Band:
    """Keys allowed for query row m: lo(m) <= n <= hi(m) (None: no bound), for rows in
    [row_lo, row_hi].  lo and hi are non-decreasing in m, lo(m) <= hi(m) on those rows and
    lo(m + 1) <= hi(m) + 1, so the keys allowed for a run of rows form one interval."""

    lo: Callable[[Expr], Expr] | None
    hi: Callable[[Expr], Expr] | None
    row_lo: int | None = None
    row_hi: int | None = None
    empty: bool = False


def _band_of_lin(c: _Lin) -> _Band:
    """lo(m) = max(m - dhi, nlo), hi(m) = min(m - dlo, nhi); rows where lo <= hi are
    [nlo + dlo, nhi + dhi] (and [mlo, mhi])."""
    if c.empty:
        return _Band(None, None, empty=True)
    dlo, dhi, nlo, nhi = c.dlo, c.dhi, c.nlo, c.nhi

    def lo(m: Expr) -> Expr:
        parts = ([_sub(m, dhi)] if dhi is not None else []) + \
            ([_c(nlo)] if nlo is not None else [])
        return parts[0] if len(parts) == 1 else _max(*parts)

    def hi(m: Expr) -> Expr:
        parts = ([_sub(m, dlo)] if dlo is not None else []) + \
            ([_c(nhi)] if nhi is not None else [])
        return parts[0] if len(parts) == 1 else _min(*parts)

    row_lo = _opt(max, c.mlo, nlo + dlo if nlo is not None and dlo is not None else None)
    row_hi = _opt(min, c.mhi, nhi + dhi if nhi is not None and dhi is not None else None)
    has_lo, has_hi = dhi is not None or nlo is not None, dlo is not None or nhi is not None
    return _Band(lo if has_lo else None, hi if has_hi else None, row_lo, row_hi)


def _chunk_side(e: Expr) -> tuple[str, int] | None:
    if e.op is Op.FLOORDIV and e.src[0].op is Op.INDEX and e.src[0].arg in ("m", "n"):
        c = _const(e.src[1])
        if c is not None and c > 0:
            return e.src[0].arg, c
    return None


def _band_of_chunk(e: Expr) -> _Band | None:
    """m // C  op  n // C with k(m) = (m // C) * C: == gives [k(m), k(m) + C - 1];
    >= gives n <= k(m) + C - 1; > gives n <= k(m) - 1; <= gives n >= k(m); < gives
    n >= k(m) + C."""
    if e.op not in _FLIP or e.op is Op.NE:
        return None
    a, b, op = _chunk_side(e.src[0]), _chunk_side(e.src[1]), e.op
    if a is None or b is None or a[1] != b[1] or a[0] == b[0]:
        return None
    if a[0] == "n":
        op = _FLIP[op]
    C = a[1]

    def k(m: Expr, off: int) -> Expr:
        return _add(_mul(_fdiv(m, C), C), off)

    lo_off = {Op.EQ: 0, Op.LE: 0, Op.LT: C}.get(op)
    hi_off = {Op.EQ: C - 1, Op.GE: C - 1, Op.GT: -1}.get(op)
    return _Band(None if lo_off is None else (lambda m: k(m, lo_off)),
                 None if hi_off is None else (lambda m: k(m, hi_off)))


def _band_of(e: Expr) -> _Band | None:
    lin = _lin_of(e)
    return _band_of_lin(lin) if lin is not None else _band_of_chunk(e)


def _or_parts(e: Expr) -> list[Expr]:
    if e.op is Op.OR and e.dtype == BOOL:
        return _or_parts(e.src[0]) + _or_parts(e.src[1])
    return [e]


_MAX_PARTS = 8


def _disjuncts(e: Expr) -> list[Expr]:
    """e as an | of parts, & distributed over | ((a | b) & c = a & c | b & c: sinks or a
    window, all causal), at most _MAX_PARTS of them."""
    if e.op is Op.OR and e.dtype == BOOL:
        return _disjuncts(e.src[0]) + _disjuncts(e.src[1])
    if e.op is Op.AND and e.dtype == BOOL:
        left, right = _disjuncts(e.src[0]), _disjuncts(e.src[1])
        if len(left) * len(right) <= _MAX_PARTS:
            return [E.binary(Op.AND, a, b) for a in left for b in right]
    return [e]


def _bands(mask: Expr) -> list[_Band | None]:
    """The bands of the parts of an | (distributing & over | when the parts as written are
    not all bands)."""
    bands = [_band_of(p) for p in _or_parts(mask)]
    if any(b is None for b in bands):
        parts = _disjuncts(mask)
        if len(parts) > 1:
            return [_band_of(p) for p in parts]
    return bands


_Four = tuple[Expr, Expr, Expr, Expr]


def _band_bounds(band: _Band, BM: int, BN: int, torch_boundary: bool) -> _Four:
    """Closed forms for one band.  Rows of tile qt: [m0, m1], m0 = qt*BM,
    m1 = min(m0 + BM, M) - 1, narrowed to the band's rows [a, b].  The keys allowed for them
    are [max(lo(a), 0), min(hi(b), N - 1)] (one interval, see _Band), so the non-empty kv tiles
    are [that lo // BN, that hi // BN + 1).  A kv tile [n0, n1] is full iff n0 >= lo(m1) and
    n1 <= hi(m0) (lo, hi monotone) and every row is a band row: n0 >= lo(m1) gives
    kt >= ceil(lo(m1) / BN); n1 = min(n0 + BN, N) - 1 <= X = hi(m0) holds for every tile when
    X >= N - 1, else for kt < (X + 1) // BN."""
    zero = _c(0)
    if band.empty:
        return zero, zero, zero, zero
    qt, M, N = E.index("qt"), E.param("M", INT), E.param("N", INT)
    m0 = _mul(qt, BM)
    m1 = _sub(_min(_add(m0, BM), M), 1)
    a = m0 if band.row_lo is None else _max(m0, _c(band.row_lo))
    b = m1 if band.row_hi is None else _min(m1, _c(band.row_hi))
    first = zero if band.lo is None else _max(band.lo(a), zero)
    last = _sub(N, 1) if band.hi is None else _min(band.hi(b), _sub(N, 1))
    rows = None if band.row_lo is None and band.row_hi is None else _le(a, b)
    nonempty = _and(rows, _le(first, last))
    lo = _if(nonempty, _fdiv(first, BN), zero)
    hi = _if(nonempty, _add(_fdiv(last, BN), 1), zero)
    nk = _fdiv(_add(N, BN - 1), BN)
    y = zero if band.lo is None else _max(band.lo(m1), zero)
    raw_lo = _fdiv(_add(y, BN - 1), BN)
    if band.hi is None:
        upper = nk
    else:
        x = band.hi(m0)
        upper = _if(_le(_sub(N, 1), x), nk, _fdiv(_add(x, 1), BN))
    rows_ok = None
    if band.row_lo is not None:
        rows_ok = _le(_c(band.row_lo), m0)
    if band.row_hi is not None:
        rows_ok = _and(rows_ok, _le(m1, _c(band.row_hi)))
    if torch_boundary:
        upper = _min(upper, _fdiv(N, BN))
        rows_ok = _and(rows_ok, _le(_add(m0, BM), M))
    full_lo = _min(_max(raw_lo, lo), hi)
    full_hi = _if(rows_ok, _max(_min(upper, hi), full_lo), full_lo)
    return lo, hi, full_lo, full_hi


def _positions_only(mask: Expr) -> bool:
    """The mask reads only m and n and constants: closed forms may exist."""
    return not mask.free_indices() - {"m", "n"} and \
        not any(x.op in (Op.PARAM, Op.LOAD) for x in mask.walk())


def _conjuncts(e: Expr) -> list[Expr]:
    if e.op is Op.AND and e.dtype == BOOL:
        return _conjuncts(e.src[0]) + _conjuncts(e.src[1])
    return [e]


def _diagonal_chunk_and_lin(e: Expr) -> tuple[_Band, _Band] | None:
    """e = (one chunk comparison m // C op n // C) & (linear constraints on m - n only), both
    allowing the diagonal n = m (op one of ==, <=, >=; dlo <= 0 <= dhi): chunked causal,
    a sliding window inside chunks, ...  Returns the two bands, or None."""
    parts = _conjuncts(e)
    chunks = [p for p in parts if _band_of_chunk(p) is not None and _lin_of(p) is None]
    if len(chunks) != 1 or chunks[0].op not in (Op.EQ, Op.LE, Op.GE):
        return None
    lin = _Lin()
    for p in parts:
        if p is not chunks[0]:
            c = _lin_of(p)
            if c is None:
                return None
            lin = lin.meet(c)
    if lin.empty or any(v is not None for v in (lin.mlo, lin.mhi, lin.nlo, lin.nhi)) or \
            (lin.dlo is not None and lin.dlo > 0) or (lin.dhi is not None and lin.dhi < 0):
        return None
    chunk = _band_of_chunk(chunks[0])
    assert chunk is not None
    return chunk, _band_of_lin(lin)


def _meet(a: _Four, b: _Four) -> _Four:
    """Tile bounds of the intersection of two bands that both allow the diagonal n = m.  Each
    row's keys are then an interval holding m, so a tile's rows allow one interval of keys from
    the first row's lower end to the last row's upper end: the non-empty tiles are the meet of
    the two ranges.  A tile is full for both bands iff it is full for their intersection, so
    the full tiles are the meet of the two full ranges."""
    zero = _c(0)
    lo, hi = _max(a[0], b[0]), _min(a[1], b[1])
    nonempty = _le(_add(lo, 1), hi)
    lo, hi = _if(nonempty, lo, zero), _if(nonempty, hi, zero)
    full_lo = _min(_max(_max(a[2], b[2]), lo), hi)
    full_hi = _max(_min(_min(a[3], b[3]), hi), full_lo)
    return lo, hi, full_lo, full_hi


def kv_tile_bounds(mask: Expr, BLOCK_M: int, BLOCK_N: int, *,
                   torch_boundary: bool = False) -> KVBounds | None:
    """Closed forms of the non-empty and full kv tile ranges of each query tile, or None.

    Recognised: conjunctions (&, ~ of comparisons, abs(x) <= y) of linear constraints that
    bound m - n, m or n alone (causal, bottom-right causal ``n <= m + c``, sliding windows one-
    or two-sided, causal & window, ...); one chunk comparison ``m // C  op  n // C`` (chunked
    local attention, block-causal); and | of such parts that all leave n unbounded below
    (prefix-LM ``n < P | causal``: the union of ranges that all start at tile 0 is the range
    up to the largest end, and a tile that the union fills is filled by one part, because
    each part is closed under decreasing n); and a chunk comparison & linear constraints on
    m - n when both allow the diagonal (chunked causal, windows inside chunks: see _meet).
    Masks using b, h or captured data give None.
    """
    BM, BN = _positive("BLOCK_M", BLOCK_M), _positive("BLOCK_N", BLOCK_N)
    check_mask(mask, None)
    if not _positions_only(mask):
        return None
    bands = _bands(mask)
    if len(bands) == 1 and bands[0] is None:
        pair = _diagonal_chunk_and_lin(mask)
        if pair is None:
            return None
        four = _meet(*(_band_bounds(b, BM, BN, torch_boundary) for b in pair))
        return KVBounds(*four, BM, BN, torch_boundary)
    if any(b is None for b in bands):
        return None
    if len(bands) == 1:
        return KVBounds(*_band_bounds(bands[0], BM, BN, torch_boundary), BM, BN, torch_boundary)
    if any(b.lo is not None for b in bands if not b.empty):
        return None
    return KVBounds(*_prefix_union(bands, BM, BN, torch_boundary), BM, BN, torch_boundary)


def _prefix_union(bands: list[_Band], BM: int, BN: int, torch_boundary: bool) -> _Four:
    """Bounds of the union of bands that are all unbounded below (see kv_tile_bounds)."""
    parts = [_band_bounds(b, BM, BN, torch_boundary) for b in bands]
    hi, full_hi = parts[0][1], parts[0][3]
    for p in parts[1:]:
        hi, full_hi = _max(hi, p[1]), _max(full_hi, p[3])
    return _c(0), hi, _c(0), full_hi


def kv_tile_segments(mask: Expr, BLOCK_M: int, BLOCK_N: int, *,
                     torch_boundary: bool = False) -> list[KVBounds] | None:
    """Closed-form key-tile segments of each query tile: disjoint, in increasing order, and
    together exactly its non-empty tiles; each segment's [full_lo, full_hi) tiles are full.

    One segment is :func:`kv_tile_bounds` (exact).  Two: an | whose parts are all unbounded
    below but one (sinks ``n < S``, a prefix: their union is the first segment, from tile 0)
    and one band (a window, causal ...), clipped to start where the first segment ends.  A
    tile of the first segment that is partial for its parts but filled by the band is then
    treated as partial (masked, still correct): with two segments full tiles may be missed,
    never invented.  None when neither applies."""
    single = kv_tile_bounds(mask, BLOCK_M, BLOCK_N, torch_boundary=torch_boundary)
    if single is not None:
        return [single]
    if not _positions_only(mask):
        return None
    BM, BN = BLOCK_M, BLOCK_N
    bands = _bands(mask)
    if len(bands) < 2 or any(b is None for b in bands):
        return None
    bounded = [i for i, b in enumerate(bands) if not b.empty and b.lo is not None]
    if len(bounded) != 1:
        return None
    head = _prefix_union([b for i, b in enumerate(bands) if i != bounded[0]], BM, BN,
                         torch_boundary)
    lo, hi, full_lo, full_hi = _band_bounds(bands[bounded[0]], BM, BN, torch_boundary)
    lo = _max(lo, head[1])
    hi = _max(hi, lo)
    full_lo = _min(_max(full_lo, lo), hi)
    full_hi = _max(_min(full_hi, hi), full_lo)
    return [KVBounds(*head, BM, BN, torch_boundary),
            KVBounds(lo, hi, full_lo, full_hi, BM, BN, torch_boundary)]


__all__ = ["CHUNKED", "CLOSED_FORM", "EMPTY", "FULL", "MAX_SEGMENTS", "PARTIAL", "SUMMARIES",
           "BlockTables", "Boxes", "Geometry", "IntervalEvaluator", "Iv", "KVBounds",
           "MaskAnalysisError", "RangeTable", "TileMap", "check_mask", "classify_tiles",
           "dense_to_ordered", "exact_classes", "kv_tile_bounds", "kv_tile_segments"]
