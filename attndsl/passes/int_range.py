"""Static ranges of integer expressions: which ones a kernel may compute in int32.

Integers of the IR are int64 (as torch's).  A kernel computes an integer subexpression in
int32 only where that is provably exact: ``int_range`` bounds every integer node in exact
(Python) integer interval arithmetic from what a launch guarantees -- an index lies in
``[0, 2**31 - 2]`` (extents are below ``2**31``), an int parameter arrives as an i32 when it
fits (a larger one arrives as an i64 and widens what it touches by itself), a captured int
tensor is read as int64 (any value).  A node whose range leaves int32 is computed in int64.

The same ranges tell whether an integer ``//`` or ``%`` can divide by zero (torch raises
ZeroDivisionError there; a kernel has no way to raise).
"""

from __future__ import annotations

from attndsl.ir.expr import BOOL, FLOAT, INT, SHIFTS, Expr, Op

Range = tuple[int, int]
I32 = (-(2**31), 2**31 - 1)
I64 = (-(2**63), 2**63 - 1)
INDEX_RANGE = (0, 2**31 - 2)


def fits_i32(r: Range) -> bool:
    return I32[0] <= r[0] and r[1] <= I32[1]


def _clip(lo: int, hi: int) -> Range:
    """A range wider than int64 wraps: any int64 value."""
    return (lo, hi) if I64[0] <= lo and hi <= I64[1] else I64


def _corners(fn, a: Range, b: Range) -> Range:
    vals = [fn(x, y) for x in a for y in b]
    return _clip(min(vals), max(vals))


def _bits(r: Range) -> Range:
    """The smallest two's-complement range [-2^w, 2^w - 1] holding ``r`` (bitwise results of
    operands in it stay in it)."""
    w = max(abs(r[0]).bit_length(), (r[1] + 1).bit_length())
    return (-(2**w), 2**w - 1) if r[0] < 0 else (0, 2**w - 1)


def _floordiv(a: Range, b: Range) -> Range:
    """Corners when b keeps one sign; else (a zero divisor is refused or checked at launch)
    |x // y| <= |x| for |y| >= 1."""
    if b[0] <= 0 <= b[1]:
        top = max(abs(a[0]), abs(a[1]))
        return _clip(-top, top)
    return _corners(lambda x, y: x // y, a, b)


def _mod(a: Range, b: Range) -> Range:
    """x % y takes the sign of y and |x % y| < |y|; x % y <= x for x >= 0, y > 0."""
    if b[0] > 0:
        return (0, b[1] - 1) if a[0] < 0 else (0, min(a[1], b[1] - 1))
    if b[1] < 0:
        return (b[0] + 1, 0)
    top = max(abs(b[0]), abs(b[1])) - 1
    return (-top, top)


def _rule(e: Expr, s: list[Range]) -> Range:
    op = e.op
    if op is Op.NEG:
        return _clip(-s[0][1], -s[0][0])
    if op is Op.ABS:
        lo, hi = s[0]
        return _clip(0 if lo <= 0 <= hi else min(abs(lo), abs(hi)), max(abs(lo), abs(hi)))
    if op is Op.INVERT:
        return (-s[0][1] - 1, -s[0][0] - 1)
    if op is Op.ADD:
        return _clip(s[0][0] + s[1][0], s[0][1] + s[1][1])
    if op is Op.SUB:
        return _clip(s[0][0] - s[1][1], s[0][1] - s[1][0])
    if op is Op.MUL:
        return _corners(lambda x, y: x * y, s[0], s[1])
    if op is Op.FLOORDIV:
        return _floordiv(s[0], s[1])
    if op is Op.MOD:
        return _mod(s[0], s[1])
    if op in (Op.MAX, Op.MIN):
        f = max if op is Op.MAX else min
        return (f(s[0][0], s[1][0]), f(s[0][1], s[1][1]))
    if op in (Op.AND, Op.OR, Op.XOR):
        return _bits((min(s[0][0], s[1][0]), max(s[0][1], s[1][1])))
    if op is Op.WHERE:
        return (min(s[1][0], s[2][0]), max(s[1][1], s[2][1]))
    if op is Op.CAST:
        return s[0] if e.src[0].dtype != FLOAT else I64
    return I64  # POW, shifts (computed in int64 always), reductions


def int_ranges(e: Expr) -> dict[Expr, Range]:
    """A range for every integer or boolean node of ``e`` (booleans are [0, 1])."""
    out: dict[Expr, Range] = {}
    for node in e.walk():
        if node.dtype == BOOL:
            out[node] = (int(node.arg), int(node.arg)) if node.op is Op.CONST else (0, 1)
        elif node.dtype != INT:
            continue
        elif node.op is Op.CONST:
            out[node] = (node.arg, node.arg)
        elif node.op is Op.INDEX:
            out[node] = INDEX_RANGE
        elif node.op is Op.PARAM:
            out[node] = I32
        elif node.op is Op.LOAD or node.op in SHIFTS:
            out[node] = I64
        else:
            out[node] = _rule(node, [out.get(x, I64) for x in node.src])
    return out


def may_wrap(e: Expr) -> bool:
    """Whether an integer ``+``, ``-``, ``*``, negation, ``abs`` or ``**`` of ``e`` may leave
    int64 -- where torch's (and the kernels') arithmetic wraps, so that real-number reasoning
    about ``e`` (the closed-form mask bounds) is wrong: ``m + 2**63 - 1 >= 0`` is false for
    every m >= 1.  From the ranges of :func:`int_ranges`, before their clip to int64; ``**``
    always may (its range is not tracked)."""
    ranges = int_ranges(e)
    for node in e.walk():
        if node.dtype != INT or not node.src:
            continue
        s = [ranges.get(x, I64) for x in node.src]
        if node.op is Op.POW:
            return True
        if node.op in (Op.NEG, Op.ABS):
            real = (-s[0][1], -s[0][0]) if node.op is Op.NEG else (0, max(map(abs, s[0])))
        elif node.op is Op.ADD:
            real = (s[0][0] + s[1][0], s[0][1] + s[1][1])
        elif node.op is Op.SUB:
            real = (s[0][0] - s[1][1], s[0][1] - s[1][0])
        elif node.op is Op.MUL:
            vals = [x * y for x in s[0] for y in s[1]]
            real = (min(vals), max(vals))
        else:
            continue
        if real[0] < I64[0] or real[1] > I64[1]:
            return True
    return False


def may_be_zero(e: Expr) -> bool:
    """Whether an integer expression can be 0 at some point of its index space."""
    lo, hi = int_ranges(e)[e]
    return lo <= 0 <= hi


def reads_data(e: Expr) -> bool:
    """Whether ``e`` reads a parameter or a tensor (values known only at launch)."""
    return any(x.op in (Op.PARAM, Op.LOAD) for x in e.walk())


def launch_divisors(e: Expr) -> list[Expr]:
    """The divisors of the integer ``//`` and ``%`` nodes of ``e`` that read parameters or
    tensors: whether they can be 0 is decided at launch, from the values."""
    return [x.src[1] for x in e.walk()
            if x.op in (Op.FLOORDIV, Op.MOD) and x.dtype == INT and reads_data(x.src[1])]


def zero_divisors(e: Expr) -> list[Expr]:
    """The integer ``//`` and ``%`` nodes of ``e`` whose divisor, a function of the indices
    alone, can be zero (divisors reading data are checked at launch: launch_divisors)."""
    ranges: dict[Expr, Range] = {}
    out = []
    for node in e.walk():
        if node.op in (Op.FLOORDIV, Op.MOD) and node.dtype == INT:
            d = node.src[1]
            if reads_data(d):
                continue
            if d not in ranges:
                ranges.update(int_ranges(d))
            lo, hi = ranges[d]
            if lo <= 0 <= hi:
                out.append(node)
    return out


__all__ = ["I32", "INDEX_RANGE", "fits_i32", "int_ranges", "launch_divisors", "may_be_zero",
           "reads_data", "zero_divisors"]
