"""Symbolic differentiation of Cascade-IR scalar expressions (the chain rule, op by op).

``diff(e, x)`` is the derivative of ``e`` with respect to one variable ``x``, a ``LOAD`` node
such as ``S[b, h, m, n]`` or a gather of a captured tensor ``cap0[h, m - n + 31]``.  Reads of
one tensor at different subscripts are *different* variables: ``gather_grads(e, "cap0")``
returns one ``(load, d e / d load)`` pair per distinct gather site, so that a backward kernel
scatters each site's gradient to the element that site read.

The rules (``'`` is the derivative of an operand; comparisons, booleans, integers, indices,
parameters and constants have derivative 0)::

    (a + b)' = a' + b'        (a * b)' = a' b + a b'        (a / b)' = a' / b - a b' / b^2
    exp(a)'  = exp(a) a'      exp2(a)' = exp2(a) ln2 a'     log(a)'  = a' / a
    log2(a)' = a' / (a ln2)   tanh(a)' = (1 - tanh(a)^2) a' sigmoid(a)' = s (1 - s) a'
    abs(a)'  = sign(a) a'     sqrt(a)' = a' / (2 sqrt(a))
    (a ** b)' = b a^(b-1) a' + a^b log(a) b'
    max(a, b)' = where(a >= b, a', b')      min(a, b)' = where(a <= b, a', b')
    where(c, a, b)' = where(c, a', b')      float(a)' = a' (a float), 0 otherwise
    float16(a)' = bfloat16(a)' = a' (rounding passes the gradient through, as torch's)

A derivative that is structurally zero is pruned while it is built (no ``x * 0`` terms reach
the result), and the result is simplified with :func:`attndsl.passes.rules.simplify`.
"""

from __future__ import annotations

from attndsl.ir import expr as E
from attndsl.ir.expr import BOOL, FLOAT, Expr, IRError, Op
from attndsl.passes.rules import LN2, RULES, Rule, rewrite

Deriv = Expr | None  # None: identically zero


class GradError(IRError):
    """An expression that cannot be differentiated (a reduction, a softmax, a ROW value)."""


def _is_zero(e: Expr) -> bool:
    return e.op is Op.CONST and e.dtype != BOOL and e.arg == 0


def _c2(e: Expr) -> bool:
    return all(s.op is Op.CONST and s.dtype != BOOL for s in e.src)


def _merge_consts(e: Expr) -> Expr | None:
    """(c1 * x) * c2, c2 * (c1 * x), (x * c1) * c2 ... -> (c1 * c2) * x (float constants)"""
    if e.op is not Op.MUL or e.dtype != FLOAT:
        return None
    for outer, inner in ((e.src[1], e.src[0]), (e.src[0], e.src[1])):
        if outer.op is not Op.CONST or inner.op is not Op.MUL:
            continue
        for c, x in ((inner.src[0], inner.src[1]), (inner.src[1], inner.src[0])):
            if c.op is Op.CONST and c.dtype == FLOAT and outer.dtype == FLOAT:
                return E.const(float(c.arg) * float(outer.arg)) * x
    return None


_GRAD_RULES = [
    Rule("zero-mul", lambda e: E.const(0.0) if e.op is Op.MUL and (
        _is_zero(e.src[0]) or _is_zero(e.src[1])) else None),  # 0 * x -> 0 (x finite where used)
    Rule("zero-div", lambda e: E.const(0.0)
         if e.op is Op.DIV and _is_zero(e.src[0]) else None),  # 0 / x -> 0
    Rule("where-same", lambda e: e.src[1]
         if e.op is Op.WHERE and e.src[1] == e.src[2] else None),  # where(c, x, x) -> x
    Rule("neg-zero", lambda e: E.const(0.0)
         if e.op is Op.NEG and _is_zero(e.src[0]) else None),  # -0 -> 0
    Rule("zero-sub", lambda e: -e.src[1] if e.op is Op.SUB and _is_zero(e.src[0])
         and e.dtype == FLOAT else None),  # 0 - x -> -x
    Rule("fold-float", lambda e: E.const(float(e.src[0].arg)) if e.op is Op.CAST
         and e.arg == FLOAT and e.src[0].op is Op.CONST else None),  # float(c) -> c
    Rule("fold-div", lambda e: E.const(e.src[0].arg / e.src[1].arg) if e.op is Op.DIV
         and _c2(e) and e.src[1].arg != 0 else None),  # c1 / c2 -> c
    Rule("merge-consts", _merge_consts),  # (c1 * x) * c2 -> (c1 * c2) * x
]


def simplify_grad(e: Expr) -> Expr:
    """``simplify`` plus the pruning rules that are sound for derivatives (0 * x -> 0)."""
    return rewrite(e, RULES + _GRAD_RULES)


def _float(e: Expr) -> Expr:
    return e if e.dtype == FLOAT else E.unary(Op.CAST, e, FLOAT)


def _mul(a: Deriv, b: Expr) -> Deriv:
    """a * b with a possibly zero (None)."""
    return None if a is None else a * b


def _add(a: Deriv, b: Deriv) -> Deriv:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _sub(a: Deriv, b: Deriv) -> Deriv:
    if b is None:
        return a
    if a is None:
        return -b
    return a - b


def _sign(a: Expr) -> Expr:
    """sign(a) as a float: 1, -1, or 0 at 0 (torch's abs' derivative at 0 is 0)."""
    return E.where(E.binary(Op.GT, a, 0.0), 1.0, E.where(E.binary(Op.LT, a, 0.0), -1.0, 0.0))


def _rule(n: Expr, d: list[Deriv]) -> Deriv:
    """The derivative of node ``n`` given the derivatives ``d`` of its operands."""
    op, src = n.op, n.src
    if op in (Op.REDUCE_SUM, Op.REDUCE_MAX, Op.SOFTMAX):
        raise GradError(f"cannot differentiate the reduction {E.render(n)} elementwise")
    if n.dtype != FLOAT and op is not Op.CAST:
        return None  # integers, booleans, comparisons: derivative 0
    if op is Op.ADD:
        return _add(d[0], d[1])
    if op is Op.SUB:
        return _sub(d[0], d[1])
    if op is Op.MUL:
        return _add(_mul(d[0], _float(src[1])), _mul(d[1], _float(src[0])))
    if op is Op.DIV:
        a, b = src
        first = None if d[0] is None else d[0] / b
        second = None if d[1] is None else a * d[1] / (b * b)
        return _sub(first, second)
    if op is Op.NEG:
        return None if d[0] is None else -d[0]
    if op is Op.EXP:
        return _mul(d[0], n)
    if op is Op.EXP2:
        return _mul(d[0], n * LN2)
    if op is Op.LOG:
        return None if d[0] is None else d[0] / src[0]
    if op is Op.LOG2:
        return None if d[0] is None else d[0] / (src[0] * LN2)
    if op is Op.TANH:
        return _mul(d[0], 1.0 - n * n)
    if op is Op.SIGMOID:
        return _mul(d[0], n * (1.0 - n))
    if op is Op.ABS:
        return _mul(d[0], _sign(src[0]))
    if op is Op.SQRT:
        return None if d[0] is None else d[0] / (2.0 * n)
    if op is Op.POW:
        a, b = src
        da = _mul(d[0], _float(b) * E.binary(Op.POW, a, b - 1))
        db = _mul(d[1], n * E.log(a))
        return _add(da, db)
    if op in (Op.MAX, Op.MIN):
        if d[0] is None and d[1] is None:
            return None
        pick = E.binary(Op.GE if op is Op.MAX else Op.LE, src[0], src[1])
        return E.where(pick, d[0] if d[0] is not None else 0.0,
                       d[1] if d[1] is not None else 0.0)
    if op is Op.WHERE:
        if d[1] is None and d[2] is None:
            return None
        return E.where(src[0], d[1] if d[1] is not None else 0.0,
                       d[2] if d[2] is not None else 0.0)
    if op is Op.CAST:
        return d[0] if n.arg == FLOAT and src[0].dtype == FLOAT else None
    if op is Op.ROUND:  # as torch's .half(): the gradient passes through the rounding
        return d[0]
    if op is Op.TRUEDIV:
        a, b = src
        first = None if d[0] is None else E.binary(Op.TRUEDIV, d[0], b)
        second = None if d[1] is None else E.binary(Op.TRUEDIV, a * d[1], b * b)
        return _sub(first, second)
    if op is Op.FLOORDIV:
        return None  # piecewise constant
    if op is Op.MOD:  # a - floor(a / b) * b
        return _sub(d[0], _mul(d[1], E.binary(Op.FLOORDIV, src[0], src[1])))
    if op is Op.ROW:
        raise GradError(f"cannot differentiate the schedule value {E.render(n)}")
    return None  # CONST, INDEX, PARAM, other loads: independent of the variable


def diff(e: Expr, wrt: Expr) -> Expr:
    """d e / d wrt, where ``wrt`` is a LOAD node (one variable: a tensor at one subscript).

    Returns a float expression (``0.0`` when ``e`` does not depend on ``wrt``)."""
    if wrt.op is not Op.LOAD:
        raise GradError(f"can only differentiate with respect to a tensor read, got "
                        f"{E.render(wrt)}")
    memo: dict[Expr, Deriv] = {}
    for node in e.walk():
        if node == wrt:
            memo[node] = E.const(1.0) if node.dtype == FLOAT else None
        elif node.op is Op.LOAD:
            memo[node] = None  # another tensor, or this one at other subscripts
        else:
            memo[node] = _rule(node, [memo[s] for s in node.src])
    out = memo[e]
    return E.const(0.0) if out is None else simplify_grad(_float(out))


def gather_sites(e: Expr, tensor: str) -> list[Expr]:
    """The distinct reads (gather sites) of ``tensor`` in ``e``, in order of first use."""
    return [n for n in e.walk() if n.op is Op.LOAD and n.arg == tensor]


def gather_grads(e: Expr, tensor: str) -> list[tuple[Expr, Expr]]:
    """One ``(load, d e / d load)`` pair per gather site of ``tensor`` whose derivative is not
    identically zero: the gradient of a captured tensor is the scatter-add over the sites."""
    out = []
    for site in gather_sites(e, tensor):
        if site.dtype != FLOAT:
            continue
        d = diff(e, site)
        if not _is_zero(d):
            out.append((site, d))
    return out


__all__ = ["GradError", "diff", "gather_grads", "gather_sites", "simplify_grad"]
