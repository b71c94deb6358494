"""Triton printer: Tile IR -> the source of a standalone Python module.

The printer is a renderer: an op-to-text table for expressions plus templates for the kernel's
fixed skeleton, in the shape of Triton's fused-attention tutorial: per pass one ``@triton.jit``
key-tile step (``_key_tile_step_N``: load K, the dot, the score printed once, the masked
running max, the running sums) called with a constexpr MASKED from every sparsity branch; the
kernel loads Q once, runs the loops and stores the outputs.  Launch-time specialisations drop
what a problem does not need: EVEN_N / EVEN_M (tiles inside the sequence), EVEN_E / EVEN_F
(the block is the head dim: no head-dim masks), SCALE_NONNEG (rowmax(qk * s) = rowmax(qk) * s),
NONNEG_SUBSCRIPTS (no captured-tensor subscript is negative: torch's wrap is dropped).  A score
with a multiply-free [BLOCK_M, BLOCK_N] term (a bias table read) is printed in natural units
and scaled by log2 e inside the max and the weights (:func:`_natural_scores`).
Every identifier in the generated source is made here, named by role as in the tutorial
(``q_ptr``, ``stride_qm``, ``sm_scale``, ``q``, ``qk``, ``m_i``, ``acc``, ``l_i``, ``alpha``:
:func:`_names`, :func:`_role_names`); names from a spec reach the source only as validated
short ASCII identifiers (a captured tensor's pointer, ``slopes_ptr``), as string literals
produced by ``repr`` or as comments with unsafe characters removed.  Known constants are
commented (``1.4426950408889634  # 1/ln 2``) and the launcher passes keyword arguments.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from attndsl.codegen import loads, writer
from attndsl.codegen.expr import (
    HELPERS,
    CodegenError,
    Env,
    arithmetic_reads,
    comment,
    compared_reads,
    host_literal,
    is_wrap,
    literal,
    lower_for_print,
    render,
    render_at,
    reset_spills,
)
from attndsl.codegen.key_bounds import lowered_mask
from attndsl.codegen.relative import KEYS_MOVE, relative_mask, relative_score
from attndsl.codegen.writer import DIM_LETTERS as _DIM_LETTERS
from attndsl.codegen.writer import SPEC_NAME as _SPEC_NAME
from attndsl.codegen.writer import Lines
from attndsl.codegen.writer import spec_base as _spec_base
from attndsl.codegen.writer import stride_names as _stride_names

from attndsl.index_check import runtime_source
from attndsl.ir import expr as E
from attndsl.ir.expr import BOOL, FLOAT, INT, SHIFTS, Expr, Op
from attndsl.ir.tile import KVPass, Operand, RunningMax, RunningSum, TileKernel, head_params
from attndsl.passes.float_range import bounded_below
from attndsl.passes.index_bounds import walk_intervals
from attndsl.passes.int_range import fits_i32, int_ranges, launch_divisors, zero_divisors
from attndsl.passes.mask import SPARSE_BLOCK
from attndsl.passes.rules import LOG2E

# -- the module -----------------------------------------------------------------------------

@dataclass
class _Names:
    """Kernel argument names (all generated here), by role as in Triton's fused-attention
    tutorial: ``q_ptr`` with strides ``stride_qz, stride_qh, stride_qm, stride_qk``, ``o_ptr``,
    ``lse_ptr``, ``sm_scale``.  ``strides`` maps a pointer to its stride arguments in dim
    order; ``spec`` maps a pointer or parameter argument to the spec name it stands for."""

    tensors: dict[str, str]
    params: dict[str, str]
    outputs: dict[str, str]
    strides: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    spec: dict[str, str] = dataclasses.field(default_factory=dict)
    # operand tile variable / output pointer -> its tensor descriptor (the TMA path)
    descriptors: dict[str, loads.Descriptor] = dataclasses.field(default_factory=dict)

    def base(self, ptr: str) -> str:
        """The role name of a pointer (``q_ptr`` -> ``q``), for the variables derived from it."""
        return ptr.removesuffix("_ptr")


def _names(k: TileKernel) -> _Names:
    """Role names for every tensor, output and parameter of the kernel.  Spec names reach the
    source only as validated identifiers (:func:`_spec_base`); one that is not valid, or
    whose pointer name another tensor took, gets a numbered role name instead."""
    letter_of = {k.roles[r]: c for r, c in _DIM_LETTERS.items() if r in k.roles}
    taken: set[str] = set()

    def claim(want: str | None, role: str) -> str:
        name, i = (f"{want}_ptr" if want else None), 0
        while name is None or name in taken:
            name, i = f"{role}{i}_ptr", i + 1
        taken.add(name)
        return name

    names = _Names({}, {}, {})
    sides: dict[str, int] = {}
    for o in k.operands:
        if o.tensor in names.tensors:
            continue
        count = sides[o.side] = sides.get(o.side, -1) + 1
        ptr = names.tensors[o.tensor] = claim(o.side if count == 0 else None, o.side)
        names.strides[ptr] = _stride_names(names.base(ptr), [
            letter_of.get(i.arg) if i.op is Op.INDEX else None for i in o.idx])
        names.spec[ptr] = o.tensor
    for i, st in enumerate(k.stores):
        first_tile = st.tile and not any(s.tile for s in k.stores[:i])
        ptr = names.outputs[st.name] = claim("o" if first_tile else _spec_base(st.name), "out")
        names.strides[ptr] = _stride_names(names.base(ptr), [letter_of.get(x)
                                                             for x in st.indices])
        names.spec[ptr] = st.name
    for c, rank, _ in k.captured:
        if c not in names.tensors:
            ptr = names.tensors[c] = claim(_spec_base(c), "captured")
            names.strides[ptr] = _stride_names(names.base(ptr), [None] * rank)
            names.spec[ptr] = c
    for i, (p, _) in enumerate(k.params):
        want = "sm_scale" if p == "scale" else \
            f"param_{p}" if _SPEC_NAME.match(p) else None
        arg = want if want is not None and want not in taken else f"param{i}"
        taken.add(arg)
        names.params[p] = arg
        names.spec[arg] = p
    every = list(taken) + [s for strides in names.strides.values() for s in strides]
    if len(set(every)) != len(every):  # an invariant of the naming rules above
        raise CodegenError(f"kernel argument names collide: {sorted(every)}")
    return names


def _operand_base(o: Operand, names: _Names, env: Env) -> str:
    """The program's base pointer into an operand: its batch/head subscripts (loop-invariant),
    each times its stride in int64 unless I32_BASES (``batch * stride_b`` passes 2**31 on a
    big tensor; once per program, outside the key loop)."""
    ptr = names.tensors[o.tensor]
    strides = names.strides[ptr]
    parts = [f"{writer.to_i64(render(idx, env))} * {strides[d]}" for d, idx in enumerate(o.idx)
             if d not in (o.row_dim, o.col_dim)]
    return " + ".join([ptr] + parts)


def _operand_ptr(o: Operand, names: _Names, row: str, col: str) -> str:
    """The pointer tile of operand ``o``: its base, the column term, then the row term.  The
    column term (the head dim, the same for every key tile) is added first: with it after the
    key rows, ptxas held more address registers live across a kernel's several key-tile loops
    (measured: sm90 sliding window D=128 pointer loads 214 registers -> 189, sm80 GQA D=64
    194 -> 186, the loops' instruction counts within +-2)."""
    strides = names.strides[names.tensors[o.tensor]]
    return f"base_{o.var} + {col} * {strides[o.col_dim]} + {row} * {strides[o.row_dim]}"



def _hoist(exprs: list[Expr], tile_vars: set[str], lines: Lines, env: Env, depth: int) -> None:
    """Loop-invariant code motion: scalar subexpressions become variables before the loop."""
    for e in exprs:
        for node in e.walk():
            if node.op in (Op.CONST, Op.PARAM, Op.INDEX) or node in env.hoisted:
                continue
            deps = node.free_indices()
            if deps & tile_vars or any(x.op is Op.ROW for x in node.walk()):
                continue  # a captured read at scalar subscripts is in range: checked at launch
            if node.op is Op.LOAD or any(s.op in (Op.CONST, Op.PARAM, Op.INDEX) or
                                         s in env.hoisted for s in node.src):
                name = f"c{len(env.hoisted)}"
                lines(depth, f"{name} = {render_at(lines, depth, node, env)}")
                env.hoisted[node] = name


def _hoist_rows(exprs: list[Expr], m: str, lines: Lines, env: Env, depth: int) -> None:
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


@dataclass(frozen=True)
class _Gather:
    """A captured-tensor read in the key-tile step whose every subscript is linear in the key
    index n with a constant coefficient: ``sub_d = coefs[d] * n + consts[d] + sum(pieces[d])``,
    the pieces free of n (query-row math, batch/head scalars).  With n = start_n + j
    (j < BLOCK_N) its address is

        ptr + sum_d (consts[d] + sum(pieces[d]) + coefs[d] * j) * stride_d
            + sum_d coefs[d] * start_n * stride_d

    the first part a pointer tile made once before the key loops (``name``), the second one
    scalar per key tile.  Each piece is its own pointer addition, as in a hand-written kernel
    (``bias + off_h * stride_h + offs_m[:, None] - offs_n[None, :]``): the compiler then sees
    that the elements of a thread differ by constants (immediate offsets of one address)
    instead of recomputing and sign-extending one int32 subscript per element.  The pointer
    sums are 64-bit, so only each piece times its stride must fit int32 under I32_INDICES
    (``gather_ranges``, checked by the launcher).  ``wraps``: some subscript is torch's
    negative-index wrap, which the fast form drops (then it needs NONNEG_SUBSCRIPTS)."""

    load: Expr
    name: str
    ptr: str
    strides: tuple[str, ...]
    coefs: tuple[int, ...]
    consts: tuple[int, ...]
    pieces: tuple[tuple[Expr, ...], ...]
    wraps: bool

    def at_tile(self) -> str:
        """The pointer tile of key tile ``start_n``: the one at key 0 moved by a scalar (int64
        unless I32_INDICES; ``start_n`` is a Python int in the interpreter)."""
        moves = [f" + (start_n * {c} if I32_INDICES else start_n * tl.full((), {c}, "
                 f"tl.int64)) * {self.strides[d]}" for d, c in enumerate(self.coefs) if c]
        return self.name + "".join(moves)


def _key_linear(e: Expr, n: str) -> tuple[int, int, list[Expr]] | None:
    """(c, k, pieces) with e = c * n + k + sum(pieces), c and k ints and no piece reading n
    or being a constant, or None.  Only +, -, negation and products by integer constants are
    followed; anything else that reads n is not linear here."""
    if e.op is Op.CONST and e.dtype == INT:
        return 0, e.arg, []
    if n not in e.free_indices():
        return 0, 0, [e]
    if e.dtype != INT:
        return None
    if e.op is Op.INDEX:
        return 1, 0, []
    if e.op is Op.NEG:
        inner = _key_linear(e.src[0], n)
        return None if inner is None else (-inner[0], -inner[1], [-x for x in inner[2]])
    if e.op in (Op.ADD, Op.SUB):
        a, b = (_key_linear(x, n) for x in e.src)
        if a is None or b is None:
            return None
        if e.op is Op.ADD:
            return a[0] + b[0], a[1] + b[1], a[2] + b[2]
        return a[0] - b[0], a[1] - b[1], a[2] + [-x for x in b[2]]
    if e.op is Op.MUL:
        for x, c in (e.src, e.src[::-1]):
            inner = _key_linear(x, n) if c.op is Op.CONST and c.dtype == INT else None
            if inner is not None:
                return inner[0] * c.arg, inner[1] * c.arg, [E.binary(Op.MUL, q, c)
                                                           for q in inner[2]]
    return None


def _gathers(exprs: list[Expr], n: str, allowed: set[str], wraps: frozenset[Expr],
             names: _Names) -> list[_Gather]:
    """The captured reads of the key-tile step that :class:`_Gather` applies to: each
    subscript linear in n (after dropping a wrap of ``wraps``), some coefficient nonzero,
    and every piece reading only the indices ``allowed`` (the query rows and the program's
    batch/head), parameters and constants: no tensor and no running value."""
    found: dict[Expr, _Gather] = {}
    for e in exprs:
        for node in e.walk():
            if node.op is not Op.LOAD or node in found or n not in node.free_indices():
                continue
            coefs: list[int] = []
            consts: list[int] = []
            pieces: list[tuple[Expr, ...]] = []
            wrapped = False
            for sub in node.src:
                if is_wrap(sub, wraps):
                    sub, wrapped = sub.src[2], True
                lin = _key_linear(sub, n)
                if lin is None or any(not p.free_indices() <= allowed or any(
                        x.op in (Op.LOAD, Op.ROW) for x in p.walk()) for p in lin[2]):
                    break
                coefs.append(lin[0])
                consts.append(lin[1])
                pieces.append(tuple(lin[2]))
            else:
                if any(coefs):
                    ptr = names.tensors[node.arg]
                    found[node] = _Gather(node, f"gather_{len(found)}", ptr, names.strides[ptr],
                                          tuple(coefs), tuple(consts), tuple(pieces), wrapped)
    return list(found.values())


def _emit_gathers(gathers: list[_Gather], L: Lines, env: Env) -> None:
    """Kernel scope: each gather's pointer tile at key 0, one pointer addition per piece."""
    if not gathers:
        return
    L(1, "# captured reads linear in the key index: pointer tiles at key 0, moved per key tile")
    for g in gathers:
        L(1, f"# {comment(E.render(g.load))[2:]}")
        # the key-column terms first: added last, LLVM rebuilt the column of a thread's first
        # element apart from the others' (two bases moved per key tile instead of one)
        terms = [f"{env.to_i64(f'{c} * tl.arange(0, BLOCK_N)[None, :]')} * {g.strides[d]}"
                 for d, c in enumerate(g.coefs) if c]
        terms += [f"{env.to_i64(render_at(L, 1, piece, env))} * {g.strides[d]}"
                  for d, ps in enumerate(g.pieces) for piece in ps]
        terms += [f"({literal(k)} if I32_INDICES else tl.full((), {k}, tl.int64)) * "
                  f"{g.strides[d]}" for d, k in enumerate(g.consts) if k]
        L(1, f"{g.name} = {g.ptr} + " + " + ".join(terms))


def generate(k: TileKernel, spec_hash: str, version: str) -> str:
    """The full source of a generated module for one tile kernel."""
    names = _names(k)
    roles = k.roles
    m, n = roles["query"], roles["key"]
    b, h, f = roles.get("batch"), roles.get("head"), roles.get("v")
    divisors = _check_divisors(_kernel_exprs(k))
    k = _role_names(k)
    names.descriptors = _descriptors(k, names)
    reset_spills()
    L = Lines()
    writer.prologue(L, f"spec hash: {spec_hash}\n\nCascade:\n{k.spec_text}\n\nTile IR:\n{k}",
                    "A fused attention kernel generated by attndsl; needs only torch and triton.",
                    spec_hash, version)
    k, natural = _natural_scores(_regroup(k))
    _emit_tables(k, names, L)
    L(0, HELPERS)
    L(0, LOAD_TILE)
    _emit_kernel(k, names, L, m, n, b, h, f, natural)
    L(0, runtime_source())
    L(0, loads.runtime_source())
    _emit_index_ranges(k, L, divisors)
    _emit_scale_ranges(k, L)
    _emit_narrow_ranges(k, L)
    _emit_gather_ranges(k, names, L)
    L(0, writer.launcher_sources("launcher.py", (writer.COMMON, writer.BLOCK_TABLES,
                                                  writer.TILE_KERNEL)))
    return "\n".join(L.out) + "\n"


def _descriptors(k: TileKernel, names: _Names) -> dict[str, loads.Descriptor]:
    """The tensor descriptor of every operand tile (the TMA path; outputs are stored through
    pointers, see :mod:`codegen.loads`)."""
    out: dict[str, loads.Descriptor] = {}
    for o in k.operands:
        ptr = names.tensors[o.tensor]
        out[o.var] = loads.operand_descriptor(o.var, o.side, ptr, names.strides[ptr],
                                              o.row_dim, o.col_dim)
    return out


def _key_tiles_first(operands: tuple[Operand, ...]) -> list[Operand]:
    """The operands with those read every key tile (K and V sides) before the query-side
    ones read once.

    Why the order matters: the device-side descriptors lie in the program's global scratch in
    the order they are made, and the key-tile loop hands each load the address of its
    descriptor.  With the query tile's descriptor first, the first key-side one sits at an
    offset, and ptxas (seen with triton 3.9, sm90, D=64) then kept the scratch address in
    vector registers and moved it to uniform ones per load (R2UR, IMAD.U32): 8 instructions
    per key tile (causal 314 -> 307, prefix-LM masked 432 -> 423).  The query tile is loaded
    once, before the loops, so its descriptor's place costs nothing there."""
    return sorted(operands, key=lambda o: o.side == "q")


def _role_names(k: TileKernel) -> TileKernel:
    """The kernel with its tile variables named by role, as in Triton's fused-attention
    tutorial: operand tiles ``q``, ``k``, ``v``, score dots ``qk``, running maxima ``m_i``,
    running sums ``acc`` (over V) and ``l_i`` (row sums); a second one of a role is ``_1``,
    ``_2``...  The Tile IR's own names (``q0``, ``qk0``, ``mx0``, ``l2``) are internal: none
    comes from a spec, and the printed Tile IR in the module header uses these names too."""
    count: dict[str, int] = {}
    new: dict[str, str] = {}

    def give(var: str, role: str) -> None:
        if var not in new:
            i = count[role] = count.get(role, -1) + 1
            new[var] = role if i == 0 else f"{role}_{i}"

    for o in k.operands:
        give(o.var, o.side)
    for d in k.dots:
        give(d.var, "qk")
    for p in k.passes:
        for mx in p.maxes:
            give(mx.var, "m_i")
        for sm in p.sums:
            give(sm.var, "acc" if sm.v is not None else "l_i")

    def row(node: Expr) -> Expr | None:
        if node.op is not Op.ROW:
            return None
        var, dot, rest = node.arg.partition(".")
        return E.row(new.get(var, var) + dot + rest)

    def operand(o: Operand) -> Operand:
        return dataclasses.replace(o, var=new[o.var])

    def expr(e: Expr) -> Expr:
        return e.replace(row)

    passes = tuple(dataclasses.replace(
        p, maxes=tuple(dataclasses.replace(mx, var=new[mx.var], arg=expr(mx.arg))
                       for mx in p.maxes),
        sums=tuple(dataclasses.replace(
            sm, var=new[sm.var], body=expr(sm.body),
            v=None if sm.v is None else operand(sm.v),
            units=tuple((new.get(u, u), n) for u, n in sm.units)) for sm in p.sums))
        for p in k.passes)
    return dataclasses.replace(
        k, operands=tuple(operand(o) for o in k.operands),
        dots=tuple(dataclasses.replace(d, var=new[d.var], q=operand(d.q), k=operand(d.k))
                   for d in k.dots),
        passes=passes, stores=tuple(dataclasses.replace(st, expr=expr(st.expr))
                                    for st in k.stores),
        mask=None if k.mask is None else expr(k.mask))


def _kernel_exprs(k: TileKernel) -> list[Expr]:
    return [mx.arg for p in k.passes for mx in p.maxes] + \
        [s.body for p in k.passes for s in p.sums] + [s.expr for s in k.stores] + \
        ([k.mask] if k.mask is not None else [])


def _check_divisors(exprs: list[Expr]) -> tuple[Expr, ...]:
    """Refuses an integer // or % whose divisor, a function of the indices alone, can be zero
    (torch raises ZeroDivisionError; a kernel cannot); returns the divisors that read
    parameters or tensors, whose range the launcher checks for 0."""
    divisors: dict[Expr, None] = {}
    for e in exprs:
        bad = zero_divisors(e)
        if bad:
            node = bad[0]
            raise CodegenError(f"the divisor of the integer {E.render(node)} can be zero "
                               f"(torch raises ZeroDivisionError); make it provably nonzero, "
                               f"e.g. with max(..., 1)")
        divisors.update(dict.fromkeys(launch_divisors(e)))
    return tuple(divisors)


def _emit_tables(k: TileKernel, names: _Names, L: Lines) -> None:
    """Plain-literal metadata the launcher reads (tensor names only as repr'd strings)."""
    ops = {o.tensor: o for o in k.operands}
    L(0, "# tensor name -> (kernel pointer, side, row dim, column dim)")
    L(0, "OPERANDS = " + repr({t: (names.tensors[t], o.side, o.row_dim, o.col_dim)
                               for t, o in ops.items()}))
    L(0, "# captured tensor name -> (kernel pointer, rank)")
    L(0, "CAPTURED = " + repr({c: (names.tensors[c], r) for c, r, _ in k.captured}))
    L(0, "# scalar parameter name -> kernel argument")
    L(0, "PARAMS = " + repr(names.params))
    L(0, "# parameter -> its constexpr kernel argument (read only in head subscripts)")
    L(0, "CONSTEXPR_PARAMS = " + repr({p: names.params[p] for p in head_params(k)}))
    L(0, "# output name -> (kernel pointer, indices, is a [rows, v] tile)")
    L(0, "OUTPUTS = " + repr({s.name: (names.outputs[s.name], s.indices, s.tile)
                              for s in k.stores}))
    L(0, "# kernel pointer -> its stride arguments, in dim order (the tensor's .stride())")
    L(0, "STRIDES = " + repr(names.strides))
    L(0, "# the block-table arguments (SPARSITY 2 and 4), in the launcher's order")
    L(0, "TABLE_ARGS = " + repr(_TABLE_ARGS))
    L(0, "HAS_MASK = " + repr(k.mask is not None))
    writer.binding_tables(L, k)
    L(0, "PASSES = " + repr(len(k.passes)))
    L(0, loads.descriptor_table(list(names.descriptors.values()), _per_key_reads(k)))
    L(0, "# closed-form key-tile ranges (SPARSITY 3) exist for this mask, in blocks of:")
    L(0, "BOUNDS_BLOCK = " + repr(SPARSE_BLOCK if k.bounds is not None else None))
    L(0, "BOUNDS_SEGMENTS = " + repr(len(k.bounds) if k.bounds is not None else None) + "\n")


def _per_key_reads(k: TileKernel) -> bool:
    """Whether a score or a sum of the key-tile step reads a captured tensor at a subscript
    that reads the key index (loaded on every key tile, not only where the mask is read)."""
    n = k.roles["key"]
    exprs = [mx.arg for p in k.passes for mx in p.maxes] + [s.body for p in k.passes
                                                            for s in p.sums]
    return any(x.op is Op.LOAD and any(y.op is Op.INDEX and y.arg == n for y in x.walk())
               for e in exprs for x in e.walk())


def _emit_index_ranges(k: TileKernel, L: Lines, divisors: tuple[Expr, ...] = ()) -> None:
    """``index_ranges(V, T)``: the interval of every subscript checked at launch, and
    ``divisor_ranges(V, T)``: the interval of every integer divisor that reads data, one line
    per IR node (the rules are the runtime's ``_iv_*``), from the values ``V`` of the extents
    and parameters and the tensors ``T`` (the [min, max] of a tensor read)."""
    extents = dict(k.index_extents)
    L(0, "def index_ranges(V: dict, T: dict) -> list:")
    L(1, '"""(tensor, dim, interval, subscript, negatives wrap) of each subscript of a tensor '
         'read\nthat is not proven in range at compile time (intervals: see _iv_index)."""')
    _emit_intervals(extents, L, [(f"({s.tensor!r}, {s.dim}, ", s.index, f", {s.text!r}, "
                                  f"{s.wraps!r})") for s in k.index_sites])
    L(0, "def divisor_ranges(V: dict, T: dict) -> list:")
    L(1, '"""(divisor, interval) of each integer // and % whose divisor reads parameters or '
         'tensors."""')
    _emit_intervals(extents, L, [(f"({E.render(d)!r}, ", d, ")") for d in divisors])


def _emit_scale_ranges(k: TileKernel, L: Lines) -> None:
    """``scale_ranges(V, T)``: the interval of each score scale s of a dot read as qk * s
    (:func:`_scaled_dots`); the launcher sets SCALE_NONNEG when every one is >= 0."""
    L(0, "def scale_ranges(V: dict, T: dict) -> list:")
    L(1, '"""The interval of each score scale s of a dot read as qk * s (SCALE_NONNEG)."""')
    _emit_intervals(dict(k.index_extents), L, [("", c, "") for c in _scaled_dots(k).values()])


def _widened(k: TileKernel) -> list[Expr]:
    """The integer nodes the kernel computes in int64 because their static range may leave
    int32 (:mod:`attndsl.passes.int_range`) and the integer tensor reads integer arithmetic
    converts with them (:func:`codegen.expr.arithmetic_reads`), and the integer tensor reads
    that are compared, in int32 under I32_INDICES (:func:`codegen.expr.compared_reads`);
    shifts are int64 by definition: not among them."""
    nodes: dict[Expr, None] = {}
    for e in _kernel_exprs(k):
        ranges = int_ranges(e)
        nodes.update(dict.fromkeys(
            x for x in e.walk() if x.dtype == INT and x.op is not Op.LOAD
            and x.op not in SHIFTS and not fits_i32(ranges[x])))
        nodes.update(dict.fromkeys(arithmetic_reads(e) + compared_reads(e)))
    return list(nodes)


def _emit_narrow_ranges(k: TileKernel, L: Lines) -> None:
    """``narrow_ranges(V, T)``: the interval of every integer node the kernel widens; when
    each fits int32 the launcher sets I32_INDICES and the kernel computes them in int32
    (exact: every value, intermediate ones included, is an int32)."""
    L(0, "def narrow_ranges(V: dict, T: dict) -> list:")
    L(1, '"""The interval of each integer node the kernel widens to int64 (I32_INDICES)."""')
    _emit_intervals(dict(k.index_extents), L, [("", x, "") for x in _widened(k)])


def _kernel_gathers(k: TileKernel, names: _Names) -> list[_Gather]:
    """The gathers (:class:`_Gather`) of the kernel's key-tile steps."""
    scalar = {i for i in (k.roles.get("batch"), k.roles.get("head")) if i is not None}
    loop_exprs = [mx.arg for p in k.passes for mx in p.maxes] + \
        [s.body for p in k.passes for s in p.sums] + ([k.mask] if k.mask is not None else [])
    return _gathers(loop_exprs, k.roles["key"], {k.roles["query"]} | scalar,
                    frozenset(s.index for s in k.index_sites if s.wraps), names)


def _emit_gather_ranges(k: TileKernel, names: _Names, L: Lines) -> None:
    """``GATHERS``: (kernel pointer, dim, bound) of each term a gather's pointer tile adds
    that is not an interval of IR (the key coefficient c: |c| * (N_len + BLOCK_N) bounds
    c * start_n and c * j; a constant k: |k|), and ``gather_ranges(V, T)``: (kernel pointer,
    dim, interval) of each of its pieces.  Under I32_INDICES each term times its stride is
    computed in int32: the launcher sets it only when every one fits (``_gathers_fit``)."""
    gathers = _kernel_gathers(k, names)
    keys = [(g.ptr, d, c, k_) for g in gathers for d, (c, k_) in
            enumerate(zip(g.coefs, g.consts, strict=True)) if c or k_]
    L(0, "# gather pointer -> (dim, |key coefficient|, |constant|) of its pointer tile's terms")
    L(0, "GATHERS = " + repr([(ptr, d, abs(c), abs(k_)) for ptr, d, c, k_ in keys]))
    L(0, "def gather_ranges(V: dict, T: dict) -> list:")
    L(1, '"""(kernel pointer, dim, interval) of each piece of a gather\'s pointer tile."""')
    _emit_intervals(dict(k.index_extents), L, [(f"({g.ptr!r}, {d}, ", piece, ")")
                                               for g in gathers for d, ps in enumerate(g.pieces)
                                               for piece in ps])


def _emit_intervals(extents: dict[str, str], L: Lines,
                    items: list[tuple[str, Expr, str]]) -> None:
    """The body of a function returning ``[head + interval of expr + tail, ...]``."""
    lines: list[str] = []

    def assign(text: str) -> str:
        var = f"v{len(lines)}"
        lines.append(f"{var} = {text}")
        return var

    def leaf(node: Expr) -> str:
        if node.op is Op.CONST:
            return assign(f"_iv_param({host_literal(node.arg)})")
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
    out = [head + walk_intervals(e, leaf, apply, memo) + tail for head, e, tail in items]
    for line in lines:
        L(1, line)
    L(1, "return [" + ",\n        ".join(out) + "]\n\n")


def _emit_kernel(k: TileKernel, names: _Names, L: Lines, m: str, n: str, b: str | None,
                 h: str | None, f: str | None, natural: frozenset[str] = frozenset()) -> None:
    args: list[str] = []
    tensor_ranks = {o.tensor: len(o.idx) for o in k.operands}
    tensor_ranks.update({c: r for c, r, _ in k.captured})
    for t in tensor_ranks:
        p = names.tensors[t]
        args.append(p)
        args.extend(names.strides[p])
    for s in k.stores:
        p = names.outputs[s.name]
        args.append(p)
        args.extend(names.strides[p])
    static = head_params(k)
    args.extend(names.params[p] for p, _ in k.params if p not in static)
    args += ["n_heads", "M_len", "N_len", "E_len", "F_len", *_TABLE_ARGS, "stats"]
    const = ["BLOCK_M", "BLOCK_N", "BLOCK_E", "BLOCK_F", "EVEN_N", "SPARSITY", "SPARSE_Q",
             "SPARSE_KV", "SEGMENTS", "EDGE_STAGES", "DOT_PRECISION", "UPCAST", "STATS"]
    const += [names.params[p] for p in static]  # passed by name like the runtime arguments
    row_strides = _row_strides(k, names)
    types = {a: t for a, t in _arg_types(k, names, args).items() if a not in row_strides}
    L(0, "# kernel argument -> Triton type ({dtype} is the inputs' dtype); for ahead-of-time")
    L(0, "# compilation: a launch specialises unit strides to 1 and multiples of 16 as such")
    L(0, "ARG_TYPES = " + repr(types))
    L(0, writer.row_strides_note({"attention_fwd_kernel": row_strides}) + "\n")
    steps = Lines()  # the key-tile step functions, printed above the kernel
    steps_at = len(L.out)
    kernel_start = len(L.out)
    # the spec name a pointer or parameter stands for goes into a comment
    writer.signature(L, "attention_fwd_kernel", args, const, _EVEN, notes=names.spec,
                     specialised=row_strides,
                     doc="One program: BLOCK_M query rows of one (batch, head); SPARSITY 0 = "
                     "every key tile\n    unmasked, 1 = every key tile masked, 2 = block tables "
                     "(partial tiles masked, full ones not),\n    3 = closed-form key-tile "
                     "ranges, 4 = a table of SEGMENTS key-tile ranges.")
    writer.program(L, "pid_m")
    tiled = [names.tensors[o.tensor] for o in k.operands] + [names.outputs[s.name]
                                                              for s in k.stores]
    writer.widen_strides(L, 1, [s for ptr in tiled for s in names.strides[ptr]])
    L(1, "offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)")
    L(1, "offs_e = tl.arange(0, BLOCK_E)\noffs_f = tl.arange(0, BLOCK_F)")
    L(1, "row_ok = offs_m < M_len")
    L(1, "if EVEN_M:  # every query row of the tile is in the sequence: the row masks fold away")
    L(2, "row_ok = tl.full([BLOCK_M], 1, tl.int1)")
    params = {p: names.params[p] for p, _ in k.params}
    captured = {c: (names.tensors[c], r) for c, r, _ in k.captured}
    scalar_index = {i: v for i, v in ((b, "off_b"), (h, "off_h")) if i is not None}
    head_env = Env(dict(scalar_index), {}, params, captured, {},
                   scalar_indices=frozenset(scalar_index), strides=names.strides,
                   wraps=frozenset(s.index for s in k.index_sites if s.wraps), narrow=True)
    tile_vars = {m, n} | ({f} if f else set())
    all_exprs = [mx.arg for p in k.passes for mx in p.maxes] + \
        [s.body for p in k.passes for s in p.sums] + [s.expr for s in k.stores] + \
        ([k.mask] if k.mask is not None else [])
    L(1, "# loop-invariant scalars")
    _hoist(all_exprs, tile_vars, L, head_env, 1)
    L(1, "# base pointers of this (batch, head); query-side operands, loaded once")
    for o in k.operands:
        L(1, f"base_{o.var} = {_operand_base(o, names, head_env)}")
    L(1, loads.descriptor_setup([names.descriptors[o.var] for o in _key_tiles_first(k.operands)]))
    for o in k.operands:
        if o.side == "q":
            ptr = _operand_ptr(o, names, "offs_m[:, None]", "offs_e[None, :]")
            L(1, loads.tile_load(o.var, names.descriptors.get(o.var), "pid_m * BLOCK_M",
                                 f"_load_tile({ptr}, row_ok[:, None], offs_e[None, :] < E_len, "
                                 f"not EVEN_M, not EVEN_E)"))
            L(1, f"if UPCAST:  # the interpreter has no bf16 arithmetic\n    {o.var} = "
                 f"{o.var}.to(tl.float32)")
    loop_hoisted = dict(head_env.hoisted)
    scaled = {E.binary(Op.MUL, E.row(d), c): (d, render_at(L, 1, c, head_env))
              for d, c in _scaled_dots(k).items()}
    row_env = Env({**scalar_index, m: "offs_m[:, None]"}, {}, params, captured,
                  {m: "row_ok[:, None]"}, loop_hoisted, head_env.scalar_indices,
                  strides=names.strides, wraps=head_env.wraps, narrow=True)
    loop_exprs = [mx.arg for p in k.passes for mx in p.maxes] + \
        [s.body for p in k.passes for s in p.sums] + ([k.mask] if k.mask is not None else [])
    L(1, "# captured-tensor reads that depend on the query rows only")
    _hoist_rows(loop_exprs, m, L, row_env, 1)
    gathers = _kernel_gathers(k, names)
    _emit_gathers(gathers, L, row_env)
    finished: dict[str, str] = {}
    infinite: dict[str, str] = {}  # row sum -> its stabiliser, made 1 where that is +inf
    nan_max: dict[str, str] = {}  # max -> the sum of its own weights (a NaN score: NaN)
    for pi, p in enumerate(k.passes):
        L(1, f"# pass {pi + 1} over the key tiles")
        for mx in p.maxes:
            if _empty_row_sum(p, mx):
                L(1, f"{mx.var} = tl.full([BLOCK_M], {literal(-FLT_MAX)}, tl.float32)  # the "
                     f"stabiliser, finite from the start")
                continue
            L(1, f'{mx.var} = tl.full([BLOCK_M], float("-inf"), tl.float32)')
            if mx.stabilizer:
                L(1, f"{mx.var}_use = tl.zeros([BLOCK_M], tl.float32)")
        for s in p.sums:
            shape = "[BLOCK_M, BLOCK_F]" if s.v is not None else "[BLOCK_M]"
            L(1, f"{s.var} = tl.zeros({shape}, tl.float32)")
        step = _tile_body(k, p, names, head_env, loop_hoisted, finished, m, n, b, h, scaled,
                          gathers, natural)()
        call = _emit_step_function(f"_key_tile_step_{pi + 1}", p, step, L.out[kernel_start:],
                                   args, const, steps)

        def visit(L: Lines, depth: int, masked: bool, call=call) -> None:
            L(depth, call(masked))  # one key tile: the step function, MASKED or not

        writer.sparsity_loops(L, 1, visit, k.mask is not None, "kv_",
                              "(pid_m * BLOCK_M) // SPARSE_Q", "SPARSE_KV", "BLOCK_N", "start_n",
                              "N_len", lambda L, depth, visit=visit: _ranges(L, depth, k, visit))
        for mx in p.maxes:
            empty = _empty_row_sum(p, mx)
            later = [st.expr for st in k.stores] + [e for q in k.passes[pi + 1:] for e in
                                                    [x.arg for x in q.maxes] +
                                                    [x.body for x in q.sums]]
            if empty and any(_reads(e, mx.var) or _reads(e, mx.var + ".safe") for e in later):
                L(1, f'{mx.var} = tl.where(({mx.var} == {literal(-FLT_MAX)}) & ({empty} == 0.0), '
                     f'float("-inf"), {mx.var})  # the max: -inf on a row of no kept key')
            floor = f"tl.maximum({mx.var}, 0.0)" if mx.floor0 else \
                f'tl.where({mx.var} == float("-inf"), 0.0, {mx.var})'
            L(1, f"{mx.var}_safe = {floor}")
            finished[mx.var] = mx.var
            finished[mx.var + ".safe"] = f"{mx.var}_safe"
        infinite.update(_infinite_rows(k, p))
        nan_max.update({mx.var: _empty_row_sum(p, mx) for mx in p.maxes
                        if _empty_row_sum(p, mx) is not None})
        for s in p.sums:
            finished[s.var] = s.var
    L(1, "# outputs")
    printed: set[str] = set()  # the row sums whose l_inf, the maxes whose m_nan is printed
    for st in k.stores:
        ptr = names.outputs[st.name]
        is_tile = st.tile
        rows = {r: (f"{v}[:, None]" if is_tile else v) for r, v in finished.items()}
        for s in (x for p in k.passes for x in p.sums):
            if s.v is not None:
                rows[s.var] = s.var
        for s, mx in infinite.items():
            if _reads(st.expr, mx + ".safe"):  # reads the sum as 2^m * l
                if s not in printed:  # printed where first read: a short live range
                    printed.add(s)
                    L(1, f'{s}_inf = tl.where({mx} == float("inf"), 1.0, {s})  # a +inf '
                         f"score: the sum of exp is +inf")
                rows[s] = f"{s}_inf[:, None]" if is_tile else f"{s}_inf"
        for mx, s in nan_max.items():
            if _reads(st.expr, mx):  # the raw max: NaN where the oracle's is
                if mx not in printed:
                    printed.add(mx)
                    L(1, f'{mx}_nan = tl.where(({s} != {s}) & ({mx} != float("inf")), '
                         f'float("nan"), {mx})  # a kept NaN score (tl.max skips it) made '
                         f"its weight, so {s}, NaN")
                rows[mx] = f"{mx}_nan[:, None]" if is_tile else f"{mx}_nan"
        idx = dict(scalar_index)
        idx[m] = "offs_m[:, None]" if is_tile else "offs_m"
        if f is not None:
            idx[f] = "offs_f[None, :]"
        env = Env(idx, rows, params, captured, {m: "row_ok[:, None]" if is_tile else "row_ok"},
                  head_env.hoisted, head_env.scalar_indices, strides=names.strides,
                  wraps=head_env.wraps, narrow=True)
        value = render_at(L, 1, st.expr, env)
        offs = " + ".join(f"{writer.to_i64(idx[i]) if i in scalar_index else idx[i]} * {stride}"
                          for i, stride in zip(st.indices, names.strides[ptr], strict=True))
        mask = "row_ok[:, None] & (offs_f[None, :] < F_len)" if is_tile else "row_ok"
        val = f"val_{names.base(ptr)}"
        L(1, comment(f"output {st.name}[{', '.join(st.indices)}] = {E.render(st.expr)}"))
        L(1, f"{val} = {value}")
        typed = f"{val}.to({ptr}.dtype.element_ty)"
        L(1, f"tl.store({ptr} + {offs}, {typed}, mask={mask})")
    L(0, "")
    L.out[steps_at:steps_at] = steps.out
    L.out[steps_at:] = [_annotate_constants(line) for line in L.out[steps_at:]]


def _ranges(L: Lines, depth: int, k: TileKernel, step: writer.Step) -> None:
    """The SPARSITY 3 and 4 branches of the key-tile loop nest: per segment of this query
    tile, key tiles masked in [lo, full_lo), unmasked in [full_lo, full_hi), masked in
    [full_hi, hi), read from a range table (4) or computed from the mask's closed forms (3).
    A closed-form segment with no unmasked tiles (``full_lo == full_hi == hi``: a window
    narrower than two bound blocks, the tiling pass) runs one masked loop over [lo, hi): three
    loops there held registers for two that never run (triton 3.6, sm80, a 64-key window at
    D=128: 245 against 225)."""
    single = [seg[1] == seg[2] == seg[3] for seg in k.bounds or ()]
    L(depth, "elif SPARSITY >= 3:")
    L(depth + 1, "# key-tile segments of this query tile, each masked [lo, full_lo), unmasked")
    L(depth + 1, "# [full_lo, full_hi), masked [full_hi, hi); everything else is empty.  A masked")
    L(depth + 1, "# edge is a few tiles: its loop is pipelined EDGE_STAGES deep (edge_stages)")
    L(depth + 1, "sparse_row = (pid_m * BLOCK_M) // SPARSE_Q")
    L(depth + 1, "for seg in tl.static_range(SEGMENTS):")
    L(depth + 2, "if SPARSITY == 4:  # read from a [B, H, rows, 4 * SEGMENTS] range table")
    L(depth + 3, f"ranges = {writer.offset('kv_num', ['off_b', 'off_h', 'sparse_row'])}")
    for i, name in enumerate(_BOUNDS):
        L(depth + 3, f"{name} = tl.minimum(tl.load(ranges + 4 * seg + {i}) * SPARSE_KV, N_len)")
    if any(single):
        _segment_loops(L, depth + 3, k, step, single=False)
    L(depth + 2, "else:  # closed forms of the query-tile index (SEGMENTS = BOUNDS_SEGMENTS)")
    if k.bounds is not None:
        for i, seg in enumerate(k.bounds):
            at = depth + 3
            if len(k.bounds) > 1:
                L(at, f"{'if' if i == 0 else 'elif'} seg == {i}:")
                at += 1
            names, exprs = ((_BOUNDS[0], _BOUNDS[3]), (seg[0], seg[3])) if single[i] else \
                (_BOUNDS, seg)
            if single[i]:
                L(at, "# no key tile of this segment is unmasked: one masked loop")
            temps = "t" if len(k.bounds) == 1 else f"s{i}_t"
            for name, value in zip(names, writer.bound_values(L, at, exprs, "sparse_row",
                                                              temps)):
                # in [0, N_len]: int32, so the key offsets and the mask are int32 too
                L(at, f"{name} = 0" if value == "0" else
                      f"{name} = tl.minimum(tl.maximum(({value}) * SPARSE_KV, 0), "
                      f"N_len).to(tl.int32)")
            if any(single):
                _segment_loops(L, at, k, step, single=single[i])
    else:
        L(depth + 3, "lo = 0  # this mask has no closed form: the launcher never selects "
                     "SPARSITY 3")
        L(depth + 3, "full_lo = 0\nfull_hi = 0\nhi = 0")
    if not any(single):
        _segment_loops(L, depth + 2, k, step, single=False)


def _segment_loops(L: Lines, depth: int, k: TileKernel, step: writer.Step,
                   single: bool) -> None:
    """One segment's key-tile loops: masked [lo, full_lo), unmasked [full_lo, full_hi),
    masked [full_hi, hi); or, ``single``, one masked loop over [lo, hi)."""
    parts = ((0, 3, True),) if single else writer.SEGMENT_PARTS
    for a, z, masked in parts:
        tiles = f"{_BOUNDS[a]}, {_BOUNDS[z]}, BLOCK_N"
        if masked:
            L(depth, f"for start_n in tl.range({tiles}, num_stages=EDGE_STAGES):")
        else:
            L(depth, f"for start_n in range({tiles}):")
        step(L, depth + 1, masked and k.mask is not None)


_BOUNDS = ("lo", "full_lo", "full_hi", "hi")


# float constants the passes introduce -> what they are (log2 e folds exp into exp2)
FLT_MAX = 3.4028234663852886e38  # the largest finite float32 (a finite stabiliser's floor)
_NAMED_CONSTANTS = {1 / math.log(2): "1/ln 2", math.log(2): "ln 2", FLT_MAX: "FLT_MAX"}
_FLOAT = re.compile(r"(?<![\w.])\d+\.\d+(?:e[+-]?\d+)?(?![\w.])")


def _annotate_constants(line: str) -> str:
    """A line of kernel code with a comment naming each known constant it holds
    (``1.4426950408889634  # 1/ln 2``); comment and docstring lines are left as they are."""
    code, sep, note = line.partition("#")
    if not code.strip() or '"""' in line:
        return line
    names = dict.fromkeys(f"{c} = {_NAMED_CONSTANTS[float(c)]}" for c in _FLOAT.findall(code)
                          if float(c) in _NAMED_CONSTANTS)
    if not names:
        return line
    text = ", ".join(names)
    return f"{code}{sep}{note}; {text}" if sep else f"{line}  # {text}"


def _emit_step_function(fn: str, p: KVPass, step: str, kernel: list[str], args: list[str],
                        const: list[str], out: Lines) -> Callable[[bool], str]:
    """Print ``step`` (one key-tile step of pass ``p``) as ``@triton.jit def fn(...)`` into
    ``out`` (:func:`attndsl.codegen.writer.step_function`); its running values are the pass's
    maxes (with their ``_use`` twins) and sums."""
    state = [v for mx in p.maxes for v in ([mx.var, f"{mx.var}_use"] if mx.stabilizer and
                                           not _empty_row_sum(p, mx) else [mx.var])] + \
        [s.var for s in p.sums]
    return writer.step_function(out, fn, step, state, kernel, args, const + list(_EVEN),
                                "start_n", "One key tile [start_n, start_n + BLOCK_N) of the "
                                "pass")


_TABLE_ARGS = tuple(writer.table_args("kv_"))

# EVEN_M: BLOCK_M divides M_len; EVEN_E / EVEN_F: BLOCK_E == E_len / BLOCK_F == F_len
# SCALE_NONNEG: every score scale of scale_ranges is >= 0
# NONNEG_SUBSCRIPTS: no subscript of a captured tensor that may wrap (index_ranges) is < 0
# I32_INDICES: every integer node the kernel widens to int64 fits int32 (narrow_ranges)
# TMA: tiles through tensor descriptors (codegen/loads.py), chosen per launch by the launcher
# I32_BASES / I32_TILES: base / in-tile element offsets exact in int32 (codegen/writer.py)
_EVEN = ("EVEN_M", "EVEN_E", "EVEN_F", "SCALE_NONNEG", "NONNEG_SUBSCRIPTS", "I32_INDICES",
         loads.TMA_FLAG, *writer.OFFSET_FLAGS)

LOAD_TILE = '''
@triton.jit
def _load_tile(ptrs, rows_ok, cols_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """tl.load of a 2-D tile, masked (0 outside) only along the axes that can run past the
    tensor: a tile that fits is an unmasked, vectorisable load."""
    if CHECK_ROWS and CHECK_COLS:
        x = tl.load(ptrs, mask=rows_ok & cols_ok, other=0.0)
    elif CHECK_ROWS:
        x = tl.load(ptrs, mask=rows_ok, other=0.0)
    elif CHECK_COLS:
        x = tl.load(ptrs, mask=cols_ok, other=0.0)
    else:
        x = tl.load(ptrs)
    return x
'''

_POINTER = {FLOAT: "*fp32", INT: "*i64", BOOL: "*i8"}


def _row_strides(k: TileKernel, names: _Names) -> dict[str, str]:
    """The stride of the rows of every tile a key-tile step loads (the key-side operands) ->
    the length of the tile's columns (:func:`attndsl.codegen.writer.row_strides_note`); the
    query tiles and outputs, read and written once per program, keep runtime strides."""
    return {names.strides[names.tensors[o.tensor]][o.row_dim]:
            "F_len" if o.side == "v" else "E_len" for o in k.operands if o.side != "q"}


def _arg_types(k: TileKernel, names: _Names, args: list[str]) -> dict[str, str]:
    """Triton types of the kernel's runtime arguments."""
    ptr: dict[str, str] = {names.tensors[o.tensor]: "*{dtype}" for o in k.operands}
    ptr.update({names.tensors[c]: _POINTER[dt] for c, _, dt in k.captured})
    ptr.update({names.outputs[s.name]: "*{dtype}" if s.tile else "*fp32" for s in k.stores})
    ptr.update({t: "*i32" for t in ("kv_num", "kv_idx", "full_kv_num", "full_kv_idx", "stats")})
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


def _regroup(k: TileKernel) -> TileKernel:
    """The kernel with every pass expression lowered to its printed form
    (:func:`lower_for_print`: tanh as one exp2 and a division, constant divisors as
    multiplies) and its products regrouped (:func:`_invariant_factors`).  The mask is left
    as it is: a comparison must see the exact quotient."""
    tile_vars = {k.roles[r] for r in ("query", "key", "v") if r in k.roles}

    def lower(e: Expr) -> Expr:
        return _invariant_factors(lower_for_print(e), tile_vars)

    passes = tuple(dataclasses.replace(
        p, maxes=tuple(dataclasses.replace(mx, arg=lower(mx.arg)) for mx in p.maxes),
        sums=tuple(dataclasses.replace(s, body=lower(s.body)) for s in p.sums))
        for p in k.passes)
    return dataclasses.replace(k, passes=passes)


def _invariant_factors(e: Expr, tile_vars: set[str]) -> Expr:
    """Float products regrouped as (tile factors) * (loop-invariant factors), so that the
    invariant part (``slopes[h] * 1.4426950408889634``) is one scalar hoisted out of the key
    loop and each tile element pays one multiply (``x * a * c -> x * (a * c)``)."""
    def scalar(f: Expr) -> bool:
        return not f.free_indices() & tile_vars and not any(x.op is Op.ROW for x in f.walk())

    def regroup(node: Expr) -> Expr | None:
        if node.op is not Op.MUL or node.dtype != FLOAT:
            return None
        fs = [f for f, _ in _mul_factors(node)]
        inv = [f for f in fs if scalar(f)]
        var = [f for f in fs if not scalar(f)]
        if len(inv) < 2 or not var:
            return None
        out = var[0]
        for f in var[1:]:
            out = E.binary(Op.MUL, out, f)
        numbers = [f for f in inv if f.op is Op.CONST and f.dtype == FLOAT]
        folded = math.prod(f.arg for f in numbers)
        if len(numbers) > 1 and math.isfinite(folded) and folded != 0:  # one constant
            inv = [f for f in inv if f not in numbers] + [E.const(folded)]
        c = inv[0]
        for f in inv[1:]:
            c = E.binary(Op.MUL, c, f)
        return E.binary(Op.MUL, out, c)
    return e.replace(regroup)


def _mul_factors(e: Expr) -> list[tuple[Expr, int]]:
    """The factors of a float product (integer products stay whole: their rounding differs)."""
    if e.op is Op.MUL and e.dtype == FLOAT:
        return _mul_factors(e.src[0]) + _mul_factors(e.src[1])
    return [(e, 1)]


def _scaled_dots(k: TileKernel) -> dict[str, Expr]:
    """Dots read only as ``qk * s`` with one float ``s`` of parameters and constants (the
    softmax scale): dot -> s.  The launcher checks s >= 0 (``scale_ranges``, SCALE_NONNEG);
    then a fully valid tile's row max is rowmax(qk) * s (rounding is monotonic), one multiply
    per row instead of one per element before the max."""
    exprs = [mx.arg for p in k.passes for mx in p.maxes] + [s.body for p in k.passes
                                                            for s in p.sums]
    scale: dict[str, Expr | None] = {}
    for e in exprs:
        for node in e.walk():
            for i, child in enumerate(node.src):
                if child.op is not Op.ROW:
                    continue
                c = node.src[1 - i] if node.op is Op.MUL and node.dtype == FLOAT else None
                ok = c is not None and i == 0 and c.dtype == FLOAT and not any(
                    x.op in (Op.ROW, Op.LOAD, Op.INDEX) for x in c.walk())
                prev = scale.get(child.arg, c)
                scale[child.arg] = c if ok and prev == c else None
    return {d.var: c for d in k.dots if (c := scale.get(d.var)) is not None}


def _natural_scores(k: TileKernel) -> tuple[TileKernel, frozenset[str]]:
    """The kernel with each stabiliser whose score is cheaper in natural units read as
    ``T * log2e`` (:func:`_natural_score`), and the names of those stabilisers.

    The stream pass keeps the weights as ``2^(y - m)`` with ``y = T log2e`` and distributes
    ``log2e`` over the terms of ``T``: ``qk * (scale * log2e) + b[m - n] * log2e``.  A term
    without a multiply of its own (a table read ``b``) then pays one per element, and the
    weight one more subtraction: a multiply, an FMA and a subtraction per score.  Read as
    ``y = T * log2e``, the printer evaluates ``T = qk * scale + b`` once (one FMA), the tile's
    max as ``rowmax(T) * log2e`` and each weight as ``exp2(T * log2e - m)`` (one FMA):
    two operations per score instead of three.  The max is exact: ``x -> round(x c)`` is
    monotone for ``c > 0``, so ``max_j round(c T_j) = round(c max_j T_j)`` (NaN and -inf
    alike); a weight differs from the distributed form's by rounding only."""
    natural: set[str] = set()
    dots = {d.var for d in k.dots}
    passes = []
    for p in k.passes:
        swap: dict[Expr, Expr] = {}
        for mx in p.maxes:
            z = _natural_score(mx.arg, dots, k.roles["query"], k.roles["key"]) \
                if mx.stabilizer else None
            others = [x.arg for x in p.maxes if x is not mx]
            if z is None or not all(_read_as_weight(e, mx.arg) for e in
                                    [s.body for s in p.sums] + others):
                continue
            swap[mx.arg] = E.binary(Op.MUL, z, E.const(LOG2E))
            natural.add(mx.var)
        passes.append(dataclasses.replace(
            p, maxes=tuple(dataclasses.replace(mx, arg=mx.arg.replace(swap.get))
                           for mx in p.maxes),
            sums=tuple(dataclasses.replace(s, body=s.body.replace(swap.get)) for s in p.sums)))
    return dataclasses.replace(k, passes=tuple(passes)), frozenset(natural)


def _natural_score(y: Expr, dots: set[str], m: str, n: str) -> Expr | None:
    """``T`` with ``y == T * log2e`` when that saves multiplies, else None.

    ``y`` must be a sum (``+``/``-``) of at least two float terms, each a product with a
    constant factor (the stream pass folds ``log2e`` into each term's constants): the
    factor ``log2e`` is dropped, any other constant ``c`` becomes ``c / log2e``.  It pays
    when some [BLOCK_M, BLOCK_N] term (a table read at ``m - n``, a dot) is then left with
    no multiply at all: one multiply per score fewer, against one per row for the max.  A
    term of the keys alone (``g[n] * log2e``) is not enough: its multiply is one per column
    a thread holds, about as many as the rows (mma.sync tiles hold more rows than columns)."""
    terms = _signed_terms(y)
    if len(terms) < 2 or any(t.dtype != FLOAT for _, t in terms):
        return None
    out: Expr | None = None
    saves = False
    for negative, t in terms:
        factors = [f for f, _ in _mul_factors(t)]
        at = next((i for i, f in enumerate(factors) if _is_log2e(f)), None)
        if at is None:
            at = next((i for i, f in enumerate(factors) if f.op is Op.CONST and
                       f.dtype == FLOAT and math.isfinite(f.arg) and f.arg != 0), None)
            if at is None:
                return None
            rest = factors[:at] + [E.const(factors[at].arg / LOG2E)] + factors[at + 1:]
        else:
            rest = factors[:at] + factors[at + 1:]
        if not rest:
            rest = [E.const(1.0)]
        term = rest[0]
        for f in rest[1:]:
            term = E.binary(Op.MUL, term, f)
        if len(rest) == 1 and _full_tile(term, dots, m, n):
            saves = True
        out = term if out is None and not negative else E.binary(
            Op.SUB if negative else Op.ADD, E.const(0.0) if out is None else out, term)
    return out if saves else None


def _is_log2e(e: Expr) -> bool:
    """Whether ``e`` is the constant log2(e) = 1/ln 2."""
    return e.op is Op.CONST and e.dtype == FLOAT and e.arg == LOG2E


def _signed_terms(e: Expr, negative: bool = False) -> list[tuple[bool, Expr]]:
    """The terms of a float sum ``a + b - c`` as (subtracted, term), in order."""
    if e.dtype == FLOAT and e.op in (Op.ADD, Op.SUB):
        right = negative != (e.op is Op.SUB)
        return _signed_terms(e.src[0], negative) + _signed_terms(e.src[1], right)
    return [(negative, e)]


def _read_as_weight(e: Expr, y: Expr) -> bool:
    """Whether every read of ``y`` in ``e`` is a weight ``exp2(y - r)`` of a per-row ``r``
    (where ``y * c - r`` contracts into one FMA)."""
    def weight(x: Expr) -> Expr | None:
        if x.op is Op.EXP2 and x.src[0].op is Op.SUB and x.src[0].src[0] == y and \
                x.src[0].src[1].op is Op.ROW:
            return E.const(0.0)
        return None
    return y not in set(e.replace(weight).walk())


def _full_tile(e: Expr, dots: set[str], m: str, n: str) -> bool:
    """Whether ``e`` is already a [BLOCK_M, BLOCK_N] tile (reads a dot or both tile axes)."""
    return any(x.op is Op.ROW and x.arg in dots for x in e.walk()) or \
        {m, n} <= e.free_indices()


def _vanishes_at_neg_inf(body: Expr, score: Expr, stabilizers: set[str]) -> bool:
    """Whether ``body`` is ``exp(score - u)`` or ``exp2(score - u)`` with ``u`` a stabilising
    max of the pass: its printed stabiliser is finite (the safe value), so a masked score of
    -inf gives exactly 0 and the sum needs no mask of its own."""
    if body.op not in (Op.EXP, Op.EXP2) or body.src[0].op is not Op.SUB:
        return False
    a, u = body.src[0].src
    return a == score and u.op is Op.ROW and u.arg in stabilizers


def _tile_body(k: TileKernel, p, names: _Names, head_env: Env, loop_hoisted: dict,
               finished: dict[str, str], m: str, n: str, b: str | None, h: str | None,
               scaled: dict[Expr, tuple[str, str]], gathers: list[_Gather],
               natural: frozenset[str] = frozenset()):
    """Returns body() -> the source of one key-tile step of pass p, masked when the constexpr
    MASKED is set.  ``scaled`` maps a score ``qk * s`` (:func:`_scaled_dots`) to (the dot, the
    printed scale); ``natural`` names the maxes whose argument is ``T * log2e``
    (:func:`_natural_scores`): ``T`` is printed, the max and the weights scale it."""
    maxes = [(mx, mx.arg) for mx in p.maxes]
    # Row sums first, then the sums with a V tile (the tutorial's order): the float32 weights
    # are then last read by their fp16 copy at the dot, so they are not live across the V
    # load and the MMA.  The sums of a step are independent (each reads its own old value,
    # the stabilisers and the dots), so their order is free.
    sums = sorted(((s, s.body) for s in p.sums), key=lambda sb: sb[0].v is not None)
    stabilizers = {mx.var for mx in p.maxes if mx.stabilizer}
    floor0 = {mx.var: mx.floor0 for mx in p.maxes}
    dots = {d.var for d in k.dots}

    def body() -> str:
        L = Lines()
        L(0, "if STATS:  # instrumentation: key tiles visited [0] and masked [1]")
        L(1, "if MASKED:\n    tl.atomic_add(stats + 1, 1)\nelse:\n    tl.atomic_add(stats, 1)")
        L(0, "offs_n = start_n + tl.arange(0, BLOCK_N)")
        L(0, "col_ok = offs_n < N_len")
        L(0, "if EVEN_N:  # every key of the tile is in the sequence: the masks fold away")
        L(1, "col_ok = tl.full([BLOCK_N], 1, tl.int1)")
        idx = {i: v for i, v in ((b, "off_b"), (h, "off_h")) if i is not None}
        idx[m], idx[n] = "offs_m[:, None]", "offs_n[None, :]"
        rows = {r: f"{v}[:, None]" for r, v in finished.items()}
        for mx in p.maxes:
            if mx.stabilizer and not _empty_row_sum(p, mx):
                rows[mx.var] = f"{mx.var}_use[:, None]"
        env = Env(idx, rows, head_env.params, head_env.captured,
                  {m: "row_ok[:, None]", n: "col_ok[None, :]"}, dict(loop_hoisted),
                  head_env.scalar_indices, strides=head_env.strides, wraps=head_env.wraps,
                  narrow=True, gathers={g.load: (g.at_tile(), g.wraps) for g in gathers})
        used = {d.var for d in k.dots if any(
            x.op is Op.ROW and x.arg == d.var for e in
            [a for _, a in maxes] + [s for _, s in sums] for x in e.walk())}
        for d in k.dots:
            if d.var not in used:
                continue
            ptr = _operand_ptr(d.k, names, "offs_n[None, :]", "offs_e[:, None]")
            L(0, f"# {d.var} = dot({d.q.var}, {d.k.var}^T)  ({d.k.tensor} tile)")
            L(0, loads.tile_load(d.k.var, names.descriptors.get(d.k.var), "start_n",
                                 f"_load_tile({ptr}, col_ok[None, :], offs_e[:, None] < E_len, "
                                 f"not EVEN_N, not EVEN_E)", transpose=True))
            L(0, f"if UPCAST:\n    {d.k.var} = {d.k.var}.to(tl.float32)")
            L(0, f"{d.var} = tl.dot({d.q.var}, {d.k.var}, input_precision=DOT_PRECISION)")
            rows[d.var] = d.var
        keep = "col_ok[None, :]"
        bounded = "not EVEN_N"
        if k.mask is not None:
            L(0, "keep = col_ok[None, :]")
            L(0, f"if MASKED:  # a partial tile: {comment(E.render(k.mask))[2:]}")
            mask = lowered_mask(k.mask, m, n)
            mask_env = relative_mask(L, 1, mask, m, n, env, KEYS_MOVE)
            L(1, f"keep = {render_at(L, 1, mask, mask_env)}")
            L(1, "if not EVEN_N:\n    keep = keep & col_ok[None, :]")
            keep, bounded = "keep", "MASKED or not EVEN_N"
        unmasked = "" if k.mask is None else " and not MASKED"
        scores: dict[Expr, str] = {}
        for mx, arg in maxes:
            L(0, f"# {mx.var} = max({mx.var}, rowmax({comment(E.render(arg))[2:]}))")
            score = arg.src[0] if mx.var in natural else arg  # natural: arg = T * log2e
            value = render_at(L, 0, score, relative_score(L, 0, score, m, n, env, KEYS_MOVE))
            y = f"y_{mx.var}"
            full = _full_tile(score, dots, m, n)
            L(0, f"{y} = {value}" if full else
                 f"{y} = tl.zeros([BLOCK_M, BLOCK_N], tl.float32) + ({value})")
            dot = scaled.get(arg)
            if mx.var in natural:
                _guard(L, bounded, y, keep, 'float("-inf")')
                L(0, f"{mx.var}_tile = tl.max({y}, 1) * {literal(LOG2E)}  # rowmax(T log2e) = "
                     f"rowmax(T) log2e")
            elif dot is not None:
                L(0, f"if EVEN_N and SCALE_NONNEG{unmasked}:  # rowmax(qk * s) = rowmax(qk) * s")
                L(1, f"{mx.var}_tile = tl.max({dot[0]}, 1) * {dot[1]}")
                L(0, "else:")
                L(1, f'if {bounded}:\n    {y} = tl.where({keep}, {y}, float("-inf"))')
                L(1, f"{mx.var}_tile = tl.max({y}, 1)")
            else:
                _guard(L, bounded, y, keep, 'float("-inf")')
                L(0, f"{mx.var}_tile = tl.max({y}, 1)")
            scores[arg] = y
            # the score, masked, is printed once and read by the sums (in log2 units)
            env.hoisted[arg] = f"({y} * {literal(LOG2E)})" if mx.var in natural else y
            L(0, f"{mx.var}_new = tl.maximum({mx.var}, {mx.var}_tile)")
            if mx.stabilizer and _empty_row_sum(p, mx):
                L(0, f"{mx.var}_use_new = {mx.var}_new  # the stabiliser: finite (>= its start)")
            elif mx.stabilizer:
                _emit_stabiliser(L, mx, bounded_below(arg) and f"EVEN_N{unmasked}",
                                 _read_as_own_weights(p, mx))
        shared: dict = {"names": names}
        for s, sbody in sums:
            scale = " * ".join(f"2^({k}*d{u})" for u, k in s.units) or "1"
            v = f" @ {s.v.var}" if s.v is not None else ""
            L(0, f"# {s.var} = {s.var} * {scale} + rowsum({comment(E.render(sbody))[2:]}){v}")
            vanishes = any(_vanishes_at_neg_inf(sbody, a, stabilizers) for a in scores)
            _emit_sum(L, s, sbody, env, False if vanishes else bounded, keep, shared, floor0,
                      _full_tile(sbody, dots, m, n))
        for mx in p.maxes:
            L(0, f"{mx.var} = {mx.var}_new")
            if mx.stabilizer and not _empty_row_sum(p, mx):
                L(0, f"{mx.var}_use = {mx.var}_use_new")
        return "\n".join(L.out)

    return body


def _read_as_own_weights(p: KVPass, mx: RunningMax) -> bool:
    """Whether every read of the stabiliser ``mx`` in pass ``p`` (max arguments, sum bodies)
    is a weight ``exp(a - m)`` or ``exp2(a - m)`` of its own argument ``a``.

    Then a row whose max is still -inf has every ``a`` = -inf, each weight is exp(-inf) = 0
    and each rescale factor 2^(-inf - m') = 0 for *any* finite stabiliser m', so -inf may be
    replaced by the most negative float instead of 0: one ``max`` instead of a compare and a
    select per row, with the same results bit for bit.  A read of any other form (``exp(-m)``
    of an off-by-one denominator, a score not in the max) would see the replacement value."""
    def only_weights(e: Expr) -> bool:
        if _own_weight(e, mx):
            return True
        if e.op is Op.ROW and e.arg == mx.var:
            return False
        return all(only_weights(x) for x in e.src)

    reads_self = any(x.op is Op.ROW and x.arg == mx.var for x in mx.arg.walk())
    return not reads_self and all(only_weights(e) for e in
                                  [x.arg for x in p.maxes] + [s.body for s in p.sums])


def _empty_row_sum(p: KVPass, mx: RunningMax) -> str | None:
    """The row sum of pass ``p`` that is 0 exactly on the rows of no kept key, when the running
    max ``mx`` may start at -FLT_MAX instead of -inf and be its own stabiliser; else None.

    With every read of ``mx`` a weight 2^(a - m) of its own argument
    (:func:`_read_as_own_weights`) and every rescale 2^(k (old - new)) with k > 0, the floor
    ``max(m, -FLT_MAX)`` of each step (one ``max`` per row per key tile) is the same as
    starting ``m`` at -FLT_MAX: max(max(m, t), -F) = max(max(m, -F), t).  A rescale from the
    start is then 2^(-F - new) (0, or 1 while nothing is kept) in place of 2^(-inf - new) = 0:
    either times sums that are still 0.  The epilogue needs the raw max back (-inf on an empty
    row): a sum ``l`` of the weights 2^(a - m) alone is 0 there and > 0 on a row with a kept key
    a > -inf (the key at the max enters ``l`` with weight 2^0 = 1; a weight of 0 needs the
    rounding of a contracted ``a - m`` to exceed 149, so |m| > 2^32), so the row is empty where
    m is still -F and l is 0."""
    if not mx.stabilizer or mx.floor0 or not _read_as_own_weights(p, mx) or \
            any(k <= 0 for s in p.sums for u, k in s.units if u == mx.var):
        return None
    return next((s.var for s in p.sums if s.v is None and s.units == ((mx.var, 1),)
                 and _own_weight(s.body, mx)), None)


def _own_weight(e: Expr, mx: RunningMax) -> bool:
    """Whether ``e`` is ``exp(a - m)`` or ``exp2(a - m)`` of the max ``m`` = ``mx`` of ``a``."""
    return e.op in (Op.EXP, Op.EXP2) and e.src[0].op is Op.SUB and \
        e.src[0].src[0] == mx.arg and e.src[0].src[1].op is Op.ROW and \
        e.src[0].src[1].arg == mx.var


def _infinite_rows(k: TileKernel, p: KVPass) -> dict[str, str]:
    """Row sums ``l`` of pass ``p`` read by a store as ``sum 2^a`` = ``2^m * l``: sum -> the
    stabiliser ``m`` = max ``a`` whose weights ``2^(a - m)`` it sums, for each such ``l`` that
    some store reads beside ``m``'s ``.safe`` form (the streamed forms' un-scaling, e.g. the
    log-sum-exp ``log l + m.safe``).

    Why: a kept score of +inf makes ``m`` = +inf and that score's weight 2^(inf - inf) NaN, so
    ``l`` is NaN, and so would be the log-sum-exp where ``sum 2^a`` is +inf (torch's and the
    float64 oracle's lse).  Any finite positive ``l`` with ``m`` = +inf stands for +inf; 1 is
    the weight of the max itself (``l_inf``, printed before the first store reading it: once
    per row after the key tiles, nothing in the loops).  A store reading ``l`` without
    ``.safe`` keeps it as is: a ratio ``acc / l`` is NaN either way (``acc`` is NaN, as the
    oracle's output), and a 3-pass softmax's ``GM + log(SD)`` reads the cascade's own
    ``max(n)`` raw, whose ``sum exp(s - GM)`` the oracle evaluates as written: NaN."""
    out = {}
    for s in p.sums:
        mx = next((x for x in p.maxes if x.stabilizer and not x.floor0
                   and _own_weight(s.body, x)), None)
        if s.v is None and mx is not None and any(_reads(st.expr, s.var) and
                                                  _reads(st.expr, mx.var + ".safe")
                                                  for st in k.stores):
            out[s.var] = mx.var
    return out


def _reads(e: Expr, row: str) -> bool:
    return any(x.op is Op.ROW and x.arg == row for x in e.walk())


def _emit_stabiliser(L: Lines, mx: RunningMax, finite: str | bool, own_weights: bool) -> None:
    """The stabiliser's value in the step: ``max(m, 0)`` for a floor-0 max, else ``m`` with
    -inf (a row of no finite score yet) replaced by 0, or by -FLT_MAX when ``own_weights``
    (:func:`_read_as_own_weights`: the same results, one instruction per row fewer).
    ``finite``: the condition (a constexpr expression) under which every score of the tile is
    a value of the max's argument and that argument is bounded below
    (attndsl.passes.float_range), so ``m`` is finite and the replacement is the identity;
    False when there is none."""
    if mx.floor0:
        L(0, f"{mx.var}_use_new = tl.maximum({mx.var}_new, 0.0)  # the stabiliser: finite")
        return
    safe = f'tl.where({mx.var}_new == float("-inf"), 0.0, {mx.var}_new)'
    if own_weights:
        safe = f"tl.maximum({mx.var}_new, {literal(-FLT_MAX)})"
    if not finite:
        L(0, f"{mx.var}_use_new = {safe}  # the stabiliser: finite")
        return
    L(0, f"if {finite}:  # every score of the tile is > -inf (bounded below): so is the max")
    L(1, f"{mx.var}_use_new = {mx.var}_new")
    L(0, "else:")
    L(1, f"{mx.var}_use_new = {safe}  # the stabiliser: finite (-FLT_MAX for -inf)")


def _guard(L: Lines, bounded: bool | str, var: str, keep: str, fill: str) -> None:
    if bounded is False:
        return
    if bounded is True:
        L(0, f"{var} = tl.where({keep}, {var}, {fill})")
    else:
        L(0, f"if {bounded}:\n    {var} = tl.where({keep}, {var}, {fill})")


def _emit_sum(L: Lines, s: RunningSum, sbody: Expr, env: Env, bounded: bool | str, keep: str,
              shared: dict, floor0: dict[str, bool], full: bool) -> None:
    """One running-sum update; ``shared`` reuses equal weights, rescale factors and V loads
    of the other sums of the same step."""
    rows = dict(env.rows)
    for u, _ in s.units:  # inside the step, a stabiliser reads its new (safe) value
        rows[u] = f"{u}_use_new[:, None]"
    step_env = dataclasses.replace(env, rows=rows)
    body = render_at(L, 0, sbody, step_env)
    p = shared.get(("p", body))
    if p is None:
        p = shared[("p", body)] = _numbered("p", shared)
        L(0, f"{p} = {body}" if full else
             f"{p} = tl.zeros([BLOCK_M, BLOCK_N], tl.float32) + ({body})  # a full tile")
        _guard(L, bounded, p, keep, "0.0")
    if s.units:
        alpha = shared.get(("alpha", s.units))
        if alpha is None:
            alpha = shared[("alpha", s.units)] = _numbered("alpha", shared)
            L(0, f"{alpha} = {_alpha(s.units, floor0)}")
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
        L(0, loads.tile_load(v, shared["names"].descriptors.get(v), "start_n",
                             f"_load_tile({ptr}, col_ok[:, None], offs_f[None, :] < F_len, "
                             f"not EVEN_N, not EVEN_F)"))
        L(0, f"if UPCAST:\n    {v} = {v}.to(tl.float32)")
    L(0, f"{s.var} = {scaled} + tl.dot({p}.to({v}.dtype), {v}, "
         f"input_precision=DOT_PRECISION)")


def _numbered(role: str, shared: dict) -> str:
    """``role`` for the first variable of that role in a step, then ``role_1``, ``role_2``."""
    i = sum(1 for key in shared if isinstance(key, tuple) and key[0] == role)
    return role if i == 0 else f"{role}_{i}"


def _alpha(units: tuple[tuple[str, int], ...], floor0: dict[str, bool]) -> str:
    """The rescale factor 2^(sum k * (old - new)) of a running sum.

    The new stabiliser is its safe value (finite).  With every k > 0 the old one can be read
    raw: -inf (nothing accumulated yet) gives 2^-inf = 0, a finite one equals its safe value;
    a floor-0 stabiliser is finite anyway.  A negative k would make 2^+inf * 0 = nan there,
    so then the factor is guarded."""
    def term(u: str, k: int, old: str) -> str:
        delta = f"({old} - {u}_use_new)"
        return delta if k == 1 else f"{literal(float(k))} * {delta}"

    if all(k > 0 for _, k in units):
        return "tl.exp2(" + " + ".join(
            term(u, k, f"{u}_use" if floor0.get(u) else u) for u, k in units) + ")"
    delta = " + ".join(term(u, k, f"{u}_use") for u, k in units)
    fresh = " | ".join(f'({u} == float("-inf"))' for u, _ in units)
    return f"tl.where({fresh}, 0.0, tl.exp2({delta}))"
