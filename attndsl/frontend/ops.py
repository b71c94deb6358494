"""The operations of spec expressions, shared by the text and the Python frontends.

Each builds an IR node from IR nodes with the semantics of torch (integer ``-`` and ``~``, the
bitwise and shift operators, ``where``, casts); a problem is raised as ``UnlocatedError`` (the
caller locates it).  Also the Einsum convention's implicit sums (:func:`implicit_sums`) and the
stable order of equations by their dependencies (:func:`stable_order`).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence

from attndsl.frontend.source import UnlocatedError, article
from attndsl.ir import expr as E
from attndsl.ir.expr import (
    BOOL,
    FLOAT,
    INT,
    Expr,
    IRError,
    Op,
)
from attndsl.passes.int_range import may_be_zero, reads_data


def negate(x: Expr) -> Expr:
    """-x, folding a negated numeric literal into the constant (``-1.0`` is a constant)."""
    if x.dtype == BOOL:
        raise UnlocatedError("cannot negate a boolean; use ! (not)")
    if x.op is Op.CONST:
        return E.const(-x.arg)
    return E.unary(Op.NEG, x)


def logical_not(x: Expr) -> Expr:
    if x.dtype != BOOL:
        raise UnlocatedError(f"! needs a boolean operand (a comparison), got "
                             f"{article(x.dtype)} expression", 0)
    return E.unary(Op.NOT, x)


def bitwise_not(x: Expr) -> Expr:
    """~x: logical not of a boolean, bitwise not (-x - 1) of an integer, as torch's ~."""
    if x.dtype == FLOAT:
        raise UnlocatedError("~ needs a boolean or integer operand, got a float expression", 0)
    return E.unary(Op.NOT if x.dtype == BOOL else Op.INVERT, x)


_SYMBOL = {Op.AND: "&", Op.OR: "|", Op.XOR: "^", Op.LSHIFT: "<<", Op.RSHIFT: ">>"}


def combine(op: Op, a: Expr, b: Expr) -> Expr:
    """A binary node, with the operand checks of the language."""
    if op in _SYMBOL:
        for slot, x in enumerate((a, b)):
            if x.dtype == FLOAT:
                kinds = "integer" if op in E.SHIFTS else "boolean (or integer)"
                raise UnlocatedError(f"{_SYMBOL[op]} needs {kinds} operands, got a float "
                                     f"expression", slot)
    if op in (Op.FLOORDIV, Op.MOD) and E.promote(a.dtype, b.dtype) != FLOAT:
        problem = zero_divisor(b)
        if problem:
            raise UnlocatedError(f"integer {'//' if op is Op.FLOORDIV else '%'} {problem}", 1)
    try:
        return E.binary(op, a, b)
    except IRError as err:
        raise UnlocatedError(str(err)) from None


def zero_divisor(d: Expr) -> str | None:
    """Why an integer divisor is refused: it is 0, or it is a function of the indices alone
    that is 0 somewhere (torch raises ZeroDivisionError; a kernel cannot).  A divisor that
    reads parameters or tensors is checked at launch, when their values are known."""
    if E.is_const(d, 0):
        return "by zero (torch raises ZeroDivisionError)"
    if not reads_data(d) and may_be_zero(d):
        return ("by a divisor that can be zero (torch raises ZeroDivisionError); make it "
                "provably nonzero, e.g. max(d, 1)")
    return None


def where(c: Expr, a: Expr, b: Expr) -> Expr:
    if c.dtype != BOOL:
        raise UnlocatedError(f"where() needs a boolean condition (a comparison), got "
                             f"{article(c.dtype)} expression", 0)
    return E.where(c, a, b)


def relu(x: Expr) -> Expr:
    return E.binary(Op.MAX, x, E.const(0.0))


def _unary(op: Op) -> Callable[[Expr], Expr]:
    return lambda x: E.unary(op, x)


def _cast(dtype: str) -> Callable[[Expr], Expr]:
    return lambda x: E.unary(Op.CAST, x, dtype)


# name -> (number of arguments, constructor)
FUNCTIONS: dict[str, tuple[int, Callable[..., Expr]]] = {
    "exp": (1, _unary(Op.EXP)), "log": (1, _unary(Op.LOG)), "exp2": (1, _unary(Op.EXP2)),
    "log2": (1, _unary(Op.LOG2)), "tanh": (1, _unary(Op.TANH)),
    "sigmoid": (1, _unary(Op.SIGMOID)), "abs": (1, _unary(Op.ABS)), "sqrt": (1, _unary(Op.SQRT)),
    "relu": (1, relu), "min": (2, lambda a, b: combine(Op.MIN, a, b)),
    "max": (2, lambda a, b: combine(Op.MAX, a, b)), "where": (3, where),
    "float": (1, _cast(FLOAT)), "int": (1, _cast(INT)), "bool": (1, _cast(BOOL)),
}
BINARY_OPS = {"+": Op.ADD, "-": Op.SUB, "*": Op.MUL, "/": Op.DIV, "//": Op.FLOORDIV,
              "%": Op.MOD, "**": Op.POW, "&": Op.AND, "|": Op.OR, "^": Op.XOR, "<<": Op.LSHIFT,
              ">>": Op.RSHIFT, "<": Op.LT, "<=": Op.LE, ">": Op.GT, ">=": Op.GE, "==": Op.EQ,
              "!=": Op.NE}
REDUCTIONS = {"sum": E.reduce_sum, "max": E.reduce_max, "softmax": E.softmax}
REDUCE_WORD = {Op.REDUCE_SUM: "sum", Op.REDUCE_MAX: "max", Op.SOFTMAX: "softmax",
               Op.CUMSUM: "cumsum", Op.RECUR: "recur"}
SCAN_FORMS = ("inclusive", "exclusive")  # cumsum(n) x is inclusive; cumsum(n, exclusive) x


def implicit_sums(expr: Expr, lhs: Iterable[str]) -> Expr:
    """The Einsum convention: sum each additive term over the indices it uses that ``lhs`` lacks.

    The right-hand side is split at its top-level ``+`` and ``-``.  A term whose free indices
    include indices absent from the left-hand side is wrapped in ``sum(i)`` for each of them
    (the index that appears first, reading left to right, innermost); trailing ``* c`` and
    ``/ c`` factors that use none of those indices stay outside the sums, so
    ``Q[m,e] * K[n,e] * scale`` is ``(sum(e) Q[m,e] * K[n,e]) * scale``.
    """
    keep = frozenset(lhs)

    def visit(e: Expr) -> Expr:
        extra = e.free_indices() - keep
        if not extra:
            return e
        if e.op in (Op.ADD, Op.SUB):
            return E.binary(e.op, visit(e.src[0]), visit(e.src[1]))
        outside: list[tuple[Op, Expr]] = []
        while e.op in (Op.MUL, Op.DIV) and not e.src[1].free_indices() & extra:
            outside.append((e.op, e.src[1]))
            e = e.src[0]
        for name in _first_appearance(e, extra):
            e = E.reduce_sum(name, e)
        for op, factor in reversed(outside):
            e = E.binary(op, e, factor)
        return e

    return visit(expr)


def _first_appearance(e: Expr, wanted: frozenset[str]) -> list[str]:
    out: list[str] = []
    seen: set[Expr] = set()
    stack = [e]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op is Op.INDEX and node.arg in wanted and node.arg not in out:
            out.append(node.arg)
        stack.extend(reversed(node.src))
    return out


class DependencyCycle(Exception):
    def __init__(self, path: list[str]) -> None:
        super().__init__(" -> ".join(path))
        self.path = path


def stable_order(names: Sequence[str], deps: dict[str, list[str]]) -> list[str]:
    """Names in dependency order, keeping the given order wherever it is already valid; raises
    DependencyCycle with the path of a dependency cycle."""
    position = {n: i for i, n in enumerate(names)}
    users: dict[str, list[str]] = {n: [] for n in names}
    need = dict.fromkeys(names, 0)
    for n in names:
        for d in dict.fromkeys(deps[n]):
            if d in users:
                users[d].append(n)
                need[n] += 1
    ready = [position[n] for n in names if need[n] == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        n = names[heapq.heappop(ready)]
        order.append(n)
        for u in users[n]:
            need[u] -= 1
            if need[u] == 0:
                heapq.heappush(ready, position[u])
    if len(order) == len(names):
        return order
    done = set(order)
    path = [next(n for n in names if n not in done)]  # each remaining name waits on another
    seen = {path[0]: 0}
    while True:
        nxt = next(d for d in deps[path[-1]] if d in position and d not in done)
        if nxt in seen:
            raise DependencyCycle(path[seen[nxt]:] + [nxt])
        seen[nxt] = len(path)
        path.append(nxt)


