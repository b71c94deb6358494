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
* :func:`distance_bounds`: a comparison whose sides differ by ``c (m - n) + k`` (``k`` free
  of both indices) bounds the distance, ``m >= n + 3  =  m - n >= 3``, so that the printer
  reads it on the tile's ``diag = m - n`` like any pair of the two indices::

      c (m - n) + k OP 0   =   (m - n) OP' K       (c > 0: OP' = OP, K = -k / c; c < 0:
                                                    OP flipped, K = k / |c|)

  exact on integers where neither side wraps in int64; for ``|c| > 1`` the constant ``K``
  is rounded toward the kept side (``2 (m - n) >= 3  =  m - n >= 2``).
* :func:`decided_compares`: a comparison that the ranges of its sides decide (an index is
  never negative: ``m >= 0``) is its constant truth, folded into the ``&`` / ``|`` around it.
"""

from __future__ import annotations

from attndsl.ir import expr as E
from attndsl.ir.expr import INT, Expr, Op
from attndsl.passes.affine import int_affine
from attndsl.passes.int_range import int_ranges, may_wrap, reads_data
from attndsl.passes.rules import simplify

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


# m - n of two indices in [0, 2**31 - 2] (attndsl.passes.int_range.INDEX_RANGE)
_DISTANCE = (-(2**31 - 2), 2**31 - 2)


def _scaled(op: Op, c: int, k: int) -> tuple[Op, int] | bool:
    """``c * d OP k`` for an integer d and ``c > 0`` as ``d OP' K`` (or the constant truth,
    when ``c`` does not divide ``k`` in an ``==`` / ``!=``)."""
    q, r = divmod(k, c)  # floor
    if r == 0:
        return op, q
    if op in (Op.EQ, Op.NE):
        return op is Op.NE
    # c d < k = d <= floor(k / c); c d > k = d >= floor(k / c) + 1 (and <= / >= alike)
    return (Op.LE, q) if op in (Op.LT, Op.LE) else (Op.GE, q + 1)


def distance_bound(e: Expr, m: str, n: str) -> Expr | None:
    """The comparison ``e`` as ``(m - n) OP K`` (or a constant), when its sides differ by
    ``c (m - n) + k`` with ``k`` free of both indices and nothing in it wraps; else None
    (also for ``m OP n`` itself, already a pair)."""
    if e.op not in _FLIPPED or any(x.dtype != INT for x in e.src):
        return None
    if all(x.op is Op.INDEX for x in e.src):
        return None
    form = int_affine(E.binary(Op.SUB, *e.src), {m, n})
    if form is None:
        return None
    coef, k = form
    c = coef.get(m, 0)
    # a parameter or a table value may arrive as any int64 (the ranges assume int32 for a
    # parameter), where n + W could wrap and m - n >= W not: only values the ranges bound
    if c == 0 or coef != {m: c, n: -c} or reads_data(k) or may_wrap(e):
        return None
    op = e.op if c > 0 else _FLIPPED[e.op]
    rhs = simplify(-k) if c > 0 else k  # c d + k OP 0  =  |c| d OP' (-k or k)
    if rhs.op is Op.CONST:
        scaled = _scaled(op, abs(c), rhs.arg)
        if isinstance(scaled, bool):
            return E.const(scaled)
        op, value = scaled
        if op in (Op.LT, Op.GT):  # non-strict, as written by hand: m - n > -1 is m - n >= 0
            op, value = (Op.LE, value - 1) if op is Op.LT else (Op.GE, value + 1)
        truth = _truth(op, _DISTANCE, (value, value))
        if truth is not None:  # every distance of two indices agrees
            return E.const(truth)
        rhs = E.const(value)
    elif abs(c) != 1 or may_wrap(rhs):
        return None
    return E.binary(op, E.binary(Op.SUB, E.index(m), E.index(n)), rhs)


def distance_bounds(e: Expr, m: str, n: str) -> Expr:
    """``e`` with the comparisons :func:`distance_bound` rewrites replaced.  A key bound that
    :func:`relative_bound` reads on the tile columns (one compare per element, where the
    distance costs a subtraction too) is kept, unless ``e`` compares the distance (or the two
    indices) more than once: a window ``n <= m - 1 & n >= m - 64`` is then
    ``1 <= m - n <= 64``, one unsigned compare of the distance once LLVM merges the two."""
    ranges = int_ranges(e)
    lowered = {x: d for x in e.walk() if (d := distance_bound(x, m, n)) is not None}
    pairs = sum(1 for x in e.walk() if x.op in _FLIPPED and all(
        s.op is Op.INDEX and s.arg in (m, n) for s in x.src) and x.src[0].arg != x.src[1].arg)

    def kept(x: Expr) -> bool:
        bound = key_bound(x, n)
        return bound is not None and relative_bound(bound, ranges)

    if len(lowered) + pairs < 2:
        lowered = {x: d for x, d in lowered.items() if not kept(x)}
    return e.replace(lambda x: lowered.get(x))


def _truth(op: Op, a: tuple[int, int], b: tuple[int, int]) -> bool | None:
    """``x OP y`` for every x in ``a`` and y in ``b`` (closed ranges), or None."""
    (alo, ahi), (blo, bhi) = a, b
    if op is Op.EQ or op is Op.NE:
        if alo == ahi == blo == bhi:
            return op is Op.EQ
        if ahi < blo or bhi < alo:
            return op is Op.NE
        return None
    if op in (Op.GT, Op.GE):
        return _truth(_FLIPPED[op], b, a)
    strict = op is Op.LT
    if ahi < blo or (not strict and ahi == blo):
        return True
    if alo > bhi or (strict and alo == bhi):
        return False
    return None


def decided_compares(e: Expr) -> Expr:
    """``e`` with each integer comparison of indices and constants that
    :func:`attndsl.passes.int_range.int_ranges` decides replaced by its truth, and the
    constants folded (``True & p = p``)."""
    ranges = int_ranges(e)

    def fold(x: Expr) -> Expr | None:
        if x.op not in _FLIPPED or any(s.dtype != INT or s not in ranges for s in x.src):
            return None
        if reads_data(x):  # the ranges assume int32 for a parameter; it may be any int64
            return None
        truth = _truth(x.op, ranges[x.src[0]], ranges[x.src[1]])
        return None if truth is None else E.const(truth)

    return simplify(e.replace(fold))


def lowered_mask(mask: Expr, m: str, n: str) -> Expr:
    """The mask as the printers evaluate it: decided compares folded, key bounds of one
    direction merged, comparisons of sums as distance compares (the same boolean)."""
    return distance_bounds(merge_key_bounds(decided_compares(mask), n), m, n)
