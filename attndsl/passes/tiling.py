"""Lower a streaming Schedule to the Tile IR: find the operands, the dot products and the
value products, and check that what is left is elementwise over a (query, key) tile.

* ``sum(e) A[.., m, .., e] * B[.., n, .., e]`` (e the qk index)  ->  ``Dot`` of two operands
* a running sum whose body is ``p * V[.., n, .., f]``            ->  ``p @ V`` on the tensor cores
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from attndsl.ir import expr as E
from attndsl.ir.cascade import Cascade
from attndsl.ir.expr import Expr, IRError, Op
from attndsl.ir.tile import Dot, KVPass, Operand, RunningMax, RunningSum, Store, TileKernel
from attndsl.passes import terms as T
from attndsl.passes.index_bounds import cascade_sites, wrap_captured
from attndsl.passes.mask import SPARSE_BLOCK, closed_form_segments
from attndsl.passes.stream import Reduction, Schedule


class LoweringError(IRError):
    """The schedule does not fit the attention kernel template; the message says why.

    ``tensors`` names the tensors the problem is about and ``subject`` what was being lowered
    (``("output", O)``, ``("reduction", l0)`` or ``("mask", None)``), so that
    :func:`~attndsl.passes.pipeline.compile_cascade` can point at the equation to blame."""

    def __init__(self, what: str, tensors: tuple[str, ...] = ()) -> None:
        super().__init__(what)
        self.tensors = tensors
        self.subject: tuple[str, str | None] | None = None


@contextmanager
def _lowering(kind: str, name: str | None) -> Iterator[None]:
    """Tag a LoweringError raised inside with what was being lowered."""
    try:
        yield
    except LoweringError as err:
        if err.subject is None:
            err.subject = (kind, name)
        raise


def _operand(load: Expr, c: Cascade, row: str, col: str, side: str, var: str) -> Operand:
    decl = c.tensor(load.arg)
    if decl is None or decl.kind != "input":
        raise LoweringError(f"{E.render(load)}: only input tensors can feed a dot product",
                            (load.arg,))
    rows = [i for i, s in enumerate(load.src) if s.op is Op.INDEX and s.arg == row]
    cols = [i for i, s in enumerate(load.src) if s.op is Op.INDEX and s.arg == col]
    if len(rows) != 1 or len(cols) != 1:
        raise LoweringError(f"{E.render(load)}: a {side}-side operand must be indexed by "
                            f"{row} and {col} directly, once each", (load.arg,))
    for i, s in enumerate(load.src):
        if i not in (rows[0], cols[0]) and s.free_indices() - {c.role("batch"), c.role("head")}:
            raise LoweringError(f"{E.render(load)}: subscript {E.render(s)} may only use the "
                                f"batch and head indices", (load.arg,))
    return Operand(var, load.arg, side, load.src, rows[0], cols[0])


def _loads(e: Expr) -> tuple[str, ...]:
    """The tensors ``e`` reads, in order of first appearance."""
    return tuple(dict.fromkeys(x.arg for x in e.walk() if x.op is Op.LOAD))


def _closed_form_bounds(mask: Expr | None, roles: dict[str, str]) -> tuple | None:
    """Segments (lo, full_lo, full_hi, hi) of each query block's key blocks, in blocks of
    SPARSE_BLOCK, when the mask has closed forms for them (the kernel then computes them).  A
    segment whose full blocks can only be cut short by M or N (``edge_full_only``: a window
    narrower than two blocks) is (lo, hi, hi, hi), every block partial: the kernel's key-tile
    loop over it is then one masked loop, and masking a full block is only extra work."""
    if mask is None or (roles["query"], roles["key"]) != ("m", "n"):
        return None
    segs = closed_form_segments(mask, SPARSE_BLOCK, SPARSE_BLOCK)
    if segs is None:
        return None
    return tuple((b.lo, b.hi, b.hi, b.hi) if b.edge_full_only else
                 (b.lo, b.full_lo, b.full_hi, b.hi) for b in segs)


def _wrapped(schedule: Schedule, c: Cascade) -> Schedule:
    """The schedule with torch's wrap of negative subscripts of captured tensors explicit."""
    def wrap(x: Expr) -> Expr:
        return wrap_captured(x, c)
    passes = tuple(tuple(replace(r, body=wrap(r.body)) for r in p) for p in schedule.passes)
    outputs = tuple((name, idx, wrap(x)) for name, idx, x in schedule.outputs)
    mask = None if schedule.mask is None else wrap(schedule.mask)
    return replace(schedule, passes=passes, outputs=outputs, mask=mask)


def _schedule_exprs(schedule: Schedule) -> list[Expr]:
    return [r.body for p in schedule.passes for r in p] + [x for _, _, x in schedule.outputs] \
        + ([schedule.mask] if schedule.mask is not None else [])


def lower_to_tiles(schedule: Schedule, c: Cascade) -> TileKernel:
    """The tile kernel of a schedule; subscripts of tensor reads that are not proven in range
    become ``index_sites`` (checked at launch), and negative ones of captured tensors wrap."""
    sites = cascade_sites(c, _schedule_exprs(schedule))
    bounds = _closed_form_bounds(schedule.mask, {i.role: i.name for i in c.indices})
    schedule = _wrapped(schedule, c)
    roles = {i.role: i.name for i in c.indices}
    m, n = roles["query"], roles["key"]
    e, f = roles.get("qk"), roles.get("v")
    operands: dict[tuple[str, str, tuple[Expr, ...]], Operand] = {}
    dots: dict[Expr, Dot] = {}

    def operand(load: Expr, row: str, col: str, side: str) -> Operand:
        k = (side, load.arg, load.src)
        if k not in operands:
            count = sum(1 for o in operands.values() if o.side == side)
            operands[k] = _operand(load, c, row, col, side, f"{side}{count}")
        return operands[k]

    def replace_dots(x: Expr) -> Expr:
        def visit(node: Expr) -> Expr | None:
            if node.op is not Op.REDUCE_SUM or node.arg != e:
                return None
            body = node.src[0]
            if body.op is not Op.MUL or {s.op for s in body.src} != {Op.LOAD}:
                raise LoweringError(f"sum({e}) must be a product of a query-side and a key-side "
                                    f"tensor, got {E.render(body)}", _loads(body))
            a, b = body.src
            if m not in a.free_indices():
                a, b = b, a
            if node not in dots:
                q = operand(a, m, e, "q")
                k = operand(b, n, e, "k")
                dots[node] = Dot(f"qk{len(dots)}", q, k)
            return E.row(dots[node].var)
        return x.replace(visit)

    def check_elementwise(x: Expr, what: str, allowed: set[str]) -> None:
        for node in x.walk():
            if node.op is Op.LOAD and c.tensor(node.arg) is not None and \
                    c.tensor(node.arg).kind == "input":
                raise LoweringError(f"{what}: input {node.arg} is used outside a dot product "
                                    f"({E.render(node)})", (node.arg,))
            if node.op in (Op.REDUCE_SUM, Op.REDUCE_MAX):
                raise LoweringError(f"{what}: nested reduction over {node.arg} in "
                                    f"{E.render(x)}")
        extra = x.free_indices() - allowed
        if extra:
            raise LoweringError(f"{what} depends on {sorted(extra)}, which a kernel tile "
                                f"cannot hold")

    tile_ok = {roles.get("batch"), roles.get("head"), m, n} - {None}

    def lower_sum(r: Reduction, body: Expr) -> RunningSum:
        v = None
        if f is not None and f in body.free_indices():
            factors = T.factors(body)
            vs = [i for i, (x, _) in enumerate(factors) if f in x.free_indices()]
            vload, power = factors[vs[0]] if len(vs) == 1 else (body, 0)
            if power != 1 or vload.op is not Op.LOAD:
                raise LoweringError(f"sum {r.name}: the {f} index must come from one value "
                                    f"tensor multiplying the weights, got {E.render(body)}",
                                    _loads(vload))
            v = operand(vload, n, f, "v")
            body = T.product([fp for i, fp in enumerate(factors) if i != vs[0]])
        check_elementwise(body, f"sum {r.name}", tile_ok)
        return RunningSum(r.name, body, v, r.units)

    def lower_store(name: str, idx: tuple[str, ...], x: Expr) -> Store:
        if n in idx:
            raise LoweringError(f"output {name}[{', '.join(idx)}] keeps the key index {n}: the "
                                f"kernel streams key tiles and writes rows per query; an "
                                f"output must reduce over {n} (sum or max)", (name,))
        x = replace_dots(x)
        if any(node.op is Op.ROW and node.arg in {d.var for d in dots.values()}
               for node in x.walk()):
            raise LoweringError(f"output {name} reads a score tile outside a reduction over "
                                f"{n}: {E.render(x)}", (name,))
        check_elementwise(x, f"output {name}", {roles.get("batch"), roles.get("head"), m}
                          - {None})
        if m not in idx:
            raise LoweringError(f"output {name}[{', '.join(idx)}] must be indexed by the query "
                                f"index {m}")
        return Store(name, idx, x, f is not None and f in idx)

    passes = []
    for p in schedule.passes:
        maxes, sums = [], []
        for r in p:
            with _lowering("reduction", r.name):
                body = replace_dots(r.body)
                if r.kind == "max":
                    check_elementwise(body, f"max {r.name}", tile_ok)
                    maxes.append(RunningMax(r.name, body, r.floor0, r.stabilizer))
                    continue
                sums.append(lower_sum(r, body))
        passes.append(KVPass(tuple(maxes), tuple(sums)))
    stores = []
    for name, idx, x in schedule.outputs:
        with _lowering("output", name):
            stores.append(lower_store(name, idx, x))
    mask = schedule.mask
    if mask is not None:
        with _lowering("mask", None):
            check_elementwise(mask, "the mask", tile_ok)
    exprs = [mx.arg for p in passes for mx in p.maxes] + \
        [s.body for p in passes for s in p.sums] + [s.expr for s in stores] + \
        ([mask] if mask is not None else []) + \
        [i for o in operands.values() for i in o.idx]
    params: dict[str, str] = {}
    captured: dict[str, tuple[str, int, str]] = {}
    for x in exprs:
        for node in x.walk():
            if node.op is Op.PARAM:
                params[node.arg] = node.dtype
            elif node.op is Op.LOAD:
                decl = c.tensor(node.arg)
                if decl is not None and decl.kind == "captured":
                    captured[node.arg] = (node.arg, len(decl.dims), decl.dtype)
    return TileKernel(c.name, roles, tuple(operands.values()), tuple(dots.values()),
                      tuple(passes), tuple(stores), mask, tuple(sorted(params.items())),
                      tuple(captured.values()),
                      tuple((t.name, t.dims) for t in c.tensors
                            if t.kind == "input" or t.name in captured),
                      tuple((i.name, i.extent) for i in c.indices),
                      tuple((p.name, p.default) for p in c.params if p.default is not None),
                      str(c), bounds, sites, tuple((p.name, p.dtype) for p in c.params))
