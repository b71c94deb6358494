"""Static bounds of float expressions as a kernel computes them (fp32): whether a score can
be -inf.

A stabilising max ``m = max(m, rowmax(score))`` is guarded in the kernel (``m_safe = 0 where
m == -inf``) because a row whose scores are all -inf (masked, or -inf by the score itself)
must give ``exp(score - m_safe) = 0``, not ``exp(-inf + inf) = nan``.  On a tile whose every
score is a value of an expression bounded below (``cap * tanh(qk / cap)`` lies in
``[-cap, cap]`` whatever ``qk`` is, infinite inputs included), the max is finite and the guard
is the identity.

``float_ranges`` bounds every node in interval arithmetic over the extended reals, in float64:
leaves whose value a launch decides (dot products and other rows, float parameters and
tensor reads) are ``[-inf, inf]``; integer and boolean nodes take their
:mod:`attndsl.passes.int_range` interval.  NaN is no value of an interval (it propagates
whatever the guard does).  A bound past ``FINITE`` counts as infinite: the kernel rounds to
fp32 (largest ~3.4e38), where a large finite bound may overflow.  Any operation without a
rule here is ``[-inf, inf]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from attndsl.ir.expr import BOOL, INT, Expr, Op
from attndsl.passes.int_range import int_ranges

Bounds = tuple[float, float]
INF = math.inf
UNKNOWN: Bounds = (-INF, INF)
FINITE = 1e38  # below fp32's largest value, with room for rounding
FP16_MAX = 65504.0  # rounding to float16 overflows past it


def _clean(lo: float, hi: float) -> Bounds:
    """``[lo, hi]`` with NaN bounds and bounds past FINITE widened to infinity."""
    lo = -INF if math.isnan(lo) or lo < -FINITE else lo
    hi = INF if math.isnan(hi) or hi > FINITE else hi
    return (lo, hi)


def _mul(a: float, b: float) -> float:
    """a * b at interval corners: 0 * inf is 0 (the products near that corner are finite)."""
    return 0.0 if a == 0 or b == 0 else a * b


def _corners(fn: Callable[[float, float], float], a: Bounds, b: Bounds) -> Bounds:
    vals = [fn(x, y) for x in a for y in b]
    return UNKNOWN if any(math.isnan(v) for v in vals) else _clean(min(vals), max(vals))


def _exp(x: float, base: float) -> float:
    """base ** x, +inf on overflow."""
    try:
        return math.exp(x * math.log(base)) if math.isfinite(x) else (0.0 if x < 0 else INF)
    except OverflowError:
        return INF


def _log(x: float, base: float) -> float:
    """log_base(x) for x >= 0 (log 0 = -inf; negatives give NaN, which is no value)."""
    if x <= 0:
        return -INF
    return INF if x == INF else math.log(x) / math.log(base)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + _exp(-x, math.e))


def _divide(a: Bounds, b: Bounds) -> Bounds:
    """a / b when b excludes 0 (then a / b is monotone in each operand on the box)."""
    if b[0] <= 0 <= b[1]:
        return UNKNOWN
    return _corners(lambda x, y: x / y if math.isfinite(y) else
                    (0.0 if math.isfinite(x) else math.nan), a, b)


def _abs(a: Bounds) -> Bounds:
    lo, hi = a
    if lo >= 0:
        return a
    if hi <= 0:
        return (-hi, -lo)
    return (0.0, max(-lo, hi))


def _round(fmt: str, a: Bounds) -> Bounds:
    """Rounding to a 16-bit format: float16 overflows past 65504 (bfloat16 has fp32's range)."""
    if fmt != "float16":
        return a
    return (a[0] if a[0] >= -FP16_MAX else -INF, a[1] if a[1] <= FP16_MAX else INF)


def _rule(e: Expr, s: list[Bounds]) -> Bounds:
    op = e.op
    if op is Op.NEG:
        return (-s[0][1], -s[0][0])
    if op is Op.ADD:
        return _clean(s[0][0] + s[1][0], s[0][1] + s[1][1])
    if op is Op.SUB:
        return _clean(s[0][0] - s[1][1], s[0][1] - s[1][0])
    if op is Op.MUL:
        return _corners(_mul, s[0], s[1])
    if op in (Op.TRUEDIV, Op.DIV):  # DIV's 0 / 0 = 0 needs a divisor that can be 0
        return _divide(s[0], s[1])
    if op in (Op.EXP, Op.EXP2):
        base = math.e if op is Op.EXP else 2.0
        return _clean(_exp(s[0][0], base), _exp(s[0][1], base))
    if op in (Op.LOG, Op.LOG2):
        base = math.e if op is Op.LOG else 2.0
        return _clean(_log(s[0][0], base), _log(s[0][1], base))
    if op is Op.TANH:
        return (math.tanh(s[0][0]), math.tanh(s[0][1]))
    if op is Op.SIGMOID:
        return (_sigmoid(s[0][0]), _sigmoid(s[0][1]))
    if op is Op.SQRT:
        return (math.sqrt(max(s[0][0], 0.0)), math.sqrt(max(s[0][1], 0.0)))
    if op is Op.ABS:
        return _abs(s[0])
    if op in (Op.MAX, Op.MIN):
        f = max if op is Op.MAX else min
        return (f(s[0][0], s[1][0]), f(s[0][1], s[1][1]))
    if op is Op.WHERE:
        return (min(s[1][0], s[2][0]), max(s[1][1], s[2][1]))
    if op is Op.CAST:
        return s[0]
    if op is Op.ROUND:
        return _round(e.arg, s[0])
    return UNKNOWN  # POW, float // and %, reductions, ...


def float_ranges(e: Expr) -> dict[Expr, Bounds]:
    """Bounds of every node of ``e`` (integers and booleans from their integer ranges)."""
    ints = int_ranges(e)
    out: dict[Expr, Bounds] = {}
    for node in e.walk():
        if node.dtype in (INT, BOOL):
            lo, hi = ints.get(node, (-(2**63), 2**63 - 1))
            out[node] = (float(lo), float(hi))
        elif node.op is Op.CONST:
            v = float(node.arg)
            out[node] = UNKNOWN if math.isnan(v) else _clean(v, v)
        elif node.op in (Op.INDEX, Op.PARAM, Op.LOAD, Op.ROW) or not node.src:
            out[node] = UNKNOWN
        else:
            out[node] = _rule(node, [out[x] for x in node.src])
    return out


def bounded_below(e: Expr) -> bool:
    """Whether ``e`` is never -inf (NaN aside), whatever the rows, parameters and reads."""
    return float_ranges(e)[e][0] > -INF
