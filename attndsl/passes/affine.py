"""Affine forms over a tile: ``e = a * x + b`` with ``x`` a dot tile and ``a``, ``b`` the same
for every element of the tile.

The backward printers evaluate a sigmoid or tanh of the score as one ``exp2`` of
``x * c + o``; when the argument is affine in the dot tile, ``c`` and ``o`` are scalars
computed once before the tile loops (the scale, a bias parameter, a per-head cap, log2 e
folded), so the tile pays one fused multiply-add.
"""

from __future__ import annotations

from attndsl.ir import expr as E
from attndsl.ir.expr import Expr, Op

_ZERO = E.const(0.0)


def invariant(e: Expr, tile: set[str]) -> bool:
    """The same value for every element of a tile: no tile index and no tile row (captured
    reads subscripted by the batch and head only are hoisted out of the loops)."""
    return not (e.free_indices() & tile) and not any(x.op is Op.ROW for x in e.walk())


def _combine(op: Op, a: Expr, b: Expr) -> Expr:
    """``a op b`` for the parts of an affine form, where a 0 part is structural (the form has
    no such term) rather than a value: x +- 0 = x, 0 +- x = +-x, 0 * c = 0 / c = 0."""
    if op in (Op.ADD, Op.SUB):
        if b == _ZERO:
            return a
        if a == _ZERO:
            return b if op is Op.ADD else -b
    elif a == _ZERO:
        return _ZERO
    return E.binary(op, a, b)


def affine(e: Expr, tile: set[str], rows: dict[str, Expr]) -> tuple[Expr, Expr] | None:
    """(a, b) with e = a * x + b, a and b tile-invariant, or None.  ``rows`` maps each ROW
    name that stands for the tile x to its factor (``{"qk": 1}``; FlexAttention's score
    ``S = qk * scale`` as ``{"s": scale}``)."""
    if e.op is Op.ROW and e.arg in rows:
        return rows[e.arg], _ZERO
    if invariant(e, tile):
        return _ZERO, e
    parts = [affine(x, tile, rows) for x in e.src] if e.op in (Op.ADD, Op.SUB, Op.NEG) else []
    if parts and all(p is not None for p in parts):
        if e.op is Op.NEG:
            return _combine(Op.SUB, _ZERO, parts[0][0]), _combine(Op.SUB, _ZERO, parts[0][1])
        (a1, b1), (a2, b2) = parts
        return _combine(e.op, a1, a2), _combine(e.op, b1, b2)
    if e.op is Op.MUL:
        for x, c in (e.src, e.src[::-1]):
            ab = affine(x, tile, rows) if invariant(c, tile) else None
            if ab is not None:
                return _combine(Op.MUL, ab[0], c), _combine(Op.MUL, ab[1], c)
    divisor = e.src[1] if e.op in (Op.DIV, Op.TRUEDIV) else None
    if divisor is not None and invariant(divisor, tile) and \
            (e.op is Op.TRUEDIV or divisor.op is Op.CONST):  # DIV's 0 / 0 = 0 needs b != 0
        ab = affine(e.src[0], tile, rows)
        if ab is not None:
            return _combine(e.op, ab[0], divisor), _combine(e.op, ab[1], divisor)
    return None


def is_zero(e: Expr | None) -> bool:
    """A structural zero part of an affine form (nothing to add)."""
    return e is not None and e.op is Op.CONST and e.arg == 0


__all__ = ["affine", "invariant", "is_zero"]
