"""Affine forms over a tile: ``e = a * x + b`` with ``x`` a dot tile and ``a``, ``b`` the same
for every element of the tile; and the split of a score into a tile, a row and a column part.

The backward printers evaluate a sigmoid or tanh of the score as one ``exp2`` of
``x * c + o``; when the argument is affine in the dot tile, ``c`` and ``o`` are scalars
computed once before the tile loops (the scale, a bias parameter, a per-head cap, log2 e
folded), so the tile pays one fused multiply-add.

:func:`split_axes` writes a sum ``e`` over a [queries, keys] tile as
``tile[m, n] + rows[m] + cols[n]``: the terms of one axis are vectors (BLOCK_M or BLOCK_N
values per tile instead of BLOCK_M * BLOCK_N), and a relative position ``c (n - m) + k``
(ALiBi's ``slope (n - m)``) is an outer sum, split at the query tile's first row ``m0``::

    c (n - m) + k  =  [c (n - m0) + k]  +  [c (m0 - m)]          (integers: exact)

so both vectors stay as small as the true offsets (``|m0 - m| < BLOCK_M``) and the float
conversions and products round at the size of the value, as the unsplit form does.  A kernel
may hold the key vector at another anchor ``n0`` (its own key tile, so the vector is the same
for every query tile of its loop); the split's ``shift`` is the scalar that moves it there::

    c (n - m0) + k  =  [c (n - n0) + k]  +  [c (n0 - m0)]                   (shift)
"""

from __future__ import annotations

from dataclasses import dataclass

from attndsl.ir import expr as E
from attndsl.ir.expr import BOOL, INT, Expr, Op

_ZERO = E.const(0.0)


def invariant(e: Expr, tile: set[str]) -> bool:
    """The same value for every element of a tile: no tile index and no tile row (captured
    reads subscripted by the batch and head only are hoisted out of the loops)."""
    return not (e.free_indices() & tile) and not any(x.op is Op.ROW for x in e.walk())


def _combine(op: Op, a: Expr, b: Expr) -> Expr:
    """``a op b`` for the parts of an affine form, where a 0 part is structural (the form has
    no such term) rather than a value: x +- 0 = x, 0 +- x = +-x, 0 * c = 0 / c = 0."""
    if op in (Op.ADD, Op.SUB):
        if _zero(b):
            return a
        if _zero(a):
            return b if op is Op.ADD else -b
    elif _zero(a):
        return _ZERO
    return E.binary(op, a, b)


def _zero(e: Expr) -> bool:
    """A structural zero: the constant 0 or 0.0 (an integer form's is 0)."""
    return e.op is Op.CONST and e.dtype != BOOL and e.arg == 0


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


def int_affine(e: Expr, axes: set[str]) -> tuple[dict[str, int], Expr] | None:
    """``(coef, k)`` with integer ``e = sum(i) coef[i] * i + k``, ``i`` the indices ``axes``
    and ``k`` free of them, or None (``e`` is not affine in them with constant integer
    coefficients: ``(n - m) // 2``, ``n * m``, a table read at ``n``)."""
    if e.dtype != INT:
        return None
    if not e.free_indices() & axes:
        return {}, e
    if e.op is Op.INDEX:
        return {e.arg: 1}, E.const(0)
    if e.op is Op.NEG:
        inner = int_affine(e.src[0], axes)
        return None if inner is None else ({i: -c for i, c in inner[0].items()},
                                           _int_combine(Op.SUB, _ZERO_INT, inner[1]))
    if e.op in (Op.ADD, Op.SUB):
        a, b = (int_affine(x, axes) for x in e.src)
        if a is None or b is None:
            return None
        sign = 1 if e.op is Op.ADD else -1
        coef = dict(a[0])
        for i, c in b[0].items():
            coef[i] = coef.get(i, 0) + sign * c
        return {i: c for i, c in coef.items() if c}, _int_combine(e.op, a[1], b[1])
    if e.op is Op.MUL:
        for x, c in (e.src, e.src[::-1]):
            inner = int_affine(x, axes) if c.op is Op.CONST else None
            if inner is not None:
                return ({i: v * c.arg for i, v in inner[0].items()},
                        _int_combine(Op.MUL, inner[1], c))
    return None


_ZERO_INT = E.const(0)
_INT_FOLD = {Op.ADD: lambda a, b: a + b, Op.SUB: lambda a, b: a - b,
             Op.MUL: lambda a, b: a * b}


def _int_combine(op: Op, a: Expr, b: Expr) -> Expr:
    """:func:`_combine` of the offset parts of integer forms, two constants folded (a
    constant product would print as an int64 conversion of a Python int)."""
    if a.op is Op.CONST and b.op is Op.CONST:
        return E.const(int(_INT_FOLD[op](a.arg, b.arg)))
    return _combine(op, a, b)


@dataclass(frozen=True)
class AxisSplit:
    """``e = tile + rows + cols``: ``rows`` free of the key index (and of the dot tile),
    ``cols`` free of the query index; either may read the query tile's first row ``start``
    (an integer index of that name).  ``shift`` (of the anchors ``start`` and ``key_start``
    only) moves the key vector's anchor: ``cols = cols[start := key_start] + shift``.  A
    structural zero (``is_zero``) is an absent part."""

    tile: Expr
    rows: Expr
    cols: Expr
    shift: Expr = _ZERO

    @property
    def separable(self) -> bool:
        """Whether any term left the tile (else printing the split gains nothing)."""
        return not (is_zero(self.rows) and is_zero(self.cols))


def split_axes(e: Expr, m: str, n: str, tile: set[str], start: str,
               key_start: str | None = None) -> AxisSplit:
    """``e`` (a float sum over a tile of query index ``m`` and key index ``n``; ``tile``: the
    indices and rows that vary over it) as tile + rows + cols, by additive terms: sums and
    differences split, products with and quotients by tile-invariant factors distribute, a
    term of one axis (or of none: it joins the rows) leaves the tile, and an integer
    ``c n - c m + k`` becomes ``[c (n - start) + k] + [c (start - m)]``, with the shift
    ``c (key_start - start)`` when ``key_start`` is named (module docstring).  Anything else
    stays in the tile."""
    return AxisSplit(*_split(e, m, n, tile, (start, key_start)))


Parts = tuple[Expr, Expr, Expr, Expr]  # tile, rows, cols, shift


def _split(e: Expr, m: str, n: str, tile: set[str], at: tuple[str, str | None]) -> Parts:
    uses_rows = any(x.op is Op.ROW for x in e.walk())
    deps = e.free_indices() & {m, n}
    if not uses_rows and n not in deps:
        return _ZERO, E.to_float(e), _ZERO, _ZERO
    if not uses_rows and m not in deps:
        return _ZERO, _ZERO, E.to_float(e), _ZERO
    if e.dtype == INT:
        return _split_relative(e, m, n, at)
    if e.op is Op.CAST and e.src[0].dtype == INT:  # float(c (n - m) + k)
        return _split_relative(e.src[0], m, n, at)
    if e.op is Op.NEG:
        return tuple(_combine(Op.SUB, _ZERO, x) for x in _split(e.src[0], m, n, tile, at))
    if e.op in (Op.ADD, Op.SUB):
        a, b = (_split(x, m, n, tile, at) for x in e.src)
        return tuple(_combine(e.op, x, y) for x, y in zip(a, b))
    if e.op is Op.MUL:
        for x, c in (e.src, e.src[::-1]):
            if invariant(c, tile):
                return tuple(_combine(Op.MUL, p, c) for p in _split(x, m, n, tile, at))
    divisor = e.src[1] if e.op in (Op.DIV, Op.TRUEDIV) else None
    if divisor is not None and invariant(divisor, tile) and \
            (e.op is Op.TRUEDIV or divisor.op is Op.CONST):  # DIV's 0 / 0 = 0 needs b != 0
        return tuple(_combine(e.op, p, divisor) for p in _split(e.src[0], m, n, tile, at))
    return E.to_float(e), _ZERO, _ZERO, _ZERO


def _split_relative(e: Expr, m: str, n: str, at: tuple[str, str | None]) -> Parts:
    """An integer term of both axes: ``c (n - m) + k`` -> (0, c (start - m), c (n - start)
    + k, c (key_start - start)) as floats; any other stays in the tile."""
    form = int_affine(e, {m, n})
    if form is None or set(form[0]) != {m, n} or form[0][m] != -form[0][n]:
        return E.to_float(e), _ZERO, _ZERO, _ZERO
    c, k = E.const(form[0][n]), form[1]
    start = E.index(at[0])
    cols = _combine(Op.ADD, _times_int(c, E.binary(Op.SUB, E.index(n), start)), k)
    rows = _times_int(c, E.binary(Op.SUB, start, E.index(m)))
    shift = _ZERO if at[1] is None else \
        E.to_float(_times_int(c, E.binary(Op.SUB, E.index(at[1]), start)))
    return _ZERO, E.to_float(rows), E.to_float(cols), shift


def _times_int(c: Expr, x: Expr) -> Expr:
    """``c * x`` for an integer constant ``c`` (``x`` itself when c is 1, ``-x`` when -1)."""
    if c.arg == 1:
        return x
    return E.unary(Op.NEG, x) if c.arg == -1 else E.binary(Op.MUL, c, x)


__all__ = ["AxisSplit", "affine", "int_affine", "invariant", "is_zero", "split_axes"]
