"""The ``.attn`` text frontend: cascades of Einsum-style equations parsed into the Cascade IR.

A spec declares its indices, tensors and parameters, then equations over named indices::

    spec causal_softmax3 {
      index b: B batch, h: H head, m: M query, n: N key, e: E qk, f: F v
      input Q[B, H, M, E], K[B, HKV, N, E], V[B, HKV, N, F]
      param scale: float
      param G: int
      mask n <= m
      QK[b,h,m,n] = Q[b,h,m,e] * K[b,h//G,n,e] * scale   # e is summed (Einsum convention)
      GM[b,h,m]   = max(n) QK[b,h,m,n]
      ...
      output O
    }

The syntax lives in ``grammar/attn.lark`` (explained in ``grammar/REFERENCE.md``).  Parsing is
LALR(1); the :class:`_Exprs` transformer turns expression trees into IR nodes, one method per
grammar alias; :class:`Assembler` checks declarations and equations and builds the verified
:class:`~attndsl.ir.cascade.Cascade`.  The Python builder (:mod:`attndsl.frontend.builder`)
goes through the same assembler, so both forms of a spec give equal cascades.

Every problem is a :class:`SpecError` located at the offending token::

    spec.attn:5:15: error: max(e) reduces over 'e', which its body does not use
        GM[m] = max(e) S[m, n]
                    ^
"""

from __future__ import annotations

import difflib
import heapq
import importlib.resources
import keyword
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import (
    LarkError,
    UnexpectedCharacters,
    UnexpectedInput,
    UnexpectedToken,
    VisitError,
)

from attndsl.errors import AttnDSLError, located_message
from attndsl.ir import expr as E
from attndsl.ir.cascade import (
    ROLES,
    Cascade,
    Equation,
    IndexDecl,
    ParamDecl,
    SourceLoc,
    TensorDecl,
    verify,
)
from attndsl.ir.expr import (
    BOOL,
    FLOAT,
    INT,
    MAX_DEPTH,
    Expr,
    IRError,
    Op,
    render,
    render_const,
)
from attndsl.passes.int_range import may_be_zero, reads_data

GRAMMAR_FILE = "attn.lark"
MAX_BRACKETS = 64  # open ( and [ at once
# MAX_DEPTH (attndsl.ir.expr): levels of an expression tree, checked on the parse tree (lark's
# transformer recurses once per level) and on the IR of each equation with the equations it
# reads inlined (chained comparisons and equation chains nest without nesting the parse tree)
INT_LIMIT = 2**63  # integer literals must fit in int64

# role of an index whose declaration names none, by the conventional index names
ROLE_BY_NAME = {"b": "batch", "h": "head", "m": "query", "p": "query", "q": "query",
                "n": "key", "k": "key", "e": "qk", "f": "v"}
UNIQUE_ROLES = ("batch", "head", "query", "key")  # at most one index each
RESERVED = frozenset({"spec", "index", "input", "tensor", "param", "mask", "output", "sum", "max",
                      "softmax", "inf", "Keep"})  # Keep names the mask equation in the IR
TENSOR_DTYPES = (FLOAT, INT, BOOL)
PARAM_DTYPES = (FLOAT, INT)
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


# -- errors and source locations -------------------------------------------------------------

class SpecError(AttnDSLError, ValueError):
    """A spec that does not parse or check.

    ``file``, ``line`` and ``col`` (1-based) locate the offending token; the message is
    ``{file}:{line}:{col}: error: {what}`` followed by the source line and a caret under it.
    """

    def __init__(self, what: str, file: str = "<string>", line: int = 1, col: int = 1,
                 source_line: str = "") -> None:
        self.what, self.file, self.line, self.col = what, file, line, col
        self.source_line = source_line
        super().__init__(located_message(what, file, line, col, source_line))


@dataclass(frozen=True)
class Where:
    """A position in a spec's source (a .attn file, or the Python line that called a builder)."""

    file: str
    line: int
    col: int
    text: str = ""  # the whole source line

    def error(self, what: str) -> SpecError:
        return SpecError(what, self.file, self.line, self.col, self.text)

    def loc(self) -> SourceLoc:
        return SourceLoc(self.file, self.line, self.col, self.text)

    def describe(self, other: Where) -> str:
        """'line 3', or 'file:3' when ``other`` is in another file."""
        return f"line {self.line}" if self.file == other.file else f"{self.file}:{self.line}"


class _Source:
    """The text being parsed, to turn lark positions into :class:`Where` values."""

    def __init__(self, text: str, file: str) -> None:
        self.file = file
        self.lines = text.split("\n")

    def at(self, line: int, col: int) -> Where:
        text = self.lines[line - 1].rstrip("\r") if 0 < line <= len(self.lines) else ""
        return Where(self.file, line, col, text)

    def of(self, item: Any) -> Where:
        """Where a token or a tree's meta starts."""
        return self.at(item.line, item.column)

    def end(self) -> Where:
        return self.at(len(self.lines), len(self.lines[-1].rstrip("\r")) + 1)


class _Bad(Exception):
    """A problem found by a shared check; ``slot`` says which operand (None: the node itself)."""

    def __init__(self, what: str, slot: int | None = None) -> None:
        super().__init__(what)
        self.what, self.slot = what, slot


def check_name(name: str, where: Where, what: str = "name") -> None:
    """Names end up in generated Python: plain ASCII identifiers, no keywords, no dunders."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise where.error(f"{what} {name!r} is not a valid name (use ASCII letters, digits and _, "
                          f"not starting with a digit)")
    if keyword.iskeyword(name):
        raise where.error(f"{name!r} is a Python keyword and cannot be used as {_a(what)}")
    if name.startswith("__"):
        raise where.error(f"{name!r}: names starting with '__' are reserved")
    if name in RESERVED:
        raise where.error(f"{name!r} is a reserved word of the .attn language and cannot be "
                          f"used as {_a(what)}")


def parse_number(text: str) -> int | float:
    """An integer (int64) or a finite float64 from a NUMBER token."""
    shown = text if len(text) <= 24 else text[:20] + "..."
    if any(ch in text for ch in ".eE"):
        value = float(text)
        if math.isinf(value):
            raise _Bad(f"number {shown} overflows float64 (write inf for infinity)")
        return value
    if len(text) > 19 or int(text) >= INT_LIMIT:
        raise _Bad(f"integer {shown} does not fit in 64 bits")
    return int(text)


def _suggest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


# -- operations shared by the text and the Python frontends ----------------------------------

def negate(x: Expr) -> Expr:
    """-x, folding a negated numeric literal into the constant (``-1.0`` is a constant)."""
    if x.dtype == BOOL:
        raise _Bad("cannot negate a boolean; use ! (not)")
    if x.op is Op.CONST:
        return E.const(-x.arg)
    return E.unary(Op.NEG, x)


def logical_not(x: Expr) -> Expr:
    if x.dtype != BOOL:
        raise _Bad(f"! needs a boolean operand (a comparison), got {_a(x.dtype)} expression", 0)
    return E.unary(Op.NOT, x)


def bitwise_not(x: Expr) -> Expr:
    """~x: logical not of a boolean, bitwise not (-x - 1) of an integer, as torch's ~."""
    if x.dtype == FLOAT:
        raise _Bad("~ needs a boolean or integer operand, got a float expression", 0)
    return E.unary(Op.NOT if x.dtype == BOOL else Op.INVERT, x)


_SYMBOL = {Op.AND: "&", Op.OR: "|", Op.XOR: "^", Op.LSHIFT: "<<", Op.RSHIFT: ">>"}


def combine(op: Op, a: Expr, b: Expr) -> Expr:
    """A binary node, with the operand checks of the language."""
    if op in _SYMBOL:
        for slot, x in enumerate((a, b)):
            if x.dtype == FLOAT:
                kinds = "integer" if op in E.SHIFTS else "boolean (or integer)"
                raise _Bad(f"{_SYMBOL[op]} needs {kinds} operands, got a float expression", slot)
    if op in (Op.FLOORDIV, Op.MOD) and E.promote(a.dtype, b.dtype) != FLOAT:
        problem = zero_divisor(b)
        if problem:
            raise _Bad(f"integer {'//' if op is Op.FLOORDIV else '%'} {problem}", 1)
    try:
        return E.binary(op, a, b)
    except IRError as err:
        raise _Bad(str(err)) from None


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
        raise _Bad(f"where() needs a boolean condition (a comparison), got {_a(c.dtype)} "
                   f"expression", 0)
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
_REDUCE_WORD = {Op.REDUCE_SUM: "sum", Op.REDUCE_MAX: "max", Op.SOFTMAX: "softmax"}


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


class _Cycle(Exception):
    def __init__(self, path: list[str]) -> None:
        super().__init__(" -> ".join(path))
        self.path = path


def stable_order(names: Sequence[str], deps: dict[str, list[str]]) -> list[str]:
    """Names in dependency order, keeping the given order wherever it is already valid; raises
    _Cycle with the path of a dependency cycle."""
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
            raise _Cycle(path[seen[nxt]:] + [nxt])
        seen[nxt] = len(path)
        path.append(nxt)


# -- the assembler: declarations and equations -> a verified Cascade --------------------------

Locate = Callable[[Expr, Any], Where]  # (node, slot) -> where to point an error about it


@dataclass
class _Eq:
    name: str
    indices: tuple[str, ...]
    where: Where
    expr: Expr | None = None
    locate: Locate | None = None
    depth: int | None = None  # levels of expr with the equations it reads inlined


class Assembler:
    """Collects one spec's declarations and equations, checks them, builds the Cascade.

    Both frontends drive it: the text frontend with positions of tokens, the builder with the
    Python lines that called it.  Every check raises :class:`SpecError` at such a position.
    """

    def __init__(self, name: str, where: Where) -> None:
        check_name(name, where, "spec name")
        self.name, self.where = name, where
        self.kinds: dict[str, tuple[str, Where]] = {}  # every name -> (what it is, where)
        self.indices: dict[str, IndexDecl] = {}
        self.by_role: dict[str, str] = {}
        self.tensors: dict[str, TensorDecl] = {}
        self.params: dict[str, ParamDecl] = {}
        self.equations: dict[str, _Eq] = {}
        self.mask: tuple[Expr, Where] | None = None
        self.outputs: dict[str, Where] = {}

    # -- declarations (each checks everything before it records anything) --------------------
    def _check_new(self, name: str, kind: str, where: Where) -> None:
        check_name(name, where, kind)
        if name in self.kinds:
            old, at = self.kinds[name]
            raise where.error(f"{name!r} is already declared as {_a(old)} on {at.describe(where)}")

    def _check_extent(self, name: str, where: Where, owner: str, owner_kind: str) -> None:
        check_name(name, where, "extent")
        kind = owner_kind if name == owner else self.kinds.get(name, ("extent",))[0]
        if kind != "extent":
            raise where.error(f"{name!r} is {_a(kind)}; an extent needs a name of its own")

    def _record(self, name: str, kind: str, where: Where) -> None:
        self.kinds.setdefault(name, (kind, where))

    def index(self, name: str, extent: str, role: str | None, w_name: Where,
              w_extent: Where | None = None, w_role: Where | None = None) -> None:
        self._check_new(name, "index", w_name)
        self._check_extent(extent, w_extent or w_name, name, "index")
        if role is None:
            if name not in ROLE_BY_NAME:
                raise w_name.error(f"cannot infer the role of index {name!r}; write it after the "
                                   f"extent, one of: {', '.join(ROLES)}")
            role = ROLE_BY_NAME[name]
        elif role not in ROLES:
            raise (w_role or w_name).error(f"unknown role {role!r}; expected one of: "
                                           f"{', '.join(ROLES)}")
        if role in UNIQUE_ROLES and role in self.by_role:
            raise w_name.error(f"index {name!r} is a second {role} index ({self.by_role[role]!r} "
                               f"is the first); a spec has at most one")
        self._record(name, "index", w_name)
        self._record(extent, "extent", w_extent or w_name)
        self.by_role.setdefault(role, name)
        self.indices[name] = IndexDecl(name, extent, role)

    def tensor(self, name: str, dims: Sequence[str], dtype: str | None, kind: str,
               w_name: Where, w_dims: Sequence[Where] = (), w_dtype: Where | None = None) -> None:
        what = "input tensor" if kind == "input" else "captured tensor"
        self._check_new(name, what, w_name)
        if not dims:
            raise w_name.error(f"tensor {name!r} needs at least one dimension")
        w_dims = [w_dims[i] if i < len(w_dims) else w_name for i in range(len(dims))]
        for d, w in zip(dims, w_dims, strict=True):
            self._check_extent(d, w, name, what)
        dtype = FLOAT if dtype is None else dtype
        if dtype not in TENSOR_DTYPES:
            raise (w_dtype or w_name).error(f"unknown type {dtype!r}; expected one of: "
                                            f"{', '.join(TENSOR_DTYPES)}")
        self._record(name, what, w_name)
        for d, w in zip(dims, w_dims, strict=True):
            self._record(d, "extent", w)
        self.tensors[name] = TensorDecl(name, tuple(dims), dtype, kind)

    def param(self, name: str, dtype: str, default: Any, w_name: Where,
              w_dtype: Where | None = None, w_default: Where | None = None) -> None:
        self._check_new(name, "parameter", w_name)
        if dtype not in PARAM_DTYPES:
            raise (w_dtype or w_name).error(f"unknown parameter type {dtype!r}; expected one of: "
                                            f"{', '.join(PARAM_DTYPES)}")
        if default is not None:
            wd = w_default or w_name
            if isinstance(default, bool) or not isinstance(default, (int, float)):
                raise wd.error(f"the default of {name!r} must be a number, got {default!r}")
            if dtype == INT and not isinstance(default, int):
                raise wd.error(f"the default of int parameter {name!r} must be an integer, got "
                               f"{render_const(default)}")
            if math.isnan(default) or abs(default) >= (INT_LIMIT if dtype == INT else math.inf):
                raise wd.error(f"the default of {name!r} is out of range: {default!r}")
            default = float(default) if dtype == FLOAT else default
        self._record(name, "parameter", w_name)
        self.params[name] = ParamDecl(name, dtype, default)

    def header(self, name: str, indices: Sequence[str], w_name: Where,
               w_indices: Sequence[Where] = ()) -> None:
        """Declare an equation ``name[indices]`` (its body comes later)."""
        self._check_new(name, "equation", w_name)
        if not indices:
            raise w_name.error(f"equation {name!r} needs at least one index")
        seen: set[str] = set()
        for i, idx in enumerate(indices):
            w = w_indices[i] if i < len(w_indices) else w_name
            if idx not in self.indices:
                raise w.error(self._not_an_index(idx, f"the left-hand side of {name}"))
            if idx in seen:
                raise w.error(f"index {idx!r} appears twice on the left-hand side of {name}")
            seen.add(idx)
        self._record(name, "equation", w_name)
        self.equations[name] = _Eq(name, tuple(indices), w_name)

    def define(self, name: str, indices: Sequence[str], expr: Expr, where: Where) -> None:
        """Header and body at once (the builder); nothing is recorded if a check fails."""
        self.header(name, indices, where)
        try:
            self.body(name, expr, lambda node, slot: where)
        except BaseException:
            del self.equations[name], self.kinds[name]
            raise

    def output(self, name: str, where: Where) -> None:
        _expect_name(name, where, "output()")
        if name in self.outputs:
            raise where.error(f"{name!r} is already an output (line {self.outputs[name].line})")
        self.outputs[name] = where

    def check_roles(self) -> None:
        for role in ("query", "key"):
            if role not in self.by_role:
                raise self.where.error(f"spec {self.name!r} has no {role} index; declare one, "
                                       f"e.g. `index {'m: M' if role == 'query' else 'n: N'} "
                                       f"{role}`")

    # -- names in expressions ----------------------------------------------------------------
    def _not_an_index(self, name: str, place: str) -> str:
        if name in self.kinds:
            return f"{name!r} in {place} is {_a(self.kinds[name][0])}, not an index"
        return f"unknown index {name!r} in {place}{_suggest(name, self.indices)}"

    def scalar(self, name: str, where: Where) -> Expr:
        """What a bare name denotes: an index, a parameter or an extent."""
        _expect_name(name, where, "var()")
        kind = self.kinds.get(name, (None,))[0]
        if kind == "index":
            return E.index(name)
        if kind == "parameter":
            return E.param(name, self.params[name].dtype)
        if kind == "extent":
            return E.param(name, INT)
        if kind is not None:
            raise where.error(f"{name!r} is {_a(kind)}; read it with subscripts, e.g. "
                              f"{name}[{', '.join(self._dims_of(name))}]")
        raise where.error(f"unknown name {name!r}{_suggest(name, self.kinds)}")

    def index_name(self, name: str, where: Where, place: str) -> str:
        _expect_name(name, where, place)
        if name not in self.indices:
            raise where.error(self._not_an_index(name, place))
        return name

    def _dims_of(self, name: str) -> tuple[str, ...]:
        if name in self.tensors:
            return self.tensors[name].dims
        return self.equations[name].indices

    def read(self, name: str, subs: Sequence[Expr], where: Where) -> Expr:
        """``name[subs]``: a tensor, or an equation whose body is already built."""
        _expect_name(name, where, "read()")
        if name in self.tensors:
            return E.load(name, tuple(subs), self.tensors[name].dtype)
        eq = self.equations.get(name)
        if eq is not None and eq.expr is not None:
            return E.load(name, tuple(subs), eq.expr.dtype)
        if eq is not None:
            raise where.error(f"{name!r} is read before it is defined")
        kind = self.kinds.get(name, (None,))[0]
        if kind is not None:
            raise where.error(f"{name!r} is {_a(kind)}, not a tensor")
        names = list(self.tensors) + list(self.equations)
        raise where.error(f"unknown tensor {name!r}{_suggest(name, names)}")

    # -- equations ---------------------------------------------------------------------------
    def body(self, name: str, expr: Expr, locate: Locate) -> None:
        """Check an equation's right-hand side and store it with its implicit sums."""
        eq = self.equations[name]
        self._check_expr(expr, locate, f"{name}[{', '.join(eq.indices)}]")
        eq.expr, eq.locate = implicit_sums(expr, eq.indices), locate
        try:
            eq.depth = self._inlined_depth(eq.expr)
        except _Bad as bad:
            eq.expr = eq.locate = None
            raise eq.where.error(f"equation {name}: {bad.what}") from None

    def _inlined_depth(self, expr: Expr) -> int:
        """Levels of ``expr`` once the equations it reads are substituted (as fusion does):
        a read of an equation counts that equation's own inlined depth."""
        memo: dict[Expr, int] = {}
        for node in expr.walk():
            eq = self.equations.get(node.arg) if node.op is Op.LOAD else None
            below = max((memo[s] for s in node.src), default=0)
            memo[node] = 1 + below if eq is None or eq.depth is None else \
                max(eq.depth, 1 + below)
        if memo[expr] > MAX_DEPTH:
            raise _Bad(f"the expression is nested too deeply once the equations it reads are "
                       f"substituted ({memo[expr]} levels of operators, more than {MAX_DEPTH})")
        return memo[expr]

    def set_mask(self, expr: Expr, locate: Locate, where: Where) -> None:
        if self.mask is not None:
            raise where.error(f"a second mask (the first is on {self.mask[1].describe(where)}); "
                              f"combine the conditions with &")
        self._check_expr(expr, locate, "the mask", mask=True)
        if expr.dtype != BOOL:
            raise locate(expr, None).error(f"the mask must be a boolean condition (a comparison, "
                                           f"&, |, !), got {_a(expr.dtype)} expression")
        allowed = {self.by_role[r] for r in UNIQUE_ROLES if r in self.by_role}
        for node in expr.walk():
            if node.op is Op.INDEX and node.arg not in allowed:
                raise locate(node, None).error(
                    f"the mask may use only the batch, head, query and key indices; "
                    f"{node.arg!r} is the {self.indices[node.arg].role} index")
        self.mask = (expr, where)

    def _check_expr(self, expr: Expr, locate: Locate, what: str, mask: bool = False) -> None:
        for node in expr.walk():
            op = node.op
            try:
                if op is Op.LOAD:
                    self._check_load(node, mask)
                elif op is Op.INDEX and node.arg not in self.indices:
                    raise _Bad(self._not_an_index(node.arg, what))
                elif op is Op.PARAM and self.kinds.get(node.arg, ("",))[0] not in (
                        "parameter", "extent"):
                    raise _Bad(f"unknown parameter {node.arg!r}")
                elif op is Op.CONST and isinstance(node.arg, float) and math.isnan(node.arg):
                    raise _Bad("a constant is not a number (NaN)")
                elif op is Op.ROW:
                    raise _Bad("row values belong to schedules, not to specs")
                elif op in _REDUCE_WORD:
                    self._check_reduction(node, mask)
            except _Bad as bad:
                slot = "arg" if op in _REDUCE_WORD and bad.slot is None else bad.slot
                raise locate(node, slot).error(bad.what) from None

    def _check_reduction(self, node: Expr, mask: bool) -> None:
        word, i = _REDUCE_WORD[node.op], node.arg
        if mask:
            raise _Bad(f"the mask cannot contain {word}(); it is a condition on single elements")
        if i not in self.indices:
            raise _Bad(self._not_an_index(i, f"{word}({i})"))
        if i not in node.src[0].free_indices():
            raise _Bad(f"{word}({i}) reduces over {i!r}, which its body does not use")

    def _check_load(self, node: Expr, mask: bool) -> None:
        name, subs = node.arg, node.src
        if name in self.tensors:
            dims, t = self.tensors[name].dims, self.tensors[name]
            if mask and t.kind != "captured":
                raise _Bad(f"the mask may read only captured tensors (declared with `tensor`); "
                           f"{name!r} is an input")
        elif name in self.equations:
            dims, t = self.equations[name].indices, None
            if mask:
                raise _Bad(f"the mask cannot read equation results ({name!r})")
        else:
            raise _Bad(f"unknown tensor {name!r}")
        if len(subs) != len(dims):
            raise _Bad(f"{name} has {len(dims)} dimension{'s' * (len(dims) != 1)} "
                       f"({name}[{', '.join(dims)}]) but is read with {len(subs)} subscript"
                       f"{'s' * (len(subs) != 1)}")
        for k, s in enumerate(subs):
            if t is None:
                if s.op is not Op.INDEX or s.arg != dims[k]:
                    raise _Bad(f"{name} must be read at the indices it is defined over, "
                               f"{name}[{', '.join(dims)}]; only input and captured tensors "
                               f"accept other subscripts", k)
            elif s.dtype == FLOAT:
                raise _Bad(f"subscript {k + 1} of {name} is a float expression; subscripts must "
                           f"be integers", k)
            elif s.op is Op.INDEX and s.arg in self.indices and \
                    self.indices[s.arg].extent != dims[k]:
                raise _Bad(f"index {s.arg!r} has extent {self.indices[s.arg].extent} but "
                           f"dimension {k + 1} of {name} has extent {dims[k]}", k)

    # -- the cascade -------------------------------------------------------------------------
    def finish(self) -> Cascade:
        self.check_roles()
        if not self.outputs:
            raise self.where.error(f"spec {self.name!r} has no output; add `output O`")
        for name, w in self.outputs.items():
            if name not in self.equations:
                kind = self.kinds.get(name, (None,))[0]
                if kind is not None:
                    raise w.error(f"output {name!r} is {_a(kind)}; outputs are defined by "
                                  f"equations")
                raise w.error(f"output {name!r} is not defined by any equation"
                              f"{_suggest(name, self.equations)}")
        eqs = self.equations
        reads = {n: [x for x in e.expr.walk() if x.op is Op.LOAD and x.arg in eqs]
                 for n, e in eqs.items() if e.expr is not None}
        try:
            order = stable_order(list(reads), {n: [x.arg for x in r] for n, r in reads.items()})
        except _Cycle as cyc:
            src, dst = cyc.path[0], cyc.path[1]
            load = next(x for x in reads[src] if x.arg == dst)
            raise eqs[src].locate(load, None).error(f"equations depend on each other in a "
                                                    f"cycle: {cyc}") from None
        used = {x.arg for n, r in reads.items() for x in r if x.arg != n}
        for name, eq in eqs.items():
            if name not in used and name not in self.outputs:
                raise eq.where.error(f"equation {name} is never used")
        mask = None
        if self.mask is not None:
            keep = tuple(self.by_role[r] for r in UNIQUE_ROLES if r in self.by_role)
            mask = Equation("Keep", keep, self.mask[0], self.mask[1].loc())
        cascade = Cascade(self.name, tuple(self.indices.values()), tuple(self.tensors.values()),
                          tuple(self.params.values()),
                          tuple(Equation(n, eqs[n].indices, eqs[n].expr, eqs[n].where.loc())
                                for n in order),
                          tuple(self.outputs), mask)
        try:
            return verify(cascade)
        except IRError as err:
            msg, at = str(err), self.where
            for eq in list(eqs.values()) + ([] if self.mask is None else [self.mask]):
                w = eq.where if isinstance(eq, _Eq) else eq[1]
                if msg.startswith(f"{w.loc()}: "):
                    msg, at = msg[len(f"{w.loc()}: "):], w
                    break
            raise at.error(msg) from None


def _expect_name(name: Any, where: Where, place: str) -> None:
    """Lookups take names (the builder passes whatever its caller gave)."""
    if not isinstance(name, str):
        raise where.error(f"{place} takes a name (a str), got {type(name).__name__} {name!r}")


def _a(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


# -- the text frontend -----------------------------------------------------------------------

class _TooDeep(Exception):
    def __init__(self, token: Token) -> None:
        super().__init__()
        self.token = token


class _Layout:
    """Post-lexer: a newline inside ( ) or [ ], or right after ',', continues the statement."""

    always_accept = ("_NL",)

    def process(self, stream: Iterable[Token]) -> Iterable[Token]:
        depth, prev = 0, None
        for tok in stream:
            if tok.type in ("LPAR", "LSQB"):
                depth += 1
                if depth > MAX_BRACKETS:
                    raise _TooDeep(tok)
            elif tok.type in ("RPAR", "RSQB"):
                depth = max(0, depth - 1)
            elif tok.type == "_NL" and tok.value != ";" and (depth or prev == "COMMA"):
                continue
            prev = tok.type
            yield tok


def grammar_text() -> str:
    """grammar/attn.lark: from the source tree (a checkout, an editable install) or else from
    the installed ``attndsl.grammar`` package."""
    local = Path(__file__).resolve().parents[2] / "grammar" / GRAMMAR_FILE
    if local.is_file():
        return local.read_text(encoding="utf-8")
    resource = importlib.resources.files("attndsl.grammar").joinpath(GRAMMAR_FILE)
    return resource.read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def parser() -> Lark:
    """The LALR parser of grammar/attn.lark (built once)."""
    return Lark(grammar_text(), parser="lalr", propagate_positions=True, postlex=_Layout(),
                maybe_placeholders=True)


# readable names of the terminals in syntax errors
_WORDS = {"NAME": "a name", "NUMBER": "a number", "CMP_OP": "a comparison", "_NL": "end of line",
          "$END": "end of input"}
_EXPR_START = {"NAME", "NUMBER", "(", "-", "!", "~", "sum", "max", "softmax", "inf", "True",
               "False"}
_OPERATORS = {"+", "-", "*", "/", "//", "%", "**", "&", "|", "^", "<<", ">>", "CMP_OP"}
_FIRST = {"]": 0, ")": 1, "}": 2, ",": 3}


def _expected(names: Iterable[str]) -> str:
    """'; expected one of: ...' for a set of terminal names, literals quoted, in plain words."""
    literal = {t.name: t.pattern.value for t in parser().terminals if t.pattern.type == "str"}
    items = {literal.get(n, n) for n in names}
    words: list[str] = []
    if {"NAME", "NUMBER", "("} <= items:
        items -= _EXPR_START
        words.append("an expression")
    if {"+", "*", "CMP_OP"} <= items:
        items -= _OPERATORS
        words.append("an operator")
    quoted = sorted((i for i in items if i not in _WORDS and i in literal.values()),
                    key=lambda q: (_FIRST.get(q, 9), q))
    words += sorted((_WORDS.get(i, i.lower()) for i in items if i not in quoted),
                    key=lambda w: (w.startswith("end of"), w))
    shown = [f"'{q}'" for q in quoted]
    if len(shown) + len(words) == 1:
        return f"; expected {(shown + words)[0]}"
    listed = ", ".join(([" ".join(shown)] if shown else []) + words)
    return f"; expected one of: {listed}" if listed else ""


def _found(tok: Token) -> str:
    if tok.type == "$END":
        return "end of input"
    if tok.type == "_NL":
        return "end of line" if tok.value != ";" else "';'"
    value = tok.value if len(tok.value) <= 24 else tok.value[:20] + "..."
    if tok.type == "NAME":
        return f"name {value!r}"
    if tok.type == "NUMBER":
        return f"number {value}"
    return repr(value)


def _syntax_error(err: UnexpectedInput, text: str, src: _Source) -> SpecError:
    if isinstance(err, UnexpectedToken):
        tok = err.token
        at = src.end() if tok.type == "$END" else src.of(tok)
        what = f"unexpected {_found(tok)}{_expected(err.accepts or err.expected)}"
        if tok.type == "NAME" and tok.value in RESERVED:
            what += f" ('{tok.value}' is a reserved word)"
        opened = _open_bracket(text[: tok.start_pos] if tok.type != "$END" else text)
        if opened is not None and opened.line < at.line:
            what += f" (the '{opened.value}' on line {opened.line} is not closed)"
        return at.error(what)
    if isinstance(err, UnexpectedCharacters):
        ch = err.char
        what = f"unexpected character {ch!r}"
        if ch.isalpha() and not ch.isascii():
            what += " (names may use only ASCII letters, digits and _)"
        elif ch in "'\"":
            what += " (the .attn language has no strings)"
        else:
            what += _expected_before(text[: err.pos_in_stream])
        return src.at(err.line, err.column).error(what)
    return src.at(getattr(err, "line", 1) or 1, getattr(err, "column", 1) or 1).error(
        "syntax error")


def _open_bracket(prefix: str) -> Token | None:
    """The innermost ( or [ left open at the end of ``prefix``."""
    stack: list[Token] = []
    try:
        for tok in parser().lex(prefix):
            if tok.type in ("LPAR", "LSQB"):
                stack.append(tok)
            elif tok.type in ("RPAR", "RSQB") and stack:
                stack.pop()
    except (LarkError, _TooDeep):
        return None
    return stack[-1] if stack else None


def _expected_before(prefix: str) -> str:
    """What the parser would accept after ``prefix`` (the text before a bad character)."""
    try:
        parser().parse(prefix)
    except UnexpectedToken as err:
        if err.token.type == "$END":
            return _expected((err.accepts or err.expected) - {"$END"})
    except (LarkError, _TooDeep):
        pass
    return ""


def _check_tree(tree: Tree, src: _Source) -> None:
    """Depth limit (a deep tree would exhaust Python's recursion) and safe names, iteratively."""
    stack: list[tuple[Tree, int, Tree]] = [(tree, 0, tree)]
    names: list[Token] = []
    while stack:
        node, depth, top = stack.pop()
        if depth > MAX_DEPTH:
            raise src.of(top.meta).error(f"expression is nested too deeply (more than "
                                         f"{MAX_DEPTH} levels of operators)")
        for child in node.children:
            if isinstance(child, Tree):  # start > spec > statement > expression > ...
                stack.append((child, depth + 1, child if depth == 2 else top))
            elif isinstance(child, Token) and child.type == "NAME":
                names.append(child)
    for tok in sorted(names, key=lambda t: (t.line, t.column)):
        if keyword.iskeyword(tok.value) or tok.value.startswith("__"):
            check_name(tok.value, src.of(tok))


@v_args(inline=True, meta=True)
class _Exprs(Transformer):
    """Expression parse tree -> IR expression; one method per alias of grammar/attn.lark.

    ``first`` maps (node, slot) to where the node first appears, for errors found later;
    ``latest`` to where it appeared last (the operands of the node being built)."""

    def __init__(self, asm: Assembler, src: _Source) -> None:
        super().__init__(visit_tokens=False)
        self.asm, self.src = asm, src
        self.first: dict[tuple[Expr, Any], Where] = {}
        self.latest: dict[Expr, Where] = {}

    def _locate(self, node: Expr, slot: Any) -> Where:
        return self.first.get((node, slot)) or self.first[(node, None)]

    def _where(self, item: Any) -> Where:
        return item if isinstance(item, Where) else self.src.of(item)

    def _at(self, item: Any, e: Expr, slot: Any = None) -> Expr:
        w = self._where(item)
        self.first.setdefault((e, slot), w)
        if slot is None:
            self.latest[e] = w
        return e

    def _op(self, meta: Any, fn: Callable[..., Expr], *args: Expr) -> Expr:
        try:
            e = fn(*args)
        except _Bad as bad:
            w = self.latest[args[bad.slot]] if bad.slot is not None else self._where(meta)
            raise w.error(bad.what) from None
        except IRError as err:
            raise self._where(meta).error(str(err)) from None
        if e.depth > MAX_DEPTH:  # a chain a < b < c < ... nests without nesting the tree
            raise self._where(meta).error(f"expression is nested too deeply (more than "
                                          f"{MAX_DEPTH} levels of operators)")
        return self._at(meta, e)

    # leaves
    def number(self, meta: Any, tok: Token) -> Expr:
        try:
            return self._at(tok, E.const(parse_number(tok.value)))
        except _Bad as bad:
            raise self.src.of(tok).error(bad.what) from None

    def inf(self, meta: Any) -> Expr:
        return self._at(meta, E.const(math.inf))

    def true(self, meta: Any) -> Expr:
        return self._at(meta, E.const(True))

    def false(self, meta: Any) -> Expr:
        return self._at(meta, E.const(False))

    def name(self, meta: Any, tok: Token) -> Expr:
        return self._at(tok, self.asm.scalar(tok.value, self.src.of(tok)))

    def load(self, meta: Any, tok: Token, *subs: Expr) -> Expr:
        e = self._at(tok, self.asm.read(tok.value, subs, self.src.of(tok)))
        for k, s in enumerate(subs):
            self._at(self.latest[s], e, k)
        return e

    def call(self, meta: Any, tok: Token, *args: Expr) -> Expr:
        fn = FUNCTIONS.get(tok.value)
        if fn is None:
            raise self.src.of(tok).error(f"unknown function {tok.value!r}"
                                         f"{_suggest(tok.value, FUNCTIONS)}; the functions are: "
                                         f"{', '.join(sorted(FUNCTIONS))}")
        if len(args) != fn[0]:
            raise self.src.of(tok).error(f"{tok.value}() takes {fn[0]} argument"
                                         f"{'s' * (fn[0] != 1)}, got {len(args)}")
        return self._op(meta, fn[1], *args)

    def maximum(self, meta: Any, a: Expr, b: Expr) -> Expr:
        return self._op(meta, combine, Op.MAX, a, b)

    # operators
    def _binary(op: Op) -> Callable[..., Expr]:
        def method(self: _Exprs, meta: Any, a: Expr, b: Expr) -> Expr:
            return self._op(meta, lambda x, y: combine(op, x, y), a, b)
        return method

    add, sub, mul, div = _binary(Op.ADD), _binary(Op.SUB), _binary(Op.MUL), _binary(Op.DIV)
    floordiv, mod, pow = _binary(Op.FLOORDIV), _binary(Op.MOD), _binary(Op.POW)
    and_, or_, xor = _binary(Op.AND), _binary(Op.OR), _binary(Op.XOR)
    lshift, rshift = _binary(Op.LSHIFT), _binary(Op.RSHIFT)

    def neg(self, meta: Any, x: Expr) -> Expr:
        return self._op(meta, negate, x)

    def invert(self, meta: Any, x: Expr) -> Expr:
        return self._op(meta, bitwise_not, x)

    def not_(self, meta: Any, x: Expr) -> Expr:
        return self._op(meta, logical_not, x)

    def comparison(self, meta: Any, *items: Any) -> Expr:
        """a < b <= c is (a < b) & (b <= c)."""
        result = None
        for k in range(1, len(items), 2):
            a, op, b = items[k - 1], items[k], items[k + 1]
            at = self.latest[a]  # a comparison is located at its left operand
            cmp = self._op(at, lambda x, y, o=BINARY_OPS[op.value]: combine(o, x, y), a, b)
            result = cmp if result is None else self._op(meta, combine, Op.AND, result, cmp)
        assert result is not None
        return result

    def _reduction(word: str) -> Callable[..., Expr]:
        def method(self: _Exprs, meta: Any, tok: Token, body: Expr) -> Expr:
            w = self.src.of(tok)
            idx = self.asm.index_name(tok.value, w, f"{word}({tok.value})")
            return self._at(w, self._at(meta, REDUCTIONS[word](idx, body)), "arg")
        return method

    reduce_sum, reduce_max, softmax = _reduction("sum"), _reduction("max"), _reduction("softmax")


def _transform(ex: _Exprs, tree: Any) -> Expr:
    try:
        return ex.transform(tree) if isinstance(tree, Tree) else tree
    except VisitError as err:
        if isinstance(err.orig_exc, SpecError):
            raise err.orig_exc from None
        raise


def _eq_reads(tree: Tree, equations: dict[str, _Eq]) -> list[Token]:
    """The NAME tokens of the equation results an expression tree reads, in source order."""
    found: list[Token] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if node.data == "load" and node.children[0].value in equations:
            found.append(node.children[0])
        stack.extend(c for c in node.children if isinstance(c, Tree))
    return sorted(found, key=lambda t: (t.line, t.column))


def _read_spec(tree: Tree, src: _Source) -> Cascade:
    name_tok, *stmts = tree.children
    asm = Assembler(name_tok.value, src.of(name_tok))
    bodies: dict[str, Tree] = {}
    masks: list[Tree] = []
    for st in stmts:
        kids = st.children
        if st.data == "index_stmt":
            for d in kids:
                n, ext, role = d.children
                asm.index(n.value, ext.value, role and role.value, src.of(n), src.of(ext),
                          role and src.of(role))
        elif st.data in ("input_stmt", "tensor_stmt"):
            kind = "input" if st.data == "input_stmt" else "captured"
            for d in kids:
                n, *dims, dtype = d.children
                asm.tensor(n.value, [t.value for t in dims], dtype and dtype.value, kind,
                           src.of(n), [src.of(t) for t in dims], dtype and src.of(dtype))
        elif st.data == "param_stmt":
            n, dtype, default = kids
            value = None if default is None else _transform(_Exprs(asm, src), default).arg
            asm.param(n.value, dtype.value, value, src.of(n), src.of(dtype),
                      None if default is None else src.of(default.meta))
        elif st.data == "output_stmt":
            for t in kids:
                asm.output(t.value, src.of(t))
        elif st.data == "mask_stmt":
            masks.append(st)
        else:  # equation
            n, *idx, body = kids
            asm.header(n.value, [t.value for t in idx], src.of(n), [src.of(t) for t in idx])
            bodies[n.value] = body
    asm.check_roles()
    reads = {n: _eq_reads(b, asm.equations) for n, b in bodies.items()}
    try:
        order = stable_order(list(bodies), {n: [t.value for t in r] for n, r in reads.items()})
    except _Cycle as cyc:
        tok = next(t for t in reads[cyc.path[0]] if t.value == cyc.path[1])
        raise src.of(tok).error(f"equations depend on each other in a cycle: {cyc}") from None
    for name in order:
        ex = _Exprs(asm, src)
        asm.body(name, _transform(ex, bodies[name]), ex._locate)
    for st in masks:
        ex = _Exprs(asm, src)
        asm.set_mask(_transform(ex, st.children[0]), ex._locate, src.of(st.meta))
    return asm.finish()


def normalize_newlines(text: str) -> str:
    """Windows (\\r\\n) and classic Mac (lone \\r) line ends as \\n: lark counts lines by \\n
    only, so a file with lone carriage returns would otherwise be one long line."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_text(text: str, filename: str = "<string>") -> dict[str, Cascade]:
    """Parse .attn text holding one or more specs into verified cascades, by spec name.

    Raises :class:`SpecError` (a ValueError) at the first problem."""
    if not isinstance(text, str):
        raise TypeError(f"parse_text() takes a str, got {type(text).__name__}")
    text = normalize_newlines(text)
    src = _Source(text, filename)
    try:
        tree = parser().parse(text)
    except _TooDeep as deep:
        raise src.of(deep.token).error(f"brackets are nested too deeply (more than "
                                       f"{MAX_BRACKETS} open at once)") from None
    except UnexpectedInput as err:
        raise _syntax_error(err, text, src) from None
    except LarkError as err:
        raise src.at(1, 1).error(f"cannot parse: {type(err).__name__}") from None
    specs: dict[str, Cascade] = {}
    try:
        _check_tree(tree, src)
        for spec in tree.children:
            c = _read_spec(spec, src)
            if c.name in specs:
                raise src.of(spec.children[0]).error(f"a second spec named {c.name!r}")
            specs[c.name] = c
    except RecursionError:
        raise src.at(1, 1).error("the spec is nested too deeply to process") from None
    if not specs:
        raise src.end().error("no spec found; a file holds `spec NAME { ... }` blocks")
    return specs


def parse_file(path: str | Path) -> dict[str, Cascade]:
    """Parse a .attn file (see :func:`parse_text`); errors name the file."""
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        before = data[: err.start].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        line = before.count(b"\n") + 1
        raise SpecError("the file is not valid UTF-8", str(path), line, 1) from None
    return parse_text(text, str(path))


def format_cascade(c: Cascade) -> str:
    """A cascade as .attn text (explicit roles, types and sums); parse_text reads it back."""
    lines = [f"spec {c.name} {{"]
    lines.append("  index " + ", ".join(f"{i.name}: {i.extent} {i.role}" for i in c.indices))
    for t in c.tensors:
        kind = "input" if t.kind == "input" else "tensor"
        lines.append(f"  {kind} {t.name}[{', '.join(t.dims)}]: {t.dtype}")
    for p in c.params:
        default = "" if p.default is None else f" = {render_const(p.default)}"
        lines.append(f"  param {p.name}: {p.dtype}{default}")
    if c.mask is not None:
        lines.append(f"  mask {render(c.mask.expr)}")
    lines.extend(f"  {eq}" for eq in c.equations)
    lines.append(f"  output {', '.join(c.outputs)}")
    lines.append("}")
    return "\n".join(lines) + "\n"


__all__ = ["FUNCTIONS", "Assembler", "SpecError", "Where", "format_cascade", "grammar_text",
           "implicit_sums", "parse_file", "parse_text", "parser"]
