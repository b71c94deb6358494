"""Triton printer: Tile IR -> the source of a standalone Python module.

The printer is a renderer: an op-to-text table for expressions plus templates for the kernel's
fixed skeleton (program ids, operand loads, the online-update loop, stores), in the shape of
Triton's fused-attention tutorial.  Every identifier in the generated source is made here
(``q0``, ``qk0``, ``l0``, ``p0``...); names from a spec only reach the source as string
literals produced by ``repr`` or as comments with unsafe characters removed.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from attndsl.errors import AttnDSLError
from attndsl.ir import expr as E
from attndsl.ir.expr import BOOL, FLOAT, INT, SHIFTS, Expr, Op
from attndsl.ir.tile import Operand, RunningSum, TileKernel
from attndsl.passes.index_bounds import walk_intervals
from attndsl.passes.int_range import fits_i32, int_ranges, zero_divisors
from attndsl.passes.mask import SPARSE_BLOCK
from attndsl.runtime.index_check import runtime_source

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


_UNARY = {Op.EXP: "tl.exp({})", Op.EXP2: "tl.exp2({})", Op.LOG: "tl.log({})",
          Op.LOG2: "tl.log2({})", Op.SIGMOID: "tl.sigmoid({})", Op.ABS: "tl.abs({})",
          Op.SQRT: "tl.sqrt({})", Op.NEG: "(-{})",
          Op.TANH: "(2.0 * tl.sigmoid(2.0 * {}) - 1.0)"}  # tanh x = 2 sigmoid(2x) - 1
_BINARY = {Op.ADD: "({} + {})", Op.SUB: "({} - {})", Op.MUL: "({} * {})",
           Op.LT: "({} < {})", Op.LE: "({} <= {})", Op.GT: "({} > {})", Op.GE: "({} >= {})",
           Op.EQ: "({} == {})", Op.NE: "({} != {})", Op.AND: "({} & {})", Op.OR: "({} | {})",
           Op.XOR: "({} ^ {})", Op.LSHIFT: "_shl({}, {})", Op.RSHIFT: "_shr({}, {})",
           Op.TRUEDIV: "({} / {})", Op.MAX: "tl.maximum({}, {})", Op.MIN: "tl.minimum({}, {})"}


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
@triton.jit
def _safe_div(a, b):
    """a / b, with 0 / 0 = 0 (a fully masked row normalises to zero)."""
    both0 = (a == 0) & (b == 0)
    return tl.where(both0, 0.0, a / tl.where(both0, 1.0, b))


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
    a tile of them)."""
    q = a / b
    return tl.where(a == 0, tl.where(b == 0, 0.0, q), q)


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

    def wide(self, e: Expr) -> bool:
        """Whether an integer node is computed in int64: its range may leave int32, it is a
        shift (int64 by definition) or it reads an int64 tensor."""
        if e.dtype != INT:
            return False
        if e not in self.ranges:
            self.ranges.update(int_ranges(e))
        return e.op in SHIFTS or e.op is Op.LOAD or not fits_i32(self.ranges[e])


def _widen(e: Expr, a: list[str], env: Env) -> list[str]:
    """Operands converted as the node computes: integers to int64 under an int64 node (an
    int32 operand would wrap), integers and booleans to fp32 under a float node (Triton's
    float functions take no integers)."""
    if e.op in (Op.CAST, Op.LOAD) or not e.src:
        return a
    if e.dtype == FLOAT:
        return [x if s.dtype == FLOAT or _is_where_cond(e, i) else
                literal(float(s.arg)) if s.op is Op.CONST else f"({x}).to(tl.float32)"
                for i, (s, x) in enumerate(zip(e.src, a))]
    if env.wide(e) or any(env.wide(s) for s in e.src):
        return [f"({x}).to(tl.int64)" if s.dtype in (INT, BOOL) and not env.wide(s)
                and s.op is not Op.CONST and not _is_where_cond(e, i) else x
                for i, (s, x) in enumerate(zip(e.src, a))]
    return a


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
        offs = " + ".join(f"({a[d]}) * {ptr}_s{d}" for d in range(rank)) or "0"
        axes = sorted(e.free_indices() & set(env.masks))
        mask = f", mask={' & '.join(env.masks[x] for x in axes)}, other=0" if axes else ""
        load = f"tl.load({ptr} + {offs}{mask})"
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
        width = "tl.int64" if env.wide(e) else "tl.int32"
        return {FLOAT: "({}).to(tl.float32)", INT: f"({{}}).to({width})",
                BOOL: "(({}) != 0)"}[e.arg].format(a[0])
    if op is Op.WHERE:
        return f"tl.where({a[0]}, {a[1]}, {a[2]})"
    if op is Op.DIV:  # 0 / 0 = 0 (a fully masked row normalises to zero)
        d = e.src[1]
        if d.op is Op.CONST and d.arg != 0:
            return f"({a[0]} / {a[1]})"
        if _scalar(d, env):
            return f"_safe_div_scalar({a[0]}, {a[1]})"
        return f"_safe_div({a[0]}, {a[1]})"
    if op is Op.FLOORDIV:
        if e.dtype == FLOAT:
            return f"tl.floor(({a[0]}) / ({a[1]}))"
        if _nonneg(e.src[0]) and _nonneg(e.src[1]):
            return f"({a[0]} // {a[1]})"
        return f"_floor_div({a[0]}, {a[1]})"
    if op is Op.MOD:
        if e.dtype == FLOAT:
            return f"(({a[0]}) - tl.floor(({a[0]}) / ({a[1]})) * ({a[1]}))"
        if _nonneg(e.src[0]) and _nonneg(e.src[1]):
            return f"({a[0]} % {a[1]})"
        return f"_floor_mod({a[0]}, {a[1]})"
    if op is Op.POW:
        y = e.src[1]
        if y.op is Op.CONST and float(y.arg).is_integer() and 0 <= y.arg <= 8:
            return "(" + " * ".join([f"({a[0]})"] * int(y.arg)) + ")" if y.arg else "1.0"
        return f"tl.exp2(tl.log2({a[0]}) * ({a[1]}))"
    if op in _BINARY:
        return _BINARY[op].format(*a)
    raise CodegenError(f"no Triton rule for {op.name}")


# -- the module -----------------------------------------------------------------------------

@dataclass
class _Names:
    """Kernel argument names for tensors and parameters (all generated here)."""

    tensors: dict[str, str]
    params: dict[str, str]
    outputs: dict[str, str]


def _names(k: TileKernel) -> _Names:
    tensors: dict[str, str] = {}
    for o in k.operands:
        tensors.setdefault(o.tensor, f"T{len(tensors)}")
    for i, (name, _, _) in enumerate(k.captured):
        tensors[name] = f"C{i}"
    params = {name: f"P{i}" for i, (name, _) in enumerate(k.params)}
    outputs = {s.name: f"O{i}" for i, s in enumerate(k.stores)}
    return _Names(tensors, params, outputs)


class _Lines:
    def __init__(self) -> None:
        self.out: list[str] = []

    def __call__(self, depth: int, text: str = "") -> None:
        self.out.extend(("    " * depth + ln).rstrip() for ln in text.split("\n"))


def _operand_base(o: Operand, names: _Names, env: Env) -> str:
    """The program's base pointer into an operand: its batch/head subscripts (loop-invariant)."""
    ptr = names.tensors[o.tensor]
    parts = [f"({render(idx, env)}) * {ptr}_s{d}" for d, idx in enumerate(o.idx)
             if d not in (o.row_dim, o.col_dim)]
    return " + ".join([ptr] + parts)


def _operand_ptr(o: Operand, names: _Names, row: str, col: str) -> str:
    ptr = names.tensors[o.tensor]
    return (f"base_{o.var} + {row} * {ptr}_s{o.row_dim} + {col} * {ptr}_s{o.col_dim}")


def _hoist(exprs: list[Expr], tile_vars: set[str], lines: _Lines, env: Env, depth: int) -> None:
    """Loop-invariant code motion: scalar subexpressions become variables before the loop."""
    for e in exprs:
        for node in e.walk():
            if node.op in (Op.CONST, Op.PARAM, Op.INDEX) or node in env.hoisted:
                continue
            deps = node.free_indices()
            if deps & tile_vars or any(x.op in (Op.ROW, Op.LOAD) for x in node.walk()):
                continue
            if any(s.op in (Op.CONST, Op.PARAM, Op.INDEX) or s in env.hoisted
                   for s in node.src):
                name = f"c{len(env.hoisted)}"
                lines(depth, f"{name} = {render_at(lines, depth, node, env)}")
                env.hoisted[node] = name


def _hoist_rows(exprs: list[Expr], m: str, lines: _Lines, env: Env, depth: int) -> None:
    """Reads of captured tensors that depend on the query rows only (``doc[m]``) are loaded
    once per program as [BLOCK_M, 1] columns instead of once per key tile."""
    def visit(node: Expr) -> None:
        if node in env.hoisted:
            return
        free = node.free_indices()
        if m in free and free <= env.scalar_indices | {m} and \
                not any(x.op is Op.ROW for x in node.walk()) and \
                any(x.op is Op.LOAD for x in node.walk()):
            name = f"r{sum(1 for v in env.hoisted.values() if v.startswith('r'))}"
            lines(depth, f"{name} = {render_at(lines, depth, node, env)}")
            env.hoisted[node] = name
            return
        for s in node.src:
            visit(s)
    for e in exprs:
        visit(e)


def generate(k: TileKernel, spec_hash: str, version: str) -> str:
    """The full source of a generated module for one tile kernel."""
    names = _names(k)
    roles = k.roles
    m, n = roles["query"], roles["key"]
    b, h, f = roles.get("batch"), roles.get("head"), roles.get("v")
    divisors = _check_divisors(_kernel_exprs(k))
    reset_spills()
    L = _Lines()
    L(0, comment(f"Generated by attndsl {version} -- do not edit.\nspec hash: {spec_hash}\n\n"
                 f"Cascade:\n{k.spec_text}\n\nTile IR:\n{k}"))
    L(0, '"""A fused attention kernel generated by attndsl; needs only torch and triton."""\n')
    L(0, "import math\nimport os\n\nimport torch\n")
    L(0, "if not torch.cuda.is_available() and not os.environ.get(\"ATTNDSL_NO_INTERPRET\"):")
    L(1, "# CPU tensors run in Triton's interpreter (chosen before triton is imported)")
    L(1, 'os.environ.setdefault("TRITON_INTERPRET", "1")')
    L(0, "import triton  # noqa: E402\nimport triton.language as tl  # noqa: E402\n")
    L(0, f"SPEC_HASH = {spec_hash!r}\nATTNDSL_VERSION = {version!r}")
    _emit_tables(k, names, L)
    L(0, "# parameters that divide integers: a launch with one of them 0 is refused")
    L(0, "NONZERO_PARAMS = " + repr(divisors) + "\n")
    L(0, HELPERS)
    _emit_kernel(k, names, L, m, n, b, h, f)
    L(0, runtime_source())
    _emit_index_ranges(k, L)
    L(0, launcher_source())
    return "\n".join(L.out) + "\n"


def _kernel_exprs(k: TileKernel) -> list[Expr]:
    return [mx.arg for p in k.passes for mx in p.maxes] + \
        [s.body for p in k.passes for s in p.sums] + [s.expr for s in k.stores] + \
        ([k.mask] if k.mask is not None else [])


def _check_divisors(exprs: list[Expr]) -> tuple[str, ...]:
    """Refuses an integer // or % whose divisor can be zero (torch raises ZeroDivisionError;
    a kernel cannot); returns the parameters that are divisors, checked at launch."""
    params: dict[str, None] = {}
    for e in exprs:
        bad = zero_divisors(e)
        if bad:
            node = bad[0]
            raise CodegenError(f"the divisor of the integer {E.render(node)} can be zero "
                               f"(torch raises ZeroDivisionError); make it provably nonzero, "
                               f"e.g. with max(..., 1)")
        for node in e.walk():
            if node.op in (Op.FLOORDIV, Op.MOD) and node.dtype == INT and \
                    node.src[1].op is Op.PARAM:
                params[node.src[1].arg] = None
    return tuple(params)


def _emit_tables(k: TileKernel, names: _Names, L: _Lines) -> None:
    """Plain-literal metadata the launcher reads (tensor names only as repr'd strings)."""
    ops = {o.tensor: o for o in k.operands}
    L(0, "# tensor name -> (kernel pointer, side, row dim, column dim)")
    L(0, "OPERANDS = " + repr({t: (names.tensors[t], o.side, o.row_dim, o.col_dim)
                               for t, o in ops.items()}))
    L(0, "# captured tensor name -> (kernel pointer, rank)")
    L(0, "CAPTURED = " + repr({c: (names.tensors[c], r) for c, r, _ in k.captured}))
    L(0, "# scalar parameter name -> kernel argument")
    L(0, "PARAMS = " + repr(names.params))
    L(0, "# output name -> (kernel pointer, indices, is a [rows, v] tile)")
    L(0, "OUTPUTS = " + repr({s.name: (names.outputs[s.name], s.indices, s.tile)
                              for s in k.stores}))
    L(0, "ROLES = " + repr(dict(k.roles)))
    L(0, "HAS_MASK = " + repr(k.mask is not None))
    L(0, "# tensor name -> extent name of each dim; index name -> extent name")
    L(0, "TENSOR_DIMS = " + repr(dict(k.tensor_dims)))
    L(0, "INDEX_EXTENTS = " + repr(dict(k.index_extents)))
    L(0, "PARAM_DEFAULTS = " + repr(dict(k.param_defaults)))
    L(0, "PASSES = " + repr(len(k.passes)))
    L(0, "# closed-form key-tile ranges (SPARSITY 3) exist for this mask, in blocks of:")
    L(0, "BOUNDS_BLOCK = " + repr(SPARSE_BLOCK if k.bounds is not None else None))
    L(0, "BOUNDS_SEGMENTS = " + repr(len(k.bounds) if k.bounds is not None else None) + "\n")


def _emit_index_ranges(k: TileKernel, L: _Lines) -> None:
    """``index_ranges(V, T)``: the interval of every subscript checked at launch, one line per
    IR node (the rules are the runtime's ``_iv_*``), from the values ``V`` of the extents and
    parameters and the tensors ``T`` (the [min, max] of a tensor read inside a subscript)."""
    extents = dict(k.index_extents)
    L(0, "def index_ranges(V: dict, T: dict) -> list:")
    L(1, '"""(tensor, dim, interval, subscript, negatives wrap) of each subscript of a tensor '
         'read\nthat is not proven in range at compile time (intervals: see _iv_index)."""')
    lines: list[str] = []

    def assign(text: str) -> str:
        var = f"v{len(lines)}"
        lines.append(f"{var} = {text}")
        return var

    def leaf(node: Expr) -> str:
        if node.op is Op.CONST:
            return assign(f"_iv_param({literal(node.arg)})")
        if node.op is Op.INDEX:
            ext = extents.get(node.arg)
            return assign(f"_iv_index(V.get({ext!r}))" if ext else "_UNKNOWN")
        if node.op is Op.PARAM:
            return assign(f"_iv_param(V.get({node.arg!r}))")
        if node.op is Op.LOAD:
            return assign(f"_iv_tensor(T[{node.arg!r}])")
        return assign("_iv_row()")

    def apply(rule: str, args: list[str]) -> str:
        return assign(f"{rule}({', '.join(args)})")

    memo: dict[Expr, str] = {}
    out = [f"({s.tensor!r}, {s.dim}, {walk_intervals(s.index, leaf, apply, memo)}, "
           f"{s.text!r}, {s.wraps!r})" for s in k.index_sites]
    for line in lines:
        L(1, line)
    L(1, "return [" + ",\n        ".join(out) + "]\n\n")


def _emit_kernel(k: TileKernel, names: _Names, L: _Lines, m: str, n: str, b: str | None,
                 h: str | None, f: str | None) -> None:
    args: list[str] = []
    tensor_ranks = {o.tensor: len(o.idx) for o in k.operands}
    tensor_ranks.update({c: r for c, r, _ in k.captured})
    for t, rank in tensor_ranks.items():
        p = names.tensors[t]
        args.append(p)
        args.extend(f"{p}_s{d}" for d in range(rank))
    for s in k.stores:
        p = names.outputs[s.name]
        args.append(p)
        args.extend(f"{p}_s{d}" for d in range(len(s.indices)))
    args.extend(names.params[p] for p, _ in k.params)
    args += ["n_heads", "M_len", "N_len", "E_len", "F_len"]
    args += ["kv_num", "kv_num_s0", "kv_num_s1", "kv_num_s2", "kv_idx", "kv_idx_s0",
             "kv_idx_s1", "kv_idx_s2", "kv_idx_s3", "full_num", "full_num_s0", "full_num_s1",
             "full_num_s2", "full_idx", "full_idx_s0", "full_idx_s1", "full_idx_s2",
             "full_idx_s3", "stats"]
    const = ["BLOCK_M", "BLOCK_N", "BLOCK_E", "BLOCK_F", "EVEN_N", "SPARSITY", "SPARSE_Q",
             "SPARSE_KV", "SEGMENTS", "DOT_PRECISION", "UPCAST", "STATS"]
    types = _arg_types(k, names, args)
    L(0, "# kernel argument -> Triton type ({dtype} is the inputs' dtype); for ahead-of-time")
    L(0, "# compilation: a launch specialises unit strides to 1 and multiples of 16 as such")
    L(0, "ARG_TYPES = " + repr(types) + "\n")
    L(0, "def attention_fwd_kernel(")
    for a in args:
        L(1, f"{a},")
    for c in const:
        L(1, f"{c}: tl.constexpr,")
    L(0, "):")
    L(1, '"""One program: BLOCK_M query rows of one (batch, head); SPARSITY 0 = every key '
         'tile\n    unmasked, 1 = every key tile masked, 2 = block tables (partial tiles masked, '
         'full ones not),\n    3 = closed-form key-tile ranges, 4 = a table of SEGMENTS '
         'key-tile ranges."""')
    L(1, "pid_m = tl.program_id(0)\npid_bh = tl.program_id(1)")
    L(1, "off_b = pid_bh // n_heads\noff_h = pid_bh % n_heads")
    L(1, "offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)")
    L(1, "offs_e = tl.arange(0, BLOCK_E)\noffs_f = tl.arange(0, BLOCK_F)")
    L(1, "row_ok = offs_m < M_len")
    params = {p: names.params[p] for p, _ in k.params}
    captured = {c: (names.tensors[c], r) for c, r, _ in k.captured}
    scalar_index = {i: v for i, v in ((b, "off_b"), (h, "off_h")) if i is not None}
    head_env = Env(dict(scalar_index), {}, params, captured, {},
                   scalar_indices=frozenset(scalar_index))
    tile_vars = {m, n} | ({f} if f else set())
    all_exprs = [mx.arg for p in k.passes for mx in p.maxes] + \
        [s.body for p in k.passes for s in p.sums] + [s.expr for s in k.stores] + \
        ([k.mask] if k.mask is not None else [])
    L(1, "# loop-invariant scalars")
    _hoist(all_exprs, tile_vars, L, head_env, 1)
    L(1, "# base pointers of this (batch, head); query-side operands, loaded once")
    for o in k.operands:
        L(1, f"base_{o.var} = {_operand_base(o, names, head_env)}")
    for o in k.operands:
        if o.side == "q":
            ptr = _operand_ptr(o, names, "offs_m[:, None]", "offs_e[None, :]")
            L(1, f"{o.var} = tl.load({ptr}, mask=row_ok[:, None] & (offs_e[None, :] < E_len), "
                 f"other=0.0)")
            L(1, f"if UPCAST:  # the interpreter has no bf16 arithmetic\n    {o.var} = "
                 f"{o.var}.to(tl.float32)")
    loop_hoisted = dict(head_env.hoisted)
    row_env = Env({**scalar_index, m: "offs_m[:, None]"}, {}, params, captured,
                  {m: "row_ok[:, None]"}, loop_hoisted, head_env.scalar_indices)
    loop_exprs = [mx.arg for p in k.passes for mx in p.maxes] + \
        [s.body for p in k.passes for s in p.sums] + ([k.mask] if k.mask is not None else [])
    L(1, "# captured-tensor reads that depend on the query rows only")
    _hoist_rows(loop_exprs, m, L, row_env, 1)
    finished: dict[str, str] = {}
    for pi, p in enumerate(k.passes):
        L(1, f"# pass {pi + 1} over the key tiles")
        for mx in p.maxes:
            L(1, f'{mx.var} = tl.full([BLOCK_M], float("-inf"), tl.float32)')
            if mx.stabilizer:
                L(1, f"{mx.var}_use = tl.zeros([BLOCK_M], tl.float32)")
        for s in p.sums:
            shape = "[BLOCK_M, BLOCK_F]" if s.v is not None else "[BLOCK_M]"
            L(1, f"{s.var} = tl.zeros({shape}, tl.float32)")
        body = _tile_body(k, p, names, head_env, loop_hoisted, finished, m, n, b, h)
        L(1, "if SPARSITY == 2:")
        for table, masked in (("kv", True), ("full", False)):
            L(2, f"# {'partial tiles: evaluate the mask' if masked else 'full tiles: no mask'}")
            L(2, "sparse_row = (pid_m * BLOCK_M) // SPARSE_Q")
            L(2, f"n_blocks = tl.load({table}_num + off_b * {table}_num_s0 + off_h * "
                 f"{table}_num_s1 + sparse_row * {table}_num_s2)")
            L(2, "for blk_i in range(0, n_blocks):")
            L(3, f"blk = tl.load({table}_idx + off_b * {table}_idx_s0 + off_h * {table}_idx_s1 "
                 f"+ sparse_row * {table}_idx_s2 + blk_i * {table}_idx_s3)")
            L(3, "for sub in range(0, SPARSE_KV // BLOCK_N):")
            L(4, "start_n = blk * SPARSE_KV + sub * BLOCK_N")
            L(4, body(masked and k.mask is not None))
        L(1, "elif SPARSITY >= 3:")
        L(2, "# key-tile segments of this query tile, each masked [lo, full_lo), unmasked")
        L(2, "# [full_lo, full_hi), masked [full_hi, hi); everything else is empty")
        L(2, "sparse_row = (pid_m * BLOCK_M) // SPARSE_Q")
        L(2, "for seg in tl.static_range(SEGMENTS):")
        L(3, "if SPARSITY == 4:  # read from a [B, H, rows, 4 * SEGMENTS] range table")
        L(4, "ranges = kv_num + off_b * kv_num_s0 + off_h * kv_num_s1 + sparse_row * kv_num_s2")
        for i, name in enumerate(("lo", "full_lo", "full_hi", "hi")):
            L(4, f"{name} = tl.minimum(tl.load(ranges + 4 * seg + {i}) * SPARSE_KV, N_len)")
        L(3, "else:  # closed forms of the query-tile index (SEGMENTS = BOUNDS_SEGMENTS)")
        if k.bounds is not None:
            bounds_env = Env({"qt": "sparse_row"}, {}, {"M": "M_len", "N": "N_len"}, {}, {})
            for i, seg in enumerate(k.bounds):
                depth = 4
                if len(k.bounds) > 1:
                    L(4, f"{'if' if i == 0 else 'elif'} seg == {i}:")
                    depth = 5
                for name, expr in zip(("lo", "full_lo", "full_hi", "hi"), seg):
                    value = render_at(L, depth, expr, bounds_env)
                    L(depth, f"{name} = tl.minimum(({value}) * SPARSE_KV, "
                             f"N_len)")
        else:
            L(4, "lo = 0  # this mask has no closed form: the launcher never selects SPARSITY 3")
            L(4, "full_lo = 0\nfull_hi = 0\nhi = 0")
        for a, z, masked in (("lo", "full_lo", True), ("full_lo", "full_hi", False),
                             ("full_hi", "hi", True)):
            L(3, f"for start_n in range({a}, {z}, BLOCK_N):")
            L(4, body(masked and k.mask is not None))
        L(1, "elif SPARSITY == 1:")
        L(2, "for start_n in range(0, N_len, BLOCK_N):")
        L(3, body(k.mask is not None))
        L(1, "else:")
        L(2, "for start_n in range(0, N_len, BLOCK_N):")
        L(3, body(False))
        for mx in p.maxes:
            floor = f"tl.maximum({mx.var}, 0.0)" if mx.floor0 else \
                f'tl.where({mx.var} == float("-inf"), 0.0, {mx.var})'
            L(1, f"{mx.var}_safe = {floor}")
            finished[mx.var] = mx.var
            finished[mx.var + ".safe"] = f"{mx.var}_safe"
        for s in p.sums:
            finished[s.var] = s.var
    L(1, "# outputs")
    for st in k.stores:
        ptr = names.outputs[st.name]
        is_tile = st.tile
        rows = {r: (f"{v}[:, None]" if is_tile else v) for r, v in finished.items()}
        for s in (x for p in k.passes for x in p.sums):
            if s.v is not None:
                rows[s.var] = s.var
        idx = dict(scalar_index)
        idx[m] = "offs_m[:, None]" if is_tile else "offs_m"
        if f is not None:
            idx[f] = "offs_f[None, :]"
        env = Env(idx, rows, params, captured, {m: "row_ok[:, None]" if is_tile else "row_ok"},
                  head_env.hoisted, head_env.scalar_indices)
        value = render_at(L, 1, st.expr, env)
        offs = " + ".join(f"{idx[i]} * {ptr}_s{d}" for d, i in enumerate(st.indices))
        mask = "row_ok[:, None] & (offs_f[None, :] < F_len)" if is_tile else "row_ok"
        L(1, f"val_{ptr} = {value}")
        L(1, f"tl.store({ptr} + {offs}, val_{ptr}.to({ptr}.dtype.element_ty), mask={mask})")
    L(0, "")


_POINTER = {FLOAT: "*fp32", INT: "*i64", BOOL: "*i8"}


def _arg_types(k: TileKernel, names: _Names, args: list[str]) -> dict[str, str]:
    """Triton types of the kernel's runtime arguments."""
    ptr: dict[str, str] = {names.tensors[o.tensor]: "*{dtype}" for o in k.operands}
    ptr.update({names.tensors[c]: _POINTER[dt] for c, _, dt in k.captured})
    ptr.update({names.outputs[s.name]: "*{dtype}" if s.tile else "*fp32" for s in k.stores})
    ptr.update({t: "*i32" for t in ("kv_num", "kv_idx", "full_num", "full_idx", "stats")})
    params = {names.params[p]: "fp32" if dt == FLOAT else "i32" for p, dt in k.params}
    out = {}
    for a in args:
        if a in ptr:
            out[a] = ptr[a]
        elif a in params:
            out[a] = params[a]
        else:
            out[a] = "i32"  # strides, lengths, head count
    return out


def _tile_body(k: TileKernel, p, names: _Names, head_env: Env, loop_hoisted: dict,
               finished: dict[str, str], m: str, n: str, b: str | None, h: str | None):
    """Returns body(masked) -> the source of one key-tile step of pass p."""

    def body(masked: bool) -> str:
        L = _Lines()
        L(0, f"if STATS:  # instrumentation: key tiles visited [0] and masked [1]\n"
             f"    tl.atomic_add(stats + {1 if masked else 0}, 1)")
        L(0, "offs_n = start_n + tl.arange(0, BLOCK_N)")
        L(0, "col_ok = offs_n < N_len")
        idx = {i: v for i, v in ((b, "off_b"), (h, "off_h")) if i is not None}
        idx[m], idx[n] = "offs_m[:, None]", "offs_n[None, :]"
        rows = {r: f"{v}[:, None]" for r, v in finished.items()}
        for mx in p.maxes:
            if mx.stabilizer:
                rows[mx.var] = f"{mx.var}_use[:, None]"
        env = Env(idx, rows, head_env.params, head_env.captured,
                  {m: "row_ok[:, None]", n: "col_ok[None, :]"}, loop_hoisted,
                  head_env.scalar_indices)
        used = {d.var for d in k.dots if any(
            x.op is Op.ROW and x.arg == d.var for e in
            [mx.arg for mx in p.maxes] + [s.body for s in p.sums] for x in e.walk())}
        for d in k.dots:
            if d.var not in used:
                continue
            ptr = _operand_ptr(d.k, names, "offs_n[None, :]", "offs_e[:, None]")
            L(0, f"{d.k.var} = tl.load({ptr}, mask=col_ok[None, :] & (offs_e[:, None] < E_len), "
                 f"other=0.0)")
            L(0, f"if UPCAST:\n    {d.k.var} = {d.k.var}.to(tl.float32)")
            L(0, f"{d.var} = tl.dot({d.q.var}, {d.k.var}, input_precision=DOT_PRECISION)")
            rows[d.var] = d.var
        keep = "col_ok[None, :]"
        if masked:
            assert k.mask is not None
            L(0, f"keep = col_ok[None, :] & ({render_at(L, 0, k.mask, env)})")
            keep = "keep"
        bounded = masked or "not EVEN_N"
        for mx in p.maxes:
            value = render_at(L, 0, mx.arg, env)
            L(0, f"y_{mx.var} = tl.zeros([BLOCK_M, BLOCK_N], tl.float32) + ({value})")
            _guard(L, bounded, f"y_{mx.var}", keep, 'float("-inf")')
            L(0, f"{mx.var}_new = tl.maximum({mx.var}, tl.max(y_{mx.var}, 1))")
            if mx.stabilizer:
                safe = f"tl.maximum({mx.var}_new, 0.0)" if mx.floor0 else \
                    f'tl.where({mx.var}_new == float("-inf"), 0.0, {mx.var}_new)'
                L(0, f"{mx.var}_use_new = {safe}")
        shared: dict = {"names": names}
        for s in p.sums:
            _emit_sum(L, s, env, bounded, keep, shared)
        for mx in p.maxes:
            L(0, f"{mx.var} = {mx.var}_new")
            if mx.stabilizer:
                L(0, f"{mx.var}_use = {mx.var}_use_new")
        return "\n".join(L.out)

    return body


def _guard(L: _Lines, bounded: bool | str, var: str, keep: str, fill: str) -> None:
    if bounded is True:
        L(0, f"{var} = tl.where({keep}, {var}, {fill})")
    else:
        L(0, f"if {bounded}:\n    {var} = tl.where({keep}, {var}, {fill})")


def _emit_sum(L: _Lines, s: RunningSum, env: Env, bounded: bool | str, keep: str,
              shared: dict) -> None:
    """One running-sum update; ``shared`` reuses equal weights, rescale factors and V loads
    of the other sums of the same step."""
    rows = dict(env.rows)
    for u, _ in s.units:  # inside the step, a stabiliser reads its new (safe) value
        rows[u] = f"{u}_use_new[:, None]"
    step_env = Env(env.index, rows, env.params, env.captured, env.masks, env.hoisted,
                   env.scalar_indices)
    body = render_at(L, 0, s.body, step_env)
    p = shared.get(("p", body))
    if p is None:
        p = shared[("p", body)] = f"p_{s.var}"
        L(0, f"{p} = tl.zeros([BLOCK_M, BLOCK_N], tl.float32) + ({body})  # a full tile")
        _guard(L, bounded, p, keep, "0.0")
    if s.units:  # rescale by 2^(k * (old - new)); nothing accumulated yet when old is -inf
        alpha = shared.get(("alpha", s.units))
        if alpha is None:
            alpha = shared[("alpha", s.units)] = f"alpha_{s.var}"
            delta = " + ".join(f"{k}.0 * ({u}_use - {u}_use_new)" for u, k in s.units)
            fresh = " | ".join(f'({u} == float("-inf"))' for u, _ in s.units)
            L(0, f"{alpha} = tl.where({fresh}, 0.0, tl.exp2({delta}))")
        scaled = f"{s.var} * {alpha}" + ("[:, None]" if s.v is not None else "")
    else:
        scaled = s.var
    if s.v is None:
        L(0, f"{s.var} = {scaled} + tl.sum({p}, 1)")
        return
    v = s.v.var
    if ("v", v) not in shared:
        shared[("v", v)] = v
        ptr = _operand_ptr(s.v, shared["names"], "offs_n[:, None]", "offs_f[None, :]")
        L(0, f"{v} = tl.load({ptr}, mask=col_ok[:, None] & (offs_f[None, :] < F_len), "
             f"other=0.0)")
        L(0, f"if UPCAST:\n    {v} = {v}.to(tl.float32)")
    L(0, f"{s.var} = {scaled} + tl.dot({p}.to({v}.dtype), {v}, "
         f"input_precision=DOT_PRECISION)")


def launcher_source() -> str:
    """The launcher appended to every module (codegen/launcher.py, without its lint header)."""
    text = (Path(__file__).with_name("launcher.py")).read_text()
    return text.split("\n", 1)[1]
