"""Classification of every tile as EMPTY, PARTIAL or FULL: intervals first, then exactly.

How tiles are classified (``TileMap.mechanism``):

* ``"closed-form bounds"`` -- the mask uses no captured data.  It is evaluated in interval
  arithmetic (:class:`~attndsl.passes.mask.evaluator.IntervalEvaluator`) over every tile at
  once (broadcast over the tile grid; above COARSE_BOXES tiles first over boxes of 4 x 4
  tiles, then only inside the undecided ones): each index becomes the interval it spans in
  the tile, booleans become three-valued (always / never / maybe), and a tile is FULL when
  the mask is *always* true, EMPTY when *never*.  The rules are sound (a bound always
  contains every value), so FULL and EMPTY are never wrong; "maybe" tiles are then refined
  (below) so that the final classes are exact.
* ``"table from summaries"`` -- the mask reads captured tensors.  Reads are bounded by range
  summaries (:mod:`~attndsl.passes.mask.summaries`): ``doc[m]`` over a tile is [min, max] of
  the ids in it; reads at exact indices (``win[h]``, ``lengths[b]``) are exact.
* ``"chunked evaluation"`` -- when a bound had to fall back to a data-blind rule (a gather at
  a non-monotone index such as ``doc[perm[m]]``, a read ranging over two dimensions) and
  therefore *every* tile of a data-dependent mask came out "maybe", the mask is evaluated
  exactly (:func:`attndsl.ir.evaluate.evaluate`) over blocks of tiles (at most
  ``max_elements`` points at a time) and reduced per tile.

Refinement of "maybe" tiles (exact, still interval arithmetic): a few exact points of each
tile are evaluated first (corners, centre, short runs along a row and a column) -- a true
and a false point prove PARTIAL; the rest are split into quarters recursively, a quarter
that is always/never true is decided, and a tile is decided as soon as it has a true and a
false witness or all its pieces are decided.  Pieces that stay "maybe" at a single point
(NaN data, 0/0), or work beyond ``REFINE_BUDGET`` pieces, are finished by exact evaluation of
those tiles (``stats["exact_tiles"]`` counts them).  Cost: O(number of tiles) for the first
pass, plus about O(log BLOCK) pieces per maybe tile for the masks of the test-suite.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from attndsl.ir import expr as E
from attndsl.ir.evaluate import evaluate
from attndsl.ir.expr import BOOL, Expr, Op
from attndsl.passes.index_bounds import check_sites, index_sites, wrap_negative
from attndsl.passes.mask.evaluator import Boxes, IntervalEvaluator, _blind_gathers
from attndsl.passes.mask.intervals import _F64
from attndsl.passes.mask.tiles import (
    _MAYBE,
    EMPTY,
    FULL,
    PARTIAL,
    Geometry,
    MaskAnalysisError,
    TileMap,
)

Tensor = torch.Tensor

CLOSED_FORM = "closed-form bounds"
SUMMARIES = "table from summaries"
CHUNKED = "chunked evaluation"
MAX_ELEMENTS = 1 << 24  # dense mask points evaluated at a time
MAX_BOXES = 1 << 20  # interval boxes evaluated at a time
REFINE_BUDGET = 1 << 23  # boxes a refinement may evaluate in all
_AXES = ("b", "h", "m", "n")


# -- tiling: the interval pass, coarse to fine -------------------------------------------

@functools.lru_cache(maxsize=16)
def _grid_boxes(g: Geometry, Bm: int, Hm: int) -> Boxes:
    """The tiles of g as boxes, broadcast over [Bm, Hm, nq, nk] (cached: never modified)."""
    qt = torch.arange(g.nq, dtype=_F64).reshape(1, 1, -1, 1)
    kt = torch.arange(g.nk, dtype=_F64).reshape(1, 1, 1, -1)
    mlo, mhi = g.rows(qt)
    nlo, nhi = g.cols(kt)
    b = torch.arange(Bm, dtype=_F64).reshape(-1, 1, 1, 1)
    h = torch.arange(Hm, dtype=_F64).reshape(1, -1, 1, 1)
    return Boxes(b, h, mlo, mhi, nlo, nhi, g)


COARSE_BOXES = 65536  # boxes of the first, coarsest level of the interval pass
_SPLIT = 4  # each level cuts a box into _SPLIT x _SPLIT boxes of the next


def _coarse_to_fine(ev: IntervalEvaluator, mask: Expr, g: Geometry, Bm: int, Hm: int,
                    stats: dict[str, int]) -> Tensor:
    """Interval codes [Bm, Hm, nq, nk] of every tile, coarse to fine.

    The first level evaluates boxes of s x s tiles (s a power of _SPLIT, at most about
    COARSE_BOXES boxes); a box that is always (never) true decides all its tiles at once, and
    only the boxes of the next level inside undecided ones are evaluated, down to single
    tiles.  Work is proportional to the undecided boundary of the mask, not to the number of
    tiles (a level that is mostly undecided is evaluated as a whole grid, by broadcasting)."""
    s = 1
    while -(-g.nq // (s * _SPLIT)) * -(-g.nk // (s * _SPLIT)) * Bm * Hm >= COARSE_BOXES:
        s *= _SPLIT
    level = Geometry(g.Lq, g.Lkv, g.BM * s, g.BN * s)
    codes = ev.codes(mask, _grid_boxes(level, Bm, Hm)).expand(Bm, Hm, level.nq, level.nk)
    stats["coarse_boxes"] = codes.numel()
    while s > 1:
        s //= _SPLIT
        level = Geometry(g.Lq, g.Lkv, g.BM * s, g.BN * s)
        codes = codes.repeat_interleave(_SPLIT, 2)[:, :, :level.nq]
        codes = codes.repeat_interleave(_SPLIT, 3)[:, :, :, :level.nk]
        maybe = (codes & 1).bool()  # codes are 0, FULL or _MAYBE
        count = int(maybe.sum())
        stats["coarse_boxes"] += count
        if 4 * count > codes.numel():  # mostly undecided: the whole grid, by broadcasting
            grid = ev.codes(mask, _grid_boxes(level, Bm, Hm)).expand_as(codes)
            codes = torch.where(maybe, grid, codes)
        elif count:
            roots = maybe.nonzero()
            codes[tuple(roots.unbind(1))] = _codes_of(ev, mask, _root_boxes(roots, level))
    return codes.contiguous()


def _root_boxes(roots: Tensor, g: Geometry) -> Tensor:
    """[R, 6] boxes (b, h, mlo, mhi, nlo, nhi) of tiles given as [R, 4] (b, h, qt, kt) rows."""
    r = roots.to(_F64)
    mlo, mhi = g.rows(r[:, 2])
    nlo, nhi = g.cols(r[:, 3])
    return torch.stack([r[:, 0], r[:, 1], mlo, mhi, nlo, nhi], 1)


def _codes_of(ev: IntervalEvaluator, mask: Expr, rows: Tensor) -> Tensor:
    """Codes of [P, 6] boxes, MAX_BOXES at a time."""
    out = torch.empty(rows.shape[0], dtype=torch.int8)
    for s in range(0, rows.shape[0], MAX_BOXES):
        chunk = rows[s:s + MAX_BOXES]
        out[s:s + MAX_BOXES] = ev.codes(mask, Boxes.from_rows(chunk)).expand(chunk.shape[0])
    return out


# -- refinement of the undecided tiles ---------------------------------------------------------

def _sample_codes(ev: IntervalEvaluator, mask: Expr, boxes: Tensor, runs: bool) -> Tensor:
    """Exact codes [P, k] at k points of each of the [P, 6] boxes: its corners and centre,
    or (``runs``) 7 steps along the last row from the left and 7 along the last column from
    the top.  The points of a box share its b and h, so they are evaluated as [P, k] point
    boxes broadcast against [P, 1] (MAX_BOXES points at a time)."""
    out = []
    step = max(1, MAX_BOXES // 16)
    for s in range(0, boxes.shape[0], step):
        b, h, mlo, mhi, nlo, nhi = (x[:, None] for x in boxes[s:s + step].unbind(1))
        if runs:
            j = torch.arange(1, 8, dtype=_F64)
            m = torch.cat([mhi.expand(-1, 7), torch.minimum(mlo + j, mhi)], 1)
            n = torch.cat([torch.minimum(nlo + j, nhi), nhi.expand(-1, 7)], 1)
        else:
            mmid, nmid = torch.floor((mlo + mhi) / 2), torch.floor((nlo + nhi) / 2)
            m = torch.cat([mlo, mlo, mhi, mhi, mmid], 1)
            n = torch.cat([nlo, nhi, nlo, nhi, nmid], 1)
        out.append(ev.codes(mask, Boxes(b, h, m, m, n, n)).expand(m.shape))
    return torch.cat(out)


def _split(boxes: Tensor, owner: Tensor) -> tuple[Tensor, Tensor]:
    """Quarters of each box (halves along a dimension of length 1 are not split)."""
    b, h, mlo, mhi, nlo, nhi = boxes.unbind(1)
    mmid, nmid = torch.floor((mlo + mhi) / 2), torch.floor((nlo + nhi) / 2)
    ms = [(mlo, mmid, torch.ones_like(mlo, dtype=torch.bool)), (mmid + 1, mhi, mhi > mlo)]
    ns = [(nlo, nmid, torch.ones_like(nlo, dtype=torch.bool)), (nmid + 1, nhi, nhi > nlo)]
    kids, owners = [], []
    for ml, mh, mok in ms:
        for nl, nh, nok in ns:
            ok = mok & nok
            kids.append(torch.stack([b, h, ml, mh, nl, nh], 1)[ok])
            owners.append(owner[ok])
    return torch.cat(kids), torch.cat(owners)


@dataclass
class _Witness:
    """Per maybe tile: a true point was seen, a false point was seen, it must be done exactly."""

    true: Tensor
    false: Tensor
    stuck: Tensor

    def see(self, codes: Tensor, owner: Tensor) -> None:
        self.true.index_fill_(0, owner[codes == FULL], True)
        self.false.index_fill_(0, owner[codes == EMPTY], True)

    @property
    def partial(self) -> Tensor:
        return self.true & self.false


def _refine(ev: IntervalEvaluator, mask: Expr, roots: Tensor, g: Geometry,
            stats: dict[str, int], budget: int) -> Tensor:
    """Exact codes (or _MAYBE where exact evaluation is needed) of the maybe tiles ``roots``."""
    boxes = _root_boxes(roots, g)
    n = boxes.shape[0]
    w = _Witness(*(torch.zeros(n, dtype=torch.bool) for _ in range(3)))
    undecided = torch.arange(n)
    for runs in (False, True):  # corners and centre first, then short runs from a corner
        codes = _sample_codes(ev, mask, boxes[undecided], runs)  # a row per box
        w.true[undecided] |= (codes == FULL).any(1)
        w.false[undecided] |= (codes == EMPTY).any(1)
        stats["sample_points"] += codes.numel()
        undecided = undecided[~w.partial[undecided]]
        if not undecided.numel():
            break
    frontier, owner = boxes[undecided], undecided
    spent = 0
    while frontier.shape[0]:
        frontier, owner = _split(frontier, owner)
        spent += frontier.shape[0]
        if spent > budget:
            w.stuck[owner] = True
            break
        codes = _codes_of(ev, mask, frontier)
        w.see(codes, owner)
        live = (codes == _MAYBE) & ~w.partial[owner]
        point = (frontier[:, 2] == frontier[:, 3]) & (frontier[:, 4] == frontier[:, 5])
        w.stuck[owner[live & point]] = True
        keep = live & ~point & ~w.stuck[owner]
        frontier, owner = frontier[keep], owner[keep]
    stats["refine_boxes"] += spent
    decided = torch.where(w.true, FULL, EMPTY)
    out = torch.where(w.stuck, _MAYBE, decided)
    return torch.where(w.partial, PARTIAL, out).to(torch.int8)


# -- exact evaluation --------------------------------------------------------------------------

def _exact_tiles(mask: Expr, captured: Mapping[str, Tensor], g: Geometry, b: Tensor, h: Tensor,
                 qts: Tensor, kts: Tensor) -> Tensor:
    """Exact codes [len(b), len(h), len(qts), len(kts)] by dense evaluation of those tiles.

    Each tile's positions are padded to a full block by repeating its last in-range position,
    which changes no any / all."""
    mpos = (qts[:, None] * g.BM + torch.arange(g.BM)).clamp(max=g.Lq - 1).reshape(-1)
    npos = (kts[:, None] * g.BN + torch.arange(g.BN)).clamp(max=g.Lkv - 1).reshape(-1)
    ranges = {"b": b, "h": h, "m": mpos, "n": npos}
    v = evaluate(mask, list(_AXES), ranges, captured).to(torch.bool)
    v = v.expand(len(b), len(h), len(mpos), len(npos))
    v = v.reshape(len(b), len(h), len(qts), g.BM, len(kts), g.BN)
    full = v.all(dim=5).all(dim=3)
    some = v.any(dim=5).any(dim=3)
    return torch.where(full, FULL, torch.where(some, PARTIAL, EMPTY)).to(torch.int8)


def _chunks(total: int, size: int) -> list[Tensor]:
    return [torch.arange(s, min(s + size, total)) for s in range(0, total, max(1, size))]


def _exact_grid(mask: Expr, captured: Mapping[str, Tensor], Bm: int, Hm: int, g: Geometry,
                max_elements: int) -> Tensor:
    """Every tile by dense evaluation, at most ``max_elements`` points at a time (one tile at
    a time at least)."""
    tile = g.BM * g.BN
    ck = min(g.nk, max(1, max_elements // tile))
    cq = min(g.nq, max(1, max_elements // (tile * ck)))
    ch = min(Hm, max(1, max_elements // (tile * ck * cq)))
    cb = min(Bm, max(1, max_elements // (tile * ck * cq * ch)))
    out = torch.empty(Bm, Hm, g.nq, g.nk, dtype=torch.int8)
    for b in _chunks(Bm, cb):
        for h in _chunks(Hm, ch):
            for q in _chunks(g.nq, cq):
                for k in _chunks(g.nk, ck):
                    codes = _exact_tiles(mask, captured, g, b, h, q, k)
                    out[b[0]:b[-1] + 1, h[0]:h[-1] + 1, q[0]:q[-1] + 1, k[0]:k[-1] + 1] = codes
    return out


def _exact_roots(mask: Expr, captured: Mapping[str, Tensor], roots: Tensor, g: Geometry,
                 max_elements: int) -> Tensor:
    """Exact codes of the tiles ``roots`` ([R, 4] rows b, h, qt, kt), query tile by query tile."""
    out = torch.empty(roots.shape[0], dtype=torch.int8)
    for qt in roots[:, 2].unique():
        sel = (roots[:, 2] == qt).nonzero().squeeze(1)
        sub = roots[sel]
        bs, hs, kts = sub[:, 0].unique(), sub[:, 1].unique(), sub[:, 3].unique()
        step = max(1, max_elements // (len(bs) * len(hs) * g.BM * g.BN))
        for s in range(0, len(kts), step):
            ks = kts[s:s + step]
            codes = _exact_tiles(mask, captured, g, bs, hs, qt.reshape(1), ks)
            inside = (sub[:, 3] >= ks[0]) & (sub[:, 3] <= ks[-1])
            part = sub[inside].T.contiguous()
            out[sel[inside]] = codes[torch.searchsorted(bs, part[0]),
                                     torch.searchsorted(hs, part[1]), 0,
                                     torch.searchsorted(ks, part[3])]
    return out


# -- classification ----------------------------------------------------------------------------

def _positive(name: str, v: Any) -> int:
    if isinstance(v, bool):
        raise MaskAnalysisError(f"{name} must be a positive integer, got {v!r}")
    try:
        iv = operator.index(v)
    except TypeError:
        raise MaskAnalysisError(f"{name} must be a positive integer, got {v!r}") from None
    if iv <= 0:
        raise MaskAnalysisError(f"{name} must be a positive integer, got {iv}")
    return iv


def check_mask(mask: Any, captured: Mapping[str, Tensor] | None) -> Expr:
    """A boolean expression over b, h, m, n whose captured tensors are all bound (not checked
    when ``captured`` is None)."""
    if not isinstance(mask, Expr):
        raise MaskAnalysisError(f"the mask must be an Expr, got {type(mask).__name__}")
    if mask.dtype != BOOL:
        raise MaskAnalysisError(f"the mask must be boolean (a comparison, &, |, ~), got a "
                                f"{mask.dtype} expression: {E.render(mask)}")
    extra = mask.free_indices() - set(_AXES)
    if extra:
        raise MaskAnalysisError(f"a mask may only use the indices b, h, m, n; "
                                f"{E.render(mask)} uses {sorted(extra)}")
    for node in mask.walk():
        if node.op is Op.LOAD and captured is not None and node.arg not in captured:
            raise MaskAnalysisError(f"captured tensor {node.arg!r} is not bound")
        if node.op in (Op.REDUCE_SUM, Op.REDUCE_MAX, Op.SOFTMAX, Op.ROW):
            raise MaskAnalysisError(f"a mask cannot contain {node.op.name}: {E.render(node)}")
    return mask


def _in_range(mask: Expr, captured: Mapping[str, Tensor], sizes: dict[str, int]) -> Expr:
    """The mask with torch's indexing made explicit: every subscript of a captured tensor is
    checked to lie in [-size, size) (the IndexError of attndsl.index_check
    otherwise, as the kernels and torch raise), and negative ones wrap, ``where(i < 0, i + s,
    i)``, so that the interval rules (which clamp subscripts into the tensor) stay sound."""
    extents = dict(zip(_AXES, ("B", "H", "M", "N")))
    dims = {name: tuple(f"{name}.{d}" for d in range(t.dim())) for name, t in captured.items()}
    sites = index_sites([mask], lambda name: "captured" if name in captured else None,
                        dims.__getitem__, extents.get)
    check_sites(sites, sizes, {}, captured, extents)
    return wrap_negative(mask, lambda name, d: E.const(int(captured[name].shape[d]))
                         if name in captured else None)


def classify_tiles(mask: Expr, captured: Mapping[str, Tensor], B: int, H: int, Lq: int,
                   Lkv: int, BLOCK_M: int, BLOCK_N: int, *, exact: bool = True,
                   max_elements: int = MAX_ELEMENTS, budget: int = REFINE_BUDGET) -> TileMap:
    """Classify every (b, h, query tile, kv tile) of ``mask`` as EMPTY, PARTIAL or FULL.

    With ``exact=False`` only the interval pass runs: FULL and EMPTY are still never wrong, but
    tiles the bounds cannot decide are reported PARTIAL.
    """
    B, H, Lq, Lkv = (_positive(k, v) for k, v in (("B", B), ("H", H), ("Lq", Lq), ("Lkv", Lkv)))
    g = Geometry(Lq, Lkv, _positive("BLOCK_M", BLOCK_M), _positive("BLOCK_N", BLOCK_N))
    captured = {k: v.detach().cpu() for k, v in captured.items()}
    free = check_mask(mask, captured).free_indices()
    mask = _in_range(mask, captured, {"B": B, "H": H, "M": Lq, "N": Lkv})
    Bm, Hm = (B if "b" in free else 1), (H if "h" in free else 1)
    uses_data = any(node.op is Op.LOAD for node in mask.walk())
    ev = IntervalEvaluator(captured)
    stats = {"tiles": Bm * Hm * g.nq * g.nk, "coarse_boxes": 0, "decided_by_bounds": 0,
             "sample_points": 0, "refine_boxes": 0, "exact_tiles": 0}
    classes = _coarse_to_fine(ev, mask, g, Bm, Hm, stats)
    roots = (classes & 1).bool().nonzero()  # the interval pass gives 0, FULL = 2 or _MAYBE = 3
    stats["decided_by_bounds"] = classes.numel() - roots.shape[0]
    if uses_data and (ev.coarse or _blind_gathers(mask)) and \
            roots.shape[0] == classes.numel():
        stats["exact_tiles"] = classes.numel()
        classes = _exact_grid(mask, captured, Bm, Hm, g, max_elements)
        return TileMap(classes, CHUNKED, Lq, Lkv, g.BM, g.BN, stats)
    mechanism = SUMMARIES if uses_data else CLOSED_FORM
    if roots.shape[0]:
        if exact:
            codes = _refine(ev, mask, roots, g, stats, budget)
            stuck = codes == _MAYBE
            if bool(stuck.any()):
                codes[stuck] = _exact_roots(mask, captured, roots[stuck], g, max_elements)
                stats["exact_tiles"] = int(stuck.sum())
        else:
            codes = torch.full((roots.shape[0],), PARTIAL, dtype=torch.int8)
        classes[tuple(roots.unbind(1))] = codes
    return TileMap(classes, mechanism, Lq, Lkv, g.BM, g.BN, stats)


def exact_classes(mask: Expr, captured: Mapping[str, Tensor], B: int, H: int, Lq: int, Lkv: int,
                  BLOCK_M: int, BLOCK_N: int, max_elements: int = MAX_ELEMENTS) -> Tensor:
    """Reference classes [B', H', nq, nk] by chunked dense evaluation (no interval reasoning)."""
    g = Geometry(Lq, Lkv, _positive("BLOCK_M", BLOCK_M), _positive("BLOCK_N", BLOCK_N))
    free = check_mask(mask, captured).free_indices()
    Bm, Hm = (B if "b" in free else 1), (H if "h" in free else 1)
    return _exact_grid(mask, {k: v.cpu() for k, v in captured.items()}, Bm, Hm, g, max_elements)
