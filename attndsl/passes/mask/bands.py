"""Bands: masks whose rows allow one interval of keys, recognised from the expression.

A conjunction of linear constraints on m and n (``_Lin``) that each bound m - n, m or n alone
(causal ``n <= m``, bottom-right causal ``n <= m + c``, sliding windows ``|m - n| <= W``,
``m >= P`` ...) allows, for query row m, the keys lo(m) <= n <= hi(m) with
lo(m) = max(m - dhi, nlo), hi(m) = min(m - dlo, nhi); a chunk comparison ``m // C  op  n // C``
allows an interval of keys per row as well (``_band_of_chunk``).  Both are bands (``_Band``):
lo and hi are non-decreasing in m, so the keys of a run of rows form one interval, which is
what makes closed-form tile bounds possible (:mod:`~attndsl.passes.mask.closed_form`).
Comparisons are read over the integers (x < y is y - x - 1 >= 0); ~ flips a comparison, and
& is distributed over | (at most _MAX_PARTS parts) to find the bands of a union.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from attndsl.ir import expr as E
from attndsl.ir.expr import BOOL, INT, Expr, Op
from attndsl.passes.mask.symbolic import _add, _c, _const, _fdiv, _max, _min, _mul, _opt, _sub


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
    if e.op is Op.CONST:
        return {"": e.arg} if _const(e) is not None else None
    if e.op is Op.INDEX:
        return {e.arg: 1} if e.arg in ("m", "n") else None
    rule = _LINEAR.get(e.op)
    forms = None if rule is None else [_linear(s) for s in e.src]
    return None if forms is None or None in forms else rule(e, forms)


def _product(x: Linear, y: Linear) -> Linear | None:
    """x * y is linear when one factor is a constant."""
    if set(y) <= {""}:
        return _scale(x, y.get("", 0))
    if set(x) <= {""}:
        return _scale(y, x.get("", 0))
    return None


def _scale(x: Linear, k: int) -> Linear:
    return {v: c * k for v, c in x.items()}


def _plus(x: Linear, y: Linear) -> Linear:
    return {v: x.get(v, 0) + y.get(v, 0) for v in set(x) | set(y)}


# the linear form of a node from the forms of its operands (all linear), one rule per Op
_LINEAR: dict[Op, Callable[[Expr, list[Linear]], Linear | None]] = {
    Op.NEG: lambda e, f: _scale(f[0], -1),  # -x
    Op.ADD: lambda e, f: _plus(f[0], f[1]),  # x + y
    Op.SUB: lambda e, f: _plus(f[0], _scale(f[1], -1)),  # x - y
    Op.MUL: lambda e, f: _product(f[0], f[1]),  # c * x, x * c
    Op.CAST: lambda e, f: f[0] if e.arg == INT else None,  # int(x) of an integer form is x
}


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
    lo(m + 1) <= hi(m) + 1, so the keys allowed for a run of rows form one interval.  ``width``:
    at most that many keys a row (dhi - dlo + 1 of dlo <= m - n <= dhi), when known."""

    lo: Callable[[Expr], Expr] | None
    hi: Callable[[Expr], Expr] | None
    row_lo: int | None = None
    row_hi: int | None = None
    empty: bool = False
    width: int | None = None


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
    width = dhi - dlo + 1 if dlo is not None and dhi is not None else None
    return _Band(lo if has_lo else None, hi if has_hi else None, row_lo, row_hi, width=width)


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


def _conjuncts(e: Expr) -> list[Expr]:
    if e.op is Op.AND and e.dtype == BOOL:
        return _conjuncts(e.src[0]) + _conjuncts(e.src[1])
    return [e]
