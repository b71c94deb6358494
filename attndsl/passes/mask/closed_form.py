"""Closed forms of each query tile's key-tile ranges, as integer expressions over qt, M, N.

:func:`kv_tile_bounds` gives, for masks made of linear constraints on ``m - n``, ``m``, ``n``
(causal, sliding windows, prefix-LM ...) or tile arithmetic ``m // C  op  n // C`` (chunked,
chunked causal ...) -- the bands of :mod:`~attndsl.passes.mask.bands` -- closed forms of the
non-empty and full kv tile ranges of each query tile (:class:`KVBounds`), so that a kernel
computes them from its query-tile index and reads no table.  For one band with rows
[m0, m1] in the tile: the keys allowed are [lo(m0), hi(m1)] (one interval, lo and hi
monotone), so the non-empty tiles are [lo(m0) // BN, hi(m1) // BN + 1); a tile [n0, n1] is
full iff n0 >= lo(m1) and n1 <= hi(m0) (see ``_band_bounds``).  Unions of bands that all
start at key 0 (prefix-LM) take the largest end (``_prefix_union``); two bands that both allow
the diagonal meet (``_meet``).  :func:`kv_tile_segments` extends them to two segments (sinks
beside a window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attndsl.ir import evaluate as ir_eval
from attndsl.ir import expr as E
from attndsl.ir.expr import INT, Expr, Op
from attndsl.passes.int_range import may_wrap
from attndsl.passes.mask.bands import (
    _Band,
    _band_of_chunk,
    _band_of_lin,
    _bands,
    _conjuncts,
    _Lin,
    _lin_of,
)
from attndsl.passes.mask.classify import _positive, check_mask
from attndsl.passes.mask.symbolic import _add, _and, _c, _fdiv, _if, _le, _max, _min, _mul, _sub

Tensor = torch.Tensor


@dataclass(frozen=True)
class KVBounds:
    """For query tile ``qt``: the non-empty kv tiles are exactly [lo, hi) and the full ones
    exactly [full_lo, full_hi) (inside [lo, hi); lo == hi when none).  Integer expressions over
    INDEX ``qt``, PARAM ``M`` (= Lq) and PARAM ``N`` (= Lkv).  Full means full over in-range
    points (a kernel must still bound-check keys >= N in the last tile), or under torch's
    convention (cut-short tiles never full) when ``torch_boundary``.  ``edge_full_only``: only
    a tile cut short by M or N can be full (a band narrower than BLOCK_M + BLOCK_N - 1 keys,
    :func:`_edge_full_only`), so a kernel may take all of [lo, hi) as partial."""

    lo: Expr
    hi: Expr
    full_lo: Expr
    full_hi: Expr
    BLOCK_M: int
    BLOCK_N: int
    torch_boundary: bool = False
    edge_full_only: bool = False

    def evaluate(self, Lq: int, Lkv: int) -> dict[str, Tensor]:
        """The four bounds for every query tile, int64 [nq] tensors."""
        nq = -(-Lq // self.BLOCK_M)
        ranges = {"qt": torch.arange(nq)}
        params = {"M": Lq, "N": Lkv}
        return {k: ir_eval.evaluate(getattr(self, k), ["qt"], ranges, {}, params).long().expand(nq)
                for k in ("lo", "hi", "full_lo", "full_hi")}

    def __str__(self) -> str:
        """The four bounds, with subexpressions used more than once named t0, t1, ..."""
        names = ("lo", "hi", "full_lo", "full_hi")
        roots = [getattr(self, k) for k in names]
        shared = _shared_nodes(roots)
        lines = [f"{v} = {E.render(_named(node, shared))}" for node, v in shared.items()]
        lines += [f"{k} = {shared[r] if r in shared else E.render(_named(r, shared))}"
                  for k, r in zip(names, roots)]
        return "\n".join(lines)


def _shared_nodes(roots: list[Expr]) -> dict[Expr, str]:
    """Non-leaf nodes referenced more than once across ``roots``, children first, named t0,
    t1, ..."""
    return {x: f"t{i}" for i, x in enumerate(E.shared_nodes(roots))}


def _named(e: Expr, names: dict[Expr, str]) -> Expr:
    """e with its named proper subexpressions replaced by their names."""
    memo: dict[Expr, Expr] = {}
    for node in e.walk():
        if node in names and node is not e:
            memo[node] = E.param(names[node], node.dtype)
            continue
        src = tuple(memo[s] for s in node.src)
        memo[node] = node if src == node.src else Expr(node.op, src, node.arg, node.dtype)
    return memo[e]


_Four = tuple[Expr, Expr, Expr, Expr]


def _band_bounds(band: _Band, BM: int, BN: int, torch_boundary: bool) -> _Four:
    """Closed forms for one band.  Rows of tile qt: [m0, m1], m0 = qt*BM,
    m1 = min(m0 + BM, M) - 1, narrowed to the band's rows [a, b].  The keys allowed for them
    are [max(lo(a), 0), min(hi(b), N - 1)] (one interval, see _Band), so the non-empty kv tiles
    are [that lo // BN, that hi // BN + 1).  A kv tile [n0, n1] is full iff n0 >= lo(m1) and
    n1 <= hi(m0) (lo, hi monotone) and every row is a band row: n0 >= lo(m1) gives
    kt >= ceil(lo(m1) / BN); n1 = min(n0 + BN, N) - 1 <= X = hi(m0) holds for every tile when
    X >= N - 1, else for kt < (X + 1) // BN."""
    zero = _c(0)
    if band.empty:
        return zero, zero, zero, zero
    qt, M, N = E.index("qt"), E.param("M", INT), E.param("N", INT)
    m0 = _mul(qt, BM)
    m1 = _sub(_min(_add(m0, BM), M), 1)
    a = m0 if band.row_lo is None else _max(m0, _c(band.row_lo))
    b = m1 if band.row_hi is None else _min(m1, _c(band.row_hi))
    first = zero if band.lo is None else _max(band.lo(a), zero)
    last = _sub(N, 1) if band.hi is None else _min(band.hi(b), _sub(N, 1))
    rows = None if band.row_lo is None and band.row_hi is None else _le(a, b)
    nonempty = _and(rows, _le(first, last))
    lo = _if(nonempty, _fdiv(first, BN), zero)
    hi = _if(nonempty, _add(_fdiv(last, BN), 1), zero)
    nk = _fdiv(_add(N, BN - 1), BN)
    y = zero if band.lo is None else _max(band.lo(m1), zero)
    raw_lo = _fdiv(_add(y, BN - 1), BN)
    if band.hi is None:
        upper = nk
    else:
        x = band.hi(m0)
        upper = _if(_le(_sub(N, 1), x), nk, _fdiv(_add(x, 1), BN))
    rows_ok = None
    if band.row_lo is not None:
        rows_ok = _le(_c(band.row_lo), m0)
    if band.row_hi is not None:
        rows_ok = _and(rows_ok, _le(m1, _c(band.row_hi)))
    if torch_boundary:
        upper = _min(upper, _fdiv(N, BN))
        rows_ok = _and(rows_ok, _le(_add(m0, BM), M))
    full_lo = _min(_max(raw_lo, lo), hi)
    full_hi = _if(rows_ok, _max(_min(upper, hi), full_lo), full_lo)
    return lo, hi, full_lo, full_hi


def _edge_full_only(band: _Band, BM: int, BN: int) -> bool:
    """Whether only tiles cut short by M or N can be full for ``band``.  A tile of BM rows
    [m0, m1] and BN keys [n0, n1] is full iff n0 >= lo(m1) >= m1 - dhi and n1 <= hi(m0) <=
    m0 - dlo, so it needs dhi - dlo >= (m1 - m0) + (n1 - n0) = BM + BN - 2: a band of width
    dhi - dlo + 1 < BM + BN - 1 has no full tile that is not cut short."""
    return band.width is not None and band.width < BM + BN - 1


def _positions_only(mask: Expr) -> bool:
    """The mask reads only m and n and constants, and no integer arithmetic of it may wrap
    in int64 (:func:`may_wrap`; the closed forms are real-number algebra): closed forms may
    exist."""
    return not mask.free_indices() - {"m", "n"} and \
        not any(x.op in (Op.PARAM, Op.LOAD) for x in mask.walk()) and not may_wrap(mask)


def _diagonal_chunk_and_lin(e: Expr) -> tuple[_Band, _Band] | None:
    """e = (one chunk comparison m // C op n // C) & (linear constraints on m - n only), both
    allowing the diagonal n = m (op one of ==, <=, >=; dlo <= 0 <= dhi): chunked causal,
    a sliding window inside chunks, ...  Returns the two bands, or None."""
    parts = _conjuncts(e)
    chunks = [p for p in parts if _band_of_chunk(p) is not None and _lin_of(p) is None]
    if len(chunks) != 1 or chunks[0].op not in (Op.EQ, Op.LE, Op.GE):
        return None
    lin = _Lin()
    for p in parts:
        if p is not chunks[0]:
            c = _lin_of(p)
            if c is None:
                return None
            lin = lin.meet(c)
    if lin.empty or any(v is not None for v in (lin.mlo, lin.mhi, lin.nlo, lin.nhi)) or \
            (lin.dlo is not None and lin.dlo > 0) or (lin.dhi is not None and lin.dhi < 0):
        return None
    chunk = _band_of_chunk(chunks[0])
    assert chunk is not None
    return chunk, _band_of_lin(lin)


def _meet(a: _Four, b: _Four) -> _Four:
    """Tile bounds of the intersection of two bands that both allow the diagonal n = m.  Each
    row's keys are then an interval holding m, so a tile's rows allow one interval of keys from
    the first row's lower end to the last row's upper end: the non-empty tiles are the meet of
    the two ranges.  A tile is full for both bands iff it is full for their intersection, so
    the full tiles are the meet of the two full ranges."""
    zero = _c(0)
    lo, hi = _max(a[0], b[0]), _min(a[1], b[1])
    nonempty = _le(_add(lo, 1), hi)
    lo, hi = _if(nonempty, lo, zero), _if(nonempty, hi, zero)
    full_lo = _min(_max(_max(a[2], b[2]), lo), hi)
    full_hi = _max(_min(_min(a[3], b[3]), hi), full_lo)
    return lo, hi, full_lo, full_hi


def kv_tile_bounds(mask: Expr, BLOCK_M: int, BLOCK_N: int, *,
                   torch_boundary: bool = False) -> KVBounds | None:
    """Closed forms of the non-empty and full kv tile ranges of each query tile, or None.

    Recognised: conjunctions (&, ~ of comparisons, abs(x) <= y) of linear constraints that
    bound m - n, m or n alone (causal, bottom-right causal ``n <= m + c``, sliding windows one-
    or two-sided, causal & window, ...); one chunk comparison ``m // C  op  n // C`` (chunked
    local attention, block-causal); and | of such parts that all leave n unbounded below
    (prefix-LM ``n < P | causal``: the union of ranges that all start at tile 0 is the range
    up to the largest end, and a tile that the union fills is filled by one part, because
    each part is closed under decreasing n); and a chunk comparison & linear constraints on
    m - n when both allow the diagonal (chunked causal, windows inside chunks: see _meet).
    Masks using b, h or captured data give None.
    """
    BM, BN = _positive("BLOCK_M", BLOCK_M), _positive("BLOCK_N", BLOCK_N)
    check_mask(mask, None)
    if not _positions_only(mask):
        return None
    bands = _bands(mask)
    if len(bands) == 1 and bands[0] is None:
        pair = _diagonal_chunk_and_lin(mask)
        if pair is None:
            return None
        four = _meet(*(_band_bounds(b, BM, BN, torch_boundary) for b in pair))
        narrow = any(_edge_full_only(b, BM, BN) for b in pair)  # the meet is narrower still
        return KVBounds(*four, BM, BN, torch_boundary, narrow)
    if any(b is None for b in bands):
        return None
    if len(bands) == 1:
        return KVBounds(*_band_bounds(bands[0], BM, BN, torch_boundary), BM, BN, torch_boundary,
                        _edge_full_only(bands[0], BM, BN))
    if any(b.lo is not None for b in bands if not b.empty):
        return None
    return KVBounds(*_prefix_union(bands, BM, BN, torch_boundary), BM, BN, torch_boundary)


def _prefix_union(bands: list[_Band], BM: int, BN: int, torch_boundary: bool) -> _Four:
    """Bounds of the union of bands that are all unbounded below (see kv_tile_bounds)."""
    parts = [_band_bounds(b, BM, BN, torch_boundary) for b in bands]
    hi, full_hi = parts[0][1], parts[0][3]
    for p in parts[1:]:
        hi, full_hi = _max(hi, p[1]), _max(full_hi, p[3])
    return _c(0), hi, _c(0), full_hi


def kv_tile_segments(mask: Expr, BLOCK_M: int, BLOCK_N: int, *,
                     torch_boundary: bool = False) -> list[KVBounds] | None:
    """Closed-form key-tile segments of each query tile: disjoint, in increasing order, and
    together exactly its non-empty tiles; each segment's [full_lo, full_hi) tiles are full.

    One segment is :func:`kv_tile_bounds` (exact).  Two: an | whose parts are all unbounded
    below but one (sinks ``n < S``, a prefix: their union is the first segment, from tile 0)
    and one band (a window, causal ...), clipped to start where the first segment ends.  A
    tile of the first segment that is partial for its parts but filled by the band is then
    treated as partial (masked, still correct): with two segments full tiles may be missed,
    never invented.  None when neither applies."""
    single = kv_tile_bounds(mask, BLOCK_M, BLOCK_N, torch_boundary=torch_boundary)
    if single is not None:
        return [single]
    if not _positions_only(mask):
        return None
    BM, BN = BLOCK_M, BLOCK_N
    bands = _bands(mask)
    if len(bands) < 2 or any(b is None for b in bands):
        return None
    bounded = [i for i, b in enumerate(bands) if not b.empty and b.lo is not None]
    if len(bounded) != 1:
        return None
    head = _prefix_union([b for i, b in enumerate(bands) if i != bounded[0]], BM, BN,
                         torch_boundary)
    lo, hi, full_lo, full_hi = _band_bounds(bands[bounded[0]], BM, BN, torch_boundary)
    lo = _max(lo, head[1])
    hi = _max(hi, lo)
    full_lo = _min(_max(full_lo, lo), hi)
    full_hi = _max(_min(full_hi, hi), full_lo)
    return [KVBounds(*head, BM, BN, torch_boundary),
            KVBounds(lo, hi, full_lo, full_hi, BM, BN, torch_boundary,
                     _edge_full_only(bands[bounded[0]], BM, BN))]


SPARSE_BLOCK = 128  # the block of sparse key-tile plans: 128 queries x 128 keys (see below)
_SEGMENTS: dict[tuple[Expr, int, int], tuple[KVBounds, ...] | None] = {}


def closed_form_segments(mask: Expr, BLOCK_M: int = SPARSE_BLOCK,
                         BLOCK_N: int = SPARSE_BLOCK) -> tuple[KVBounds, ...] | None:
    """:func:`kv_tile_segments` of ``mask``, cached per (expression, block sizes).

    The one test of "does this mask have closed-form key-tile ranges": the tile pass asks it
    at ``SPARSE_BLOCK`` (a generated kernel with closed forms computes its key-tile ranges in
    blocks of SPARSE_BLOCK x SPARSE_BLOCK, its ``BOUNDS_BLOCK``) and so does the key-tile plan
    of a launch (:func:`attndsl.key_tile_plan.plan_key_tiles`), so the two always agree."""
    key = (mask, BLOCK_M, BLOCK_N)
    if key not in _SEGMENTS:
        segments = kv_tile_segments(mask, BLOCK_M, BLOCK_N)
        _SEGMENTS[key] = None if segments is None else tuple(segments)
    return _SEGMENTS[key]
