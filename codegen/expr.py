"""Printing IR expressions as Triton source, shared by the forward and backward printers.

An op-to-text table (``_UNARY``, ``_BINARY`` and the rules of :func:`_render_node`) with
torch's semantics (integer division and modulo floor, shifts saturate, int32 math widened when
its range needs int64), the helper functions those rules call (``HELPERS``, printed into every
module), and the safe spelling of identifiers, literals and comments: a spec's names reach the
source only through :func:`ident` (validated), :func:`literal` or :func:`comment`.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from attndsl.errors import AttnDSLError
from attndsl.ir import expr as E
from attndsl.ir.expr import BOOL, COMPARE, FLOAT, INT, SHIFTS, Expr, Op
from attndsl.passes.float_range import float_ranges
from attndsl.passes.int_range import fits_i32, int_ranges
from attndsl.passes.rules import LOG2E, Rule, rewrite

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class CodegenError(AttnDSLError, ValueError):
    """The Tile IR asks for something the Triton printer has no rule for."""


def ident(name: str) -> str:
    """A kernel identifier derived from an internal name (``mx0.safe`` -> ``mx0_safe``)."""
    out = name.replace(".", "_")
    if not _IDENT.match(out):
        raise CodegenError(f"internal name {name!r} is not a valid identifier")
    return out


def comment(text: str) -> str:
    """Spec text as a comment: printable ASCII only, one line per line."""
    lines = text.splitlines() or [""]
    clean = ["".join(ch if 32 <= ord(ch) < 127 else "?" for ch in ln) for ln in lines]
    return "\n".join(f"# {ln}".rstrip() for ln in clean)


def literal(v: object) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, int):  # outside int32 Triton would type it u32 / i64 by value: say i64
        return repr(int(v)) if fits_i32((v, v)) else f"tl.full((), {int(v)}, tl.int64)"
    if isinstance(v, float):
        if math.isnan(v):
            return 'float("nan")'
        if math.isinf(v):
            return 'float("inf")' if v > 0 else 'float("-inf")'
        return repr(float(v))
    raise CodegenError(f"cannot print a constant of type {type(v).__name__}")


def host_literal(v: object) -> str:
    """A constant as plain Python, for the launcher's host-side code (interval functions):
    an int of any size stays a Python int there."""
    if isinstance(v, int) and not isinstance(v, bool):
        return repr(int(v))
    return literal(v)


_UNARY = {Op.EXP: "tl.exp({})", Op.EXP2: "tl.exp2({})", Op.LOG: "tl.log({})",
          Op.LOG2: "tl.log2({})", Op.SIGMOID: "tl.sigmoid({})", Op.ABS: "tl.abs({})",
          Op.SQRT: "tl.sqrt({})", Op.NEG: "(-{})",
          # tanh x = 1 - 2 / (2^(2 x log2 e) + 1): one exp2 and one division (see _tanh_exp2)
          Op.TANH: f"(1.0 - 2.0 / (tl.exp2({{}} * {2 * LOG2E!r}) + 1.0))"}
# integer arithmetic, whose bool operands the printer widens (int1 + int1 wraps to 0)
_INT_ARITH = (Op.ADD, Op.SUB, Op.MUL, Op.FLOORDIV, Op.MOD, Op.MAX, Op.MIN, Op.POW)
_BINARY = {Op.ADD: "({} + {})", Op.SUB: "({} - {})", Op.MUL: "({} * {})",
           Op.LT: "({} < {})", Op.LE: "({} <= {})", Op.GT: "({} > {})", Op.GE: "({} >= {})",
           Op.EQ: "({} == {})", Op.NE: "({} != {})", Op.AND: "({} & {})", Op.OR: "({} | {})",
           Op.XOR: "({} ^ {})", Op.LSHIFT: "_shl({}, {})", Op.RSHIFT: "_shr({}, {})",
           Op.TRUEDIV: "({} / {})", Op.MAX: "tl.maximum({}, {})", Op.MIN: "tl.minimum({}, {})"}


# -- printer lowering: cheaper forms of the same value -------------------------------------

def _number(e: Expr) -> float | None:
    """The value of a numeric (int or float) constant, else None."""
    return float(e.arg) if e.op is Op.CONST and e.dtype != BOOL else None


def _div_const(e: Expr) -> Expr | None:
    """x / c -> x * (1/c) for a float quotient by a constant whose reciprocal is a normal
    float: a multiply instead of a division, and a factor that folds into the others
    (:func:`codegen.triton._invariant_factors`); the quotient differs by at most an ulp."""
    c = _number(e.src[1]) if e.op in (Op.TRUEDIV, Op.DIV) and e.dtype == FLOAT else None
    if not c or not 2.0 ** -126 <= abs(1.0 / c) <= 2.0 ** 127:  # a normal fp32 reciprocal
        return None
    return E.binary(Op.MUL, e.src[0], E.const(1.0 / c))


def _tanh_exp2(e: Expr) -> Expr | None:
    """tanh x -> 1 - 2 / (2^(2 x log2 e) + 1): one exp2 and one division (Triton's ``/`` on
    a GPU is the full-range div.full.f32, MUFU.RCP and a few multiplies; the interpreter's
    is IEEE) instead of a sigmoid's exp, division and two multiplies.  Exact at both ends:
    2^+inf gives 1, 2^-inf gives -1."""
    if e.op is not Op.TANH:
        return None
    z = E.binary(Op.ADD, E.unary(Op.EXP2, E.binary(Op.MUL, e.src[0], E.const(2.0 * LOG2E))),
                 E.const(1.0))
    return E.binary(Op.SUB, E.const(1.0), E.binary(Op.TRUEDIV, E.const(2.0), z))


def _uniform(e: Expr) -> bool:
    """Whether ``e`` reads only constants and parameters (one value per launch)."""
    return all(x.op in (Op.CONST, Op.PARAM) or x.src for x in e.walk()) and \
        not any(x.op is Op.LOAD for x in e.walk())


def _times(a: float, k: Expr) -> Expr:
    """The constant ``a`` times ``k``, folded when ``k`` is a constant."""
    kk = _number(k)
    return E.const(a * kk) if kk is not None else E.binary(Op.MUL, E.const(a), k)


def _scale_const_quotient(e: Expr) -> Expr | None:
    """(a - b / z) * k, k * (a - b / z) -> a k - (b k) / z for constants a, b and a uniform
    k (constants and parameters): a scaled tanh (softcap's cap * tanh(s / cap)) becomes one
    multiply-add after the division.  The absolute error stays an ulp of a k, as in the
    product form."""
    if e.op is not Op.MUL or e.dtype != FLOAT:
        return None
    for d, k in ((e.src[0], e.src[1]), (e.src[1], e.src[0])):
        if d.op is not Op.SUB or d.src[1].op is not Op.TRUEDIV or not _uniform(k):
            continue
        a, b = _number(d.src[0]), _number(d.src[1].src[0])
        if a is not None and b is not None:
            ak, bk = _times(a, k), _times(b, k)
            if all(x.op is not Op.CONST or math.isfinite(x.arg) for x in (ak, bk)):
                return E.binary(Op.SUB, ak, E.binary(Op.TRUEDIV, bk, d.src[1].src[1]))
    return None


# divisors of at least this magnitude are normal fp32 numbers, with room for rounding
_NORMAL_DIVISOR = 2.0 ** -125
# quotients of a divisor past 2**126 that an addend absorbs: |b| * 2**-126 < ulp(a) / 4
_ABSORBED_RATIO = 2.0 ** 90
# the range of normal fp32 constants
_FP32_NORMAL = (2.0 ** -126, 3.4028234663852886e38)


def _normal_const(e: Expr) -> float | None:
    """The value of a float constant that fp32 holds as a normal number, else None."""
    v = _number(e)
    return v if v is not None and _FP32_NORMAL[0] <= abs(v) <= _FP32_NORMAL[1] else None


def _absorbed_quotient(e: Expr) -> Expr | None:
    """a - b / z, a + b / z, b / z + a, b / z - a -> the same with b / z marked ``absorbed``
    (printed as the fast division, :data:`HELPERS`' ``_absorbed_div``) for normal constants
    a, b with |b| <= 2**90 |a| and a divisor z that float_ranges keeps at |z| >= 2**-125.

    Triton's ``/`` is div.full.f32: for |z| <= 2**126 it is MUFU.RCP and a multiply, and
    above that it first scales both operands by 1/4 (a compare, a select and a multiply per
    element).  div.approx.f32 is the same reciprocal and multiply (2 ulp, PTX ISA, the bound
    of div.full.f32) and gives 0 for |z| > 2**126 (b finite), where the exact quotient is
    below |b| 2**-126 <= |a| 2**-36, under a quarter ulp of a: a +- b / z rounds to a either
    way.  z = +-inf gives a; z = 0 gives +-inf and NaN gives NaN on both paths.  This is
    tanh's form (:func:`_tanh_exp2`: z = 2^(2 x log2 e) + 1 >= 1), softcap's included."""
    if e.op not in (Op.ADD, Op.SUB) or e.dtype != FLOAT:
        return None
    for a, q in ((e.src[0], e.src[1]), (e.src[1], e.src[0])):
        if q.op is not Op.TRUEDIV or q.arg is not None or q.dtype != FLOAT:
            continue
        av, bv = _normal_const(a), _normal_const(q.src[0])
        if av is None or bv is None or abs(bv) > _ABSORBED_RATIO * abs(av):
            continue
        lo, hi = float_ranges(q.src[1])[q.src[1]]
        if lo >= _NORMAL_DIVISOR or hi <= -_NORMAL_DIVISOR:
            fast = Expr(Op.TRUEDIV, q.src, "absorbed", FLOAT)
            return Expr(e.op, (a, fast) if a is e.src[0] else (fast, a), e.arg, e.dtype)
    return None


PRINT_RULES: list[Rule] = [
    Rule("div-const", _div_const),  # x / c -> x * (1/c)
    Rule("tanh-exp2", _tanh_exp2),  # tanh x -> 1 - 2 / (2^(2x log2 e) + 1)
    Rule("scale-const-quotient", _scale_const_quotient),  # (a - b/z) * c -> ac - (bc)/z
    Rule("absorbed-quotient", _absorbed_quotient),  # a - b/z -> a - fast(b/z), |z| >= 2^-125
]


def lower_for_print(e: Expr) -> Expr:
    """``e`` in the forms the printers emit (:data:`PRINT_RULES`): the same value, cheaper on
    a GPU (fewer multiplies, no sigmoid, constants folded).  Each tanh adds three levels; an
    expression that could then nest deeper than a spec may (``MAX_DEPTH``) is left as it is,
    so that the printer's limits stay those of the spec."""
    tanhs = sum(1 for node in e.walk() if node.op is Op.TANH)
    if e.depth + 3 * tanhs > E.MAX_DEPTH:
        return e
    return rewrite(e, PRINT_RULES)


def _nonneg(e: Expr) -> bool:
    """A cheap proof that an integer expression is >= 0 (indices, constants, + * // %)."""
    if e.op is Op.INDEX:
        return True
    if e.op is Op.CONST:
        return e.arg >= 0
    if e.op in (Op.ADD, Op.MUL, Op.FLOORDIV, Op.MOD, Op.MAX):
        return all(_nonneg(s) for s in e.src)
    return False


HELPERS = '''
import inspect  # noqa: E402

# How _absorbed_div divides: tl.fdiv(a, b, approx=True) (div.approx.f32) where triton has it
# (3.9 on); on older ones div.approx.f32 as inline PTX when the module is compiled (triton's /
# is div.full.f32; "r" is a 32-bit register, float32 included, as in triton's own examples),
# and / under the interpreter, which runs no PTX.  triton.jit picks the interpreter when it
# decorates, from TRITON_INTERPRET (knobs.runtime.interpret); the module reads the same flag
# when it is imported, so the two agree.
_DIV_PATH = tl.constexpr(
    "approx" if "approx" in inspect.signature(tl.fdiv).parameters
    else "slash" if triton.knobs.runtime.interpret else "asm")


@triton.jit
def _absorbed_div(a, b):
    """a / b, added to a constant that absorbs any quotient of a divisor past 2**126: the
    fast division (MUFU.RCP and a multiply), which is the full-range / except that there it
    gives 0 instead of scaling both operands (codegen/expr.py, _absorbed_quotient)."""
    if _DIV_PATH == "approx":
        return tl.fdiv(a, b, approx=True)
    elif _DIV_PATH == "asm":
        tl.static_assert(b.dtype == tl.float32, "div.approx.f32 divides float32 operands")
        return tl.inline_asm_elementwise("div.approx.f32 $0, $1, $2;", "=r,r,r", [a, b],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return a / b


@triton.jit
def _safe_div(a, b):
    """a / b, with 0 / 0 = 0 (a fully masked row normalises to zero).  The divisor is made
    nonzero from b alone, so a divisor broadcast along the columns (l_i[:, None]) is one
    reciprocal per row, not one per element; where b = +-0 the quotient is a * +-inf (IEEE
    x / +-0, the sign read from b's bits) and 0 when a = 0."""
    b = b.to(tl.float32)
    b0 = b == 0
    b_inf = tl.where(b.to(tl.int32, bitcast=True) < 0, float("-inf"), float("inf"))
    return tl.where(b0 & (a == 0), 0.0, tl.where(b0, a * b_inf, a / tl.where(b0, 1.0, b)))


@triton.jit
def _round_bf16(x):
    """x rounded to the nearest bfloat16 (ties to even), as a float32: on the bits, since
    the interpreter's float32 -> bfloat16 conversion truncates."""
    b = x.to(tl.uint32, bitcast=True)
    r = (b + (0x7FFF + ((b >> 16) & 1))) & 0xFFFF0000
    return tl.where(x != x, x, r.to(tl.float32, bitcast=True))


@triton.jit
def _shl(a, b):
    """torch's a << b on int64: 0 when b < 0 or b >= 64."""
    out = (a << tl.minimum(tl.maximum(b, 0), 63).to(tl.int64)).to(tl.int64)
    return tl.where((b < 0) | (b > 63), tl.zeros_like(out), out)


@triton.jit
def _shr(a, b):
    """torch's a >> b on int64 (arithmetic): the sign (a >> 63) when b < 0 or b >= 64."""
    return a >> tl.where((b < 0) | (b > 63), 63, b).to(tl.int64)


@triton.jit
def _safe_div_scalar(a, b):
    """_safe_div for a divisor that is one scalar (the interpreter cannot & a scalar bool with
    a tile of them, and divides two scalar parameters as Python floats, where / 0 raises):
    0 / 0 = 0, a / 0 = a * inf (a zero divisor counts as +0)."""
    q = a / tl.where(b == 0, 1.0, b)
    return tl.where(b == 0, tl.where(a == 0, 0.0, a * float("inf")), q)


@triton.jit
def _pow(a, b):
    """torch.pow on floats: exp2(b log2|a|), negated for a negative (-0.0 included) and an
    odd integer b, NaN for a finite a < 0 and a fractional b; 1 when b == 0, a == 1 or
    a == -1 and b = +-inf (C's pow).  Both are broadcast first: the interpreter cannot & a
    scalar bool with a tile of them."""
    a, b = tl.broadcast(a.to(tl.float32), b.to(tl.float32))
    r = tl.exp2(tl.log2(tl.abs(a)) * b)
    whole = tl.floor(b) == b
    odd = whole & (tl.floor(b * 0.5) * 2.0 != b)
    # r * -1.0, not -r: triton < 3.7 lowers -r as 0 - r, which is +0.0 for r = 0 (-0.0 ** 3)
    r = tl.where((a.to(tl.int32, bitcast=True) < 0) & odd, r * -1.0, r)
    r = tl.where((a < 0) & (a > float("-inf")) & ~whole, float("nan"), r)
    one = (b == 0) | (a == 1) | ((a == -1) & (tl.abs(b) == float("inf")))
    return tl.where(one, 1.0, r)


@triton.jit
def _int_pow(a, b):
    """torch.pow on int64: a ** b by squaring over b's 63 value bits, wrapping as torch does;
    a negative b gives 0, except 1 for a = 1 and +-1 (the parity of b) for a = -1."""
    a, b = tl.broadcast(a.to(tl.int64), b.to(tl.int64))
    x = a
    e = tl.where(b < 0, 0, b)
    r = a * 0 + 1
    for _ in tl.static_range(63):
        r = tl.where((e & 1) != 0, r * x, r)
        x = x * x
        e = e >> 1
    negative = tl.where(a == 1, 1, tl.where(a == -1, 1 - 2 * (b & 1), 0))
    return tl.where(b < 0, negative.to(tl.int64), r)


@triton.jit
def _floor_div(a, b):
    """Python's a // b on integers (Triton's // truncates toward zero)."""
    q = a // b
    return tl.where(((a % b) != 0) & ((a < 0) != (b < 0)), q - 1, q)


@triton.jit
def _floor_mod(a, b):
    """Python's a % b on integers (the result takes the sign of b)."""
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)
'''


@dataclass
class Env:
    """How leaves print in one context: index names, row values and scalar arguments."""

    index: dict[str, str]
    rows: dict[str, str]
    params: dict[str, str]
    captured: dict[str, tuple[str, int]]
    masks: dict[str, str]  # index -> validity mask of that tile axis, for captured loads
    hoisted: dict[Expr, str] = field(default_factory=dict)
    scalar_indices: frozenset[str] = frozenset()
    ranges: dict[Expr, tuple[int, int]] = field(default_factory=dict)  # of integer nodes
    # pointer -> its stride arguments in dim order (default: ``<pointer>_s<dim>``)
    strides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # subscripts whose wrap where(i < 0, i + size, i) the launch may prove the identity
    # (the constexpr NONNEG_SUBSCRIPTS: every such subscript's interval is >= 0)
    wraps: frozenset[Expr] = frozenset()
    # int64 widenings print as conditional on the constexpr I32_INDICES (every integer node
    # the kernel would widen fits int32 in this launch: narrow_ranges)
    narrow: bool = False
    # captured reads linear in the key index -> (their pointer tile at this key tile, whether
    # the fast form needs NONNEG_SUBSCRIPTS: a subscript whose wrap it drops); see
    # codegen.triton._gathers
    gathers: dict[Expr, tuple[str, bool]] = field(default_factory=dict)

    def to_i64(self, x: str) -> str:
        """``x`` converted to int64 (under ``narrow``: unless the launch proved int32 exact)."""
        if self.narrow:  # int32 of an int32 is free; booleans and floats convert
            return f"(({x}).to(tl.int32) if I32_INDICES else ({x}).to(tl.int64))"
        return f"({x}).to(tl.int64)"

    def to_i32(self, x: str) -> str:
        """An integer tensor read ``x`` compared in int32 when the launch proved its values fit
        (I32_INDICES, under ``narrow``), else in its table's dtype: an int64 equality is two
        compares per element, an int32 one is one."""
        return f"(({x}).to(tl.int32) if I32_INDICES else {x})" if self.narrow else x

    def offset_index(self, x: str) -> str:
        """The subscript ``x`` of a captured-tensor read as it multiplies its stride: int64
        unless the launch proved every element offset of the tensor below 2**31 (the
        forward's I32_INDICES, the backward's I32_BASES).  ``tl.cast`` also types a constant
        subscript, a Python int."""
        flag = "I32_INDICES" if self.narrow else "I32_BASES"
        return f"({x} if {flag} else tl.cast({x}, tl.int64))"

    def stride(self, ptr: str, d: int) -> str:
        """The kernel argument holding dim ``d``'s stride of the tensor at ``ptr``."""
        named = self.strides.get(ptr)
        return named[d] if named is not None else f"{ptr}_s{d}"

    def wide(self, e: Expr) -> bool:
        """Whether an integer node is computed in int64: its range may leave int32, it is a
        shift (int64 by definition) or it reads an int64 tensor."""
        if e.dtype != INT:
            return False
        return e.op in SHIFTS or e.op is Op.LOAD or not fits_i32(self.range(e))

    def range(self, e: Expr) -> tuple[int, int]:
        """The static range of an integer node (passes.int_range); ranges already known stay
        as they are, so every node of a render takes one width."""
        if e not in self.ranges:
            for node, r in int_ranges(e).items():
                self.ranges.setdefault(node, r)
        return self.ranges[e]

    def nonneg(self, e: Expr) -> bool:
        """Whether an integer node is provably >= 0 (a cheap syntactic proof, or its range):
        then ``//`` and ``%`` are Triton's own, which agree with floor semantics there."""
        return _nonneg(e) or self.range(e)[0] >= 0


def _widen(e: Expr, a: list[str], env: Env) -> list[str]:
    """Operands converted as the node computes: integers to int64 under an int64 node (an
    int32 operand would wrap), integers and booleans to fp32 under a float node (Triton's
    float functions take no integers).

    A tensor read is int64 only when its tensor is (an int32 or int8 table reads as such), so
    under integer arithmetic it is converted like an int32 value (:func:`arithmetic_reads`).
    A boolean node (a comparison, ``not``) widens nothing: its integer operands are each
    exact in their own width, and Triton compares an int32 with an int64 in int64, so
    ``doc[q] == doc[kv]`` compares in the tables' dtype, or in int32 under I32_INDICES, which
    the launch sets only when every compared read's values fit int32 (:func:`compared_reads`,
    listed in ``narrow_ranges``): exact, and half the compares of int64 ids.  An integer
    constant compared with a
    read is a typed int32 (or int64) scalar, which Triton promotes with the read: as a Python
    int it would take the read's dtype, out of range for an int8 table (``ids[q] < 300``) or
    negative for a uint8 one."""
    if e.op in (Op.CAST, Op.LOAD) or not e.src:
        return a
    if e.dtype == BOOL:
        if e.op not in COMPARE or not any(s.op is Op.LOAD for s in e.src):
            return a
        return [_typed_int(s.arg) if s.op is Op.CONST and s.dtype == INT else
                env.to_i32(x) if s.op is Op.LOAD and s.dtype == INT else x
                for s, x in zip(e.src, a)]
    if e.dtype == FLOAT:
        return [x if s.dtype == FLOAT or _is_where_cond(e, i) else
                literal(float(s.arg)) if s.op is Op.CONST else f"({x}).to(tl.float32)"
                for i, (s, x) in enumerate(zip(e.src, a))]
    if env.wide(e) or any(env.wide(s) for s in e.src):
        return [env.to_i64(x) if s.dtype in (INT, BOOL) and (s.op is Op.LOAD or not env.wide(s))
                and s.op is not Op.CONST and not _is_where_cond(e, i) else x
                for i, (s, x) in enumerate(zip(e.src, a))]
    return a


def _pow(e: Expr, a: list[str]) -> str:
    """x ** y as torch.pow: a constant whole exponent 1..8 as products (of the operand's
    dtype, int64 for integers: POW's range is unbounded), 0 as a 1 of the result's dtype, any
    other exponent by the ``_pow`` (float) or ``_int_pow`` (integer, exact and wrapping) helper;
    a constant operand of the helpers is a typed 0-d tensor (a Python scalar has no dtype)."""
    y = e.src[1]
    if y.op is Op.CONST and float(y.arg).is_integer() and 0 <= y.arg <= 8:
        if y.arg:
            return "(" + " * ".join([f"({a[0]})"] * int(y.arg)) + ")"
        return "1.0" if e.dtype == FLOAT else "tl.full((), 1, tl.int64)"
    kind = "tl.float32" if e.dtype == FLOAT else "tl.int64"
    x, z = (f"tl.full((), {literal(float(s.arg) if e.dtype == FLOAT else int(s.arg))}, {kind})"
            if s.op is Op.CONST else v for s, v in zip(e.src, a))
    return f"_pow({x}, {z})" if e.dtype == FLOAT else f"_int_pow({x}, {z})"


def _typed_int(v: int) -> str:
    """An integer constant as a 0-d tensor of int32 (int64 when it does not fit)."""
    return f"tl.full((), {int(v)}, tl.int32)" if fits_i32((v, v)) else literal(v)


def arithmetic_reads(e: Expr) -> list[Expr]:
    """The integer tensor reads of ``e`` that are operands of integer arithmetic: :func:`_widen`
    converts them with :meth:`Env.to_i64` (whatever the table's dtype), so under I32_INDICES
    their values must fit int32 too (the forward lists them in ``narrow_ranges``)."""
    found: dict[Expr, None] = {}
    for x in e.walk():
        if x.dtype == INT and x.op not in (Op.CAST, Op.LOAD):
            found.update(dict.fromkeys(s for s in x.src if s.op is Op.LOAD and s.dtype == INT))
    return list(found)


def compared_reads(e: Expr) -> list[Expr]:
    """The integer tensor reads of ``e`` that are operands of a comparison: :func:`_widen`
    compares them in int32 under I32_INDICES (:meth:`Env.to_i32`), so their values must fit
    int32 then (the forward lists them in ``narrow_ranges``)."""
    found: dict[Expr, None] = {}
    for x in e.walk():
        if x.op in COMPARE:
            found.update(dict.fromkeys(s for s in x.src if s.op is Op.LOAD and s.dtype == INT))
    return list(found)


def is_wrap(e: Expr, subscripts: frozenset[Expr]) -> bool:
    """Whether ``e`` is torch's wrap ``where(i < 0, i + size, i)`` of one of ``subscripts``
    (attndsl.passes.index_bounds.wrap_negative)."""
    if e.op is not Op.WHERE or e.src[2] not in subscripts:
        return False
    cond, wrapped, i = e.src
    return cond.op is Op.LT and cond.src[0] == i and cond.src[1].op is Op.CONST and \
        cond.src[1].arg == 0 and wrapped.op is Op.ADD and wrapped.src[0] == i


def _is_where_cond(e: Expr, i: int) -> bool:
    return e.op is Op.WHERE and i == 0


def _scalar(e: Expr, env: Env) -> bool:
    """Same value for every element of a program (parameters, constants, batch/head math,
    reads of captured tensors at such subscripts)."""
    return not any(n.op is Op.ROW or (n.op is Op.INDEX and n.arg not in env.scalar_indices)
                   for n in e.walk())


SPILL_NEST = 48  # parentheses a rendered subexpression may nest before it becomes a variable
_NEST_PER_LEVEL = 4  # the most parentheses one node's template (and its casts) adds
_spills = itertools.count()


def reset_spills() -> None:
    """Restart the numbering of spilled variables (once per generated module: deterministic)."""
    global _spills
    _spills = itertools.count()


def render(e: Expr, env: Env, spill: list[str] | None = None) -> str:
    """Triton source of ``e``.  With ``spill``, a subexpression nested deeper than SPILL_NEST
    parentheses is assigned to a variable (``spN = ...`` appended to ``spill``, to be emitted
    before the use), so that any expression depth gives source Python can parse."""
    memo: dict[Expr, str] = {}
    nest: dict[Expr, int] = {}
    for node in e.walk():
        hoisted = env.hoisted.get(node)
        if hoisted is not None:
            memo[node], nest[node] = hoisted, 0
            continue
        memo[node] = _render_node(node, [memo[s] for s in node.src], env)
        nest[node] = max((nest[s] for s in node.src), default=0) + _NEST_PER_LEVEL
        if spill is not None and nest[node] > SPILL_NEST and node is not e:
            name = f"sp{next(_spills)}"
            spill.append(f"{name} = {memo[node]}")
            memo[node], nest[node] = name, 0
    return memo[e]


def render_at(L: Callable[[int, str], None], depth: int, e: Expr, env: Env) -> str:
    """``render`` whose spilled variables are emitted through ``L`` at ``depth`` first."""
    spill: list[str] = []
    text = render(e, env, spill)
    for line in spill:
        L(depth, line)
    return text


def _render_node(e: Expr, a: list[str], env: Env) -> str:
    op = e.op
    if op is Op.CONST:
        return literal(e.arg)
    if op is Op.INDEX:
        return env.index[e.arg]
    if op is Op.PARAM:
        return env.params[e.arg]
    if op is Op.ROW:
        return env.rows[e.arg]
    if op is Op.LOAD:
        ptr, rank = env.captured[e.arg]
        offs = " + ".join(f"{env.offset_index(a[d])} * {env.stride(ptr, d)}"
                          for d in range(rank)) or "0"
        axes = sorted(e.free_indices() & set(env.masks))
        mask = f", mask={' & '.join(env.masks[x] for x in axes)}, other=0" if axes else ""
        load = f"tl.load({ptr} + {offs}{mask})"
        fast = env.gathers.get(e)
        if fast is not None:  # the same addresses from a pointer tile made before the loop
            tile, wraps = fast
            load = f"(tl.load({tile}{mask}) if NONNEG_SUBSCRIPTS else {load})" if wraps else \
                f"tl.load({tile}{mask})"
        if e.dtype == FLOAT:  # 16-bit captured tensors are computed in fp32
            return f"{load}.to(tl.float32)"
        return f"({load} != 0)" if e.dtype == BOOL else load
    a = _widen(e, a, env)
    if op in _UNARY:
        return _UNARY[op].format(*a)
    if op is Op.NOT:
        return f"({a[0]} == 0)"
    if op is Op.INVERT:
        return f"(~{a[0]})"
    if op is Op.ROUND:  # round to nearest even in the 16-bit format, compute on in fp32
        if e.arg == "bfloat16":
            return f"_round_bf16({a[0]})"
        return f"({a[0]}).to(tl.float16).to(tl.float32)"
    if op is Op.CAST:
        c = e.src[0]
        if e.arg == INT and c.op is Op.CONST and not (math.isfinite(c.arg) and
                                                      abs(c.arg) < 2**63):
            raise CodegenError(f"int() of the constant {c.arg!r}: no int64 holds it (torch's "
                               f"result is platform-dependent there); use a finite value "
                               f"below 2**63")
        if e.arg == INT:
            return env.to_i64(a[0]) if env.wide(e) else f"({a[0]}).to(tl.int32)"
        return {FLOAT: "({}).to(tl.float32)", BOOL: "(({}) != 0)"}[e.arg].format(a[0])
    if op is Op.WHERE:
        if is_wrap(e, env.wraps):  # no negative subscripts: the select is the identity
            return f"({a[2]} if NONNEG_SUBSCRIPTS else tl.where({a[0]}, {a[1]}, {a[2]}))"
        return f"tl.where({a[0]}, {a[1]}, {a[2]})"
    if op is Op.DIV:  # 0 / 0 = 0 (a fully masked row normalises to zero)
        d = e.src[1]
        if d.op is Op.CONST and d.arg != 0:
            return f"({a[0]} / {a[1]})"
        if _scalar(d, env):
            return f"_safe_div_scalar({a[0]}, {a[1]})"
        return f"_safe_div({a[0]}, {a[1]})"
    if op in (Op.FLOORDIV, Op.MOD) and e.dtype == INT and \
            all(s.op is Op.CONST for s in e.src) and e.src[1].arg != 0:
        # Python's floor semantics on two literals (inside @triton.jit, // and % of Python
        # ints already floor: _floor_div would correct them a second time)
        x, y = int(e.src[0].arg), int(e.src[1].arg)  # int64, wrapping: -2**63 // -1
        return literal((((x // y) if op is Op.FLOORDIV else x % y) + 2**63) % 2**64 - 2**63)
    if op in _INT_ARITH and e.dtype == INT:  # bool operands count as 0 / 1, not as int1
        a = [f"({x}).to(tl.int32)" if s.dtype == BOOL else x for s, x in zip(e.src, a)]
    if op is Op.FLOORDIV:
        if e.dtype == FLOAT:
            return f"tl.floor(({a[0]}) / ({a[1]}))"
        if env.nonneg(e.src[0]) and env.nonneg(e.src[1]):
            return f"({a[0]} // {a[1]})"
        return f"_floor_div({a[0]}, {a[1]})"
    if op is Op.MOD:
        if e.dtype == FLOAT:
            return f"(({a[0]}) - tl.floor(({a[0]}) / ({a[1]})) * ({a[1]}))"
        if env.nonneg(e.src[0]) and env.nonneg(e.src[1]):
            return f"({a[0]} % {a[1]})"
        return f"_floor_mod({a[0]}, {a[1]})"
    if op is Op.POW:
        return _pow(e, a)
    if op is Op.TRUEDIV and e.arg == "absorbed":  # see _absorbed_quotient
        return f"_absorbed_div({a[0]}, {a[1]})"
    if op in (Op.MAX, Op.MIN) and e.dtype == FLOAT:  # torch's: a NaN operand gives NaN
        fn = "maximum" if op is Op.MAX else "minimum"
        return f"tl.{fn}({a[0]}, {a[1]}, propagate_nan=tl.PropagateNan.ALL)"
    if op in _BINARY:
        return _BINARY[op].format(*a)
    raise CodegenError(f"no Triton rule for {op.name}")

