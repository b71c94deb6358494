"""Integer expressions over qt, M and N, folded as they are built: the closed forms' algebra.

The closed-form tile bounds are expressions over INDEX ``qt`` (the query tile), PARAM ``M``
(= Lq) and PARAM ``N`` (= Lkv), which a kernel computes per query tile.  The builders here
fold constants (``_add(x, 0)`` is x, ``_mul(c1, c2)`` is c1 * c2) and drop a max / min /
comparison that a lower bound already decides, using qt >= 0, M >= 1, N >= 1 (``_lower``):
``max(qt * 128, 0)`` is ``qt * 128``.  None stands for "no condition" (a constant truth).
"""

from __future__ import annotations

from collections.abc import Callable

from attndsl.ir import expr as E
from attndsl.ir.expr import Expr, Op


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
