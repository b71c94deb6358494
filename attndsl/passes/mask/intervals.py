"""Interval arithmetic over boxes: the bound of every Op, one rule per line in ``_RULES``.

An :class:`Iv` holds bounds ``lo <= value <= hi`` of an expression over each box of a batch
(broadcast float64 tensors).  Each rule maps the bounds of the operands to bounds of the
result and is *sound*: whatever the operands' values inside their bounds, the result's value
lies inside its bound.  Integers are exact in float64 below 2**53; ``-inf`` / ``inf`` stand
for "unbounded", and a NaN bound (inf - inf, log of a negative, NaN data) makes the value
unknown, (-inf, inf).

Booleans are three-valued: a boolean is *always* true when ``lo == 1``, *never* when
``hi == 0``, else *maybe* (kept as bool tensors, ``lo = always``, ``hi = not never``).  An
unknown operand never proves "always" (it may be NaN, which compares false).  A rule is exact
where all its operands are single points, so a degenerate box (one point) evaluates exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from attndsl.ir.expr import BOOL, INT, Expr, Op

Tensor = torch.Tensor
_F64 = torch.float64
_INF = math.inf


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




def _r_abs(node: Expr | None, a: Iv) -> Iv:
    """|x|: [lo, hi] when lo >= 0, [-hi, -lo] when hi <= 0, else [0, max(-lo, hi)]."""
    lo = _where(a.lo >= 0, a.lo, _where(a.hi <= 0, -a.hi, 0.0))
    return Iv(lo, torch.maximum(a.lo.abs(), a.hi.abs()))






def _corners(fn: Callable[[Tensor, Tensor], Tensor], a: Iv, b: Iv) -> Iv:
    """[min, max] of fn over the four corners (x, y) in {lo_x, hi_x} x {lo_y, hi_y}."""
    vals = torch.stack(torch.broadcast_tensors(*(fn(x, y) for x in a for y in b)))
    return Iv(vals.amin(0), vals.amax(0))


def _times(x: Tensor, y: Tensor) -> Tensor:
    """x * y with 0 * inf = 0 (an unbounded factor times an exact 0 is 0)."""
    return torch.nan_to_num(x * y, nan=0.0, posinf=_INF, neginf=-_INF)




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






def _r_pow(node: Expr, a: Iv, b: Iv) -> Iv:
    """x ** y: exact at points; y a constant integer k >= 0: |x| ** k bounds (k even) or
    [lo ** k, hi ** k] (k odd, monotone); x > 0 and y constant: monotone in x; else unknown.
    Integers to a negative power are torch's integer pow: 1 for x = 1, (-1) ** k for x = -1,
    else 0 (so within [-1, 1]), not the float x ** k."""
    if node.dtype == INT:
        negative = _r_int_pow_negative(a, b)
        return Iv(*(_where(b.hi < 0, n, x) for n, x in zip(negative, _r_pow_real(a, b))))
    return _r_pow_real(a, b)


def _r_int_pow_negative(a: Iv, b: Iv) -> Iv:
    """x ** k of integers for k < 0: within [-1, 1], exact at points."""
    x, k = a.lo, b.lo
    value = _where(x == 1, 1.0, _where(x == -1, 1.0 - 2.0 * torch.remainder(k, 2), 0.0))
    point = _is_point(a) & _is_point(b)
    return Iv(_where(point, value, -1.0), _where(point, value, 1.0))


def _r_pow_real(a: Iv, b: Iv) -> Iv:
    """x ** y over the reals (see :func:`_r_pow`)."""
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


# integer ops whose int64 result wraps (torch's integer arithmetic) where the real one leaves
# [-2**63, 2**63): a bound past it is no bound of the wrapped value (see no_wrap)
_WRAPS = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.POW, Op.NEG, Op.ABS, Op.FLOORDIV})
_I64_LO, _I64_END = -2.0 ** 63, 2.0 ** 63


def no_wrap(node: Expr, v: Iv) -> Iv:
    """``v``, the real-arithmetic bound of ``node``, where it is inside int64; unknown
    (-inf, inf) on the boxes where an integer op's bound leaves int64 (``(m + 1) ** 70`` is 0
    for m = 1 in int64, outside the real bound [1, 2**70]), infinite bounds included (an
    overflow to inf in float64)."""
    if node.dtype != INT or node.op not in _WRAPS:
        return v
    out = (v.lo < _I64_LO) | (v.hi >= _I64_END)
    if not bool(out.any()):
        return v
    return Iv(_where(out, -_INF, v.lo), _where(out, _INF, v.hi))


# rules that take boolean intervals (bool tensors) as they are; the others get float64
_LOGICAL = frozenset({Op.AND, Op.OR, Op.NOT, Op.WHERE, Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT,
                      Op.GE, Op.XOR})

# one rule per Op: rule(node, *operand intervals) -> the interval of the node over each box
_RULES: dict[Op, Callable[..., Iv]] = {
    Op.NEG: lambda node, a: Iv(-a.hi, -a.lo),  # -x: [-hi, -lo]
    Op.ABS: _r_abs,  # [lo, hi] if lo >= 0, [-hi, -lo] if hi <= 0, else [0, max(-lo, hi)]
    Op.ADD: lambda node, a, b: _clean(a.lo + b.lo, a.hi + b.hi),  # [lo_x + lo_y, hi_x + hi_y]
    Op.SUB: lambda node, a, b: _clean(a.lo - b.hi, a.hi - b.lo),  # [lo_x - hi_y, hi_x - lo_y]
    Op.MUL: lambda node, a, b: _corners(_times, a, b),  # bilinear: extremes at corners
    Op.DIV: _r_div,  # corners when y keeps one sign, else unbounded; points exact
    Op.TRUEDIV: _r_truediv,  # as DIV, but a point 0 / 0 is NaN (unknown)
    Op.FLOORDIV: _r_floordiv,  # floor of the corners when y keeps one sign
    Op.MOD: _r_mod,  # [lo % c, hi % c] inside one period, else [0, hi_y - 1] (y > 0)
    Op.MAX: lambda node, a, b: Iv(torch.maximum(a.lo, b.lo), torch.maximum(a.hi, b.hi)),
    Op.MIN: lambda node, a, b: Iv(torch.minimum(a.lo, b.lo), torch.minimum(a.hi, b.hi)),
    Op.POW: _r_pow,  # |x| ** k (k even), monotone (k odd, or x > 0), exact at points
    Op.EXP: _monotone(torch.exp),  # increasing f: [f(lo), f(hi)]
    Op.EXP2: _monotone(torch.exp2),
    Op.LOG: _monotone(torch.log),  # log of a negative is NaN: unknown
    Op.LOG2: _monotone(torch.log2),
    Op.TANH: _monotone(torch.tanh),
    Op.SIGMOID: _monotone(torch.sigmoid),
    Op.SQRT: _monotone(torch.sqrt),
    Op.LT: _r_lt,  # always when hi_x < lo_y, never when lo_x >= hi_y
    Op.LE: _r_le,  # always when hi_x <= lo_y, never when lo_x > hi_y
    Op.GT: lambda node, a, b: _r_lt(node, b, a),  # x > y is y < x
    Op.GE: lambda node, a, b: _r_le(node, b, a),  # x >= y is y <= x
    Op.EQ: _r_eq,  # always when one same point, never when disjoint
    Op.NE: _r_ne,  # the negation of ==
    Op.AND: _r_and,  # booleans: [min(lo), min(hi)]; integers: bitwise bounds
    Op.OR: _r_or,  # booleans: [max(lo), max(hi)]; integers: bitwise bounds
    Op.XOR: _r_xor,  # booleans: known when both are; integers: within the bit width
    Op.INVERT: _r_invert,  # ~x = -x - 1: [-hi - 1, -lo - 1]
    Op.LSHIFT: _r_shift,  # exact at points, else unknown
    Op.RSHIFT: _r_shift,
    Op.ROUND: _r_round,  # rounding to a 16-bit format is monotone
    Op.NOT: _r_not,  # always when p is the point 0, never when 0 is outside [lo, hi]
    Op.CAST: _r_cast,  # bool(x) is x != 0, int(x) truncates (monotone), float(x) is x
    Op.WHERE: _r_where,  # the chosen branch when p is decided, else the hull of both
}
