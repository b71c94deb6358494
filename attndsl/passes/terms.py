"""Cascade-term helpers shared by the passes: flatten sums and products, and rebuild them.

``a - b + c`` is the signed terms ``[(a, +1), (b, -1), (c, +1)]``; ``a * b / c`` is the factors
``[(a, +1), (b, +1), (c, -1)]``.  Rebuilding keeps the order, so ``sum_terms(terms(e))`` and
``product(factors(e))`` give back an expression equal in value to ``e``.
"""

from __future__ import annotations

from attndsl.ir import expr as E
from attndsl.ir.expr import Expr, Op


def terms(e: Expr) -> list[tuple[Expr, int]]:
    """Flatten a +/- tree into signed terms."""
    if e.op is Op.ADD:
        return terms(e.src[0]) + terms(e.src[1])
    if e.op is Op.SUB:
        return terms(e.src[0]) + [(t, -s) for t, s in terms(e.src[1])]
    if e.op is Op.NEG:
        return [(t, -s) for t, s in terms(e.src[0])]
    return [(e, 1)]


def sum_terms(signed: list[tuple[Expr, int]]) -> Expr:
    """The sum of signed terms, left to right (0.0 when there are none)."""
    out: Expr | None = None
    for t, s in signed:
        if out is None:
            out = t if s > 0 else -t
        else:
            out = out + t if s > 0 else out - t
    return out if out is not None else E.const(0.0)


def factors(e: Expr) -> list[tuple[Expr, int]]:
    """Flatten a * and / tree into (factor, +1 | -1)."""
    if e.op is Op.MUL:
        return factors(e.src[0]) + factors(e.src[1])
    if e.op is Op.DIV:
        return factors(e.src[0]) + [(f, -p) for f, p in factors(e.src[1])]
    return [(e, 1)]


def product(powered: list[tuple[Expr, int]]) -> Expr:
    """The numerator factors multiplied left to right, divided by each denominator factor
    (1.0 when there is no numerator)."""
    num = [f for f, p in powered if p > 0]
    den = [f for f, p in powered if p < 0]
    out = num[0] if num else E.const(1.0)
    for f in num[1:]:
        out = out * f
    for f in den:
        out = out / f
    return out
