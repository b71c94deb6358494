"""Backward printer of any one-pass tile kernel: the backward IR -> a module of two kernels.

It prints :class:`attndsl.passes.tile_grad.TileBackward` (the derivation lives there):

* ``tile_bwd_rows_kernel``, one program per (query tile, batch*head): recomputes the finished
  rows of the forward's running sums -- first the stabilising maxima over every key tile, then
  the sums with each stabiliser at its final (safe) value, so no rescaling -- and from them
  and the incoming gradients the coefficients ``c_s`` of the chain rule (0 on rows with no
  kept key: those rows add nothing to any sum), the final stabilisers, and the gradients of
  captured tensors read by the stores.
* ``tile_bwd_keys_kernel``, one program per (key tile, batch*head): loops over the query
  tiles, re-forms the dot tiles and the sum bodies, and accumulates ``dV_s += b_s^T c_s``,
  ``dK_d += dqk_d^T Q_d`` in registers, adding the captured-tensor gradients of tile sites
  with float32 atomics.  dK and dV are added atomically at the end (a kernel's key-side
  subscripts may send several heads to one element, as GQA does).
* ``tile_bwd_queries_kernel``, one program per (query tile, batch*head), FlashAttention-2's
  dQ kernel: loops over the key tiles, re-forms ``W_s = c_s V^T`` and ``dqk_d`` and
  accumulates ``dQ_d += dqk_d K_d`` in registers, added once at the end (no atomics in the
  loop: deterministic, and the key-tile loop holds one dot fewer).

With the mask's closed-form key-block bounds (the forward's, ``TileKernel.bounds``) the keys
and dQ kernels skip empty blocks and drop the mask on full ones: an unmasked loop and a masked
one, as a hand-written FlashAttention backward; without them the mask is evaluated on every
tile.  The rows kernel visits every key tile (the kept count alone uses the bounds) and
recomputes only the rows its outputs read (sigmoid's coefficient ``dY`` reads none: its key
loop evaluates the mask alone).  Identifiers are made here (``T0``, ``C0``, ``P0``, ``qk0``,
``l0``); spec names reach the source only as
``repr``'d strings in the metadata tables or as sanitised comments.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace

from attndsl.codegen import writer
from attndsl.codegen.expr import (
    HELPERS,
    Env,
    comment,
    ident,
    render,
    render_at,
    reset_spills,
)
from attndsl.codegen.key_bounds import lowered_mask
from attndsl.codegen.relative import KEYS_MOVE, relative_mask
from attndsl.codegen.writer import Lines

from attndsl.ir import expr as E
from attndsl.ir.expr import BOOL, FLOAT, Expr, Op
from attndsl.ir.tile import Operand, TileKernel, head_params
from attndsl.passes.affine import is_zero
from attndsl.passes.mask.closed_form import SPARSE_BLOCK
from attndsl.passes.tile_grad import SiteGrad, TileBackward, UnaryForm, rows_read


class _Names:
    """Kernel argument names by role, as the forward's: input tensors by side (``q_ptr``,
    ``k_ptr``, ``v_ptr``; a second tensor of a side ``q0_ptr``...) with strides named by the
    roles of their dims (``stride_qm``), their gradients ``dq_ptr``...; captured tensors
    numbered ``C0`` (gradients ``DC0``, sizes ``C0_n0``); parameters ``sm_scale`` and
    ``param_<name>``; the incoming gradients of the stores ``do_ptr``, ``dlse_ptr``..."""

    def __init__(self, k: TileKernel) -> None:
        letter_of = {k.roles[r]: c for r, c in writer.DIM_LETTERS.items() if r in k.roles}
        taken: set[str] = set()

        def claim(want: str | None, role: str) -> str:
            base, i = want, 0
            while base is None or base in taken:
                base, i = f"{role}{i}", i + 1
            taken.add(base)
            return base

        self.strides: dict[str, tuple[str, ...]] = {}
        self.spec: dict[str, str] = {}  # argument -> the spec name it stands for
        self.kernel_args: dict[str, list[str]] = {}  # kernel -> its runtime arguments

        def pointer(base: str, letters: list[str | None], spec: str) -> str:
            ptr = f"{base}_ptr"
            self.strides[ptr] = writer.stride_names(base, letters)
            self.spec[ptr] = spec
            return ptr

        self.tensors: dict[str, str] = {}
        self.grads: dict[str, str] = {}
        self.ranks = {o.tensor: len(o.idx) for o in k.operands}
        sides: dict[str, int] = {}
        for o in k.operands:
            if o.tensor in self.tensors:
                continue
            first = sides.setdefault(o.side, len(self.tensors)) == len(self.tensors)
            letters = [letter_of.get(i.arg) if i.op is Op.INDEX else None for i in o.idx]
            base = claim(o.side if first else None, o.side)
            self.tensors[o.tensor] = pointer(base, letters, o.tensor)
            self.grads[o.tensor] = pointer(claim("d" + base, "d" + o.side), letters,
                                           f"d {o.tensor}, float32")
        # captured tensors are numbered (C0, gradients DC0), as in the FlexAttention backward
        self.captured: dict[str, tuple[str, int]] = {}
        self.sizes: dict[str, list[str]] = {}
        for i, (name, rank, _) in enumerate(k.captured):
            ptr = f"C{i}"
            self.captured[name] = (ptr, rank)
            self.strides[ptr] = tuple(f"{ptr}_s{d}" for d in range(rank))
            self.sizes[name] = [f"{ptr}_n{d}" for d in range(rank)]
        self.cap_grads = {}
        for i, (name, rank, dt) in enumerate(k.captured):
            if dt == FLOAT:
                g = self.cap_grads[name] = f"DC{i}"
                self.strides[g] = tuple(f"{g}_s{d}" for d in range(rank))
        self.params: dict[str, str] = {}
        for i, (name, _) in enumerate(k.params):
            want = "sm_scale" if name == "scale" else \
                f"param_{name}" if writer.SPEC_NAME.match(name) else None
            self.params[name] = claim(want or f"param{i}", "param")
            self.spec[self.params[name]] = name
        # parameters read only in head subscripts (the GQA group size): constexprs
        self.static = {name: self.params[name] for name in head_params(k)}
        self.stores = {st.name: pointer(claim(_dy_base(st.name), "dy"),
                                        [letter_of.get(x) for x in st.indices],
                                        f"d {st.name}, float32")
                       for st in k.stores}
        # per kernel, the stride of the rows of each tile its loop reads every iteration ->
        # the length of the tile's columns: taken as constexprs (writer.row_strides_note).
        # The keys kernel loops over query tiles (the query-side operands and the incoming
        # gradients of the stores), the queries kernel over key tiles (the key-side operands).
        def rows(sides: tuple[str, ...]) -> dict[str, str]:
            out = {}
            for o in k.operands:
                if o.side in sides:
                    out[self.strides[self.tensors[o.tensor]][o.row_dim]] = \
                        "F_len" if o.side == "v" else "E_len"
            return out

        keys = rows(("q",))
        m = k.roles["query"]
        for st in k.stores:
            if st.tile and m in st.indices:
                keys[self.strides[self.stores[st.name]][st.indices.index(m)]] = "F_len"
        self.row_strides = {"tile_bwd_rows_kernel": {}, "tile_bwd_keys_kernel": keys,
                            "tile_bwd_queries_kernel": rows(("k", "v"))}

    def args(self, ptr: str) -> list[str]:
        """A pointer and its stride arguments."""
        return [ptr, *self.strides[ptr]]

    def at(self, ptr: str, parts: list[tuple[int, str]]) -> str:
        """``ptr + part * stride + ...`` for the ``(dim, part)`` pairs ``parts``."""
        return " + ".join([ptr] + [f"{p} * {self.strides[ptr][d]}" for d, p in parts])


def _dy_base(store: str) -> str | None:
    """The role base of a store's incoming gradient: ``do`` for O, ``dlse`` for LSE."""
    base = writer.spec_base(store)
    return None if base is None else "d" + base


def _exp2_arg(u: UnaryForm, env: Env, L: Lines) -> str:
    """The exp2 argument of a sigmoid or tanh: the hoisted ``dot * c + o`` or the tile."""
    if u.dot is None:
        return render_at(L, 0, u.scaled, env)
    return f"{u.dot} * {u.var}_c" + ("" if is_zero(u.offset) else f" + {u.var}_o")


def _unary_value(u: UnaryForm, arg: str) -> str:
    """The printed sigmoid or tanh of ``arg``; tanh's division is the fast one, which its
    1.0 absorbs (2^x + 1 >= 1: codegen.expr._absorbed_quotient)."""
    if u.node.op is Op.SIGMOID:
        return f"1.0 / (1.0 + tl.exp2({arg}))  # sigmoid x = 1 / (1 + e^-x)"
    return f"1.0 - _absorbed_div(2.0, tl.exp2({arg}) + 1.0)  # tanh x = 1 - 2 / (e^2x + 1)"


def _hoist_unaries(L: Lines, depth: int, b: TileBackward, names: _Names) -> None:
    """The tile-invariant exp2 coefficients of the sigmoids and tanhs, before the loops."""
    head = _env(b, names, {}, {}, {})
    for u in b.unaries:
        if u.dot is None:
            continue
        L(depth, f"# {u.var} = {E.render(u.node)[:60]}: exp2 of {u.dot} * {u.var}_c"
                 + ("" if is_zero(u.offset) else f" + {u.var}_o"))
        L(depth, f"{u.var}_c = {render_at(L, depth, u.coef, head)}")
        if not is_zero(u.offset):
            L(depth, f"{u.var}_o = {render_at(L, depth, u.offset, head)}")


def _emit_unaries(L: Lines, b: TileBackward, env: Env) -> None:
    """Each sigmoid and tanh once per step; later renders print its variable."""
    for u in b.unaries:
        L(0, f"{u.var} = {_unary_value(u, _exp2_arg(u, env, L))}")
        env.hoisted[u.node] = u.var


def _scale_accumulators(L: Lines, b: TileBackward, names: _Names, side: str) -> None:
    head = _env(b, names, {}, {}, {})
    for var, c in b.factors[side].items():
        L(1, f"d_{var} = d_{var} * ({render_at(L, 1, c, head)})  # the factor common to "
             f"every d b / d qk term")


def _tile_ptr(o: Operand, names: _Names, ptr: str, env: Env, row: str, col: str) -> str:
    """The addresses of a [rows, columns] tile of an operand's tensor (or its gradient)
    ``ptr``: the program's (batch, head) slice (a base offset: int64 unless I32_BASES), then
    the rows and columns."""
    parts = [(d, writer.to_i64(render(i, env))) for d, i in enumerate(o.idx)
             if d not in (o.row_dim, o.col_dim)]
    return names.at(ptr, parts + [(o.row_dim, row), (o.col_dim, col)])


def _rows_buffer(var: str, tile: bool) -> str:
    """Offsets into a contiguous float32 [batch, heads, M(, F)] buffer of the backward."""
    rows = "(pid_bh * M_len + offs_m)"
    return f"{var} + {rows}[:, None] * F_len + offs_f[None, :]" if tile else f"{var} + {rows}"


def _load_operand(L: Lines, depth: int, o: Operand, names: _Names, env: Env, axis: str,
                  ok: str) -> None:
    """``o`` as a [rows, columns] tile: rows ``offs_m``/``offs_n`` (axis), columns E or F."""
    ptr = names.tensors[o.tensor]
    col, col_ok = ("offs_e", "e_ok") if o.side != "v" else ("offs_f", "f_ok")
    p = _tile_ptr(o, names, ptr, env, f"{axis}[:, None]", f"{col}[None, :]")
    L(depth, f"{o.var} = tl.load({p}, mask={ok}[:, None] & {col_ok}[None, :], "
             f"other=0.0)")
    L(depth, f"if UPCAST:  # the interpreter has no bf16 arithmetic\n    {o.var} = "
             f"{o.var}.to(tl.float32)")


def _env(b: TileBackward, names: _Names, rows: dict[str, str], index: dict[str, str],
         masks: dict[str, str]) -> Env:
    k = b.kernel
    scalar = {i: v for i, v in ((k.roles.get("batch"), "off_b"), (k.roles.get("head"), "off_h"))
              if i is not None}
    return Env({**scalar, **index}, rows, dict(names.params), names.captured, masks,
               scalar_indices=frozenset(scalar), strides=names.strides)


# How a kernel lays out its score tiles: [BLOCK_M, BLOCK_N] (queries x keys, the rows kernel)
# or [BLOCK_N, BLOCK_M] (keys x queries, the keys kernel: its accumulating products P^T c and
# dqk^T Q then need no transposed tile).  Per layout: the broadcast of a query vector, of a key
# vector, and the tile shape.
QUERY_MAJOR = ("[:, None]", "[None, :]", "[BLOCK_M, BLOCK_N]")
KEY_MAJOR = ("[None, :]", "[:, None]", "[BLOCK_N, BLOCK_M]")


def _tile_index(k: TileKernel, o: tuple[str, str, str]) -> tuple[dict, dict]:
    m, n = k.roles["query"], k.roles["key"]
    return ({m: f"offs_m{o[0]}", n: f"offs_n{o[1]}"}, {m: f"row_ok{o[0]}", n: f"col_ok{o[1]}"})


def _dots(L: Lines, depth: int, k: TileKernel, o: tuple[str, str, str],
          only: set[str] | None = None) -> None:
    for d in (x for x in k.dots if only is None or x.var in only):
        a, b = (d.q.var, d.k.var) if o is QUERY_MAJOR else (d.k.var, d.q.var)
        L(depth, f"{d.var} = tl.dot({a}, tl.trans({b}), input_precision=DOT_PRECISION)")


def _keep(L: Lines, depth: int, k: TileKernel, env: Env, o: tuple[str, str, str],
          masked: bool | None = True) -> None:
    """The kept elements of a tile: in range, and the mask unless the tile is full
    (``masked``; None: under the constexpr MASKED of a step function).  The loops over key
    tiles print it relative to start_n where it reads the indices in pairs
    (:mod:`attndsl.codegen.relative`; sm90 D=64 sigmoid dQ loop 351 -> 328 instructions,
    the hand-written one 336); the keys kernel's, over the query tiles of a block, keeps it
    absolute (relative to start_m the D=64 kernel held 145 registers, not 134, the D=128 one
    248, not 240; the hand-written 149 and 235).  Static SASS, triton 3.9."""
    L(depth, f"keep = row_ok{o[0]} & col_ok{o[1]}")
    if k.mask is None or masked is False:
        return
    if masked is None:
        L(depth, "if MASKED:  # a partial tile: evaluate the mask")
        depth += 1
    m, n = k.roles["query"], k.roles["key"]
    mask = lowered_mask(k.mask, m, n)
    if o is QUERY_MAJOR:
        env = relative_mask(L, depth, mask, m, n, env, KEYS_MOVE)
    L(depth, f"keep = keep & ({render_at(L, depth, mask, env)})")


def _block_bounds(L: Lines, depth: int, k: TileKernel, qt: str) -> None:
    """The closed-form key-block bounds lo_i, flo_i, fhi_i, hi_i of every segment i (in
    BOUNDS_BLOCK units) of query block ``qt``: keys [flo, fhi) are full, [lo, flo) and
    [fhi, hi) partial, the rest empty (attndsl.passes.mask.closed_form)."""
    assert k.bounds is not None
    for i, seg in enumerate(k.bounds):
        temps = "t" if len(k.bounds) == 1 else f"s{i}_t"
        for name, value in zip(_BOUNDS, writer.bound_values(L, depth, seg, qt, temps)):
            L(depth, f"{name}{i} = (tl.zeros([], tl.int32) + ({value})).to(tl.int32)")


_BOUNDS = ("lo", "flo", "fhi", "hi")


def _query_tiles(L: Lines, k: TileKernel, step) -> None:
    """The keys kernel's loops over query tiles, ``step(L, depth, masked)`` in each: with
    closed-form bounds, per query block of BOUNDS_BLOCK rows the tiles of a block that is
    partial for this key block (masked), then of a full one (no mask); empty blocks are
    skipped.  Else every tile, masked when there is a mask.  A block's tiles are a range
    over start_m itself, as the hand-written kernel's (counting sub-tiles and computing
    start_m from them, the sm90 D=128 sigmoid dK/dV loop was 322 instructions against the
    hand-written 315 on triton 3.8, 2 per pointer: now 0.99 of it; static SASS)."""
    if k.bounds is None:
        L(1, "for start_m in range(0, M_len, BLOCK_M):")
        step(L, 2, k.mask is not None)
        return
    L(1, f"kb = (pid_t * BLOCK_N) // {SPARSE_BLOCK}  # this key tile's block")
    L(1, f"for qb in range(0, (M_len + {SPARSE_BLOCK - 1}) // {SPARSE_BLOCK}):")
    L(2, "qbt = qb + tl.zeros([], tl.int32)  # a tensor, in the interpreter too")
    _block_bounds(L, 2, k, "qbt")
    full = " | ".join(f"((flo{i} <= kb) & (kb < fhi{i}))" for i in range(len(k.bounds)))
    part = " | ".join(f"((lo{i} <= kb) & (kb < flo{i})) | ((fhi{i} <= kb) & (kb < hi{i}))"
                      for i in range(len(k.bounds)))
    L(2, f"part = {part}\nfull = ({full}) & ~part")
    L(2, f"blk_lo = qb * {SPARSE_BLOCK}\nblk_hi = tl.minimum(blk_lo + {SPARSE_BLOCK}, M_len)")
    for flag, masked in (("part", True), ("full", False)):
        L(2, f"for start_m in range(blk_lo, tl.where({flag}, blk_hi, blk_lo), BLOCK_M):")
        step(L, 3, masked)


def _key_tiles(L: Lines, k: TileKernel, step) -> None:
    """The dQ kernel's loops over key tiles: with closed-form bounds, per segment the partial
    key blocks below the full ones (masked), the full ones (no mask), the partial ones above
    (masked), as the forward; else every tile."""
    if k.bounds is None:
        L(1, "for start_n in range(0, N_len, BLOCK_N):")
        step(L, 2, k.mask is not None)
        return
    L(1, f"qb = (pid_t * BLOCK_M) // {SPARSE_BLOCK}  # this query tile's block")
    _block_bounds(L, 1, k, "qb")
    for i in range(len(k.bounds)):
        for a, z, masked in writer.SEGMENT_PARTS:
            L(1, f"for start_n in range({_BOUNDS[a]}{i} * {SPARSE_BLOCK}, tl.minimum("
                 f"{_BOUNDS[z]}{i} * {SPARSE_BLOCK}, N_len), BLOCK_N):")
            step(L, 2, masked)


def _use_rows(b: TileBackward, o: tuple[str, str, str]) -> dict[str, str]:
    """A stabiliser inside the loop reads its final safe value (also as ``.safe``)."""
    rows = {}
    for mx in b.stabilizers:
        rows[mx] = rows[mx + ".safe"] = f"{ident(mx)}_use{o[0]}"
    return rows


_CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "BLOCK_E", "BLOCK_F", "DOT_PRECISION", "UPCAST")


def _signature(L: Lines, fn: str, args: list[str], doc: str, names: _Names) -> None:
    names.kernel_args[fn] = list(args)  # the KERNEL_ARGS table of the launch by keyword
    writer.signature(L, fn, args, (*_CONSTEXPRS, *names.static.values()), writer.EVEN, doc,
                     names.spec, specialised=names.row_strides[fn])


def _common_args(b: TileBackward, names: _Names) -> list[str]:
    args: list[str] = []
    for ptr in names.tensors.values():
        args += names.args(ptr)
    for name, (ptr, _) in names.captured.items():
        args += names.args(ptr) + names.sizes[name]
    args += [arg for name, arg in names.params.items() if name not in names.static]
    for s in b.sums:
        args.append(f"CF_{ident(s.sum.var)}")
    for mx in b.stabilizers:
        args.append(f"MX_{ident(mx)}")
    for ptr in names.cap_grads.values():
        args += names.args(ptr)
    return args + ["n_heads", "M_len", "N_len", "E_len", "F_len"]


def _ok(var: str, offs: str, dim: str) -> str:
    """A validity vector, all true (folded away by the compiler) when EVEN_<dim>: the length
    is a multiple of the tile (M, N) or equals it (E, F)."""
    return f"{var} = ({offs} < {dim}_len) | EVEN_{dim}"


def _program(L: Lines, k: TileKernel, axis: str, names: _Names, args: list[str],
             dots: bool = True) -> None:
    """Program ids and index vectors; the head dim E's only when the kernel forms dots.
    Unless I32_TILES, the strides of the tiled tensors among ``args`` (inputs, their
    gradients, the stores' incoming gradients) and ``pid_bh`` (the float32 row buffers are
    indexed from it) are int64."""
    writer.program(L, "pid_t")
    tiled = [*names.tensors.values(), *names.grads.values(), *names.stores.values()]
    writer.widen_strides(L, 1, [s for ptr in tiled if ptr in args for s in names.strides[ptr]],
                         ("pid_bh",))
    if dots:
        L(1, "offs_e = tl.arange(0, BLOCK_E)\noffs_f = tl.arange(0, BLOCK_F)")
        L(1, _ok("e_ok", "offs_e", "E") + "\n" + _ok("f_ok", "offs_f", "F"))
    else:
        L(1, "offs_f = tl.arange(0, BLOCK_F)\n" + _ok("f_ok", "offs_f", "F"))
    if axis == "m":
        L(1, "offs_m = pid_t * BLOCK_M + tl.arange(0, BLOCK_M)\n" + _ok("row_ok", "offs_m", "M"))
    else:
        L(1, "offs_n = pid_t * BLOCK_N + tl.arange(0, BLOCK_N)\n" + _ok("col_ok", "offs_n", "N"))


def _emit_rows_kernel(L: Lines, b: TileBackward, names: _Names) -> None:
    """Recomputes only what the outputs read (:meth:`TileBackward.recomputed`): the needed
    maxima, then the needed sums with the stabilisers final; without a needed sum the loop
    only counts the kept keys, from the mask's closed-form bounds where it has them."""
    k = b.kernel
    (p,) = k.passes
    need = b.recomputed()
    maxes = [mx for mx in p.maxes if mx.var in need]
    sums = [s for s in b.sums if s.sum.var in need]
    args = _common_args(b, names)
    for st in k.stores:
        args += names.args(names.stores[st.name])
    _signature(L, "tile_bwd_rows_kernel", args,
               "One program: BLOCK_M query rows of one (batch, head).  Recomputes the "
               "finished rows\n    and writes the chain rule's coefficient of every running "
               "sum and the final stabilisers.", names)
    q_read = {d.q.var for d in k.dots if d.var in need}
    _program(L, k, "m", names, args, dots=bool(q_read))
    index, masks = _tile_index(k, QUERY_MAJOR)
    head = _env(b, names, {}, {}, {})
    for o in k.operands:
        if o.side == "q" and o.var in q_read:
            _load_operand(L, 1, o, names, head, "offs_m", "row_ok")
    L(1, "kept = tl.zeros([BLOCK_M], tl.float32)  # keys kept per row")
    if maxes:
        L(1, "# stabilising maxima over every key tile")
        for mx in maxes:
            L(1, f'{ident(mx.var)} = tl.full([BLOCK_M], float("-inf"), tl.float32)')
        _key_loop(L, b, names, lambda B, env: _emit_maxes(B, maxes, env), index, masks, {},
                  count=False, reads={x for mx in maxes for x in rows_read(mx.arg)})
        for mx in maxes:
            v = ident(mx.var)
            floor = f"tl.maximum({v}, 0.0)" if mx.floor0 else \
                f'tl.where({v} == float("-inf"), 0.0, {v})'
            L(1, f"{v}_use = {floor}")
            if mx.var in b.stabilizers:
                L(1, f"tl.store({_rows_buffer('MX_' + v, False)}, {v}_use, mask=row_ok)")
    if not sums:
        _count_kept(L, b, names, index, masks)
    else:
        L(1, "# the running sums, each stabiliser at its final value")
        for s in sums:
            shape = "[BLOCK_M, BLOCK_F]" if s.sum.v is not None else "[BLOCK_M]"
            L(1, f"{ident(s.sum.var)} = tl.zeros({shape}, tl.float32)")
        reads = {x for s in sums for x in rows_read(s.sum.body)} | \
            {s.sum.v.var for s in sums if s.sum.v is not None}
        _key_loop(L, b, names, lambda B, env: _emit_sums(B, sums, env), index, masks,
                  _use_rows(b, QUERY_MAJOR), count=True, reads=reads)
    _emit_coefficients(L, b, names)


def _count_kept(L: Lines, b: TileBackward, names: _Names, index: dict, masks: dict) -> None:
    """``kept`` when no sum is recomputed: no operand load, no dot, only the mask.  Without
    a mask every in-range key is kept (N_len); with closed-form bounds each full key block
    keeps all its in-range keys (one count per segment) and only the partial blocks
    evaluate the mask; else every key tile does."""
    k = b.kernel
    if k.mask is None:
        L(1, "kept += N_len  # no mask: every key is kept")
        return
    L(1, "# keys kept per row: the mask only (no running sum is read)")
    tile = _key_step(b, names, lambda B, env: None, index, masks, {}, True, set())
    if k.bounds is None:
        L(1, "for start_n in range(0, N_len, BLOCK_N):")
        tile(L, 2, True)
        return
    L(1, f"qb = (pid_t * BLOCK_M) // {SPARSE_BLOCK}  # this query tile's block")
    _block_bounds(L, 1, k, "qb")
    B = SPARSE_BLOCK
    for i in range(len(k.bounds)):
        L(1, f"kept += tl.maximum(tl.minimum(fhi{i} * {B}, N_len) - flo{i} * {B}, 0)"
             f".to(tl.float32)  # full blocks keep every in-range key")
        for lo, hi in ((f"lo{i}", f"flo{i}"), (f"fhi{i}", f"hi{i}")):
            L(1, f"for start_n in range({lo} * {B}, tl.minimum({hi} * {B}, N_len), BLOCK_N):")
            tile(L, 2, True)


def _key_loop(L: Lines, b: TileBackward, names: _Names, step, index: dict, masks: dict,
              rows: dict, count: bool, reads: set[str]) -> None:
    """The rows kernel's loop over every key tile, ``step`` in each.  (Restricting it to the
    closed-form bounds' non-empty blocks measured heavier on sm90: a softmax sums loop of
    546 -> 594 instructions and 126 -> 176 registers at D 64; only the kept count uses them.)"""
    L(1, "for start_n in range(0, N_len, BLOCK_N):")
    _key_step(b, names, step, index, masks, rows, count, reads)(L, 2, b.kernel.mask is not None)


def _key_step(b: TileBackward, names: _Names, step, index: dict, masks: dict, rows: dict,
              count: bool, reads: set[str]):
    """One key tile of the rows kernel: the key-side operands and dot tiles in ``reads`` (a
    dot's name reads its operands; a value operand's name itself), the kept elements, then
    ``step(lines, env)``."""
    k = b.kernel
    dots = {d.var for d in k.dots if d.var in reads}
    loads = {d.k.var for d in k.dots if d.var in dots} | reads
    head = _env(b, names, {}, {}, {})

    def tile(L: Lines, depth: int, masked: bool) -> None:
        B = Lines()
        B(0, "offs_n = start_n + tl.arange(0, BLOCK_N)\n" + _ok("col_ok", "offs_n", "N"))
        for o in k.operands:
            if o.side != "q" and o.var in loads:
                _load_operand(B, 0, o, names, head, "offs_n", "col_ok")
        _dots(B, 0, k, QUERY_MAJOR, dots)
        env = _env(b, names, {**rows, **{d: d for d in dots}}, index, masks)
        _keep(B, 0, k, env, QUERY_MAJOR, masked)
        if count:
            B(0, "kept += tl.sum(keep.to(tl.float32), 1)")
        step(B, env)
        L(depth, "\n".join(B.out))
    return tile


def _emit_maxes(L: Lines, maxes: list, env: Env) -> None:
    for mx in maxes:
        v = ident(mx.var)
        value = render_at(L, 0, mx.arg, env)
        L(0, f"y = tl.where(keep, tl.zeros([BLOCK_M, BLOCK_N], tl.float32) + ({value}), "
             f'float("-inf"))')
        L(0, f"{v} = tl.maximum({v}, tl.max(y, 1))")


def _emit_sums(L: Lines, sums: list, env: Env) -> None:
    for s in sums:
        r = s.sum
        v = ident(r.var)
        body = render_at(L, 0, r.body, env)
        L(0, f"p = tl.where(keep, {body}, 0.0)")
        if r.v is None:
            L(0, f"{v} += tl.sum(p, 1)")
        else:
            L(0, f"{v} += tl.dot(p.to({r.v.var}.dtype), {r.v.var}, "
                 f"input_precision=DOT_PRECISION)")


def _store_env(b: TileBackward, names: _Names, tile: bool) -> Env:
    """Leaves of a store expression: finished rows, and the store's incoming gradient."""
    k = b.kernel
    (p,) = k.passes
    col = "[:, None]" if tile else ""
    rows = {}
    for mx in p.maxes:
        v = ident(mx.var)
        rows[mx.var] = f"{v}{col}"
        rows[mx.var + ".safe"] = f"{v}_use{col}"
    for s in p.sums:
        rows[s.var] = ident(s.var) + ("" if s.v is not None else col)
    m, f = k.roles["query"], k.roles.get("v")
    index = {m: f"offs_m{col}"}
    if f is not None and tile:
        index[f] = "offs_f[None, :]"
    return _env(b, names, rows, index, {m: f"row_ok{col}"})


def _emit_coefficients(L: Lines, b: TileBackward, names: _Names) -> None:
    """c_s = sum over stores of dY * dG/dR_s (rows with no kept key: 0)."""
    k = b.kernel
    L(1, "# incoming gradients of the stores")
    dy = {}
    for st in (x for x in k.stores if x.name not in b.max_stores):
        ptr = names.stores[st.name]
        env = _store_env(b, names, st.tile)
        offs = names.at(ptr, [(d, writer.to_i64(v) if v in writer.PROGRAM_SCALARS else v)
                              for d, v in ((d, env.index.get(i, "0"))
                                           for d, i in enumerate(st.indices))])
        ok = "row_ok[:, None] & f_ok[None, :]" if st.tile else "row_ok"
        dy[st.name] = f"dy{len(dy)}"
        L(1, f"{dy[st.name]} = tl.load({offs}, mask={ok}, other=0.0).to(tl.float32)")
    tiles = {st.name: st.tile for st in k.stores}
    L(1, "# coefficients of the running sums: c_s = sum(Y) dY dG/dR_s")
    for s in b.sums:
        r = s.sum
        c = f"c_{ident(r.var)}"
        shape = "[BLOCK_M, BLOCK_F]" if r.v is not None else "[BLOCK_M]"
        L(1, f"{c} = tl.zeros({shape}, tl.float32)")
        for part in (x for x in b.partials if x.row == r.var):
            env = _store_env(b, names, tiles[part.store])
            term = f"{dy[part.store]} * ({render_at(L, 1, part.deriv, env)})"
            if tiles[part.store] and r.v is None:
                term = f"tl.sum({term}, 1)"
            L(1, f"{c} += {term}")
        col = "[:, None]" if r.v is not None else ""
        L(1, f"{c} = tl.where(kept{col} > 0.0, {c}, 0.0)  # a row with no kept key adds nothing")
        ok = "row_ok[:, None] & f_ok[None, :]" if r.v is not None else "row_ok"
        buf = "CF_" + ident(r.var)
        L(1, f"tl.store({_rows_buffer(buf, r.v is not None)}, {c}.to({buf}.dtype.element_ty), "
             f"mask={ok})")
    for store, site in b.store_sites:
        tile = tiles[store]
        env = _store_env(b, names, tile)
        ok = "row_ok[:, None] & f_ok[None, :]" if tile else "row_ok"
        g = f"tl.where({ok}, {dy[store]} * ({render_at(L, 1, site.deriv, env)}), 0.0)"
        L(1, comment(f"gradient of the captured tensor read at {E.render(site.load)}"))
        L(1, f"g = {g}")
        _scatter(L, 1, b, names, site, "g", env, tile_axes=("m", "f") if tile else ("m",))


def _scatter(L: Lines, depth: int, b: TileBackward, names: _Names, site: SiteGrad, var: str,
             env: Env, tile_axes: tuple[str, ...]) -> None:
    """Atomic scatter-add of ``var`` (a tile over ``tile_axes``: roles query/key/v) to the
    element the site read: summed over the axes its subscripts do not use."""
    k = b.kernel
    role = {"m": "query", "n": "key", "f": "v"}
    axis_index = [k.roles.get(role[a]) for a in tile_axes]
    deps = site.load.free_indices()
    keep = [i for i, x in enumerate(axis_index) if x in deps]
    value = var
    for i in reversed(range(len(tile_axes))):
        if i not in keep:
            value = f"tl.sum({value}, {i})"
    vec = {"m": "offs_m", "n": "offs_n", "f": "offs_f"}
    ok = {"m": "row_ok", "n": "col_ok", "f": "f_ok"}
    kept_axes = [tile_axes[i] for i in keep]
    shape = len(kept_axes)
    idx = dict(env.index)
    for j, a in enumerate(kept_axes):
        sel = "" if shape == 1 else ("[:, None]" if j == 0 else "[None, :]")
        idx[axis_index[tile_axes.index(a)]] = vec[a] + sel
    sub_env = Env(idx, env.rows, env.params, env.captured, env.masks,
                  scalar_indices=env.scalar_indices, strides=env.strides)
    dptr = names.cap_grads[site.tensor]
    target = names.at(dptr, [(d, writer.to_i64(render(s, sub_env)))  # any element: I32_BASES
                             for d, s in enumerate(site.load.src)])
    if shape == 0:
        L(depth, f"tl.atomic_add({target}, {value})")
        return
    masks = [ok[a] + ("" if shape == 1 else ("[:, None]" if j == 0 else "[None, :]"))
             for j, a in enumerate(kept_axes)]
    L(depth, f"tl.atomic_add({target}, {value}, mask={' & '.join(masks)})")


def _step_function(L: Lines, at: int, steps: Lines, fn: str, body: Lines, state: list[str],
                   args: list[str], names: _Names, start: str, doc: str):
    """:func:`attndsl.codegen.writer.step_function` for a kernel whose signature starts at
    line ``at`` of ``L``: the step's kernel-scope reads are what ``L`` assigned since."""
    flags = [*_CONSTEXPRS, *names.static.values(), *writer.EVEN]
    call = writer.step_function(steps, fn, "\n".join(body.out), state, L.out[at:], args, flags,
                                start, doc)
    return lambda L2, depth, masked: L2(depth, call(masked))


def _emit_keys_kernel(L: Lines, b: TileBackward, names: _Names) -> None:
    k = b.kernel
    args = _common_args(b, names)
    for t in names.tensors:
        args += names.args(names.grads[t])
    steps, at = Lines(), len(L.out)  # the step function, printed above the kernel
    _signature(L, "tile_bwd_keys_kernel", args,
               "One program: BLOCK_N keys of one (batch, head); loops over the query tiles.", names)
    _program(L, k, "n", names, args)
    index, masks = _tile_index(k, KEY_MAJOR)
    head = _env(b, names, {}, {}, {})
    L(1, "# key-side tiles, loaded once; their gradients sum in registers")
    for o in k.operands:
        if o.side != "q":
            _load_operand(L, 1, o, names, head, "offs_n", "col_ok")
            cols = "BLOCK_F" if o.side == "v" else "BLOCK_E"
            L(1, f"d_{o.var} = tl.zeros([BLOCK_N, {cols}], tl.float32)")
    _hoist_unaries(L, 1, b, names)

    B = Lines()
    B(0, "offs_m = start_m + tl.arange(0, BLOCK_M)\n" + _ok("row_ok", "offs_m", "M"))
    for o in k.operands:
        if o.side == "q":
            _load_operand(B, 0, o, names, head, "offs_m", "row_ok")
    for mx in b.stabilizers:
        v = ident(mx)
        B(0, f"{v}_use = tl.load({_rows_buffer('MX_' + v, False)}, mask=row_ok, other=0.0)")
    _dots(B, 0, k, KEY_MAJOR)
    env = _env(b, names, {**_use_rows(b, KEY_MAJOR), **{d.var: d.var for d in k.dots}},
               index, masks)
    _keep(B, 0, k, env, KEY_MAJOR, None)
    _emit_unaries(B, b, env)
    _emit_key_step(B, b, names, env)
    state = [f"d_{o.var}" for o in k.operands if o.side != "q"]
    _query_tiles(L, k, _step_function(L, at, steps, "_tile_bwd_keys_step", B, state, args,
                                      names, "start_m", "One query tile [start_m, start_m + "
                                      "BLOCK_M) of the key tile's loop"))
    _scale_accumulators(L, b, names, "k")
    L(1, "# dK, dV: float32 atomics (other heads may share these keys)")
    for o in k.operands:
        if o.side != "q":
            _atomic_operand(L, 1, o, names, head, f"d_{o.var}", "offs_n", "col_ok")
    L.out[at:at] = steps.out


def _vanishes(e: Expr, body: Expr) -> bool:
    """Whether ``e`` is 0 wherever ``body`` is 0: ``body`` itself, a product of a vanishing
    factor and a bounded one, sums, negations and quotients by finite nonzero constants of
    vanishing terms.  Then ``where(keep, w e, 0) = w e[body := where(keep, body, 0)]`` for a
    finite ``w``: the masked body already computed for dV guards dqk too (one select)."""
    if e == body:
        return True
    if e.op is Op.MUL:
        a, c = e.src
        return (_vanishes(a, body) and _bounded(c)) or (_vanishes(c, body) and _bounded(a))
    if e.op is Op.NEG:
        return _vanishes(e.src[0], body)
    if e.op in (Op.ADD, Op.SUB):
        return all(_vanishes(x, body) for x in e.src)
    if e.op in (Op.DIV, Op.TRUEDIV):
        d = e.src[1]
        return d.op is Op.CONST and d.arg != 0 and math.isfinite(d.arg) and \
            _vanishes(e.src[0], body)
    return False


def _bounded(e: Expr) -> bool:
    """Finite for every argument: finite constants, sigmoids and tanhs ([0, 1], [-1, 1])
    and sums, differences, products and negations of them."""
    if e.op is Op.CONST:
        return e.dtype != BOOL and math.isfinite(e.arg)
    if e.op in (Op.SIGMOID, Op.TANH):
        return True
    return e.op in (Op.ADD, Op.SUB, Op.MUL, Op.NEG) and all(_bounded(x) for x in e.src)


def _emit_key_step(L: Lines, b: TileBackward, names: _Names, env: Env) -> None:
    """One (query tile, key tile) step: W_s, dV, dqk per dot, tile-site captured gradients.
    A d b / d qk term that vanishes with its sum's body (:func:`_vanishes`) reads the masked
    body ``p_s`` and needs no select of its own."""
    k = b.kernel
    dqk: dict[str, list[str]] = {d.var: [] for d in k.dots}
    free: dict[str, list[str]] = {d.var: [] for d in k.dots}  # terms zero where masked
    sites: list[tuple[SiteGrad, str]] = []
    for s in b.sums:
        r = s.sum
        v = ident(r.var)
        tile = r.v is not None
        ok = "row_ok[:, None] & f_ok[None, :]" if tile else "row_ok"
        L(0, f"c_{v} = tl.load({_rows_buffer('CF_' + v, tile)}, mask={ok}, other=0.0)")
        masked = None
        if tile:  # [keys, queries] tiles: W^T = V c^T, dV += P^T c
            dt = f"{r.v.var}.dtype"
            # dV's dot before W's, as FA2's dK/dV loop: fewer tiles live at once on sm90
            L(0, f"# dV += P^T c, W = c V^T  ({comment(E.render(r.body))[2:60]})")
            body = render_at(L, 0, r.body, env)
            L(0, f"p_{v} = tl.where(keep, {body}, 0.0)")
            L(0, f"d_{r.v.var} += tl.dot(p_{v}.to({dt}), c_{v}.to({dt}), "
                 f"input_precision=DOT_PRECISION)")
            L(0, f"w_{v} = tl.dot({r.v.var}, tl.trans(c_{v}.to({dt})), "
                 f"input_precision=DOT_PRECISION)")
            masked = replace(env, hoisted={**env.hoisted, r.body: f"p_{v}"})
        else:
            L(0, f"w_{v} = c_{v}[None, :]")
        for dot, deriv in s.dots:
            term = b.loop_deriv(dot, deriv, "k")
            if masked is not None and _vanishes(term, r.body):
                free[dot].append(f"w_{v} * ({render_at(L, 0, term, masked)})")
            else:
                dqk[dot].append(f"w_{v} * ({render_at(L, 0, term, env)})")
        for site in s.sites:
            sites.append((site, f"w_{v} * ({render_at(L, 0, site.deriv, env)})"))
    for d in k.dots:
        if not dqk[d.var] and not free[d.var]:
            continue
        L(0, f"# d{d.var} = sum(s) W_s * d b_s / d {d.var}; dK += d{d.var}^T Q (dQ: its own "
             f"kernel)")
        guarded = [f"tl.where(keep, {' + '.join(dqk[d.var])}, 0.0)"] if dqk[d.var] else []
        L(0, f"dqk = {' + '.join(free[d.var] + guarded)}")
        L(0, f"d_{d.k.var} += tl.dot(dqk.to({d.q.var}.dtype), {d.q.var}, "
             f"input_precision=DOT_PRECISION)")
    for site, value in sites:
        L(0, comment(f"gradient of the captured tensor read at {E.render(site.load)}"))
        L(0, f"g = tl.where(keep, {value}, 0.0)")
        _scatter(L, 0, b, names, site, "g", env, tile_axes=("n", "m"))


def _emit_queries_kernel(L: Lines, b: TileBackward, names: _Names) -> None:
    """dQ without atomics in the loop, as FlashAttention-2's dQ kernel: one program per query
    tile, looping over the key tiles; the rows' coefficients and stabilisers are read once."""
    k = b.kernel
    args = _common_args(b, names)
    for t in names.tensors:
        args += names.args(names.grads[t])
    steps, at = Lines(), len(L.out)  # the step function, printed above the kernel
    _signature(L, "tile_bwd_queries_kernel", args,
               "One program: BLOCK_M queries of one (batch, head); loops over the key tiles "
               "and adds\n    dQ_d = sum dqk_d K_d once at the end (deterministic).", names)
    _program(L, k, "m", names, args)
    index, masks = _tile_index(k, QUERY_MAJOR)
    head = _env(b, names, {}, {}, {})
    L(1, "# query-side tiles, loaded once; their gradients sum in registers")
    q_ops = {d.q.var: d.q for d in k.dots}
    for o in k.operands:
        if o.side == "q":
            _load_operand(L, 1, o, names, head, "offs_m", "row_ok")
            if o.var in q_ops:
                L(1, f"d_{o.var} = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)")
    for mx in b.stabilizers:
        v = ident(mx)
        L(1, f"{v}_use = tl.load({_rows_buffer('MX_' + v, False)}, mask=row_ok, other=0.0)")
    for s in b.sums:
        v, tile = ident(s.sum.var), s.sum.v is not None
        ok = "row_ok[:, None] & f_ok[None, :]" if tile else "row_ok"
        L(1, f"c_{v} = tl.load({_rows_buffer('CF_' + v, tile)}, mask={ok}, other=0.0)")
    _hoist_unaries(L, 1, b, names)

    B = Lines()
    B(0, "offs_n = start_n + tl.arange(0, BLOCK_N)\n" + _ok("col_ok", "offs_n", "N"))
    for o in k.operands:
        if o.side != "q":
            _load_operand(B, 0, o, names, head, "offs_n", "col_ok")
    _dots(B, 0, k, QUERY_MAJOR)
    env = _env(b, names, {**_use_rows(b, QUERY_MAJOR), **{d.var: d.var for d in k.dots}},
               index, masks)
    _keep(B, 0, k, env, QUERY_MAJOR, None)
    _emit_unaries(B, b, env)
    _emit_query_step(B, b, env)
    _key_tiles(L, k, _step_function(L, at, steps, "_tile_bwd_queries_step", B,
                                    [f"d_{var}" for var in q_ops], args, names, "start_n",
                                    "One key tile [start_n, start_n + BLOCK_N) of the query "
                                    "tile's loop"))
    _scale_accumulators(L, b, names, "q")
    L(1, "# dQ: one float32 add per element (other heads may share these queries)")
    for var, o in q_ops.items():
        _atomic_operand(L, 1, o, names, head, f"d_{var}", "offs_m", "row_ok")
    L.out[at:at] = steps.out


def _emit_query_step(L: Lines, b: TileBackward, env: Env) -> None:
    """One (query tile, key tile) step of the dQ kernel: W_s, dqk per dot, dQ += dqk K."""
    k = b.kernel
    dqk: dict[str, list[str]] = {d.var: [] for d in k.dots}
    for s in b.sums:
        r = s.sum
        v = ident(r.var)
        if not s.dots:
            continue
        if r.v is not None:  # [queries, keys] tiles: W = c V^T
            L(0, f"w_{v} = tl.dot(c_{v}.to({r.v.var}.dtype), tl.trans({r.v.var}), "
                 f"input_precision=DOT_PRECISION)  # W = c V^T")
        else:
            L(0, f"w_{v} = c_{v}[:, None]")
        for dot, deriv in s.dots:
            dqk[dot].append(f"w_{v} * ({render_at(L, 0, b.loop_deriv(dot, deriv, 'q'), env)})")
    for d in k.dots:
        if not dqk[d.var]:
            continue
        L(0, f"# d{d.var} = sum(s) W_s * d b_s / d {d.var}; dQ += d{d.var} K")
        L(0, f"dqk = tl.where(keep, {' + '.join(dqk[d.var])}, 0.0)")
        L(0, f"d_{d.q.var} += tl.dot(dqk.to({d.k.var}.dtype), {d.k.var}, "
             f"input_precision=DOT_PRECISION)")


def _atomic_operand(L: Lines, depth: int, o: Operand, names: _Names, env: Env, value: str,
                    axis: str, ok: str) -> None:
    ptr = names.grads[o.tensor]
    col, col_ok = ("offs_e", "e_ok") if o.side != "v" else ("offs_f", "f_ok")
    target = _tile_ptr(o, names, ptr, env, f"{axis}[:, None]", f"{col}[None, :]")
    L(depth, f"tl.atomic_add({target}, {value}, mask={ok}[:, None] & {col_ok}[None, :])")


def _tables(L: Lines, b: TileBackward, names: _Names) -> None:
    k = b.kernel
    L(0, "# input tensor name -> (kernel pointer, rank); captured -> (pointer, rank)")
    L(0, "TENSORS = " + repr({t: (p, names.ranks[t]) for t, p in names.tensors.items()}))
    L(0, "CAPTURED = " + repr(names.captured))
    L(0, "CAPTURED_GRADS = " + repr(names.cap_grads))
    L(0, "PARAMS = " + repr(list(names.params)))
    L(0, "# parameter -> its constexpr kernel argument (read only in head subscripts)")
    L(0, "CONSTEXPR_PARAMS = " + repr(names.static))
    writer.binding_tables(L, k)
    L(0, "# store name -> (its indices, is a [rows, v] tile)")
    L(0, "STORES = " + repr({st.name: (st.indices, st.tile) for st in k.stores}))
    L(0, "# running sums: (coefficient buffer is a [rows, v] tile); stabilisers")
    L(0, "SUMS = " + repr([s.sum.v is not None for s in b.sums]))
    L(0, "STABILIZERS = " + repr(len(b.stabilizers)))
    L(0, "# stores holding a max reduction's value: their gradient is not derived here")
    L(0, "MAX_STORES = " + repr(list(b.max_stores)))
    L(0, "# key-block size of the closed-form bounds the loops skip empty blocks by (or None)")
    L(0, "BOUNDS_BLOCK = " + repr(SPARSE_BLOCK if k.bounds is not None else None))


def generate_tile_backward(b: TileBackward, version: str) -> str:
    """The full source of the fused backward module of a one-pass tile kernel."""
    names = _Names(b.kernel)
    digest = hashlib.sha256(str(b).encode() + b.kernel.spec_text.encode()).hexdigest()[:16]
    reset_spills()
    L = Lines()
    writer.prologue(L, f"backward of: {digest}\n\nTile IR:\n{b.kernel}\n\nBackward IR:\n{b}",
                    "Fused backward kernels of an attndsl tile kernel; needs only torch and "
                    "triton.", digest, version)
    _tables(L, b, names)
    L(0, HELPERS)
    _emit_rows_kernel(L, b, names)
    L(0, "")
    _emit_keys_kernel(L, b, names)
    L(0, "")
    _emit_queries_kernel(L, b, names)
    L(0, "")
    writer.kernel_args(L, names.kernel_args)
    L(0, writer.row_strides_note(names.row_strides) + "\n")
    L(0, writer.launcher_sources("tile_backward_launcher.py",
                                 (writer.COMMON, writer.TILE_KERNEL, writer.BY_NAME)))
    return "\n".join(L.out) + "\n"


__all__ = ["generate_tile_backward"]
