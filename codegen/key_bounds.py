"""Masks that bound the key index: merged bounds, and bounds read relative to the key tile.

A mask term ``n < A`` (also ``<=``, ``>``, ``>=``, ``==``, ``!=``, either side) whose other side
``A`` is an integer free of the key index ``n`` is a *key bound*.  Two printer lowerings make
such masks cheaper per score element, both exact on integers:

* :func:`merge_key_bounds`: bounds of one direction joined by ``|`` or ``&`` are one bound,

      n < A | n < B  =  n < max(A, B)        n < A & n < B  =  n < min(A, B)
      n > A | n > B  =  n > min(A, B)        n > A & n > B  =  n > max(A, B)

  (``<=`` and ``>=`` alike).  A strict and a non-strict bound merge when one side is a
  constant, moved by one: ``n < c  =  n <= c - 1``, ``n > c  =  n >= c + 1``.  Prefix-LM's
  ``(n < 32) | (m >= n)`` becomes ``n <= max(31, m)``: one compare per element, and a
  [BLOCK_M] maximum per tile, instead of two compares and an or.
* :func:`relative_bound`: with ``n = start_n + j`` (``j`` the tile's constant columns
  ``0..BLOCK_N-1``), ``n OP A  =  j OP (A - start_n)``: the per-row (or scalar) side moves by
  the tile start, and no column index lives across tiles.  In int32 that subtraction is
  exact when ``-1 <= A <= 2**31 - 1``, as ``0 <= start_n <= 2**31 - 1``.
"""

from __future__ import annotations

from attndsl.ir import expr as E
from attndsl.ir.expr import INT, Expr, Op

# a bound with n on the left: n OP A for A OP n
_FLIPPED = {Op.LT: Op.GT, Op.LE: Op.GE, Op.GT: Op.LT, Op.GE: Op.LE, Op.EQ: Op.EQ, Op.NE: Op.NE}
_UPPER, _LOWER = (Op.LT, Op.LE), (Op.GT, Op.GE)
# the range of A in which A - start_n is exact in int32
RELATIVE_RANGE = (-1, 2**31 - 1)


def key_bound(e: Expr, n: str) -> tuple[Op, Expr] | None:
    """(OP, A) when ``e`` is the comparison ``n OP A`` or ``A OP' n`` of the key index with an
    integer ``A`` free of ``n`` (OP' the flipped comparison), else None."""
    if e.op not in _FLIPPED:
        return None
    a, b = e.src
    for key, other, op in ((a, b, e.op), (b, a, _FLIPPED[e.op])):
        if key.op is Op.INDEX and key.arg == n and other.dtype == INT and \
                n not in other.free_indices():
            return op, other
    return None


def _constant(e: Expr) -> int | None:
    return e.arg if e.op is Op.CONST and e.dtype == INT else None


def _non_strict(op: Op, a: Expr) -> tuple[Op, Expr] | None:
    """``n OP a`` as a non-strict bound (``<=`` / ``>=``), for a constant ``a``."""
    c = _constant(a)
    if op in (Op.LE, Op.GE):
        return op, a
    if c is None:
        return None
    return (Op.LE, E.const(c - 1)) if op is Op.LT else (Op.GE, E.const(c + 1))


def _merged(join: Op, first: tuple[Op, Expr], second: tuple[Op, Expr]) -> tuple[Op, Expr] | None:
    """One bound equal to ``first JOIN second`` (both of one direction), or None."""
    (op1, a1), (op2, a2) = first, second
    if op1 != op2:
        one, two = _non_strict(op1, a1), _non_strict(op2, a2)
        if one is None or two is None:
            return None
        (op1, a1), (op2, a2) = one, two
    upper = op1 in _UPPER
    widest = (join is Op.OR) == upper  # a | of upper bounds keeps the larger one
    pick = Op.MAX if widest else Op.MIN
    c1, c2 = _constant(a1), _constant(a2)
    if c1 is not None and c2 is not None:
        return op1, E.const(max(c1, c2) if pick is Op.MAX else min(c1, c2))
    if c1 is not None:  # the constant last, as written by hand: max(m, 31)
        a1, a2 = a2, a1
    return op1, E.binary(pick, a1, a2)


def _terms(e: Expr, join: Op) -> list[Expr]:
    """The operands of a chain of ``join`` (``a | b | c``), left to right."""
    if e.op is join and e.dtype == E.BOOL:
        return _terms(e.src[0], join) + _terms(e.src[1], join)
    return [e]


def _join(join: Op, e: Expr, n: str) -> Expr | None:
    """The ``|`` / ``&`` chain ``e`` with its key bounds of one direction merged, or None
    when none merge."""
    terms = _terms(e, join)
    out: list[Expr | tuple[Op, Expr]] = []
    changed = False
    for t in terms:
        bound = key_bound(t, n)
        if bound is not None and bound[0] in _UPPER + _LOWER:
            for i, prev in enumerate(out):
                if isinstance(prev, tuple) and (prev[0] in _UPPER) == (bound[0] in _UPPER):
                    merged = _merged(join, prev, bound)
                    if merged is not None:
                        out[i], changed = merged, True
                        break
            else:
                out.append(bound)
            continue
        out.append(t)
    if not changed:
        return None
    parts = [E.binary(x[0], E.index(n), x[1]) if isinstance(x, tuple) else x for x in out]
    result = parts[0]
    for p in parts[1:]:
        result = E.binary(join, result, p)
    return result


def merge_key_bounds(e: Expr, n: str) -> Expr:
    """``e`` with the key bounds of every ``|`` / ``&`` chain merged (the same boolean)."""
    return e.replace(lambda x: _join(x.op, x, n) if x.op in (Op.OR, Op.AND) and
                     x.dtype == E.BOOL else None)


def relative_bound(bound: tuple[Op, Expr], ranges: dict[Expr, tuple[int, int]]) -> bool:
    """Whether the bound ``n OP A`` may be printed as ``j OP (A - start_n)`` in int32
    (``ranges``: :func:`attndsl.passes.int_range.int_ranges` of the mask)."""
    lo, hi = ranges.get(bound[1], (None, None))
    return lo is not None and RELATIVE_RANGE[0] <= lo and hi <= RELATIVE_RANGE[1]
