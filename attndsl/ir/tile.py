"""The Tile IR: a scheduled attention kernel as loops over tiles.

One program owns ``BLOCK_M`` query rows of one (batch, head).  It loads its query operands
once, then runs each pass of the schedule as a loop over key tiles (``BLOCK_N`` keys): load the
key operands, form the dot products, evaluate the score expressions, apply the mask on partial
tiles only, and update running maxima and running sums (rescaled by ``2^(k*(old - new))``).
After the last pass it evaluates the outputs from the finished rows and stores them.

Expressions here are Cascade-IR expressions in which ``ROW(name)`` names a kernel value:
a dot-product tile (``qk0``), a running reduction (``l0``, ``mx0``) or its safe form
(``mx0.safe``: 0 where every key was masked).
"""

from __future__ import annotations

from dataclasses import dataclass

from attndsl.ir.expr import INT, Expr, IRError, Op, render


@dataclass(frozen=True)
class Operand:
    """A Q-, K- or V-side input tile: ``tensor[idx...]`` where one index is the tile row
    (query or key), one the feature column (qk or v), the rest scalar (batch/head) offsets."""

    var: str  # kernel variable, e.g. "q0"
    tensor: str  # IR tensor name
    side: str  # "q" | "k" | "v"
    idx: tuple[Expr, ...]
    row_dim: int
    col_dim: int


@dataclass(frozen=True)
class Dot:
    """``var = sum(e) q[m, e] * k[n, e]``: a [BLOCK_M, BLOCK_N] fp32 tile."""

    var: str
    q: Operand
    k: Operand


@dataclass(frozen=True)
class RunningMax:
    var: str
    arg: Expr  # over the tile (m, n)
    floor0: bool
    stabilizer: bool


@dataclass(frozen=True)
class RunningSum:
    """``var`` accumulates sum over keys of ``body`` (times the V tile when ``v`` is set),
    rescaled by ``2^(k * (old - new))`` of each stabiliser in ``units``."""

    var: str
    body: Expr
    v: Operand | None
    units: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class KVPass:
    maxes: tuple[RunningMax, ...]
    sums: tuple[RunningSum, ...]


@dataclass(frozen=True)
class Store:
    """An output: ``tensor[idx...] = expr`` with rows over the query index, and columns over
    the v index when ``tile`` is set."""

    name: str
    indices: tuple[str, ...]
    expr: Expr
    tile: bool


@dataclass(frozen=True)
class TileKernel:
    name: str
    roles: dict[str, str]  # role -> index name
    operands: tuple[Operand, ...]
    dots: tuple[Dot, ...]
    passes: tuple[KVPass, ...]
    stores: tuple[Store, ...]
    mask: Expr | None
    params: tuple[tuple[str, str], ...]  # (IR name, dtype) of scalar arguments used
    captured: tuple[tuple[str, int, str], ...]  # (IR name, rank, dtype) of captured tensors
    tensor_dims: tuple[tuple[str, tuple[str, ...]], ...]  # (tensor, extent name of each dim)
    index_extents: tuple[tuple[str, str], ...]  # (index name, extent name)
    param_defaults: tuple[tuple[str, float | int], ...]
    spec_text: str = ""
    # closed-form key-tile segments (lo, full_lo, full_hi, hi), in order, of query tile ``qt``
    # in units of BOUNDS_BLOCK keys (over INDEX qt, PARAM M = Lq, PARAM N = Lkv), when the
    # mask has them
    bounds: tuple[tuple[Expr, Expr, Expr, Expr], ...] | None = None
    # subscripts of tensor reads checked at launch (attndsl.passes.index_bounds.IndexSite)
    index_sites: tuple = ()
    # (name, dtype) of every parameter the cascade declares, used or not: the names a launch
    # accepts in ``params`` and the type each must have
    declared_params: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        lines = [f"kernel {self.name}: for each (b, h, query tile)"]
        for o in self.operands:
            where = "once" if o.side == "q" else "per key tile"
            lines.append(f"  load {o.var} = {o.tensor}[{', '.join(render(i) for i in o.idx)}] "
                         f"({where})")
        for d in self.dots:
            lines.append(f"  {d.var} = dot({d.q.var}, {d.k.var}^T)")
        for i, p in enumerate(self.passes):
            lines.append(f"  pass {i + 1}: for key tile in [lo, hi):")
            for mx in p.maxes:
                lines.append(f"    {mx.var} = max({mx.var}, rowmax({render(mx.arg)}))")
            for s in p.sums:
                scale = " * ".join(f"2^({k}*d{u})" for u, k in s.units) or "1"
                v = f" @ {s.v.var}" if s.v is not None else ""
                lines.append(f"    {s.var} = {s.var} * {scale} + rowsum({render(s.body)}){v}")
        if self.mask is not None:
            lines.append(f"  mask (partial tiles only): {render(self.mask)}")
        for i, seg in enumerate(self.bounds or ()):
            head = f"  key-tile segment {i + 1} in closed form: "
            if seg[1] == seg[2] == seg[3]:  # the tiling pass's edge_full_only segments
                lines.append(f"{head}lo = {render(seg[0])}, hi = {render(seg[3])}, every tile "
                             f"partial")
                continue
            lines.append(head + ", ".join(
                f"{n} = {render(b)}" for n, b in zip(("lo", "full_lo", "full_hi", "hi"), seg)))
        for st in self.stores:
            lines.append(f"  store {st.name}[{', '.join(st.indices)}] = {render(st.expr)}")
        return "\n".join(lines)


# -- verifier --------------------------------------------------------------------------------

def verify(k: TileKernel) -> TileKernel:
    """Check a TileKernel's invariants; raise IRError naming the kernel part otherwise.

    * the roles name declared indices, with a query and a key index;
    * every operand reads a declared input tensor with one subscript per dimension, its tile
      row is the query (Q side) or key (K, V sides) index, its column the qk (Q, K) or v (V)
      index; kernel variables (operands, dots, running reductions) are unique;
    * a dot multiplies a Q-side by a K-side operand of the kernel;
    * a ``ROW`` read names a value defined before it: inside pass ``i``, a dot product, a
      stabilising running max of pass ``i`` or a running reduction of an earlier pass (maxima
      also in their ``.safe`` form); in a store, any running reduction; a rescaling unit names
      a stabiliser of its own pass; the mask reads no kernel value;
    * tile expressions depend only on batch, head, query and key indices (stores: not the key),
      read no input tensor (those come in through operands) and hold no reduction;
    * parameters and captured tensors used are declared (captured: with their rank);
    * every store is indexed by the query index, is a tile exactly when indexed by v, and a
      store that reads a value product is a tile;
    * closed-form bounds have four expressions per segment.
    """
    where = f"tile kernel {k.name!r}"
    index_names = {i for i, _ in k.index_extents}
    roles = k.roles
    for role, name in roles.items():
        if name not in index_names:
            raise IRError(f"{where}: role {role} names {name!r}, which is not a kernel index "
                          f"({sorted(index_names)})")
    for role in ("query", "key"):
        if role not in roles:
            raise IRError(f"{where}: no {role} index among the roles {dict(roles)}")
    _verify_operands(k, where)
    defined = _verify_dots(k, where)
    tile_ok = {roles[r] for r in ("batch", "head", "query", "key") if r in roles}
    finished: set[str] = set()
    v_sums: set[str] = set()
    for i, p in enumerate(k.passes):
        here = f"{where}, pass {i + 1}"
        stabs = {mx.var for mx in p.maxes if mx.stabilizer}
        visible = defined | finished | stabs
        for mx in p.maxes:
            _verify_expr(k, f"{here}, max {mx.var}", mx.arg, visible, tile_ok)
        for s in p.sums:
            _verify_expr(k, f"{here}, sum {s.var}", s.body, visible, tile_ok)
            for u, _ in s.units:
                if u not in stabs:
                    raise IRError(f"{here}, sum {s.var}: rescaled by {u!r}, which is not a "
                                  f"stabilising max of this pass ({sorted(stabs)})")
            if s.v is not None:
                if s.v.side != "v" or s.v not in k.operands:
                    raise IRError(f"{here}, sum {s.var}: its value operand {s.v.var} is not a "
                                  f"V-side operand of the kernel")
                v_sums.add(s.var)
        for var in [mx.var for mx in p.maxes] + [s.var for s in p.sums]:
            if var in defined or var in finished:
                raise IRError(f"{here}: {var!r} is defined twice")
        finished |= {mx.var for mx in p.maxes} | {f"{mx.var}.safe" for mx in p.maxes}
        finished |= {s.var for s in p.sums}
    if k.mask is not None:
        if k.mask.dtype != "bool":
            raise IRError(f"{where}: the mask must be boolean, got {k.mask.dtype}")
        _verify_expr(k, f"{where}, mask", k.mask, set(), tile_ok)
    _verify_stores(k, where, finished, v_sums, tile_ok - {roles["key"]})
    for i, seg in enumerate(k.bounds or ()):
        if len(seg) != 4:
            raise IRError(f"{where}: closed-form key-tile segment {i + 1} has {len(seg)} "
                          f"bounds; expected lo, full_lo, full_hi, hi")
    return k


def _verify_operands(k: TileKernel, where: str) -> None:
    dims = dict(k.tensor_dims)
    captured = {c for c, _, _ in k.captured}
    row_role = {"q": "query", "k": "key", "v": "key"}
    col_role = {"q": "qk", "k": "qk", "v": "v"}
    seen: set[str] = set()
    for o in k.operands:
        what = f"{where}, operand {o.var} = {o.tensor}[{', '.join(render(i) for i in o.idx)}]"
        if o.var in seen:
            raise IRError(f"{what}: the variable {o.var!r} is defined twice")
        seen.add(o.var)
        if o.side not in row_role:
            raise IRError(f"{what}: side {o.side!r}; expected q, k or v")
        if o.tensor not in dims or o.tensor in captured:
            raise IRError(f"{what}: {o.tensor!r} is not a declared input tensor")
        if len(o.idx) != len(dims[o.tensor]):
            raise IRError(f"{what}: {o.tensor} has rank {len(dims[o.tensor])} but {len(o.idx)} "
                          f"subscripts")
        scalar = {k.roles[r] for r in ("batch", "head") if r in k.roles}
        for i, s in enumerate(o.idx):
            if i not in (o.row_dim, o.col_dim):
                _verify_expr(k, f"{what}, subscript {i}", s, set(), scalar)
        for dim, role in ((o.row_dim, row_role[o.side]), (o.col_dim, col_role[o.side])):
            name = k.roles.get(role)
            ok = 0 <= dim < len(o.idx) and o.idx[dim].op is Op.INDEX and o.idx[dim].arg == name
            if not ok or o.row_dim == o.col_dim:
                raise IRError(f"{what}: subscript {dim} must be the {role} index {name!r}")


def _verify_dots(k: TileKernel, where: str) -> set[str]:
    defined: set[str] = set()
    operands = {o.var for o in k.operands}
    for d in k.dots:
        if d.var in defined or d.var in operands:
            raise IRError(f"{where}: dot {d.var!r} is defined twice")
        if d.q.side != "q" or d.k.side != "k":
            raise IRError(f"{where}: dot {d.var} = dot({d.q.var}, {d.k.var}^T) must multiply a "
                          f"Q-side by a K-side operand")
        if d.q not in k.operands or d.k not in k.operands:
            raise IRError(f"{where}: dot {d.var} reads an operand the kernel does not load")
        defined.add(d.var)
    return defined


def _verify_expr(k: TileKernel, what: str, e: Expr, visible: set[str],
                 allowed: set[str]) -> None:
    params = dict(k.params)
    captured = {c: rank for c, rank, _ in k.captured}
    for node in e.walk():
        if node.op is Op.ROW and node.arg not in visible:
            raise IRError(f"{what}: reads %{node.arg} before it is defined (visible here: "
                          f"{sorted(visible) or 'none'})")
        if node.op is Op.PARAM and node.arg not in params:
            raise IRError(f"{what}: parameter {node.arg!r} is not among the kernel's scalar "
                          f"arguments {sorted(params)}")
        if node.op is Op.LOAD:
            if node.arg not in captured:
                raise IRError(f"{what}: reads tensor {node.arg!r} outside an operand "
                              f"({render(node)}); only captured tensors may be gathered")
            if len(node.src) != captured[node.arg]:
                raise IRError(f"{what}: {node.arg} has rank {captured[node.arg]} but is "
                              f"indexed with {len(node.src)} subscripts")
        if node.op in (Op.REDUCE_SUM, Op.REDUCE_MAX, Op.SOFTMAX):
            raise IRError(f"{what}: holds a reduction over {node.arg!r} ({render(node)}), "
                          f"which a tile cannot evaluate")
    extra = e.free_indices() - allowed
    if extra:
        raise IRError(f"{what}: depends on {sorted(extra)}; a tile holds only "
                      f"{sorted(allowed)}")


def _verify_stores(k: TileKernel, where: str, finished: set[str], v_sums: set[str],
                   allowed: set[str]) -> None:
    m, f = k.roles["query"], k.roles.get("v")
    index_names = {i for i, _ in k.index_extents}
    inputs = {t for t, _ in k.tensor_dims}
    seen: set[str] = set()
    for st in k.stores:
        what = f"{where}, store {st.name}[{', '.join(st.indices)}]"
        if st.name in seen or st.name in inputs:
            raise IRError(f"{what}: {st.name!r} is stored twice or is also an input")
        seen.add(st.name)
        unknown = [i for i in st.indices if i not in index_names]
        if unknown or len(set(st.indices)) != len(st.indices):
            raise IRError(f"{what}: indices must be distinct kernel indices "
                          f"({sorted(index_names)})")
        if m not in st.indices:
            raise IRError(f"{what}: must be indexed by the query index {m!r}")
        if st.tile != (f is not None and f in st.indices):
            raise IRError(f"{what}: a store is a [rows, v] tile exactly when indexed by the v "
                          f"index {f!r}")
        _verify_expr(k, what, st.expr, finished, allowed | ({f} if st.tile else set()))
        reads_v = {n.arg for n in st.expr.walk() if n.op is Op.ROW} & v_sums
        if reads_v and not st.tile:
            raise IRError(f"{what}: reads the value product(s) {sorted(reads_v)} but is not a "
                          f"tile over {f!r}")


def head_params(k: TileKernel) -> tuple[str, ...]:
    """The integer parameters the kernel reads only in its operands' head subscripts (those
    reading the head index and no other: ``K[b, h // G, n, e]``, the group size of
    grouped-query attention), which the forward and fused backward printers make constexprs
    (codegen/triton.py, codegen/tile_backward.py).

    Such a parameter only chooses which head of K/V one program reads: it is part of the
    per-program base offset and of nothing per tile, and it is fixed by the model's head
    counts, so one compile per value is cheap (as a launch already specialises on dtypes and
    the EVEN flags).  A constant divisor is a multiply-high instead of the runtime integer
    division, whose registers were the peak of the sm80 GQA kernel (194 against 182 with G
    constant).  A parameter read anywhere else stays a runtime argument: a score, the mask, a
    captured read, the closed-form bounds, a row or column subscript (one compile per window
    size or offset), or a batch subscript (decode's ``K[b // KVB]``, KVB = splits x batch
    for a page pool: one compile per batch size)."""
    head = k.roles.get("head")
    per_head, elsewhere = [], []
    for o in k.operands:
        for d, idx in enumerate(o.idx):
            own = d not in (o.row_dim, o.col_dim) and idx.free_indices() == {head}
            (per_head if own else elsewhere).append(idx)
    elsewhere += [mx.arg for p in k.passes for mx in p.maxes]
    elsewhere += [s.body for p in k.passes for s in p.sums] + [s.expr for s in k.stores]
    elsewhere += ([k.mask] if k.mask is not None else []) + \
        [e for seg in (k.bounds or ()) for e in seg]

    def read(exprs: list[Expr]) -> set[str]:
        return {x.arg for e in exprs for x in e.walk() if x.op is Op.PARAM}
    ints = {p for p, dt in k.params if dt == INT}
    return tuple(p for p, _ in k.params if p in ints & read(per_head) - read(elsewhere))
