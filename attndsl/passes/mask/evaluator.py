"""The interval evaluator: an expression's bounds over many boxes of (b, h, m, n) at once.

A box is a point set {b} x {h} x [mlo, mhi] x [nlo, nhi]; a batch of boxes is six broadcast
tensors, so the tiles of a whole grid are evaluated at once (a node that depends on m only is
a [.., nq, 1] tensor).  Indices become the intervals they span in the box, constants and
bound parameters single points, and every other node is bounded by its rule in
:mod:`~attndsl.passes.mask.intervals`.  Reads of captured tensors ``t[i0, i1, ..]`` are exact
at exact indices; an index that ranges in one dimension reads the range summary of t along it
(:mod:`~attndsl.passes.mask.summaries`); ranges in several dimensions fall back to the
data-blind [min t, max t] (``coarse``).  A gather at an index that is not monotone in m or n
(``doc[perm[m]]``) is bounded soundly but learns little; ``_blind_gathers`` finds such reads,
so that classification can switch to exact evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from attndsl.ir import expr as E
from attndsl.ir.expr import BOOL, Expr, Op
from attndsl.passes.mask.intervals import (
    _F64,
    _INF,
    _LOGICAL,
    _RULES,
    Iv,
    _bool,
    _clean,
    _numeric,
    _point,
    _scalar,
    no_wrap,
)
from attndsl.passes.mask.summaries import RangeTable
from attndsl.passes.mask.tiles import _MAYBE, Geometry, MaskAnalysisError

Tensor = torch.Tensor
_TABLE_LIMIT = 1 << 26  # entries of a tensor given range summaries


@dataclass(frozen=True)
class Boxes:
    """Point sets {b} x {h} x [mlo, mhi] x [nlo, nhi]: one per element of broadcastable tensors."""

    b: Tensor
    h: Tensor
    mlo: Tensor
    mhi: Tensor
    nlo: Tensor
    nhi: Tensor
    grid: Geometry | None = None  # set when the boxes are the tiles of this geometry

    @staticmethod
    def from_rows(rows: Tensor) -> Boxes:
        """Boxes from a [P, 6] float64 tensor of (b, h, mlo, mhi, nlo, nhi) rows."""
        return Boxes(*rows.unbind(1))


class IntervalEvaluator:
    """Evaluates an expression in interval arithmetic over many boxes at once.

    Every node becomes an :class:`Iv` broadcast over the boxes' shape (so a node that depends
    on m only is a [.., nq, 1] tensor over a tile grid).  ``coarse`` is set when a bound fell
    back to a data-blind rule (a read ranging over two dimensions of a tensor).
    """

    def __init__(self, captured: Mapping[str, Tensor],
                 params: Mapping[str, float] | None = None) -> None:
        self.data = {k: v.detach().cpu() for k, v in captured.items()}  # converted on use
        self.params = dict(params or {})
        self.tables: dict[tuple[str, int], RangeTable | None] = {}
        self.coarse = False

    def evaluate(self, e: Expr, boxes: Boxes) -> Iv:
        memo: dict[Expr, Iv] = {}
        for node in e.walk():
            memo[node] = self._node(node, [memo[s] for s in node.src], boxes)
        return memo[e]

    def codes(self, mask: Expr, boxes: Boxes) -> Tensor:
        """FULL where the mask is always true on the box, EMPTY where never, else _MAYBE."""
        v = self.evaluate(mask, boxes)
        always, maybe = (_bool(x).view(torch.int8) for x in v)
        return maybe * _MAYBE - always  # (1, 1) FULL, (0, 1) MAYBE, (0, 0) EMPTY

    def _node(self, node: Expr, args: list[Iv], boxes: Boxes) -> Iv:
        op = node.op
        if op is Op.CONST:
            return _point(node.arg)
        if op is Op.INDEX:
            return _index(node.arg, boxes)
        if op is Op.PARAM:
            if node.arg in self.params:
                return _point(self.params[node.arg])
            return Iv(_scalar(-_INF), _scalar(_INF))
        if op is Op.LOAD:
            tiled = self._tiled_load(node, boxes)
            return tiled if tiled is not None else self._load(node, args)
        rule = _RULES.get(op)
        if rule is None:
            raise MaskAnalysisError(f"{E.render(node)}: a mask cannot contain {op.name}")
        if op not in _LOGICAL:
            args = [_numeric(a) for a in args]
        return no_wrap(node, rule(node, *args))

    def _load(self, node: Expr, idx: list[Iv]) -> Iv:
        """t[i0, i1, ..]: exact at exact indices; a range in one dimension reads the range
        summary of t along it (min / max over [lo, hi]); ranges in several dimensions fall
        back to [min t, max t] (coarse).  Indices are clamped to the tensor's extent (an
        in-range mask only reads in range, so clamping keeps every real value)."""
        t = self.data.get(node.arg)
        if t is None:
            raise MaskAnalysisError(f"captured tensor {node.arg!r} is not bound")
        if t.dim() != len(idx):
            raise MaskAnalysisError(f"{node.arg} has {t.dim()} dims, indexed with {len(idx)}")
        if t.dim() == 0:
            return _point(float(t.to(_F64)))
        los = [v.lo.clamp(0, s - 1) for v, s in zip(idx, t.shape)]
        his = [lo if v.hi is v.lo else v.hi.clamp(0, s - 1)  # points: one tensor for both
               for v, lo, s in zip(idx, los, t.shape)]
        ranged = [d for d in range(t.dim()) if his[d] is not los[d]
                  and not torch.equal(los[d], his[d])]
        if not ranged:
            vals = t[tuple(i.to(torch.int64) for i in torch.broadcast_tensors(*los))].to(_F64)
            return _clean(vals, vals) if t.is_floating_point() else Iv(vals, vals)
        if len(ranged) == 1:
            table = self._table(node.arg, ranged[0])
            if table is not None:
                return self._ranged(t, ranged[0], table, los, his)
        self.coarse = True
        return _clean(t.min().to(_F64).reshape(()), t.max().to(_F64).reshape(()))

    def _tiled_load(self, node: Expr, boxes: Boxes) -> Iv | None:
        """t[m] (or t[n]) over the tiles of a grid, t 1-D of the axis' length: the per-tile
        min / max of t, straight from its block summaries (what _load computes, in a few
        operations)."""
        g, t = boxes.grid, self.data.get(node.arg)
        if g is None or t is None or t.dim() != 1 or node.src[0].op is not Op.INDEX:
            return None
        axis = node.src[0].arg
        length, size = (g.Lq, g.BM) if axis == "m" else (g.Lkv, g.BN) if axis == "n" else (0, 0)
        if t.shape[0] != length or size & (size - 1):
            return None
        table = self._table(node.arg, 0)
        if table is None:
            return None
        mn, mx = table.block(size.bit_length() - 1)
        shape = (1, 1, -1, 1) if axis == "m" else (1, 1, 1, -1)
        mn, mx = mn[0].view(shape), mx[0].view(shape)
        return _clean(mn, mx) if t.is_floating_point() else Iv(mn, mx)

    def _ranged(self, t: Tensor, d: int, table: RangeTable, los: list[Tensor],
                his: list[Tensor]) -> Iv:
        others = [i for i in range(t.dim()) if i != d]
        row = torch.zeros((), dtype=torch.int64)
        for i in others:
            row = row * t.shape[i] + los[i].to(torch.int64)
        lo, hi = los[d].to(torch.int64), his[d].to(torch.int64)
        row, lo, hi = torch.broadcast_tensors(row, lo, hi)
        return table.query(row, lo, hi)

    def _table(self, name: str, d: int) -> RangeTable | None:
        key = (name, d)
        if key not in self.tables:
            t = self.data[name]
            ok = t.numel() <= _TABLE_LIMIT
            rows = t.movedim(d, -1).reshape(-1, t.shape[d]).to(_F64) if ok else None
            self.tables[key] = RangeTable(rows) if rows is not None else None
        return self.tables[key]


def _index(name: str, boxes: Boxes) -> Iv:
    if name == "b":
        return Iv(boxes.b, boxes.b)
    if name == "h":
        return Iv(boxes.h, boxes.h)
    if name == "m":
        return Iv(boxes.mlo, boxes.mhi)
    if name == "n":
        return Iv(boxes.nlo, boxes.nhi)
    raise MaskAnalysisError(f"a mask may only use the indices b, h, m, n; got {name!r}")


def _monotonicity(e: Expr) -> dict[str, int] | None:
    """Sign (+1 / -1) of the monotonicity of e in each index it uses, or None when it is not
    monotone in some index (%, abs, products of indices, gathers ...)."""
    op = e.op
    if op in (Op.CONST, Op.PARAM):
        return {}
    if op is Op.INDEX:
        return {e.arg: 1}
    if op is Op.CAST and e.arg != BOOL:
        return _monotonicity(e.src[0])
    if op is Op.NEG:
        inner = _monotonicity(e.src[0])
        return None if inner is None else {k: -v for k, v in inner.items()}
    if op in (Op.ADD, Op.SUB, Op.MIN, Op.MAX):
        a, b = _monotonicity(e.src[0]), _monotonicity(e.src[1])
        if a is None or b is None:
            return None
        if op is Op.SUB:
            b = {k: -v for k, v in b.items()}
        return None if any(a.get(k, v) != v for k, v in b.items()) else {**a, **b}
    if op in (Op.MUL, Op.FLOORDIV):
        x, c = e.src
        if op is Op.MUL and x.op is Op.CONST:
            x, c = c, x
        if c.op is not Op.CONST or not isinstance(c.arg, int | float) or c.arg == 0:
            return None
        if op is Op.FLOORDIV and c.arg < 0:
            return None
        inner = _monotonicity(x)
        sign = 1 if c.arg > 0 else -1
        return None if inner is None else {k: v * sign for k, v in inner.items()}
    return None


def _blind_gathers(mask: Expr) -> bool:
    """Some read of a captured tensor is at an index that is not monotone in m or n."""
    for node in mask.walk():
        if node.op is Op.LOAD:
            for s in node.src:
                if s.free_indices() & {"m", "n"} and _monotonicity(s) is None:
                    return True
    return False
