"""Cascades from Python: the specs of the ``.attn`` language, built with Python operators.

Inline text (one spec)::

    c = cascade('''
      spec causal {
        index b: B, h: H, m: M, n: N, e: E, f: F
        ...
      }''')

or a builder (the same cascade, checked the same way, equal as IR)::

    b = CascadeBuilder("causal_softmax3")
    b.index("b", "B", "batch").index("h", "H", "head").index("m", "M", "query")
    b.index("n", "N", "key").index("e", "E", "qk").index("f", "F", "v")
    b.input("Q", "B", "H", "M", "E").input("K", "B", "HKV", "N", "E")
    b.input("V", "B", "HKV", "N", "F")
    b.param("scale", "float").param("G", "int")
    bb, h, m, n, e, f = (b.idx(i) for i in "bhmnef")
    G = b.var("G")
    b.mask(n <= m)
    b.eq("QK", "b h m n", b.read("Q", bb, h, m, e) * b.read("K", bb, h // G, n, e)
         * b.var("scale"))                                  # e is summed (Einsum convention)
    b.eq("GM", "b h m", max_over(n, b.read("QK", bb, h, m, n)))
    ...
    b.output("O")
    c = b.build()

Expressions are :class:`Term` values: ``+ - * / // % **``, comparisons, ``&``, ``|`` and
``~`` (the text's ``!``) build IR nodes; :func:`exp`, :func:`where`, :func:`sum_over` and the
other functions mirror the text's.  Python evaluates ``0 <= m`` as ``m >= 0``, so keep a Term on
the left of a comparison when the IR must match a text spec node for node; chained comparisons
(``a < b < c``) need an explicit ``&``.  Errors are :class:`SpecError` located at the Python
line that made the bad call.
"""

from __future__ import annotations

import linecache
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from attndsl.frontend.assembler import Assembler
from attndsl.frontend.ops import FUNCTIONS, bitwise_not, combine, negate
from attndsl.frontend.source import INT_LIMIT, SpecError, UnlocatedError, Where
from attndsl.frontend.text import parse_text
from attndsl.ir import expr as E
from attndsl.ir.cascade import Cascade
from attndsl.ir.expr import MAX_DEPTH, Expr, IRError, Op, render

_FRONTEND = os.path.dirname(os.path.abspath(__file__))


def _caller() -> Where:
    """The first frame outside attndsl/frontend: file, line, column and text of the call."""
    frame = sys._getframe(1)
    while frame is not None and \
            os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _FRONTEND:
        frame = frame.f_back
    if frame is None:
        return Where("<builder>", 1, 1)
    line, col = frame.f_lineno or 1, 1
    positions = getattr(frame.f_code, "co_positions", None)  # Python 3.11+
    if positions is not None:
        try:
            pos = list(positions())[frame.f_lasti // 2]
            line, col = pos[0] or line, (pos[2] or 0) + 1
        except (IndexError, TypeError):
            pass
    text = linecache.getline(frame.f_code.co_filename, line).rstrip("\r\n")
    return Where(frame.f_code.co_filename, line, col, text)


def _apply(fn: Callable[..., Expr], *args: Any) -> Expr:
    try:
        e = fn(*args)
    except UnlocatedError as bad:
        raise _caller().error(bad.what) from None
    except IRError as err:
        raise _caller().error(str(err)) from None
    if e.depth > MAX_DEPTH:
        raise _caller().error(f"expression is nested too deeply (more than {MAX_DEPTH} levels "
                              f"of operators)")
    return e


def lift(x: Any) -> Expr:
    """A Term, an IR expression or a Python number as an IR expression."""
    if isinstance(x, Term):
        return x.expr
    if isinstance(x, Expr):
        return x
    if isinstance(x, bool):
        return E.const(x)
    if isinstance(x, int):
        if abs(x) >= INT_LIMIT:
            raise _caller().error(f"integer {x} does not fit in 64 bits")
        return E.const(x)
    if isinstance(x, float):
        if math.isnan(x):
            raise _caller().error("a constant is not a number (NaN)")
        return E.const(x)
    hint = "; name an index with b.idx('m')" if isinstance(x, str) else ""
    raise _caller().error(f"cannot use a {type(x).__name__} in an expression{hint}")


def _binop(op: Op, reflected: bool = False) -> Callable[[Term, Any], Term]:
    def method(self: Term, other: Any) -> Term:
        a, b = self.expr, lift(other)
        return Term(_apply(combine, op, *((b, a) if reflected else (a, b))))
    return method


class Term:
    """An expression under construction; Python operators build IR nodes.

    ``~t`` is the text's ``~t`` (``!t`` of a boolean, bitwise not of an integer); ``t == u``
    builds a comparison (Terms are not hashable).
    ``t.expr`` is the IR expression."""

    __slots__ = ("expr",)
    __hash__ = None  # type: ignore[assignment]  # == builds an expression

    def __init__(self, expr: Expr) -> None:
        self.expr = expr

    def __repr__(self) -> str:
        return f"Term({render(self.expr)})"

    def __str__(self) -> str:
        return render(self.expr)

    def __bool__(self) -> bool:
        raise _caller().error("an expression has no truth value: use & | ~ instead of and/or/"
                              "not, where() instead of if, and (a < b) & (b < c) instead of "
                              "a < b < c")

    __add__, __radd__ = _binop(Op.ADD), _binop(Op.ADD, True)
    __sub__, __rsub__ = _binop(Op.SUB), _binop(Op.SUB, True)
    __mul__, __rmul__ = _binop(Op.MUL), _binop(Op.MUL, True)
    __truediv__, __rtruediv__ = _binop(Op.DIV), _binop(Op.DIV, True)
    __floordiv__, __rfloordiv__ = _binop(Op.FLOORDIV), _binop(Op.FLOORDIV, True)
    __mod__, __rmod__ = _binop(Op.MOD), _binop(Op.MOD, True)
    __pow__, __rpow__ = _binop(Op.POW), _binop(Op.POW, True)
    __and__, __rand__ = _binop(Op.AND), _binop(Op.AND, True)
    __or__, __ror__ = _binop(Op.OR), _binop(Op.OR, True)
    __xor__, __rxor__ = _binop(Op.XOR), _binop(Op.XOR, True)
    __lshift__, __rlshift__ = _binop(Op.LSHIFT), _binop(Op.LSHIFT, True)
    __rshift__, __rrshift__ = _binop(Op.RSHIFT), _binop(Op.RSHIFT, True)
    __lt__, __le__ = _binop(Op.LT), _binop(Op.LE)
    __gt__, __ge__ = _binop(Op.GT), _binop(Op.GE)
    __eq__, __ne__ = _binop(Op.EQ), _binop(Op.NE)  # type: ignore[assignment]

    def __neg__(self) -> Term:
        return Term(_apply(negate, self.expr))

    def __pos__(self) -> Term:
        return self

    def __invert__(self) -> Term:
        return Term(_apply(bitwise_not, self.expr))

    def __abs__(self) -> Term:
        return abs_(self)


# -- functions (the text's exp(x), where(c, a, b), ...) ---------------------------------------

def _function(name: str) -> Callable[..., Term]:
    arity, fn = FUNCTIONS[name]

    def call(*args: Any) -> Term:
        if len(args) != arity:
            raise _caller().error(f"{name}() takes {arity} argument{'s' * (arity != 1)}, got "
                                  f"{len(args)}")
        return Term(_apply(fn, *(lift(a) for a in args)))

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"The text's {name}() ({arity} argument{'s' * (arity != 1)})."
    return call


exp, log, exp2, log2 = _function("exp"), _function("log"), _function("exp2"), _function("log2")
tanh, sigmoid, relu = _function("tanh"), _function("sigmoid"), _function("relu")
sqrt, abs_, where = _function("sqrt"), _function("abs"), _function("where")
minimum, maximum = _function("min"), _function("max")


def cast(x: Any, dtype: str) -> Term:
    """The text's float(x), int(x), bool(x)."""
    if dtype not in ("float", "int", "bool"):
        raise _caller().error(f"cannot cast to {dtype!r}; expected float, int or bool")
    return _function(dtype)(x)


def _index_arg(idx: Any, word: str) -> str:
    if isinstance(idx, Term) and idx.expr.op is Op.INDEX:
        return idx.expr.arg
    if isinstance(idx, str):
        return idx
    raise _caller().error(f"{word}() reduces over an index: pass b.idx('n') or 'n', got "
                          f"{idx!r}")


def sum_over(idx: Term | str, body: Any) -> Term:
    """The text's ``sum(idx) body``."""
    return Term(E.reduce_sum(_index_arg(idx, "sum_over"), lift(body)))


def max_over(idx: Term | str, body: Any) -> Term:
    """The text's ``max(idx) body``."""
    return Term(E.reduce_max(_index_arg(idx, "max_over"), lift(body)))


def softmax_over(idx: Term | str, body: Any) -> Term:
    """The text's ``softmax(idx) body`` (the built-in normaliser, Op.SOFTMAX)."""
    return Term(E.softmax(_index_arg(idx, "softmax_over"), lift(body)))


def cumsum_over(idx: Term | str, body: Any, exclusive: bool = False) -> Term:
    """The text's ``cumsum(idx) body`` (``exclusive=True``: ``cumsum(idx, exclusive) body``):
    the prefix sum along ``idx``, sum over j <= i (or j < i), the whole right-hand side of a
    per-position equation such as ``G[b,h,n] = cumsum(n) log(A[b,h,n])``."""
    return Term(E.cumsum(_index_arg(idx, "cumsum_over"), lift(body), exclusive=exclusive))


# -- the builder -------------------------------------------------------------------------------

def _names(indices: str | Sequence[Any]) -> list[str]:
    if isinstance(indices, str):
        return [i for i in re.split(r"[\s,]+", indices) if i]
    if not isinstance(indices, Sequence):
        raise _caller().error(f"eq() takes its left-hand side indices as 'b h m n' or a list of "
                              f"indices, got {type(indices).__name__} {indices!r}")
    return [_index_arg(i, "eq") for i in indices]


class CascadeBuilder:
    """Declare indices, tensors and parameters, then equations; ``build()`` checks and returns
    the Cascade.  Declaration methods return the builder, so calls chain."""

    def __init__(self, name: str) -> None:
        self._asm = Assembler(name, _caller())

    # declarations
    def index(self, name: str, extent: str, role: str | None = None) -> CascadeBuilder:
        """``index name: extent role``; the role is inferred from b/h/m/n/e/f when omitted."""
        w = _caller()
        self._asm.index(name, extent, role, w, w, w)
        return self

    def input(self, name: str, *extents: str, dtype: str = "float") -> CascadeBuilder:
        """``input name[extents]: dtype`` (an argument of the kernel: Q, K, V, ...)."""
        w = _caller()
        self._asm.tensor(name, extents, dtype, "input", w, [w] * len(extents), w)
        return self

    def tensor(self, name: str, *extents: str, dtype: str = "float") -> CascadeBuilder:
        """``tensor name[extents]: dtype`` (a captured tensor, bound at call time)."""
        w = _caller()
        self._asm.tensor(name, extents, dtype, "captured", w, [w] * len(extents), w)
        return self

    def param(self, name: str, dtype: str = "float",
              default: float | int | None = None) -> CascadeBuilder:
        """``param name: dtype = default`` (a scalar kernel argument)."""
        w = _caller()
        self._asm.param(name, dtype, default, w, w, w)
        return self

    # expressions
    def idx(self, name: str) -> Term:
        """The index ``name`` as an expression."""
        w = _caller()
        return Term(E.index(self._asm.index_name(name, w, "idx()")))

    def var(self, name: str) -> Term:
        """What a bare name means in the text: an index, a parameter or an extent."""
        return Term(self._asm.scalar(name, _caller()))

    def read(self, name: str, *subscripts: Term | str | int) -> Term:
        """``name[subscripts]``: an input, a captured tensor or an equation defined before."""
        w = _caller()
        subs = [E.index(self._asm.index_name(s, w, f"{name}[...]")) if isinstance(s, str)
                else lift(s) for s in subscripts]
        return Term(self._asm.read(name, subs, w))

    # statements
    def mask(self, expr: Any) -> CascadeBuilder:
        """``mask expr``: keys where it is false take part in no reduction over the key."""
        w = _caller()
        self._asm.set_mask(lift(expr), lambda node, slot: w, w)
        return self

    def eq(self, name: str, indices: str | Sequence[Any], expr: Any) -> CascadeBuilder:
        """``name[indices] = expr``; indices absent on the left are summed (Einsum)."""
        w = _caller()
        self._asm.define(name, _names(indices), lift(expr), w)
        return self

    def recur(self, name: str, indices: str | Sequence[Any], over: Term | str,
              body: Callable[[Callable[..., Term]], Any]) -> CascadeBuilder:
        """The text's ``name[indices] = recur(over) body``: a state updated position by
        position.  ``body(prev)`` builds the update from ``prev(*subscripts)``, the read of
        the previous state (subscripts as for :meth:`read`, with ``over - 1`` at the
        position), e.g. the delta rule
        ``b.recur("S", "b h n e f", "n", lambda prev: prev(b_, h, n - 1, e, f) - ...)``."""
        w = _caller()
        lhs = _names(indices)
        idx = _index_arg(over, "recur")
        self._asm.header(name, lhs, w)
        self._asm.recurrence(name)
        try:
            update = lift(body(lambda *subs: self._read_at(name, subs, w)))
            self._asm.body(name, E.recur(idx, update), lambda node, slot: w)
        except BaseException:
            del self._asm.equations[name], self._asm.kinds[name]
            raise
        return self

    def _read_at(self, name: str, subscripts: Sequence[Any], w: Any) -> Term:
        subs = [E.index(self._asm.index_name(s, w, f"{name}[...]")) if isinstance(s, str)
                else lift(s) for s in subscripts]
        return Term(self._asm.read(name, subs, w))

    def output(self, *names: str) -> CascadeBuilder:
        w = _caller()
        for name in names:
            self._asm.output(name, w)
        return self

    def build(self) -> Cascade:
        """The checked, verified cascade."""
        try:
            return self._asm.finish()
        except RecursionError:
            raise self._asm.where.error("the spec is nested too deeply to check") from None


def cascade(text: str) -> Cascade:
    """The cascade of inline .attn text holding exactly one spec."""
    specs = parse_text(text, "<string>")
    if len(specs) != 1:
        raise SpecError(f"cascade() takes text with exactly one spec, got {len(specs)}: "
                        f"{', '.join(specs)}; use parse_text() for several", "<string>", 1, 1,
                        text.split("\n", 1)[0])
    return next(iter(specs.values()))


__all__ = ["CascadeBuilder", "SpecError", "Term", "abs_", "cascade", "cast", "cumsum_over", "exp",
           "exp2",
           "lift", "log", "log2", "max_over", "maximum", "minimum", "relu", "sigmoid",
           "softmax_over", "sqrt", "sum_over", "tanh", "where"]
