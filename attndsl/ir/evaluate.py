"""Element-wise evaluation of an expression on broadcast tensors: one small rule per Op.

An expression over indices ``axes`` evaluates to a tensor laid out over all of them, of size
1 along the indices it does not depend on, so broadcasting does the index bookkeeping: INDEX
``m`` is ``ranges["m"]`` reshaped along m's axis, a LOAD gathers at its index tensors, and
every other op applies its torch function to its operands.  Floats are computed in ``dtype``
(float64 by default).  The IR's semantics (see :mod:`attndsl.ir.expr`): ``0 / 0 = 0``; ``//``
and ``%`` floor like Python; & and | are logical on booleans, bitwise on integers.

Reductions, SOFTMAX and ROW are not element-wise and have no rule: an evaluator that has them
(the eager oracle, :mod:`attndsl.eager`) handles those nodes itself and hands every other node
to :func:`apply`.  Both the oracle and the mask analysis's exact evaluation use this module,
which depends on nothing but the IR.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping

import torch

from attndsl.errors import AttnDSLError
from attndsl.ir import expr as E
from attndsl.ir.expr import BOOL, FLOAT, INT, Expr, Op

Tensor = torch.Tensor


class EvaluationError(AttnDSLError, ValueError):
    """An expression cannot be evaluated with the given inputs (unbound tensor or parameter,
    wrong number of indices, an index outside a tensor, a non-element-wise op)."""


class Env:
    """What an evaluation reads: the axes, their index tensors, bound tensors and parameters."""

    def __init__(self, axes: list[str], ranges: Mapping[str, Tensor],
                 tensors: Mapping[str, Tensor], params: Mapping[str, float | int],
                 dtype: torch.dtype = torch.float64) -> None:
        self.axes, self.ranges, self.tensors, self.params = axes, ranges, tensors, params
        self.dtype = dtype

    def shape_along(self, name: str, values: Tensor) -> Tensor:
        """``values`` laid out along axis ``name`` (size 1 along the others)."""
        shape = [1] * len(self.axes)
        shape[self.axes.index(name)] = values.numel()
        return values.reshape(shape)

    def torch_dtype(self, d: str) -> torch.dtype:
        """The torch dtype of an IR dtype: floats in ``self.dtype``."""
        return {FLOAT: self.dtype, INT: torch.int64, BOOL: torch.bool}[d]

    def check_subscripts(self, node: Expr, idx: list[Tensor], t: Tensor) -> None:
        """Every subscript of the read ``node`` of ``t`` must lie in [0, size) (the oracle
        overrides this with torch's rule for captured tensors, where negatives wrap)."""
        for d, i in enumerate(idx):
            if i.numel() and (int(i.min()) < 0 or int(i.max()) >= t.shape[d]):
                raise EvaluationError(f"{node.arg}: index {d} ranges over [{int(i.min())}, "
                                      f"{int(i.max())}], outside its size {t.shape[d]}")


Rule = Callable[[Expr, list[Tensor], Env], Tensor]


def safe_div(a: Tensor, b: Tensor) -> Tensor:
    """a / b with 0 / 0 = 0 (and a finite gradient there: the divisor is replaced, not the
    quotient, so autograd never multiplies 0 by inf)."""
    both0 = (a == 0) & (b == 0)
    return torch.where(both0, torch.zeros((), dtype=a.dtype),
                       a / torch.where(both0, torch.ones((), dtype=b.dtype), b))


def as_float(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def _scalar(node: Expr, value: float | int | bool, env: Env) -> Tensor:
    return torch.tensor(value, dtype=env.torch_dtype(node.dtype)).reshape([1] * len(env.axes))


def _param(node: Expr, args: list[Tensor], env: Env) -> Tensor:
    if node.arg not in env.params:
        raise EvaluationError(f"parameter {node.arg!r} is not bound")
    return _scalar(node, env.params[node.arg], env)


def _load(node: Expr, idx: list[Tensor], env: Env) -> Tensor:
    """t[i0, i1, ..] at broadcast index tensors; every index must lie inside t."""
    name = node.arg
    if name not in env.tensors:
        raise EvaluationError(f"tensor {name!r} is not bound")
    t = env.tensors[name]
    if t.dim() != len(idx):
        raise EvaluationError(f"tensor {name!r} has {t.dim()} dims, indexed with {len(idx)}")
    if not idx:
        v = t.reshape([1] * len(env.axes))
    else:
        env.check_subscripts(node, idx, t)
        v = t[tuple(i.long() for i in idx)]  # torch's indexing: negatives wrap once
        v = v.reshape(torch.broadcast_shapes(*(i.shape for i in idx)))
    return v.to(env.torch_dtype(node.dtype)) if v.dtype.is_floating_point or \
        node.dtype != FLOAT else v.to(env.dtype)


def _float(fn: Callable[[Tensor], Tensor]) -> Rule:
    """A float function of one operand (exp, log, ...): the operand is converted first."""
    return lambda node, a, env: fn(as_float(a[0], env.dtype))


def _arith(fn: Callable[[Tensor, Tensor], Tensor]) -> Rule:
    """An arithmetic op: both operands in the result's dtype first (int + float is float)."""
    def rule(node: Expr, a: list[Tensor], env: Env) -> Tensor:
        t = env.torch_dtype(node.dtype)
        return fn(a[0].to(t), a[1].to(t))
    return rule


def _integer_division(word: str, fn: Callable[[Tensor, Tensor], Tensor]) -> Rule:
    """// and %: as torch, an integer division by zero is an error (floats give inf / nan)."""
    def rule(node: Expr, a: list[Tensor], env: Env) -> Tensor:
        t = env.torch_dtype(node.dtype)
        x, y = a[0].to(t), a[1].to(t)
        if not t.is_floating_point and bool((y == 0).any()):
            raise EvaluationError(f"{E.render(node)}: integer {word} by zero (torch raises "
                                  f"ZeroDivisionError on integer tensors too); the divisor is "
                                  f"zero for some indices")
        return fn(x, y)
    return rule


def _logical(on_bool: Callable[[Tensor, Tensor], Tensor],
             on_int: Callable[[Tensor, Tensor], Tensor]) -> Rule:
    """& | ^ << >>: logical when the result is boolean, else int64 bitwise (a bool counts
    0 / 1), as torch's operators."""
    def rule(node: Expr, a: list[Tensor], env: Env) -> Tensor:
        if node.dtype == BOOL:
            return on_bool(a[0], a[1])
        return on_int(a[0].long(), a[1].long())
    return rule


def _where(node: Expr, a: list[Tensor], env: Env) -> Tensor:
    t = env.torch_dtype(node.dtype)
    return torch.where(a[0], a[1].to(t), a[2].to(t))


RULES: dict[Op, Rule] = {
    Op.CONST: lambda node, a, env: _scalar(node, node.arg, env),
    Op.INDEX: lambda node, a, env: env.shape_along(node.arg, env.ranges[node.arg]),
    Op.PARAM: _param,
    Op.LOAD: _load,
    Op.CAST: lambda node, a, env: a[0].to(env.torch_dtype(node.arg)),
    Op.ROUND: lambda node, a, env: a[0].to(getattr(torch, node.arg)).to(env.dtype),  # 16-bit
    Op.INVERT: lambda node, a, env: torch.bitwise_not(a[0].long()),  # ~x on an integer
    Op.NEG: lambda node, a, env: torch.neg(a[0]),  # in the operand's dtype
    Op.ABS: lambda node, a, env: torch.abs(a[0]),
    Op.NOT: lambda node, a, env: torch.logical_not(a[0]),  # p == 0
    Op.EXP: _float(torch.exp),
    Op.EXP2: _float(torch.exp2),
    Op.LOG: _float(torch.log),
    Op.LOG2: _float(torch.log2),
    Op.TANH: _float(torch.tanh),
    Op.SIGMOID: _float(torch.sigmoid),
    Op.SQRT: _float(torch.sqrt),
    Op.ADD: _arith(operator.add),
    Op.SUB: _arith(operator.sub),
    Op.MUL: _arith(operator.mul),
    Op.DIV: lambda node, a, env: safe_div(as_float(a[0], env.dtype),
                                          as_float(a[1], env.dtype)),  # 0 / 0 = 0
    Op.TRUEDIV: lambda node, a, env: as_float(a[0], env.dtype) / as_float(a[1], env.dtype),
    Op.FLOORDIV: _integer_division("//", lambda x, y: torch.div(x, y, rounding_mode="floor")),
    Op.MOD: _integer_division("%", torch.remainder),  # Python's %: the sign of the divisor
    Op.MAX: _arith(torch.maximum),
    Op.MIN: _arith(torch.minimum),
    Op.POW: _arith(torch.pow),
    Op.LT: lambda node, a, env: torch.lt(a[0], a[1]),
    Op.LE: lambda node, a, env: torch.le(a[0], a[1]),
    Op.GT: lambda node, a, env: torch.gt(a[0], a[1]),
    Op.GE: lambda node, a, env: torch.ge(a[0], a[1]),
    Op.EQ: lambda node, a, env: torch.eq(a[0], a[1]),
    Op.NE: lambda node, a, env: torch.ne(a[0], a[1]),
    Op.AND: _logical(torch.logical_and, torch.bitwise_and),
    Op.OR: _logical(torch.logical_or, torch.bitwise_or),
    Op.XOR: _logical(torch.logical_xor, torch.bitwise_xor),
    Op.LSHIFT: _logical(torch.bitwise_left_shift, torch.bitwise_left_shift),
    Op.RSHIFT: _logical(torch.bitwise_right_shift, torch.bitwise_right_shift),
    Op.WHERE: _where,
}


def apply(node: Expr, args: list[Tensor], env: Env) -> Tensor:
    """The value of ``node`` given the values of its operands ``args``."""
    rule = RULES.get(node.op)
    if rule is None:
        raise EvaluationError(f"{E.render(node)}: {node.op.name} is not element-wise; only "
                              f"an evaluator with reductions (the eager oracle) evaluates it")
    return rule(node, args, env)


def evaluate(e: Expr, axes: list[str], ranges: Mapping[str, Tensor],
             tensors: Mapping[str, Tensor], params: Mapping[str, float | int] | None = None,
             dtype: torch.dtype = torch.float64) -> Tensor:
    """An element-wise expression over the index values ``ranges`` (a broadcast tensor over
    ``axes``); each shared subexpression is evaluated once."""
    env = Env(list(axes), ranges, tensors, dict(params or {}), dtype)
    memo: dict[Expr, Tensor] = {}
    for node in e.walk():
        memo[node] = apply(node, [memo[s] for s in node.src], env)
    return memo[e]


__all__ = ["RULES", "Env", "EvaluationError", "apply", "as_float", "evaluate", "safe_div"]
