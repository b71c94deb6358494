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

from attndsl.ir.expr import Expr, render


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
            lines.append(f"  key-tile segment {i + 1} in closed form: " + ", ".join(
                f"{n} = {render(b)}" for n, b in zip(("lo", "full_lo", "full_hi", "hi"), seg)))
        for st in self.stores:
            lines.append(f"  store {st.name}[{', '.join(st.indices)}] = {render(st.expr)}")
        return "\n".join(lines)
