"""Backward printer: the FlexAttention cascade -> the source of a module of backward kernels.

The forward (codegen/triton.py) computes, per row of one (batch, head)::

    S = scale * Q K^T      T = score_mod(S)      P = softmax(n) T  (masked keys excluded)
    O = P V                LSE = log sum(n) exp(T)

Given dO and dLSE, FlashAttention-2's backward recomputes P from the saved LSE instead of
storing it, and the chain rule gives::

    delta = rowsum(dO * O) - dLSE                    (preprocessing kernel)
    P     = exp2(T log2e - LSE log2e)                (0: masked, out of range, LSE = -inf)
    dV    = P^T dO            dP = dO V^T            dT = P * (dP - delta)
    dS    = dT * dT/dS        dK = scale dS^T Q      dQ = scale dS K
    dcap  = scatter-add of dT * dT/dcap[site] at each gather site of a captured tensor

``dT/dS`` and ``dT/dcap[site]`` are derived by :mod:`attndsl.passes.flex_grad` (a
``BackwardSpec``, the printable data this printer only prints).  The kernels:

* ``attention_bwd_preprocess``: one program per (query tile, batch*head): ``delta``.
* ``attention_bwd_dkdv_kernel``: one program per (key tile, batch*kv-head).  It loops over the
  G query heads of its group (GQA: dK and dV are summed in registers, so they are
  deterministic) and over the query tiles: dense (every tile, the mask evaluated on each) or
  from the q-major block tables (``q_num_blocks``/``q_indices``: partial tiles evaluate the
  mask, ``full_q_*`` tiles skip it).  With ``ATOMIC_DQ`` it also adds ``scale dS K`` into a
  float32 dQ buffer with ``tl.atomic_add``; captured-tensor gradients are always atomic adds
  into float32 buffers.
* ``attention_bwd_dq_kernel``: the deterministic dQ, one program per (query tile, batch*head)
  looping over the key tiles (kv-major tables, as the forward).

Like the forward printer, every identifier in the generated source is made here; spec names
reach it only as ``repr``'d strings in the metadata tables or as sanitised comments.  The
launcher (codegen/backward_launcher.py, between its markers) is real code, copied verbatim into
the module.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace

from attndsl.codegen import writer
from attndsl.codegen.expr import (
    HELPERS,
    CodegenError,
    Env,
    comment,
    literal,
    render,
    render_at,
    reset_spills,
)
from attndsl.codegen.key_bounds import lowered_mask
from attndsl.codegen.writer import Lines

from attndsl.ir import expr as E
from attndsl.ir.cascade import Cascade
from attndsl.ir.expr import FLOAT, Expr, Op
from attndsl.passes import flex_grad
from attndsl.passes.affine import is_zero
from attndsl.passes.flex_grad import (
    QK_ROW,
    SCORE_ROW,
    BackwardSpec,
    GatherGrad,
    NotFlexCascade,
    key_tile_start,
    tile_start,
)
from attndsl.passes.flex_grad import one_line as _one_line
from attndsl.passes.rules import LOG2E


def backward_spec(c: Cascade) -> BackwardSpec:
    """The derivation (attndsl.passes.flex_grad); a cascade the FA2 kernels cannot print is
    a CodegenError of this printer."""
    try:
        return flex_grad.backward_spec(c)
    except NotFlexCascade as err:
        raise CodegenError(str(err)) from err

# -- printing helpers -------------------------------------------------------------------------

# kernel pointers by role, as the forward's (``q_ptr`` with ``stride_qz, stride_qh, stride_qm,
# stride_qk``): tensor -> (role base, the letters of its dims, what it stands for)
_ROLES = {"Q": ("q", "zhmk", "Q"), "K": ("k", "zhnk", "K"), "V": ("v", "zhnd", "V"),
          "O": ("o", "zhmd", "O"), "DO": ("do", "zhmd", "dO"), "LSE": ("lse", "zhm", "LSE"),
          "NEG_LSE2": ("neg_lse2", "zhm", "-LSE log2e plus the query-only terms of T log2e"),
          "DLSE": ("dlse", "zhm", "dLSE"), "DELTA": ("delta", "zhm", "rowsum(dO * O) - dLSE"),
          "DQ": ("dq", "zhmk", "dQ"), "DK": ("dk", "zhnk", "dK"), "DV": ("dv", "zhnd", "dV")}


def _tensor_args(t: str) -> list[str]:
    """The pointer and stride arguments of the tensor ``t`` (a key of ``_ROLES``)."""
    return writer.role_args(*_ROLES[t][:2])


def _ptr(t: str, parts: list[str]) -> str:
    """The address of ``t`` at the subscripts ``parts`` (one per dim)."""
    return writer.role_offset(*_ROLES[t][:2], parts)


def _row_strides(tensors: tuple[str, ...]) -> dict[str, str]:
    """The stride of the rows of each 2-D tile role in ``tensors`` (those a kernel's loop
    reads or writes every iteration) -> the length of its columns: the kernel takes them as
    constexprs (writer.row_strides_note)."""
    out = {}
    for t in tensors:
        letters = _ROLES[t][1]
        dims = dict(zip(letters, _tensor_args(t)[1:], strict=True))
        out[dims.get("m") or dims["n"]] = "E_len" if "k" in letters else "F_len"
    return out


# per kernel: the tiles of its loop (dK/dV: query tiles, and dQ atomics; dQ: key tiles),
# and the dK/dV kernel's stores: without them triton 3.6 spilled 3 values around the loop
# at 255 registers (sm80, D=64, dense; static SASS, 3.8 and 3.9 either way)
ROW_STRIDES = {"attention_bwd_preprocess": {},
               "attention_bwd_dkdv_kernel": _row_strides(("Q", "DO", "DQ", "DK", "DV")),
               "attention_bwd_dq_kernel": _row_strides(("K", "V"))}


def _widen(L: Lines, tensors: tuple[str, ...]) -> None:
    """The strides of the role ``tensors`` a kernel reads, as int64 unless I32_TILES."""
    writer.widen_strides(L, 1, [s for t in tensors for s in _tensor_args(t)[1:]])


def _notes() -> dict[str, str]:
    """Signature comments: what each role pointer stands for (the captured tensors' names are
    in the CAPTURED and GRADS tables only)."""
    return {f"{base}_ptr": spec for base, _, spec in _ROLES.values()}


@dataclass(frozen=True)
class _Names:
    """Kernel pointer names of the captured tensors (``C0``...), their strides and gradients
    (``DC0``); the sizes of their dimensions (``C0_n0``...: the wrap of negative subscripts
    reads them as the parameters named by the dimensions' extents)."""

    captured: dict[str, tuple[str, int]]  # IR name -> (pointer, rank)
    grads: dict[str, str]  # IR name -> gradient pointer
    sizes: dict[str, str]  # extent of a captured dimension -> its size argument
    strides: dict[str, tuple[str, ...]]  # captured or gradient pointer -> its stride arguments
    # loop-invariant reads of captured tensors (subscripts of batch and head only) -> the
    # variable holding them, loaded once per (batch, head) instead of once per tile
    hoisted: dict = field(default_factory=dict)


def _names(spec: BackwardSpec) -> _Names:
    """Captured tensors are numbered (``C0``, gradients ``DC0``): spec names reach the source
    only as repr'd strings in the metadata tables and as comments."""
    captured = {name: (f"C{i}", rank) for i, (name, rank) in enumerate(spec.captured)}
    grads = {name: "D" + captured[name][0] for name, _ in spec.grads}
    strides = {ptr: tuple(f"{ptr}_s{d}" for d in range(rank)) for ptr, rank in captured.values()}
    strides.update({g: tuple(f"{g}_s{d}" for d in range(captured[name][1]))
                    for name, g in grads.items()})
    sizes = {spec.cascade.tensor(name).dims[d]: f"{ptr}_n{d}"
             for name, (ptr, rank) in captured.items() for d in range(rank)}
    return _Names(captured, grads, sizes, strides)


def _need(ptr: str) -> str:
    """The constexpr flag that turns on a captured tensor's gradient (``NEED_DC0``)."""
    return f"NEED_{ptr}"


def _at(names: _Names, ptr: str, parts: list[str]) -> str:
    """The address of a captured tensor or gradient ``ptr`` at ``parts`` (int64 offsets
    unless I32_BASES: the tensor may span 2**31 elements)."""
    return f"{ptr} + " + " + ".join(f"{writer.to_i64(p)} * {s}"
                                    for p, s in zip(parts, names.strides[ptr], strict=True))


@dataclass(frozen=True)
class _Orient:
    """How a kernel lays out its score tiles: ``[BLOCK_M, BLOCK_N]`` (queries x keys, the dQ
    kernel) or ``[BLOCK_N, BLOCK_M]`` (keys x queries, the dK/dV kernel: its accumulating
    products P^T dO and dS^T Q then need no transposed score tile)."""

    m: str  # the query positions as a tile axis
    n: str  # the key positions as a tile axis
    m_ok: str
    n_ok: str
    row: str  # a per-query vector broadcast over the tile
    m_axis: int  # tile axis of the queries

    @property
    def shape(self) -> str:
        return "[BLOCK_M, BLOCK_N]" if self.m_axis == 0 else "[BLOCK_N, BLOCK_M]"


QUERY_MAJOR = _Orient("offs_m[:, None]", "offs_n[None, :]", "m_ok[:, None]", "n_ok[None, :]",
                      "[:, None]", 0)
KEY_MAJOR = _Orient("offs_m[None, :]", "offs_n[:, None]", "m_ok[None, :]", "n_ok[:, None]",
                    "[None, :]", 1)
VECTORS = _Orient("offs_m", "offs_n", "m_ok", "n_ok", "", -1)  # one axis: 1-D index vectors


def _tile_env(spec: BackwardSpec, names: _Names, o: _Orient, start: str = "start_m",
              key_start: str = "start_n") -> Env:
    """Leaves of a score tile (or of one axis of it): captured-tensor loads are masked with the
    validity of the tile axes their subscripts use; ``start`` and ``key_start`` are the
    split's anchors (:func:`_emit_anchor`, and the dK/dV kernel's key tile)."""
    r = spec.roles
    index = {r["batch"]: "off_b", r["head"]: "off_h", r["query"]: o.m, r["key"]: o.n,
             tile_start(r): start, key_tile_start(r): key_start}
    return Env(index=index, rows={SCORE_ROW: "s"},
               params={"scale": "scale", "G": "G", **names.sizes},
               captured=names.captured, masks={r["query"]: o.m_ok, r["key"]: o.n_ok},
               strides=names.strides,
               hoisted=names.hoisted, scalar_indices=frozenset({r["batch"], r["head"]}))


def _hoist_loads(L: Lines, depth: int, spec: BackwardSpec, names: _Names) -> None:
    """Emit each captured-tensor read of the score, its derivatives and the mask whose
    subscripts use only the batch and head (``slopes[h]``) once, before the tile loops."""
    names.hoisted.clear()
    scalar = {spec.roles["batch"], spec.roles["head"]}
    exprs = _exp2_parts(spec) + [spec.score, spec.dscore] + ([spec.mask] if spec.mask else []) + \
        [g.deriv for _, sites in spec.grads for g in sites] + \
        [x for th in spec.tanhs for x in (th.coef, th.offset) if x is not None]
    env = _tile_env(spec, names, VECTORS)
    for e in exprs:
        for node in e.walk():
            if node.op is Op.LOAD and node.free_indices() <= scalar and \
                    node not in names.hoisted and not any(x.op is Op.ROW for x in node.walk()):
                var = f"cap_{len(names.hoisted)}"
                L(depth, f"{var} = {render_at(L, depth, node, env)}  # loop-invariant read")
                names.hoisted[node] = var
    for th in spec.tanhs:
        if th.coef is not None:
            L(depth, f"# {th.var} = tanh(x): 2 x log2e = qk * {th.var}_c"
                     + ("" if is_zero(th.offset) else f" + {th.var}_o"))
            L(depth, f"{th.var}_c = {render_at(L, depth, th.coef, env)}")
            if not is_zero(th.offset):
                L(depth, f"{th.var}_o = {render_at(L, depth, th.offset, env)}")


def _emit_tanhs(L: Lines, spec: BackwardSpec, names: _Names, env: Env) -> None:
    """Each tanh of the score once per tile (``TanhForm``); later renders print its name."""
    for th in spec.tanhs:
        if th.coef is not None:
            arg2 = f"qk * {th.var}_c" + ("" if is_zero(th.offset) else f" + {th.var}_o")
        else:
            arg2 = render_at(L, 0, th.arg2_tile, env)
        L(0, f"{th.var} = 1.0 - _absorbed_div(2.0, tl.exp2({arg2}) + 1.0)  "
          "# tanh x = 1 - 2 / (e^2x + 1); 2^x + 1 >= 1 (codegen.expr._absorbed_quotient)")
        names.hoisted.update(dict.fromkeys(th.nodes, th.var))


def _finite(e: Expr) -> bool:
    """Whether ``e`` is finite wherever the tiles are (finite qk and indices): built from
    finite constants, the score, indices and integer reads by arithmetic that cannot
    overflow or divide by zero.  Then ``dT * e`` is 0 where P is 0 and needs no guard."""
    for x in e.walk():
        if x.op is Op.CONST and not math.isfinite(float(x.arg)):
            return False
        if x.op is Op.LOAD and x.dtype == FLOAT or x.op is Op.PARAM and x.arg != "scale":
            return False
        if x.op in (Op.DIV, Op.TRUEDIV) and not (x.src[1].op is Op.CONST and x.src[1].arg):
            return False
        if x.op not in _FINITE_OPS:
            return False
    return True


# operators whose value is finite when their operands are (DIV: by a nonzero constant)
_FINITE_OPS = {Op.CONST, Op.INDEX, Op.PARAM, Op.LOAD, Op.ROW, Op.NEG, Op.TANH, Op.SIGMOID,
               Op.ABS, Op.NOT, Op.CAST, Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.TRUEDIV, Op.MAX,
               Op.MIN, Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE, Op.AND, Op.OR, Op.WHERE}


def _emit_step(L: Lines, spec: BackwardSpec, names: _Names, kind: str) -> None:
    """One (query tile, key tile) step: recompute P, then dS.  ``kind`` is ``dkdv`` (key-major
    tiles; also dV, dK, the atomic dQ and captured gradients) or ``dq`` (query-major tiles).
    The mask is evaluated under the constexpr MASKED (partial tiles)."""
    o = KEY_MAJOR if kind == "dkdv" else QUERY_MAJOR
    start = "anchor_m"  # the split's anchor (_emit_anchor)
    env = _tile_env(spec, names, o, start)
    env.rows[QK_ROW] = "qk"
    r = o.row
    dq_dp = "dp = tl.dot(do, vT, input_precision=DOT_PRECISION)"
    if kind == "dq":
        L(0, "if DP_FIRST:  # dP = dO V^T ahead of the scores (the config's choice)")
        L(1, dq_dp)
    L(0, "# scores: S = scale * Q K^T, T = score_mod(S)")
    if kind == "dkdv":
        L(0, "qk = tl.dot(k, qT, input_precision=DOT_PRECISION)  # [keys, queries]")
        _emit_row_load(L, 0, "neg_lse2")
    else:
        L(0, "qk = tl.dot(q, kT, input_precision=DOT_PRECISION)")
    if _step_reads_score(spec, names):
        L(0, "s = qk * scale")
    _emit_tanhs(L, spec, names, env)
    L(0, "# P = exp(T - LSE) = exp2(T log2e + neg_lse2), neg_lse2 = -LSE log2e (-inf on empty "
         "rows: P = 0)")
    L(0, f"valid = {o.m_ok} & {o.n_ok}")
    if spec.mask is not None:
        L(0, "if MASKED:  # a partial tile: evaluate the mask")
        mask = lowered_mask(spec.mask, spec.roles["query"], spec.roles["key"])
        L(1, f"valid = valid & ({render_at(L, 1, mask, env)})")
    _emit_p(L, spec, names, o, env, kind, start)
    L(0, "p = tl.where(valid, p, 0.0)")
    if kind == "dkdv":
        L(0, "# dP = dO V^T; dT = P * (dP - delta), delta = rowsum(dO * O) - dLSE")
        L(0, "dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)")
        _emit_row_load(L, 0, "delta")
    else:
        L(0, "# dP = dO V^T; dT = P * (dP - delta), delta = rowsum(dO * O) - dLSE")
        L(0, "if not DP_FIRST:")
        L(1, dq_dp)
    L(0, f"dt = p * (dp - delta{r})")
    L(0, f"# dS = dT * dT/dS, dT/dS = {_one_line(spec.dscore)}")
    if spec.dscore.op is Op.CONST and spec.dscore.arg == 1.0:
        L(0, "ds = dt")
    elif spec.dscore.op is Op.CONST and spec.dscore.arg == 0.0:
        L(0, f"ds = tl.zeros({o.shape}, tl.float32)")
    elif _finite(spec.dscore):  # 0 where P is 0 (dT is)
        L(0, f"ds = dt * ({render_at(L, 0, spec.dscore, env)})")
    else:  # where P == 0, dT == 0: keep dT/dS's inf/nan (at T = -inf) out of the sums
        L(0, f"ds = tl.where(p != 0.0, dt * ({render_at(L, 0, spec.dscore, env)}), 0.0)")
    if kind == "dq":
        L(0, "# dQ += dS K (times scale at the end)")
        L(0, "dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=DOT_PRECISION)")
        return
    # dV's dot after dP's: with delta read late, sm90 and sm80 both hold fewer registers so
    # (dense D 64 on sm90: 143 with dV's first, 130; D 128 on sm80: 222, 172)
    L(0, "# dV += P^T dO; dK += dS^T Q (times scale at the end)")
    L(0, "dv += tl.dot(p.to(do.dtype), do, input_precision=DOT_PRECISION)")
    L(0, "dk += tl.dot(ds.to(qT.dtype), tl.trans(qT), input_precision=DOT_PRECISION)")
    L(0, "if ATOMIC_DQ:")
    L(1, "# dQ += scale * dS K: float32 atomics (other key tiles add to the same rows)")
    L(1, "dq_part = tl.dot(tl.trans(ds.to(k.dtype)), k, input_precision=DOT_PRECISION) * scale")
    L(1, "tl.atomic_add(" + _ptr("DQ", ["off_b", "off_h", "offs_m[:, None]", "offs_e[None, :]"])
      + ", dq_part, mask=m_ok[:, None] & e_ok[None, :])")
    for name, sites in spec.grads:
        for i, site in enumerate(sites):
            _emit_gather_grad(L, spec, names, name, i, site, o)


def _exp2_parts(spec: BackwardSpec) -> list[Expr]:
    """What the tile loops render of T log2e: all of it, or the split's tile and key parts
    (its query part is in neg_lse2, :func:`_emit_rows`)."""
    split = spec.log2_split
    if split is None or not split.separable:
        return [spec.log2_score]
    return [split.tile, split.cols]


def _step_reads_score(spec: BackwardSpec, names: _Names) -> bool:
    """Whether a tile step prints a read of S (``s``): the expressions it renders (a tanh's
    argument on the tile, the mask, T log2e or its split, dT/dS, the captured gradients), not
    looking under the nodes printed as a name (hoisted reads, the tanhs)."""
    exp2 = _exp2_parts(spec)
    named = set(names.hoisted) | {x for th in spec.tanhs for x in th.nodes}
    exprs = exp2 + [spec.dscore] + ([spec.mask] if spec.mask is not None else []) \
        + [g.deriv for _, sites in spec.grads for g in sites]
    tile_args = [th.arg2_tile for th in spec.tanhs if th.coef is None]
    return any(_reads_row(e, SCORE_ROW, named) for e in exprs) or \
        any(_reads_row(e, SCORE_ROW, set(names.hoisted)) for e in tile_args)


def _reads_row(e: Expr, row: str, skip: set[Expr]) -> bool:
    """Whether ``e`` reads ``ROW(row)`` outside the subtrees ``skip`` (printed as names)."""
    seen: set[Expr] = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x in skip or x in seen:
            continue
        seen.add(x)
        if x.op is Op.ROW and x.arg == row:
            return True
        stack.extend(x.src)
    return False


def _emit_p(L: Lines, spec: BackwardSpec, names: _Names, o: _Orient, env: Env,
            kind: str, start: str) -> None:
    """``p = exp2(T log2e + neg_lse2)``, neg_lse2 = -LSE log2e: the tile pays one multiply-add
    (stored as LSE log2e, its negation was an instruction per element: ptxas negated the loaded
    vector instead of folding the sign into the FFMA; sm80 causal D=64 dK/dV 190 -> 185 loop
    instructions, static SASS, triton 3.9).  With T log2e split (``spec.log2_split``), the
    query-only terms are already in neg_lse2 (the preprocess kernel folded them,
    :func:`_emit_rows`) and the key vector is added to it first, ``tile + (t_keys + neg_lse2)``,
    so that the tile pays one add and one multiply-add with ``qk`` (left to right it pays a
    multiply-add and two adds).  The dQ kernel's key vector is anchored at its query tile's
    anchor; the dK/dV kernel's at its own key tile (the same for every query tile of its
    loop), and each query tile adds the split's scalar ``shift`` between the two anchors to
    neg_lse2: one add per query of the tile instead of a conversion and a multiply-add (sm90
    ALiBi D 64: 417 -> 385 loop instructions)."""
    split = spec.log2_split
    r = o.row
    if split is None or not split.separable:
        L(0, f"p = tl.exp2({render_at(L, 0, spec.log2_score, env)} + neg_lse2{r})")
        return
    rest = f"neg_lse2{r}"
    if not is_zero(split.cols):
        key_start = "start_n" if kind == "dkdv" else start
        cols = render_at(L, 0, split.cols, _tile_env(spec, names, VECTORS, key_start))
        L(0, f"# the key-only terms of T log2e: {_one_line(split.cols)}")
        L(0, f"t_keys = {cols}")
        rest = "t_keys" + ("[:, None]" if o.m_axis == 1 else "[None, :]") + f" + neg_lse2{r}"
    if kind == "dkdv" and not is_zero(split.shift):
        _emit_anchor(L, 0, spec, split.shift)
        shift = render_at(L, 0, split.shift, _tile_env(spec, names, VECTORS, start))
        L(0, f"# the key vector's anchor is this program's key tile: {_one_line(split.shift)}")
        L(0, f"neg_lse2 = neg_lse2 + ({shift})")
    arg = rest if is_zero(split.tile) else f"{render_at(L, 0, split.tile, env)} + ({rest})"
    L(0, f"p = tl.exp2({arg})")


def _emit_anchor(L: Lines, depth: int, spec: BackwardSpec, part: Expr,
                 rows: str = "start_m") -> None:
    """``anchor_m``, the split's anchor ``mn.start`` (:func:`attndsl.passes.affine.split_axes`)
    for the query positions ``rows``, where ``part`` of the split reads it: the start of their
    ANCHOR_M-aligned block.  ANCHOR_M is a multiple of both kernels' BLOCK_M (the launcher
    passes the larger; both are powers of two), so a query tile has one anchor, the same in
    the preprocess kernel (per row) and in both loops, and ``|m - anchor| < ANCHOR_M`` keeps
    the query vector as small as a tile's offsets."""
    if any(x.op is Op.INDEX and x.arg == tile_start(spec.roles) for x in part.walk()):
        L(depth, f"anchor_m = ({rows} // ANCHOR_M) * ANCHOR_M  # the split's anchor")


def _emit_rows(L: Lines, depth: int, spec: BackwardSpec, names: _Names) -> None:
    """Fold the query-only terms of T log2e into neg_lse2 once per query row, in the preprocess
    kernel: exp2(tile + rows[m] + cols[n] + neg_lse2[m]) = exp2(tile + cols[n] + (neg_lse2 +
    rows)[m]).
    Captured reads are loaded where they are used (this kernel has no tile loop)."""
    split = spec.log2_split
    if split is None or not split.separable or is_zero(split.rows):
        return
    _emit_anchor(L, depth, spec, split.rows, "offs_m")
    env = _tile_env(spec, replace(names, hoisted={}), VECTORS, "anchor_m")
    rows = render_at(L, depth, split.rows, env)
    L(depth, f"# the query-only terms of T log2e: {_one_line(split.rows)}")
    L(depth, f"neg_lse2 = neg_lse2 + ({rows})")


def _emit_gather_grad(L: Lines, spec: BackwardSpec, names: _Names, name: str, i: int,
                      site: GatherGrad, o: _Orient) -> None:
    """Scatter dT * dT/dcap[site] to the element the site read: reduce over the tile axes the
    subscripts do not use, then one atomic add per element (a scalar add when the site only
    depends on the batch and head)."""
    ptr = names.grads[name]
    var = f"g_{ptr.lower()}_{i}"
    m, n = spec.roles["query"], spec.roles["key"]
    env = _tile_env(spec, names, o)
    L(0, f"if {_need(ptr)}:")
    L(1, comment(f"gradient of the captured tensor at {E.render(site.load)}: dT * "
                 f"{_one_line(site.deriv)}"))
    if site.deriv.op is Op.CONST and site.deriv.arg == 1.0:
        L(1, f"{var} = dt")
    elif _finite(site.deriv):  # 0 where P is 0 (dT is)
        L(1, f"{var} = dt * ({render_at(L, 1, site.deriv, env)})")
    else:
        L(1, f"{var} = tl.where(p != 0.0, dt * ({render_at(L, 1, site.deriv, env)}), 0.0)")
    deps = site.deps & {m, n}
    sub_env = _tile_env(spec, names, VECTORS)
    if deps == {m, n}:
        sub_env, value, mask = env, var, "valid"
    elif deps == {m}:
        value, mask = f"tl.sum({var}, {1 - o.m_axis})", "m_ok"
    elif deps == {n}:
        value, mask = f"tl.sum({var}, {o.m_axis})", "n_ok"
    else:
        value, mask = f"tl.sum(tl.sum({var}, 1), 0)", None
    offs = [f"({render(s, sub_env)})" for s in site.load.src]
    target = _at(names, ptr, offs) if offs else ptr
    L(1, f"tl.atomic_add({target}, {value}" + (f", mask={mask})" if mask else ")"))


def _ok(var: str, offs: str, length: str, even: str) -> str:
    """A validity vector; all true (folded away by the compiler) when ``even``: the length
    is a multiple of the tile."""
    return f"{var} = ({offs} < {length}) | {even}  # {even}: every position in range"


# -- kernels ----------------------------------------------------------------------------------

# G, the query heads per key/value head, is a constexpr: it only maps a program's query head
# to its key/value head (one compile per group size, a constant division; as the forward's
# CONSTEXPR_PARAMS)
_CONSTEXPR = ["BLOCK_M", "BLOCK_N", "BLOCK_E", "BLOCK_F", "SPARSITY", "SPARSE_Q", "SPARSE_KV",
              "DOT_PRECISION", "UPCAST", "G"]


def _emit_preprocess(L: Lines, spec: BackwardSpec, names: _Names) -> list[str]:
    args = (_tensor_args("O") + _tensor_args("DO") + _tensor_args("DLSE")
            + _tensor_args("DELTA") + _tensor_args("LSE") + _tensor_args("NEG_LSE2")
            + _captured_args(names, False) + ["scale", "n_heads", "M_len", "F_len"])
    # no G: the kernel reads query-head rows only (a score reads no parameter but the scale,
    # so the query-only terms never map a head to its key/value head): one compile for
    # every group size
    writer.signature(L, "attention_bwd_preprocess", args, ["BLOCK_M", "BLOCK_F", "ANCHOR_M"],
                     writer.OFFSET_FLAGS,
                     doc="delta[b, h, m] = sum(f) dO[b, h, m, f] * O[b, h, m, f] - "
                     "dLSE[b, h, m], in float32,\n    and neg_lse2 = -LSE log2e (-inf where LSE = "
                     "-inf: an empty row, whose P the loops then\n    compute as 0 without a "
                     "guard) plus the query-only terms of T log2e.", notes=_notes(),
                     specialised=ROW_STRIDES["attention_bwd_preprocess"])
    writer.program(L, "pid_m")
    _widen(L, ("O", "DO", "DLSE", "DELTA", "LSE", "NEG_LSE2"))
    L(1, "offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)\noffs_f = tl.arange(0, BLOCK_F)")
    L(1, "m_ok = offs_m < M_len")
    L(1, "tile_ok = m_ok[:, None] & (offs_f[None, :] < F_len)")
    rows = ["off_b", "off_h", "offs_m[:, None]", "offs_f[None, :]"]
    L(1, f"o = tl.load({_ptr('O', rows)}, mask=tile_ok, other=0.0).to(tl.float32)")
    L(1, f"do = tl.load({_ptr('DO', rows)}, mask=tile_ok, other=0.0).to(tl.float32)")
    L(1, f"dlse = tl.load({_ptr('DLSE', ['off_b', 'off_h', 'offs_m'])}, mask=m_ok, "
         f"other=0.0).to(tl.float32)")
    L(1, "delta = tl.sum(o * do, 1) - dlse")
    L(1, f"tl.store({_ptr('DELTA', ['off_b', 'off_h', 'offs_m'])}, delta, mask=m_ok)")
    L(1, f"lse = tl.load({_ptr('LSE', ['off_b', 'off_h', 'offs_m'])}, mask=m_ok, other=0.0)")
    L(1, f'neg_lse2 = tl.where(lse == float("-inf"), float("-inf"), lse * {literal(-LOG2E)})'
         f"  # -1/ln 2")
    _emit_rows(L, 1, spec, names)
    L(1, f"tl.store({_ptr('NEG_LSE2', ['off_b', 'off_h', 'offs_m'])}, neg_lse2, mask=m_ok)\n")
    return args


def _captured_args(names: _Names, with_grads: bool) -> list[str]:
    args: list[str] = []
    for ptr, rank in names.captured.values():
        args += [ptr, *names.strides[ptr]] + [f"{ptr}_n{d}" for d in range(rank)]
    if with_grads:
        for ptr in names.grads.values():
            args += [ptr, *names.strides[ptr]]
    return args


def _emit_query_side(L: Lines, depth: int, kind: str) -> None:
    """Loads of the query-side tiles of one (b, h, query tile): Q (as Q^T [E, BLOCK_M] in the
    key-major dK/dV kernel), dO; in the dQ kernel also the saved log-sum-exp and delta, which
    the dK/dV step reads where it uses them (:func:`_emit_row_load`)."""
    if kind == "dkdv":
        L(depth, "# query-side tiles: Q, dO (the log-sum-exp and delta where the step reads them)")
    else:
        L(depth, "# query-side tiles: Q, dO, the log-sum-exp in log2 units and delta")
    if kind == "dkdv":
        q, rows, cols = "qT", "[None, :]", "[:, None]"
    else:
        q, rows, cols = "q", "[:, None]", "[None, :]"
    ptr = _ptr("Q", ["off_b", "off_h", f"offs_m{rows}", f"offs_e{cols}"])
    L(depth, f"{q} = tl.load({ptr}, mask=m_ok{rows} & e_ok{cols}, other=0.0)")
    L(depth, f"do = tl.load({_ptr('DO', ['off_b', 'off_h', 'offs_m[:, None]', 'offs_f[None, :]'])}"
             f", mask=m_ok[:, None] & f_ok[None, :], other=0.0)")
    L(depth, "if UPCAST:  # the interpreter has no bf16 arithmetic")
    L(depth + 1, f"{q} = {q}.to(tl.float32)\ndo = do.to(tl.float32)")
    if kind == "dq":
        _emit_row_load(L, depth, "neg_lse2")
        _emit_row_load(L, depth, "delta")


def _emit_row_load(L: Lines, depth: int, row: str) -> None:
    """``neg_lse2`` (minus the log-sum-exp in log2 units, -inf past the rows) or ``delta`` of
    the query tile.  The dK/dV step reads each just before its use, neg_lse2 after the QK^T
    dot and delta after dP's: a row vector of the key-major tile spans every thread's columns,
    so one loaded early stays live across the dots (sm90, dense D 64: 154 -> 143 registers)."""
    table, other = ("NEG_LSE2", 'float("-inf")') if row == "neg_lse2" else ("DELTA", "0.0")
    ptr = _ptr(table, ['off_b', 'off_h', 'offs_m'])
    L(depth, f"{row} = tl.load({ptr}, mask=m_ok, other={other})")


def _emit_key_side(L: Lines, depth: int, kind: str) -> None:
    """Loads of the key-side tiles of one (b, kv head, key tile): K, V as [BLOCK_N, E] in the
    dK/dV kernel, as K^T, V^T [E, BLOCK_N] in the dQ kernel."""
    if kind == "dkdv":
        names, idx, ok = ("k", "v"), ("offs_n[:, None]", "offs_e[None, :]", "offs_f[None, :]"), \
            "n_ok[:, None]"
        lens = ("e_ok[None, :]", "f_ok[None, :]")
    else:
        names, idx, ok = ("kT", "vT"), ("offs_n[None, :]", "offs_e[:, None]", "offs_f[:, None]"), \
            "n_ok[None, :]"
        lens = ("e_ok[:, None]", "f_ok[:, None]")
    for var, ptr, col, length in zip(names, ("K", "V"), idx[1:], lens):
        L(depth, f"{var} = tl.load({_ptr(ptr, ['off_b', 'off_hkv', idx[0], col])}, "
                 f"mask={ok} & {length}, other=0.0)")
    L(depth, "if UPCAST:")
    L(depth + 1, f"{names[0]} = {names[0]}.to(tl.float32)\n{names[1]} = {names[1]}.to(tl.float32)")


def _emit_loops(L: Lines, depth: int, spec: BackwardSpec, step: writer.Step,
                over: str) -> None:
    """The SPARSITY branches of a loop over query tiles (``over='m'``, the q-major tables) or
    key tiles ('n', the kv-major ones, as the forward)."""
    if over == "m":
        writer.sparsity_loops(L, depth, step, spec.mask is not None, "q_",
                              "(pid_n * BLOCK_N) // SPARSE_KV", "SPARSE_Q", "BLOCK_M", "start_m",
                              "M_len")
    else:
        writer.sparsity_loops(L, depth, step, spec.mask is not None, "kv_",
                              "(pid_m * BLOCK_M) // SPARSE_Q", "SPARSE_KV", "BLOCK_N", "start_n",
                              "N_len")


def _emit_dkdv(L: Lines, spec: BackwardSpec, names: _Names) -> list[str]:
    args = (_tensor_args("Q") + _tensor_args("K") + _tensor_args("V")
            + _tensor_args("DO") + _tensor_args("NEG_LSE2") + _tensor_args("DELTA")
            + _tensor_args("DQ") + _tensor_args("DK") + _tensor_args("DV")
            + _captured_args(names, True)
            + ["scale", "n_heads", "n_kv_heads", "M_len", "N_len", "E_len", "F_len"]
            + writer.table_args("q_"))
    const = _CONSTEXPR + ["ANCHOR_M", "ATOMIC_DQ"] + [_need(p) for p in names.grads.values()]
    steps = Lines()  # the step function, printed above the kernel
    at = len(L.out)
    writer.signature(L, "attention_bwd_dkdv_kernel", args, const, writer.EVEN,
                     "One program: BLOCK_N keys of one (batch, key/value head).  Loops over "
                     "the G query\nheads of the group and over the query tiles (SPARSITY 0 = "
                     "every tile unmasked, 1 = every\ntile masked, 2 = q-major block tables); "
                     "dK and dV sum in registers, dQ (ATOMIC_DQ) and\ncaptured-tensor gradients "
                     "are float32 atomic adds.", notes=_notes(),
                     specialised=ROW_STRIDES["attention_bwd_dkdv_kernel"])
    writer.program(L, "pid_n", "pid_bhkv", "n_kv_heads", "off_hkv")
    _widen(L, ("Q", "K", "V", "DO", "NEG_LSE2", "DELTA", "DQ", "DK", "DV"))
    L(1, "start_n = pid_n * BLOCK_N\noffs_n = start_n + tl.arange(0, BLOCK_N)")
    L(1, "offs_e = tl.arange(0, BLOCK_E)\noffs_f = tl.arange(0, BLOCK_F)")
    L(1, _ok("e_ok", "offs_e", "E_len", "EVEN_E"))
    L(1, _ok("f_ok", "offs_f", "F_len", "EVEN_F"))
    L(1, _ok("n_ok", "offs_n", "N_len", "EVEN_N"))
    L(1, "# key-side tiles, loaded once")
    _emit_key_side(L, 1, "dkdv")
    L(1, "dk = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)")
    L(1, "dv = tl.zeros([BLOCK_N, BLOCK_F], tl.float32)")
    L(1, "for g in range(0, G):")
    L(2, "# query head of the group (GQA: dK and dV sum over the G heads)")
    L(2, "off_h = off_hkv * G + g")
    _hoist_loads(L, 2, spec, names)

    body = Lines()
    body(0, "offs_m = start_m + tl.arange(0, BLOCK_M)")
    body(0, _ok("m_ok", "offs_m", "M_len", "EVEN_M"))
    _emit_query_side(body, 0, "dkdv")
    _emit_step(body, spec, names, "dkdv")
    call = writer.step_function(steps, "_dkdv_step", "\n".join(body.out), ["dk", "dv"],
                                L.out[at:], args, const + list(writer.EVEN), "start_m",
                                "One query tile [start_m, start_m + BLOCK_M) of the key tile's "
                                "loop")
    _emit_loops(L, 2, spec, lambda L2, depth, masked: L2(depth, call(masked)), "m")
    L(1, "# store dK = scale * sum dS^T Q and dV = sum P^T dO")
    L(1, "dk = dk * scale")
    rows = ["off_b", "off_hkv", "offs_n[:, None]"]
    L(1, f"tl.store({_ptr('DK', rows + ['offs_e[None, :]'])}, dk.to(dk_ptr.dtype.element_ty), "
         f"mask=n_ok[:, None] & e_ok[None, :])")
    L(1, f"tl.store({_ptr('DV', rows + ['offs_f[None, :]'])}, dv.to(dv_ptr.dtype.element_ty), "
         f"mask=n_ok[:, None] & f_ok[None, :])\n")
    L.out[at:at] = steps.out
    return args


def _emit_dq(L: Lines, spec: BackwardSpec, names: _Names) -> list[str]:
    args = (_tensor_args("Q") + _tensor_args("K") + _tensor_args("V")
            + _tensor_args("DO") + _tensor_args("NEG_LSE2") + _tensor_args("DELTA")
            + _tensor_args("DQ") + _captured_args(names, False)
            + ["scale", "n_heads", "M_len", "N_len", "E_len", "F_len"]
            + writer.table_args("kv_"))
    const = _CONSTEXPR + ["ANCHOR_M", "DP_FIRST"]
    steps = Lines()  # the step function, printed above the kernel
    at = len(L.out)
    writer.signature(L, "attention_bwd_dq_kernel", args, const, writer.EVEN,
                     "One program: BLOCK_M query rows of one (batch, head); loops over the "
                     "key tiles\n(as the forward) and writes dQ = scale * sum dS K without "
                     "atomics (deterministic).", notes=_notes(),
                     specialised=ROW_STRIDES["attention_bwd_dq_kernel"])
    writer.program(L, "pid_m")
    _widen(L, ("Q", "K", "V", "DO", "NEG_LSE2", "DELTA", "DQ"))
    L(1, "off_hkv = off_h // G")
    _hoist_loads(L, 1, spec, names)
    L(1, "start_m = pid_m * BLOCK_M\noffs_m = start_m + tl.arange(0, BLOCK_M)")
    L(1, "offs_e = tl.arange(0, BLOCK_E)\noffs_f = tl.arange(0, BLOCK_F)")
    L(1, _ok("e_ok", "offs_e", "E_len", "EVEN_E"))
    L(1, _ok("f_ok", "offs_f", "F_len", "EVEN_F"))
    L(1, _ok("m_ok", "offs_m", "M_len", "EVEN_M"))
    _emit_query_side(L, 1, "dq")
    split = spec.log2_split
    if split is not None and split.separable:
        _emit_anchor(L, 1, spec, split.cols)
    L(1, "dq = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)")

    body = Lines()
    body(0, "offs_n = start_n + tl.arange(0, BLOCK_N)")
    body(0, _ok("n_ok", "offs_n", "N_len", "EVEN_N"))
    _emit_key_side(body, 0, "dq")
    _emit_step(body, spec, names, "dq")
    call = writer.step_function(steps, "_dq_step", "\n".join(body.out), ["dq"], L.out[at:],
                                args, const + list(writer.EVEN), "start_n",
                                "One key tile [start_n, start_n + BLOCK_N) of the query tile's "
                                "loop")
    _emit_loops(L, 1, spec, lambda L2, depth, masked: L2(depth, call(masked)), "n")
    L(1, "dq = dq * scale")
    L(1, f"tl.store({_ptr('DQ', ['off_b', 'off_h', 'offs_m[:, None]', 'offs_e[None, :]'])}, "
         f"dq.to(dq_ptr.dtype.element_ty), mask=m_ok[:, None] & e_ok[None, :])\n")
    L.out[at:at] = steps.out
    return args


def generate_backward(c: Cascade, version: str) -> str:
    """The full source of the backward module of a FlexAttention cascade."""
    spec = backward_spec(c)
    names = _names(spec)
    digest = hashlib.sha256(str(c).encode()).hexdigest()[:16]
    reset_spills()
    L = Lines()
    writer.prologue(L, f"backward of spec hash: {digest}\n\nCascade:\n{c}\n\nBackward:\n{spec}",
                    "Backward kernels of a fused attention kernel generated by attndsl; needs "
                    "only torch and triton.", digest, version)
    L(0, "# captured tensor name -> (kernel pointer, rank)")
    L(0, "CAPTURED = " + repr(names.captured))
    L(0, "# captured tensor name -> kernel pointer of its float32 gradient buffer")
    L(0, "GRADS = " + repr(names.grads))
    L(0, "HAS_MASK = " + repr(spec.mask is not None))
    L(0, HELPERS)
    args = {"attention_bwd_preprocess": _emit_preprocess(L, spec, names),
            "attention_bwd_dkdv_kernel": _emit_dkdv(L, spec, names),
            "attention_bwd_dq_kernel": _emit_dq(L, spec, names)}
    writer.kernel_args(L, args)
    L(0, writer.row_strides_note(ROW_STRIDES) + "\n")
    L(0, writer.launcher_sources("backward_launcher.py",
                                 (writer.COMMON, writer.BLOCK_TABLES, writer.BY_NAME)))
    return "\n".join(L.out) + "\n"
