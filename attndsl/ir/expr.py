"""Scalar expressions of the Cascade IR.

One immutable node type, :class:`Expr`, holds every operation (in the spirit of a single op
enum with families).  An expression denotes the value of one element of a tensor at a point of
its index space: ``Expr(Op.INDEX, arg="m")`` is the query position, ``LOAD`` reads a tensor at
index expressions, ``REDUCE_SUM``/``REDUCE_MAX`` reduce their body over a named index.

Semantics shared by every executor (the eager oracle and the kernels):

* a reduction over the key index ranges only over unmasked keys; over an empty range
  ``sum = 0`` and ``max = -inf``;
* ``x / y`` (``DIV``, the language's normalising division) is ``0`` when both are ``0`` (a
  fully masked row normalises to zero, never NaN); ``TRUEDIV`` is IEEE division as in torch
  (``0 / 0`` is NaN), what ``/`` means in a traced score_mod;
* integers are int64 (wrapping as torch's do); ``//`` and ``%`` on integers follow Python
  (floor) semantics and a zero divisor is an error (torch raises ZeroDivisionError);
* ``&``, ``|``, ``^`` are logical on booleans and bitwise on integers (a bool operand is 0/1);
  ``INVERT`` is bitwise not of an integer (``~x = -x - 1``); ``<<`` / ``>>`` shift an int64:
  a shift by a negative amount or by 64 or more gives 0 (``<<``) or the sign (``>>``), as in
  torch;
* a float-only function (``exp``, ``log``, ``sqrt``...) of an integer first converts it to
  float (an explicit ``CAST`` node), as torch promotes;
* ``ROUND`` (arg ``"float16"`` / ``"bfloat16"``) rounds a float to the nearest value of that
  16-bit format (ties to even) and stays a float: ``.half()`` then fp32 math;
* an expression is at most :data:`MAX_DEPTH` levels deep where a spec states it (the frontends
  check it with a location); lowering may add at most :data:`LOWERING_DEPTH` levels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

from attndsl.errors import AttnDSLError

FLOAT, INT, BOOL = "float", "int", "bool"
DTYPES = (FLOAT, INT, BOOL)
HALF_FORMATS = ("float16", "bfloat16")  # the 16-bit float formats a ROUND node rounds to
MAX_DEPTH = 200  # levels of operators a spec's expression may have (after inlining equations)
LOWERING_DEPTH = 4 * MAX_DEPTH  # hard limit of any IR expression (derivatives nest deeper)


class Op(Enum):
    # leaves
    CONST = auto()  # arg: python value
    INDEX = auto()  # arg: index name
    PARAM = auto()  # arg: scalar parameter name (a kernel argument)
    LOAD = auto()  # arg: tensor name, src: one index expression per dimension
    ROW = auto()  # arg: name of a per-row value of a schedule (a finished reduction)
    # unary
    NEG = auto()
    EXP = auto()
    EXP2 = auto()
    LOG = auto()
    LOG2 = auto()
    TANH = auto()
    SIGMOID = auto()
    ABS = auto()
    SQRT = auto()
    NOT = auto()  # logical not (of a boolean, or x == 0)
    INVERT = auto()  # bitwise not of an integer
    CAST = auto()  # arg: target dtype
    ROUND = auto()  # arg: one of HALF_FORMATS; round to that format, the value stays float
    # binary
    ADD = auto()
    SUB = auto()
    MUL = auto()
    DIV = auto()  # 0 / 0 = 0 (normalisation)
    TRUEDIV = auto()  # IEEE division (torch's /); arg "absorbed": printed fast (codegen.expr)
    FLOORDIV = auto()
    MOD = auto()
    MAX = auto()
    MIN = auto()
    POW = auto()
    LT = auto()
    LE = auto()
    GT = auto()
    GE = auto()
    EQ = auto()
    NE = auto()
    AND = auto()
    OR = auto()
    XOR = auto()
    LSHIFT = auto()
    RSHIFT = auto()
    # ternary
    WHERE = auto()
    # reductions (arg: index name)
    REDUCE_SUM = auto()
    REDUCE_MAX = auto()
    # built-in normaliser over an index (arg: index name); expanded by a pass
    SOFTMAX = auto()
    # prefix sum along an index (arg: (index name, exclusive)); the value at position i is
    # sum_{j <= i} body[j] (inclusive) or sum_{j < i} body[j] (exclusive).  The index stays
    # free (the result is indexed by it).  Only the whole right-hand side of a per-position
    # equation; the runtime materialises it (attndsl.passes.scans)
    CUMSUM = auto()
    # linear recurrence along an index (arg: index name): ``S[..., n, ...] = recur(n) body``
    # where body reads the previous state ``S[..., n - 1, ...]`` (the initial state at n = 0).
    # Only the whole right-hand side of a state equation; recognised by attndsl.passes.delta
    RECUR = auto()


UNARY = {Op.NEG, Op.EXP, Op.EXP2, Op.LOG, Op.LOG2, Op.TANH, Op.SIGMOID, Op.ABS, Op.SQRT, Op.NOT,
         Op.INVERT, Op.CAST, Op.ROUND}
BINARY = {Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.TRUEDIV, Op.FLOORDIV, Op.MOD, Op.MAX, Op.MIN,
          Op.POW, Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE, Op.AND, Op.OR, Op.XOR, Op.LSHIFT,
          Op.RSHIFT}
BITWISE = {Op.AND, Op.OR, Op.XOR}  # logical on booleans, bitwise on integers
SHIFTS = {Op.LSHIFT, Op.RSHIFT}
COMPARE = {Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE}
REDUCE = {Op.REDUCE_SUM, Op.REDUCE_MAX}
LEAVES = {Op.CONST, Op.INDEX, Op.PARAM, Op.ROW}
FLOAT_ONLY = {Op.EXP, Op.EXP2, Op.LOG, Op.LOG2, Op.TANH, Op.SIGMOID, Op.SQRT}


class IRError(AttnDSLError, ValueError):
    """An ill-formed IR: the message says which node and what was expected."""


@dataclass(frozen=True)
class Expr:
    """One node: ``op`` applied to ``src`` with an extra ``arg``; ``dtype`` is float/int/bool."""

    op: Op
    src: tuple[Expr, ...] = ()
    arg: Any = None
    dtype: str = FLOAT
    _hash: int = field(default=0, compare=False, repr=False)
    depth: int = field(default=1, compare=False, repr=False)  # levels, a leaf is 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.op, self.src, self.arg, self.dtype)))
        if self.src:
            depth = 1 + max(s.depth for s in self.src)
            if depth > LOWERING_DEPTH:
                raise IRError(f"an expression is nested too deeply (more than {LOWERING_DEPTH} "
                              f"levels)")
            object.__setattr__(self, "depth", depth)

    def __hash__(self) -> int:
        return self._hash

    # -- traversal -------------------------------------------------------------------------
    def walk(self) -> Iterator[Expr]:
        """Every node, children before parents, each distinct node once."""
        seen: set[Expr] = set()
        stack: list[tuple[Expr, bool]] = [(self, False)]
        while stack:
            node, done = stack.pop()
            if done:
                yield node
                continue
            if node in seen:
                continue
            seen.add(node)
            stack.append((node, True))
            stack.extend((s, False) for s in reversed(node.src))

    def free_indices(self) -> frozenset[str]:
        """Indices the value depends on (indices bound by a reduction inside are not free)."""
        return _free(self)

    def replace(self, fn: Callable[[Expr], Expr | None]) -> Expr:
        """Rebuild bottom-up; ``fn`` returns a replacement for a rebuilt node or None."""
        memo: dict[Expr, Expr] = {}
        for node in self.walk():
            src = tuple(memo[s] for s in node.src)
            new = node if src == node.src else Expr(node.op, src, node.arg, node.dtype)
            out = fn(new)
            memo[node] = new if out is None else out
        return memo[self]

    # -- building --------------------------------------------------------------------------
    def __add__(self, o: Any) -> Expr:
        return binary(Op.ADD, self, o)

    def __radd__(self, o: Any) -> Expr:
        return binary(Op.ADD, o, self)

    def __sub__(self, o: Any) -> Expr:
        return binary(Op.SUB, self, o)

    def __rsub__(self, o: Any) -> Expr:
        return binary(Op.SUB, o, self)

    def __mul__(self, o: Any) -> Expr:
        return binary(Op.MUL, self, o)

    def __rmul__(self, o: Any) -> Expr:
        return binary(Op.MUL, o, self)

    def __truediv__(self, o: Any) -> Expr:
        return binary(Op.DIV, self, o)

    def __rtruediv__(self, o: Any) -> Expr:
        return binary(Op.DIV, o, self)

    def __neg__(self) -> Expr:
        return unary(Op.NEG, self)

    def __str__(self) -> str:
        return render(self)


def _free(e: Expr) -> frozenset[str]:
    memo: dict[Expr, frozenset[str]] = {}
    for node in e.walk():
        if node.op is Op.INDEX:
            memo[node] = frozenset({node.arg})
        elif node.op in REDUCE or node.op is Op.SOFTMAX:
            inner = memo[node.src[0]]
            memo[node] = inner - {node.arg} if node.op in REDUCE else inner
        else:
            memo[node] = frozenset().union(*(memo[s] for s in node.src))
    return memo[e]


# -- constructors ----------------------------------------------------------------------------

def const(value: float | bool) -> Expr:
    if isinstance(value, bool):
        return Expr(Op.CONST, arg=value, dtype=BOOL)
    if isinstance(value, int):
        return Expr(Op.CONST, arg=value, dtype=INT)
    if isinstance(value, float):
        return Expr(Op.CONST, arg=value, dtype=FLOAT)
    raise IRError(f"a constant must be a bool, int or float, got {type(value).__name__}")


def as_expr(x: Any) -> Expr:
    return x if isinstance(x, Expr) else const(x)


def index(name: str) -> Expr:
    return Expr(Op.INDEX, arg=name, dtype=INT)


def param(name: str, dtype: str = FLOAT) -> Expr:
    return Expr(Op.PARAM, arg=name, dtype=dtype)


def row(name: str) -> Expr:
    return Expr(Op.ROW, arg=name, dtype=FLOAT)


def load(tensor: str, idx: tuple[Expr, ...], dtype: str = FLOAT) -> Expr:
    return Expr(Op.LOAD, tuple(as_expr(i) for i in idx), tensor, dtype)


def promote(a: str, b: str) -> str:
    """Result dtype of arithmetic on a and b (bool < int < float)."""
    order = {BOOL: 0, INT: 1, FLOAT: 2}
    return a if order[a] >= order[b] else b


def to_float(x: Expr) -> Expr:
    """x as a float: an explicit CAST of an integer or boolean (torch's promotion)."""
    return x if x.dtype == FLOAT else Expr(Op.CAST, (x,), FLOAT, FLOAT)


def unary(op: Op, x: Any, arg: Any = None) -> Expr:
    x = as_expr(x)
    if op is Op.CAST:
        return Expr(op, (x,), arg, arg)
    if op is Op.ROUND:
        if arg not in HALF_FORMATS:
            raise IRError(f"ROUND needs one of {', '.join(HALF_FORMATS)}, got {arg!r}")
        return Expr(op, (to_float(x),), arg, FLOAT)
    if op is Op.NOT:
        return Expr(op, (x,), None, BOOL)
    if op is Op.INVERT:
        if x.dtype != INT:
            raise IRError(f"bitwise not (~) needs an integer operand, got a {x.dtype} "
                          f"expression; use ! (not) for booleans")
        return Expr(op, (x,), None, INT)
    if op in FLOAT_ONLY:
        return Expr(op, (to_float(x),), arg, FLOAT)
    dtype = x.dtype
    if op is Op.NEG and dtype == BOOL:
        raise IRError("cannot negate a boolean; use ~ (not)")
    return Expr(op, (x,), arg, dtype)


def binary(op: Op, a: Any, b: Any) -> Expr:
    a, b = as_expr(a), as_expr(b)
    if op in COMPARE:
        dtype = BOOL
    elif op in BITWISE:
        dtype = BOOL if a.dtype == b.dtype == BOOL else promote(a.dtype, b.dtype)
        if dtype == FLOAT:
            raise IRError(f"{_INFIX[op][0]} needs boolean or integer operands, got a float "
                          f"(as in torch)")
    elif op in SHIFTS:
        if FLOAT in (a.dtype, b.dtype):
            raise IRError(f"{_INFIX[op][0]} needs integer operands, got a float")
        dtype = INT
    elif op in (Op.DIV, Op.TRUEDIV):
        dtype = FLOAT
        if op is Op.TRUEDIV and b.op is Op.CONST and b.arg != 0:
            op = Op.DIV  # the two agree unless the divisor is 0: one canonical form
    else:
        dtype = promote(a.dtype, b.dtype)
        if dtype == BOOL and op not in (Op.MAX, Op.MIN):
            dtype = INT
        if op in (Op.FLOORDIV, Op.MOD) and dtype == INT and is_const(b, 0):
            raise IRError(f"integer {_INFIX[op][0]} by zero (torch raises ZeroDivisionError)")
    return Expr(op, (a, b), None, dtype)


def where(c: Any, a: Any, b: Any) -> Expr:
    c, a, b = as_expr(c), as_expr(a), as_expr(b)
    if c.dtype != BOOL:
        raise IRError(f"where() needs a boolean condition, got a {c.dtype} expression: {c}")
    return Expr(Op.WHERE, (c, a, b), None, promote(a.dtype, b.dtype))


def reduce_sum(idx: str, body: Any) -> Expr:
    body = as_expr(body)
    return Expr(Op.REDUCE_SUM, (body,), idx, FLOAT if body.dtype != INT else INT)


def reduce_max(idx: str, body: Any) -> Expr:
    body = as_expr(body)
    return Expr(Op.REDUCE_MAX, (body,), idx, body.dtype)


def softmax(idx: str, body: Any) -> Expr:
    return Expr(Op.SOFTMAX, (as_expr(body),), idx, FLOAT)


def cumsum(idx: str, body: Any, exclusive: bool = False) -> Expr:
    """The prefix sum of ``body`` along ``idx`` (see :attr:`Op.CUMSUM`)."""
    body = as_expr(body)
    return Expr(Op.CUMSUM, (body,), (idx, bool(exclusive)), FLOAT if body.dtype != INT else INT)


def recur(idx: str, body: Any) -> Expr:
    """The recurrence of a state along ``idx`` (see :attr:`Op.RECUR`)."""
    return Expr(Op.RECUR, (as_expr(body),), idx, FLOAT)


def exp(x: Any) -> Expr:
    return unary(Op.EXP, x)


def log(x: Any) -> Expr:
    return unary(Op.LOG, x)


def is_const(e: Expr, value: float | None = None) -> bool:
    return e.op is Op.CONST and (value is None or e.arg == value)


def shared_nodes(roots: list[Expr]) -> list[Expr]:
    """The non-leaf nodes referenced more than once across ``roots`` (as a root or an operand;
    negations excluded: they print as cheaply as a name), children before parents."""
    refs: dict[Expr, int] = {}
    order: dict[Expr, None] = {}
    for r in roots:
        refs[r] = refs.get(r, 0) + 1
        for node in r.walk():
            if node not in order:
                order[node] = None
                for s in node.src:
                    refs[s] = refs.get(s, 0) + 1
    return [x for x in order if refs.get(x, 0) > 1 and x.src and x.op is not Op.NEG]


# -- printing --------------------------------------------------------------------------------

# precedence climbs as in grammar/attn.lark: | ^ & (comparison) << >> + - * / // % ** (prefix)
_INFIX = {Op.ADD: ("+", 5), Op.SUB: ("-", 5), Op.MUL: ("*", 6), Op.DIV: ("/", 6),
          Op.FLOORDIV: ("//", 6), Op.MOD: ("%", 6), Op.POW: ("**", 8),
          Op.LSHIFT: ("<<", 4.5), Op.RSHIFT: (">>", 4.5), Op.LT: ("<", 4), Op.LE: ("<=", 4),
          Op.GT: (">", 4), Op.GE: (">=", 4), Op.EQ: ("==", 4), Op.NE: ("!=", 4),
          Op.AND: ("&", 3), Op.XOR: ("^", 2), Op.OR: ("|", 1)}
_CALL = {Op.EXP: "exp", Op.EXP2: "exp2", Op.LOG: "log", Op.LOG2: "log2", Op.TANH: "tanh",
         Op.SIGMOID: "sigmoid", Op.ABS: "abs", Op.SQRT: "sqrt", Op.MAX: "max", Op.MIN: "min",
         Op.WHERE: "where", Op.TRUEDIV: "truediv"}


def render_const(v: Any) -> str:
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    return repr(v)


def render(e: Expr, prec: float = 0) -> str:
    """Infix text of an expression (the cascade language's own syntax)."""
    op = e.op
    if op is Op.CONST:
        return render_const(e.arg)
    if op in (Op.INDEX, Op.PARAM):
        return str(e.arg)
    if op is Op.ROW:
        return f"%{e.arg}"
    if op is Op.LOAD:
        return f"{e.arg}[{', '.join(render(s) for s in e.src)}]"
    if op in _INFIX:
        sym, p = _INFIX[op]
        if op in BITWISE:  # parenthesise comparisons under & ^ | for readability
            text = f"{render(e.src[0], 4.5)} {sym} {render(e.src[1], 4.5)}"
            return f"({text})" if p < prec else text
        right = p + 1 if op is not Op.POW else p
        left = render(e.src[0], p if op is not Op.POW else p + 1)
        text = f"{left} {sym} {render(e.src[1], right)}"
        return f"({text})" if p < prec else text
    if op in (Op.NEG, Op.NOT, Op.INVERT):
        sym = {Op.NEG: "-", Op.NOT: "!", Op.INVERT: "~"}[op]
        text = f"{sym}{render(e.src[0], 7)}"
        return f"({text})" if prec > 7 else text
    if op in (Op.CAST, Op.ROUND):
        return f"{e.arg}({render(e.src[0])})"
    if op is Op.CUMSUM:
        idx, exclusive = e.arg
        text = f"cumsum({idx}{', exclusive' if exclusive else ''}) {render(e.src[0], 7)}"
        return f"({text})" if prec > 0 else text
    if op in (Op.REDUCE_SUM, Op.REDUCE_MAX, Op.SOFTMAX, Op.RECUR):
        name = {Op.REDUCE_SUM: "sum", Op.REDUCE_MAX: "max", Op.SOFTMAX: "softmax",
                Op.RECUR: "recur"}[op]
        text = f"{name}({e.arg}) {render(e.src[0], 7)}"
        return f"({text})" if prec > 0 else text
    return f"{_CALL[op]}({', '.join(render(s) for s in e.src)})"
