"""Symbolic tracing of FlexAttention ``score_mod`` / ``mask_mod`` functions into IR expressions.

The function is called once with :class:`Sym` arguments instead of tensors.  Python operators
and the torch functions a score or mask program uses are intercepted (``__torch_function__``)
and recorded as :class:`~attndsl.ir.expr.Expr` nodes; indexing a captured tensor with symbols
(``table[h, q_idx - kv_idx]``) becomes a ``LOAD`` of that tensor.  Anything that would need a
concrete value (``if score > 0:``, ``int(q_idx)``) or that is not a pure elementwise function
raises :class:`TraceError` naming the function, the line and the operation.
"""

from __future__ import annotations

import inspect
import linecache
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from attndsl.errors import AttnDSLError
from attndsl.frontend.ops import zero_divisor
from attndsl.ir import expr as E
from attndsl.ir.cascade import SourceLoc
from attndsl.ir.expr import BOOL, FLOAT, INT, Expr, Op


class TraceError(AttnDSLError, TypeError):
    """A score/mask function could not be traced; the message names the function and line."""


_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


INT64 = 2**63  # integer constants must fit in int64, as in torch

# the signatures torch's FlexAttention calls the programs with
SIGNATURES = {"score_mod": "score_mod(score, b, h, q_idx, kv_idx)",
              "mask_mod": "mask_mod(b, h, q_idx, kv_idx)"}


def _user_frame(fallback: str) -> str:
    """'file:line' of the innermost frame outside attndsl and torch (the user's code), else
    ``fallback`` (where the traced function is defined)."""
    for info in inspect.stack()[1:]:
        path = os.path.abspath(info.filename)
        if not path.startswith((_PKG_DIR, _TORCH_DIR)):
            line = (info.code_context or [""])[0].strip()
            return f"{info.filename}:{info.lineno} in {info.function}(): {line}"
    return fallback


def defined_at(fn: Callable) -> str:
    """'file:line in name()' of the line that defines ``fn`` (its ``def``), or its repr for
    callables without Python code (a builtin, a C extension)."""
    code = getattr(inspect.unwrap(fn), "__code__", None) if callable(fn) else None
    if code is None:
        return repr(fn)
    return f"{code.co_filename}:{code.co_firstlineno} in {code.co_name}()"


@dataclass
class TraceContext:
    """Collects the captured tensors met while tracing (by identity, in order of first use)."""

    fn_name: str
    captured: dict[int, tuple[str, torch.Tensor]] = field(default_factory=dict)
    prefix: str = "cap"
    return_lines: dict[Any, int] = field(default_factory=dict)  # code object -> return line
    fn_where: str = "<unknown location>"  # where the function being traced is defined
    # where the program asked torch.is_tensor of a symbol ('file:line in name()')
    type_checks: list[str] = field(default_factory=list)

    def fail(self, what: str) -> TraceError:
        return TraceError(f"cannot trace {self.fn_name}: {what}\n  at {_user_frame(self.fn_where)}")

    def returned_at(self, fn: Callable) -> SourceLoc | None:
        """Where ``fn`` returned from (its ``def`` line before it ran): file, line, the
        column of the line's first character, the line's text and the function's name."""
        code = getattr(inspect.unwrap(fn), "__code__", None)
        if code is None:
            return None
        line = self.return_lines.get(code, code.co_firstlineno)
        text = linecache.getline(code.co_filename, line).rstrip("\r\n")
        col = len(text) - len(text.lstrip()) + 1
        return SourceLoc(code.co_filename, line, col, text, code.co_name)

    def fail_in(self, fn: Callable, what: str) -> TraceError:
        """An error about ``fn``'s result, located at the line it returned from."""
        loc = self.returned_at(fn)
        where = f"{loc.file}:{loc.line} in {loc.function}()" if loc else repr(fn)
        name = getattr(fn, "__name__", type(fn).__name__)
        return TraceError(f"cannot trace {name}: {what}\n  at {where}")

    def capture(self, t: torch.Tensor) -> str:
        key = id(t)
        if key not in self.captured:
            if t.is_complex() or t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                raise self.fail(f"captured tensor of dtype {t.dtype} is not supported")
            self.captured[key] = (f"{self.prefix}{len(self.captured)}", t)
        return self.captured[key][0]


def _dtype_of(t: torch.Tensor | torch.dtype) -> str:
    dt = t if isinstance(t, torch.dtype) else t.dtype
    if dt == torch.bool:
        return BOOL
    return FLOAT if dt.is_floating_point else INT


# torch's arithmetic on two bool tensors stays boolean: * is and, + is or, - is an error
_BOOL_ARITH: dict[Op, Op | None] = {Op.MUL: Op.AND, Op.ADD: Op.OR, Op.SUB: None}


class Sym:
    """A symbolic scalar standing for one element of a score/mask computation."""

    __slots__ = ("ctx", "expr")

    def __init__(self, expr: Expr, ctx: TraceContext) -> None:
        if expr.depth > E.MAX_DEPTH:
            raise ctx.fail(f"the expression is nested too deeply (more than {E.MAX_DEPTH} "
                           f"levels of operators)")
        self.expr = expr
        self.ctx = ctx

    # -- conversions -----------------------------------------------------------------------
    def _lift(self, x: Any) -> Expr:
        if isinstance(x, Sym):
            return x.expr
        if isinstance(x, bool | int):
            if not isinstance(x, bool) and not -INT64 <= x < INT64:
                raise self.ctx.fail(f"the integer {x} does not fit in 64 bits (torch raises "
                                    f"an overflow error for it too)")
            return E.const(x)
        if isinstance(x, float):
            return E.const(x)
        if isinstance(x, torch.Tensor):
            if x.dim() != 0:
                raise self.ctx.fail(
                    f"a tensor of shape {tuple(x.shape)} is combined with a scalar score; index "
                    f"it with the symbolic indices (e.g. bias[b, h, q_idx, kv_idx])")
            name = self.ctx.capture(x)
            return E.load(name, (), _dtype_of(x))
        raise self.ctx.fail(f"unsupported operand of type {type(x).__name__}")

    def _new(self, e: Expr) -> Sym:
        return Sym(e, self.ctx)

    def _bin(self, op: Op, a: Any, b: Any) -> Sym:
        try:
            x, y = self._lift(a), self._lift(b)
            if x.dtype == y.dtype == BOOL and op in _BOOL_ARITH:  # torch: bool op bool -> bool
                if _BOOL_ARITH[op] is None:
                    raise E.IRError("subtracting two booleans is not supported (as in torch); "
                                    "use ^ or logical_xor")
                op = _BOOL_ARITH[op]
            if op in (Op.FLOORDIV, Op.MOD) and E.promote(x.dtype, y.dtype) != FLOAT:
                problem = zero_divisor(y)
                if problem:
                    sym = "//" if op is Op.FLOORDIV else "%"
                    raise E.IRError(f"integer {sym} {problem}")
            return self._new(E.binary(op, x, y))
        except E.IRError as err:
            raise self.ctx.fail(str(err)) from None

    def __bool__(self) -> bool:
        raise self.ctx.fail("data-dependent Python control flow (if/while/and/or/not on a "
                            "symbolic value); use torch.where(cond, a, b) or &, |, ~")

    def __index__(self) -> int:
        raise self.ctx.fail("a symbolic value was used where Python needs a concrete integer")

    __int__ = __index__

    def __float__(self) -> float:
        raise self.ctx.fail("a symbolic value was converted to a Python float")

    def __iter__(self):
        raise self.ctx.fail("a symbolic scalar cannot be iterated")

    def __repr__(self) -> str:
        return f"Sym({self.expr})"

    # -- python operators --------------------------------------------------------------------
    def __add__(self, o: Any) -> Sym:
        return self._bin(Op.ADD, self, o)

    def __radd__(self, o: Any) -> Sym:
        return self._bin(Op.ADD, o, self)

    def __sub__(self, o: Any) -> Sym:
        return self._bin(Op.SUB, self, o)

    def __rsub__(self, o: Any) -> Sym:
        return self._bin(Op.SUB, o, self)

    def __mul__(self, o: Any) -> Sym:
        return self._bin(Op.MUL, self, o)

    def __rmul__(self, o: Any) -> Sym:
        return self._bin(Op.MUL, o, self)

    def __truediv__(self, o: Any) -> Sym:  # IEEE, as torch: 0 / 0 is NaN
        return self._bin(Op.TRUEDIV, self, o)

    def __rtruediv__(self, o: Any) -> Sym:
        return self._bin(Op.TRUEDIV, o, self)

    def __floordiv__(self, o: Any) -> Sym:
        return self._bin(Op.FLOORDIV, self, o)

    def __rfloordiv__(self, o: Any) -> Sym:
        return self._bin(Op.FLOORDIV, o, self)

    def __mod__(self, o: Any) -> Sym:
        return self._bin(Op.MOD, self, o)

    def __rmod__(self, o: Any) -> Sym:
        return self._bin(Op.MOD, o, self)

    def __pow__(self, o: Any) -> Sym:
        return self._bin(Op.POW, self, o)

    def __rpow__(self, o: Any) -> Sym:
        return self._bin(Op.POW, o, self)

    def __lt__(self, o: Any) -> Sym:
        return self._bin(Op.LT, self, o)

    def __le__(self, o: Any) -> Sym:
        return self._bin(Op.LE, self, o)

    def __gt__(self, o: Any) -> Sym:
        return self._bin(Op.GT, self, o)

    def __ge__(self, o: Any) -> Sym:
        return self._bin(Op.GE, self, o)

    def __eq__(self, o: object) -> Sym:  # type: ignore[override]
        return self._bin(Op.EQ, self, o)

    def __ne__(self, o: object) -> Sym:  # type: ignore[override]
        return self._bin(Op.NE, self, o)

    __hash__ = None  # type: ignore[assignment]

    def __and__(self, o: Any) -> Sym:
        return self._bin(Op.AND, self, o)

    def __rand__(self, o: Any) -> Sym:
        return self._bin(Op.AND, o, self)

    def __or__(self, o: Any) -> Sym:
        return self._bin(Op.OR, self, o)

    def __ror__(self, o: Any) -> Sym:
        return self._bin(Op.OR, o, self)

    def __xor__(self, o: Any) -> Sym:
        return self._bin(Op.XOR, self, o)

    def __rxor__(self, o: Any) -> Sym:
        return self._bin(Op.XOR, o, self)

    def __lshift__(self, o: Any) -> Sym:
        return self._bin(Op.LSHIFT, self, o)

    def __rlshift__(self, o: Any) -> Sym:
        return self._bin(Op.LSHIFT, o, self)

    def __rshift__(self, o: Any) -> Sym:
        return self._bin(Op.RSHIFT, self, o)

    def __rrshift__(self, o: Any) -> Sym:
        return self._bin(Op.RSHIFT, o, self)

    def __invert__(self) -> Sym:
        return _bitwise_not(self.ctx, self)

    def __neg__(self) -> Sym:
        return self._new(E.unary(Op.NEG, self.expr))

    def __pos__(self) -> Sym:
        return self

    def __abs__(self) -> Sym:
        return self._new(E.unary(Op.ABS, self.expr))

    # -- tensor methods ----------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name in _METHODS:
            return lambda *a, **k: _METHODS[name](self, *a, **k)
        if name.endswith("_") and not name.endswith("__"):
            raise self.ctx.fail(f"in-place operation .{name}() is not supported; use the "
                                f"out-of-place form")
        raise self.ctx.fail(f"unsupported tensor method or attribute .{name}")

    @classmethod
    def __torch_function__(cls, func: Callable, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = kwargs or {}
        ctx = next(a.ctx for a in _flat(args, kwargs) if isinstance(a, Sym))
        name = getattr(func, "__name__", str(func))
        if name == "__getitem__":
            return _gather(ctx, *args)
        handler = _FUNCS.get(name)
        if handler is None:
            raise ctx.fail(f"torch operation {name!r} is not supported in score/mask programs")
        return handler(ctx, *args, **kwargs)


def _flat(args: tuple, kwargs: dict) -> list[Any]:
    out: list[Any] = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, list | tuple):
            out.extend(_flat(tuple(a), {}))
        else:
            out.append(a)
    return out


def _gather(ctx: TraceContext, t: torch.Tensor, idx: Any) -> Sym:
    if not isinstance(t, torch.Tensor):
        raise ctx.fail("only captured tensors can be indexed with symbolic indices")
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(i is None or i is Ellipsis or isinstance(i, slice) for i in idx):
        raise ctx.fail("slices, None and ... are not supported when indexing a captured tensor; "
                       "index every dimension with a scalar")
    if len(idx) != t.dim():
        raise ctx.fail(f"a captured tensor of shape {tuple(t.shape)} is indexed with "
                       f"{len(idx)} indices; index every dimension")
    s = Sym(E.const(0), ctx)
    exprs = tuple(s._lift(i) for i in idx)
    for i, e in enumerate(exprs):
        if e.dtype == FLOAT:
            raise ctx.fail(f"index {i} of a captured tensor is a float expression ({e}); "
                           f"cast it with .long() or use //")
    name = ctx.capture(t)
    return Sym(E.load(name, exprs, _dtype_of(t)), ctx)


def _sym(ctx: TraceContext, x: Any) -> Sym:
    return x if isinstance(x, Sym) else Sym(Sym(E.const(0), ctx)._lift(x), ctx)


def _unary(op: Op) -> Callable[..., Sym]:
    def run(ctx: TraceContext, x: Any, *rest: Any, **kw: Any) -> Sym:
        if rest or kw:
            raise ctx.fail(f"{op.name.lower()} takes one argument here")
        s = _sym(ctx, x)
        return s._new(E.unary(op, s.expr))
    return run


def _binop(op: Op) -> Callable[..., Sym]:
    def run(ctx: TraceContext, a: Any, b: Any, *rest: Any, **kw: Any) -> Sym:
        if rest or kw:
            raise ctx.fail(f"{op.name.lower()} takes two arguments here")
        return _sym(ctx, a)._bin(op, a, b)
    return run


def _div(ctx: TraceContext, a: Any, b: Any, *rest: Any, rounding_mode: str | None = None,
         **kw: Any) -> Sym:
    """torch.div: a / b, or a // b with rounding_mode="floor" ("trunc" is not traced)."""
    if rest or kw:
        raise ctx.fail("div takes two arguments and rounding_mode here")
    if rounding_mode not in (None, "floor"):
        raise ctx.fail(f"torch.div(..., rounding_mode={rounding_mode!r}) is not supported; "
                       f"use rounding_mode='floor' (or //) or plain division")
    return _sym(ctx, a)._bin(Op.TRUEDIV if rounding_mode is None else Op.FLOORDIV, a, b)


def _where(ctx: TraceContext, c: Any, a: Any, b: Any) -> Sym:
    s = _sym(ctx, c)
    try:
        return s._new(E.where(s._lift(c), s._lift(a), s._lift(b)))
    except E.IRError as err:
        raise ctx.fail(str(err)) from None


def _bitwise_not(ctx: TraceContext, x: Any) -> Sym:
    """torch's ~ / bitwise_not: logical not of a bool, -x - 1 of an integer, an error on floats."""
    s = _sym(ctx, x)
    if s.expr.dtype == FLOAT:
        raise ctx.fail("~ (bitwise not) of a float value is not defined (as in torch)")
    return s._new(E.unary(Op.NOT if s.expr.dtype == BOOL else Op.INVERT, s.expr))


def _logical(op: Op) -> Callable[..., Sym]:
    """torch.logical_and / or / xor: the operands count as booleans (nonzero is True)."""
    def run(ctx: TraceContext, a: Any, b: Any) -> Sym:
        s = _sym(ctx, a)
        x, y = (E.unary(Op.CAST, v, BOOL) if v.dtype != BOOL else v
                for v in (s._lift(a), s._lift(b)))
        return s._new(E.binary(op, x, y))
    return run


def _clamp(ctx: TraceContext, x: Any, min: Any = None, max: Any = None) -> Sym:
    s = _sym(ctx, x)
    e = s.expr
    if min is not None:
        e = E.binary(Op.MAX, e, s._lift(min))
    if max is not None:
        e = E.binary(Op.MIN, e, s._lift(max))
    return s._new(e)


def _cast(ctx: TraceContext, x: Any, *args: Any, **kw: Any) -> Sym:
    dt = kw.get("dtype", args[0] if args else None)
    if isinstance(dt, torch.Tensor):
        dt = dt.dtype
    if not isinstance(dt, torch.dtype):
        raise ctx.fail(".to() in a score/mask program needs a dtype (devices are implicit)")
    s = _sym(ctx, x)
    if dt in _HALF:  # rounded to the 16-bit format, then used as a float (torch upcasts)
        return s._new(E.unary(Op.ROUND, s.expr, _HALF[dt]))
    return s._new(E.unary(Op.CAST, s.expr, _dtype_of(dt)))


_HALF = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _const_like(value: float) -> Callable[..., Sym]:
    def run(ctx: TraceContext, x: Any, *a: Any, **kw: Any) -> Sym:
        s = _sym(ctx, x)
        return s._new(E.const(value if s.expr.dtype == FLOAT else int(value)))
    return run


def _full_like(ctx: TraceContext, x: Any, value: Any, *a: Any, **kw: Any) -> Sym:
    return _sym(ctx, x)._new(_sym(ctx, x)._lift(value))


def _log1p(ctx: TraceContext, x: Any) -> Sym:
    s = _sym(ctx, x)
    return s._new(E.log(E.binary(Op.ADD, s.expr, 1.0)))


def _softplus(ctx: TraceContext, x: Any) -> Sym:
    s = _sym(ctx, x)
    return s._new(E.log(E.binary(Op.ADD, E.exp(s.expr), 1.0)))


def _relu(ctx: TraceContext, x: Any) -> Sym:
    s = _sym(ctx, x)
    return s._new(E.binary(Op.MAX, s.expr, 0.0))


def _sign_safe_pow(ctx: TraceContext, a: Any, b: Any) -> Sym:
    return _sym(ctx, a)._bin(Op.POW, a, b)


def _rsqrt(ctx: TraceContext, x: Any) -> Sym:
    s = _sym(ctx, x)
    return s._new(E.binary(Op.TRUEDIV, 1.0, E.unary(Op.SQRT, s.expr)))


def _square(ctx: TraceContext, x: Any) -> Sym:
    s = _sym(ctx, x)
    return s._new(E.binary(Op.MUL, s.expr, s.expr))


_FUNCS: dict[str, Callable[..., Sym]] = {
    "where": _where, "tanh": _unary(Op.TANH), "exp": _unary(Op.EXP), "exp2": _unary(Op.EXP2),
    "log": _unary(Op.LOG), "log2": _unary(Op.LOG2), "abs": _unary(Op.ABS),
    "sigmoid": _unary(Op.SIGMOID), "sqrt": _unary(Op.SQRT), "neg": _unary(Op.NEG),
    "negative": _unary(Op.NEG), "logical_not": _unary(Op.NOT), "bitwise_not": _bitwise_not,
    "relu": _relu, "log1p": _log1p, "softplus": _softplus, "rsqrt": _rsqrt, "square": _square,
    "clamp": _clamp, "clip": _clamp, "maximum": _binop(Op.MAX), "minimum": _binop(Op.MIN),
    "max": _binop(Op.MAX), "min": _binop(Op.MIN), "add": _binop(Op.ADD), "sub": _binop(Op.SUB),
    "subtract": _binop(Op.SUB), "mul": _binop(Op.MUL), "multiply": _binop(Op.MUL),
    "div": _div, "true_divide": _binop(Op.TRUEDIV),
    "floor_divide": _binop(Op.FLOORDIV),
    "remainder": _binop(Op.MOD), "pow": _sign_safe_pow, "eq": _binop(Op.EQ),
    "ne": _binop(Op.NE), "lt": _binop(Op.LT), "le": _binop(Op.LE), "gt": _binop(Op.GT),
    "ge": _binop(Op.GE), "logical_and": _logical(Op.AND), "logical_or": _logical(Op.OR),
    "logical_xor": _logical(Op.XOR), "bitwise_and": _binop(Op.AND), "bitwise_or": _binop(Op.OR),
    "bitwise_xor": _binop(Op.XOR), "bitwise_left_shift": _binop(Op.LSHIFT),
    "bitwise_right_shift": _binop(Op.RSHIFT),
    "zeros_like": _const_like(0.0), "ones_like": _const_like(1.0), "full_like": _full_like,
    "to": _cast, "type": _cast,
}
_FUNCS.update({f"__{k}__": v for k, v in list(_FUNCS.items()) if k in
               ("add", "sub", "mul", "eq", "ne", "lt", "le", "gt", "ge")})
_FUNCS.update({"__and__": _binop(Op.AND), "__or__": _binop(Op.OR), "__xor__": _binop(Op.XOR),
               "__lshift__": _binop(Op.LSHIFT), "__rshift__": _binop(Op.RSHIFT),
               "__invert__": _bitwise_not, "__truediv__": _binop(Op.TRUEDIV)})

def _as_method(fn: Callable[..., Sym]) -> Callable[..., Sym]:
    return lambda s, *a, **k: fn(s.ctx, s, *a, **k)


_METHODS: dict[str, Callable[..., Sym]] = {
    name: _as_method(fn)
    for name, fn in _FUNCS.items() if not name.startswith("__") and name not in ("where",)
}
_METHODS.update({
    "float": lambda s: _cast(s.ctx, s, torch.float32),
    "double": lambda s: _cast(s.ctx, s, torch.float64),
    "half": lambda s: _cast(s.ctx, s, torch.float16),
    "bfloat16": lambda s: _cast(s.ctx, s, torch.bfloat16),
    "int": lambda s: _cast(s.ctx, s, torch.int32),
    "long": lambda s: _cast(s.ctx, s, torch.int64),
    "bool": lambda s: _cast(s.ctx, s, torch.bool),
    "where": lambda s, c, other: _where(s.ctx, c, s, other),
    "clamp_min": lambda s, v: _clamp(s.ctx, s, min=v),
    "clamp_max": lambda s, v: _clamp(s.ctx, s, max=v),
})


@dataclass(frozen=True)
class Traced:
    """A traced function: its result expression and the tensors it captured, by IR name."""

    expr: Expr
    captured: dict[str, torch.Tensor]


# torch.is_tensor's code: a call of it on a symbol is refused (see trace)
_IS_TENSOR = getattr(torch.is_tensor, "__code__", None)


def trace(fn: Callable, args: tuple[Expr, ...], what: str, ctx: TraceContext | None = None,
          ) -> Traced:
    """Call ``fn`` on symbols standing for ``args`` and return the expression it builds."""
    if not callable(fn):
        raise TraceError(f"{what} must be a function {SIGNATURES.get(what, what)}, got "
                         f"{_a_type(fn)}")
    name = getattr(fn, "__name__", type(fn).__name__)
    ctx = ctx or TraceContext(fn_name=name)
    ctx.fn_name, ctx.fn_where = name, defined_at(fn)
    _check_signature(fn, name, len(args), what, ctx.fn_where)
    code = getattr(inspect.unwrap(fn), "__code__", None)

    def on_event(frame: Any, event: str, arg: Any) -> None:
        if event == "return" and frame.f_code is code:
            ctx.return_lines[code] = frame.f_lineno
        elif event == "call" and frame.f_code is _IS_TENSOR and \
                isinstance(frame.f_locals.get("obj"), Sym):
            caller = frame.f_back
            ctx.type_checks.append(f"{caller.f_code.co_filename}:{caller.f_lineno} in "
                                   f"{caller.f_code.co_name}()")

    hook = sys.getprofile() is None  # never displace a profiler the user is running
    if hook:
        sys.setprofile(on_event)
    try:
        result = fn(*(Sym(a, ctx) for a in args))
    except TraceError:
        raise
    except E.IRError as err:
        raise ctx.fail(str(err)) from None
    except (Exception, SystemExit) as err:  # the user's function failing on symbols (or
        # calling sys.exit, which is no exit of attndsl's): say where, keep the cause
        raise TraceError(f"cannot trace {name}: calling it with symbolic arguments raised "
                         f"{type(err).__name__}: {err}\n  at "
                         f"{raised_at(err, ctx.fn_where)}") from err
    finally:
        if hook:
            sys.setprofile(None)
    if ctx.type_checks:  # isinstance(x, torch.Tensor), a builtin, is not seen: it is False too
        raise TraceError(f"cannot trace {name}: torch.is_tensor of a symbolic argument is False "
                         f"while tracing, where torch's flex_attention passes tensors (True): "
                         f"the program would take another branch than torch's; drop the "
                         f"check\n  at {ctx.type_checks[0]}")
    if isinstance(result, bool | int | float):
        result = Sym(E.const(result), ctx)
    if isinstance(result, torch.Tensor) and result.dim() == 0:
        result = Sym(Sym(E.const(0), ctx)._lift(result), ctx)
    if not isinstance(result, Sym):
        shape = f" of shape {tuple(result.shape)}" if isinstance(result, torch.Tensor) else ""
        raise ctx.fail_in(fn, f"{what} must return a scalar expression built from its "
                              f"arguments (e.g. {_EXAMPLE[what]}), got {_a_type(result)}{shape}")
    return Traced(result.expr, {n: t for n, t in ctx.captured.values()})


_EXAMPLE = {"score_mod": "score + bias[h]", "mask_mod": "q_idx >= kv_idx"}


def _a_type(x: Any) -> str:
    if x is None:
        return "None (no return statement?)"
    name = type(x).__name__
    return f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}"


def _check_signature(fn: Callable, name: str, nargs: int, what: str, where: str) -> None:
    """``fn`` must accept ``nargs`` positional arguments, as FlexAttention calls it."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # no introspectable signature: let the call decide
        return
    try:
        sig.bind(*range(nargs))
    except TypeError as err:
        raise TraceError(f"cannot trace {name}: {what} is called with {nargs} arguments, as "
                         f"{SIGNATURES.get(what, what)}, but {name}{sig} cannot take them "
                         f"({err})\n  at {where}") from None


def raised_at(err: BaseException, fallback: str) -> str:
    """'file:line in name()' of the innermost frame of ``err``'s traceback outside attndsl and
    torch (the user's line that raised), else ``fallback``."""
    tb = err.__traceback__
    where = fallback
    while tb is not None:
        path = os.path.abspath(tb.tb_frame.f_code.co_filename)
        if not path.startswith((_PKG_DIR, _TORCH_DIR)):
            code = tb.tb_frame.f_code
            where = f"{code.co_filename}:{tb.tb_lineno} in {code.co_name}()"
        tb = tb.tb_next
    return where
