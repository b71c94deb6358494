"""Algebraic rewrite rules: one named rule per line, each a function returning a replacement
or None.

``simplify`` applies the table bottom-up to a fixed point.  Rules never change the value of an
expression under the IR's semantics (see attndsl.ir.expr).  Every rule has a name, and
:func:`rewrite` counts the rules that fire inside a :func:`recording` block, so that the
pipeline and ``attndsl explain`` can say which rewrites each pass applied and how often.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from attndsl.ir import expr as E
from attndsl.ir.expr import BOOL, FLOAT, INT, Expr, Op


@dataclass(frozen=True)
class Rule:
    """A named rewrite: ``fn(e)`` is the replacement of the node ``e``, or None (no match)."""

    name: str
    fn: Callable[[Expr], Expr | None]

    def __call__(self, e: Expr) -> Expr | None:
        return self.fn(e)


def named(name: str) -> Callable[[Callable[[Expr], Expr | None]], Rule]:
    """Decorator: ``@named("cancel-factors")`` turns a rewrite function into a :class:`Rule`."""
    return lambda fn: Rule(name, fn)


LOG2E = 1.4426950408889634  # 1 / ln 2
LN2 = 0.6931471805599453

_FOLD = {Op.ADD: operator.add, Op.SUB: operator.sub, Op.MUL: operator.mul,
         Op.MAX: max, Op.MIN: min, Op.LT: operator.lt, Op.LE: operator.le, Op.GT: operator.gt,
         Op.GE: operator.ge, Op.EQ: operator.eq, Op.NE: operator.ne}
_FOLD1 = {Op.NEG: operator.neg, Op.EXP: math.exp, Op.TANH: math.tanh, Op.ABS: abs}


def _c(e: Expr) -> bool:
    return e.op is Op.CONST


def _finite(x: Expr) -> bool:
    """x is finite whatever the inputs (x - x is NaN where x is +-inf or NaN): a finite
    constant, a running row value (a stabiliser: finite by construction), an index or an
    integer cast to float."""
    if x.op is Op.CONST:
        return isinstance(x.arg, (int, float)) and math.isfinite(x.arg)
    return x.op in (Op.ROW, Op.INDEX) or (x.op is Op.CAST and x.src[0].dtype != FLOAT)


def _fold_binary(e: Expr) -> Expr | None:
    """c1 op c2 -> c (finite, same dtype rules as the IR)"""
    if e.op not in _FOLD or not (_c(e.src[0]) and _c(e.src[1])):
        return None
    a, b = e.src[0].arg, e.src[1].arg
    try:
        v = _FOLD[e.op](a, b)
    except (OverflowError, ValueError):
        return None
    if e.dtype == FLOAT:
        v = float(v)
        if not math.isfinite(v) and math.isfinite(float(a)) and math.isfinite(float(b)):
            return None
    elif e.dtype == INT:  # int64, wrapping as torch's
        v = (int(v) + 2**63) % 2**64 - 2**63
    else:
        v = bool(v)
    return E.const(v)


def _fold_unary(e: Expr) -> Expr | None:
    """f(c) -> c"""
    if e.op not in _FOLD1 or not _c(e.src[0]) or e.src[0].dtype == BOOL:
        return None
    try:
        v = _FOLD1[e.op](e.src[0].arg)
    except OverflowError:
        return None
    if e.dtype == INT:  # int64, wrapping as torch's: -(-2**63) and abs(-2**63) are -2**63
        v = (int(v) + 2**63) % 2**64 - 2**63
    return E.const(float(v) if e.dtype == FLOAT else v)


def _fold_cast(e: Expr) -> Expr | None:
    """cast(c) -> c as torch's .to() converts it: float -> int truncates toward zero, a
    number -> bool is c != 0 (a literal has no tensor to call .to() on in a kernel)."""
    if e.op is not Op.CAST or not _c(e.src[0]):
        return None
    v = e.src[0].arg
    if e.arg == BOOL:
        return E.const(v != 0)
    if e.arg == INT:
        return E.const(int(v)) if math.isfinite(v) and abs(v) < 2**63 else None
    return E.const(float(v))


def _is(e: Expr, v: float) -> bool:
    return e.op is Op.CONST and e.dtype != BOOL and e.arg == v


def _keep_dtype(e: Expr, x: Expr) -> Expr | None:
    """x, unless dropping the node would change the dtype (then cast)."""
    if x.dtype == e.dtype:
        return x
    return E.unary(Op.CAST, x, e.dtype) if e.dtype == FLOAT else None


RULES: list[Rule] = [
    Rule("fold-binary", _fold_binary),  # c1 op c2 -> c
    Rule("fold-unary", _fold_unary),  # f(c) -> c
    Rule("fold-cast", _fold_cast),  # cast(c) -> c, as torch converts
    Rule("mul-one", lambda e: _keep_dtype(e, e.src[0])
         if e.op is Op.MUL and _is(e.src[1], 1) else None),  # x*1 -> x
    Rule("one-mul", lambda e: _keep_dtype(e, e.src[1])
         if e.op is Op.MUL and _is(e.src[0], 1) else None),  # 1*x -> x
    Rule("add-zero", lambda e: _keep_dtype(e, e.src[0])
         if e.op in (Op.ADD, Op.SUB) and _is(e.src[1], 0) else None),  # x+0 -> x, x-0 -> x
    Rule("zero-add", lambda e: _keep_dtype(e, e.src[1])
         if e.op is Op.ADD and _is(e.src[0], 0) else None),  # 0+x -> x
    Rule("int-mul-zero", lambda e: E.const(0) if e.op is Op.MUL and e.dtype == INT
         and (_is(e.src[0], 0) or _is(e.src[1], 0)) else None),  # x*0 -> 0 (integers only)
    Rule("div-one", lambda e: _keep_dtype(e, e.src[0])
         if e.op is Op.DIV and _is(e.src[1], 1) else None),  # x/1 -> x
    Rule("neg-neg", lambda e: e.src[0].src[0]
         if e.op is Op.NEG and e.src[0].op is Op.NEG else None),  # --x -> x
    Rule("add-neg", lambda e: E.binary(Op.SUB, e.src[0], e.src[1].src[0])
         if e.op is Op.ADD and e.src[1].op is Op.NEG else None),  # a + -b -> a - b
    Rule("sub-neg", lambda e: E.binary(Op.ADD, e.src[0], e.src[1].src[0])
         if e.op is Op.SUB and e.src[1].op is Op.NEG else None),  # a - -b -> a + b
    Rule("cast-same", lambda e: e.src[0]
         if e.op is Op.CAST and e.src[0].dtype == e.arg else None),  # cast to same -> x
    Rule("where-true", lambda e: e.src[1] if e.op is Op.WHERE and _c(e.src[0])
         and e.src[0].arg is True else None),  # where(True, a, b) -> a
    Rule("where-false", lambda e: e.src[2] if e.op is Op.WHERE and _c(e.src[0])
         and e.src[0].arg is False else None),  # where(False, a, b) -> b
    Rule("and-true", lambda e: e.src[0] if e.op is Op.AND and e.dtype == BOOL and _c(e.src[1])
         and e.src[1].arg is True else None),  # p & True -> p (an integer x & True is x & 1)
    Rule("true-and", lambda e: e.src[1] if e.op is Op.AND and e.dtype == BOOL and _c(e.src[0])
         and e.src[0].arg is True else None),  # True & p -> p
    Rule("and-false", lambda e: E.const(False) if e.op is Op.AND and e.dtype == BOOL and any(
        _c(x) and x.arg is False for x in e.src) else None),  # p & False -> False
    Rule("or-false", lambda e: e.src[0] if e.op is Op.OR and e.dtype == BOOL and _c(e.src[1])
         and e.src[1].arg is False else None),  # p | False -> p
    Rule("false-or", lambda e: e.src[1] if e.op is Op.OR and e.dtype == BOOL and _c(e.src[0])
         and e.src[0].arg is False else None),  # False | p -> p
    Rule("or-true", lambda e: E.const(True) if e.op is Op.OR and e.dtype == BOOL and any(
        _c(x) and x.arg is True for x in e.src) else None),  # p | True -> True
    Rule("not-not", lambda e: e.src[0].src[0]
         if e.op is Op.NOT and e.src[0].op is Op.NOT else None),  # !!x -> x
    Rule("sub-self", lambda e: E.const(0.0) if e.op is Op.SUB and e.src[0] == e.src[1]
         and e.dtype == FLOAT and _finite(e.src[0]) else None),  # x - x -> 0, x finite
    Rule("exp-zero", lambda e: E.const(1.0)
         if e.op in (Op.EXP, Op.EXP2) and _is(e.src[0], 0) else None),  # exp(0) -> 1
]


# merging exponentials: used where no rule splits them (finalising outputs, kernel bodies)
MERGE_EXP: list[Rule] = [
    Rule("merge-exp", lambda e: E.exp(E.binary(Op.ADD, e.src[0].src[0], e.src[1].src[0]))
         if e.op is Op.MUL and e.src[0].op is Op.EXP and e.src[1].op is Op.EXP
         else None),  # exp(a)*exp(b) -> exp(a+b)
    Rule("merge-exp2", lambda e: E.unary(Op.EXP2, E.binary(Op.ADD, e.src[0].src[0],
                                                           e.src[1].src[0]))
         if e.op is Op.MUL and e.src[0].op is Op.EXP2 and e.src[1].op is Op.EXP2
         else None),  # exp2(a)*exp2(b) -> exp2(a+b)
]

_FIRED: ContextVar[Counter[str] | None] = ContextVar("attndsl_rules_fired", default=None)


@contextmanager
def recording() -> Iterator[Counter[str]]:
    """Count by name every rule that fires in the block; the counts also go to any enclosing
    ``recording`` block when this one ends."""
    outer = _FIRED.get()
    counts: Counter[str] = Counter()
    token = _FIRED.set(counts)
    try:
        yield counts
    finally:
        _FIRED.reset(token)
        if outer is not None:
            outer.update(counts)


def rewrite(e: Expr, rules: Sequence[Rule]) -> Expr:
    """Apply ``rules`` bottom-up until none fires (each firing counted under its name)."""
    def step(node: Expr) -> Expr | None:
        for rule in rules:
            out = rule(node)
            if out is not None and out != node:
                counts = _FIRED.get()
                if counts is not None:
                    counts[rule.name] += 1
                return rewrite(out, rules)
        return None
    return e.replace(step)


def simplify(e: Expr) -> Expr:
    """``e`` rewritten with :data:`RULES` to a fixed point."""
    return rewrite(e, RULES)
