"""Mask analysis and block masks: tile classes against brute force, tables against torch.

For random lengths (1..300, Lq != Lkv included), block sizes (16..128, not only powers of two,
chosen independently for queries and keys) and every supported mask family:

(a) the classification is sound against a dense eager evaluation (never a wrong EMPTY or FULL)
    -- for the interval pass alone (``exact=False``) and, with refinement, exactly equal;
(b) the eight tables equal torch's ``create_block_mask(..., BLOCK_SIZE=(BM, BN))``;
(c) closed-form kv tile ranges (``kv_tile_bounds``) agree with the classification;
(d) each mask uses the expected mechanism (analysable masks never fall back to dense
    evaluation, not even for a few tiles);
(e) bad input gives a clear error.
"""

from __future__ import annotations

import ast
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask
from torch_compat import torch_block_grid_sparsity

import attndsl
from attndsl.block_mask import BlockMask, and_masks, create_block_mask, noop_mask, or_masks
from attndsl.block_tables import torch_classes
from attndsl.eager import eval_expr
from attndsl.frontend.flex import mask_expr
from attndsl.frontend.trace import TraceError
from attndsl.ir import expr as E
from attndsl.ir.expr import Op
from attndsl.passes.mask import (
    CHUNKED,
    CLOSED_FORM,
    EMPTY,
    FULL,
    MAX_SEGMENTS,
    PARTIAL,
    SUMMARIES,
    Boxes,
    IntervalEvaluator,
    MaskAnalysisError,
    classify_tiles,
    kv_tile_bounds,
    kv_tile_segments,
)

SIZES = st.integers(1, 300)
EXAMPLES = max(12, settings.default.max_examples)  # more under HYPOTHESIS_PROFILE=thorough
BLOCKS = st.sampled_from([16, 24, 32, 48, 64, 80, 128])  # torch allows any size
Draw = Callable[[st.SearchStrategy], object]


# -- the mask families -------------------------------------------------------------------------

@dataclass
class Case:
    mask_mod: Callable
    B: int = 1
    H: int = 1
    mechanism: str | None = CLOSED_FORM  # None: not analysable, any mechanism is fine
    closed: bool = False  # kv_tile_bounds must find a closed form


def _gen(draw: Draw) -> torch.Generator:
    return torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))


def causal(b, h, q, kv):
    return q >= kv


def _window(w: int) -> Callable:
    def window(b, h, q, kv):
        return q - kv < w
    return window


def _doc_ids(draw: Draw, length: int) -> torch.Tensor:
    docs = draw(st.integers(1, 8))
    return torch.sort(torch.randint(0, docs, (length,), generator=_gen(draw))).values


def _chunk(C: int) -> Callable:
    def chunked(b, h, q, kv):
        return q // C == kv // C
    return chunked


def case_causal(draw, Lq, Lkv):
    return Case(causal, closed=True)


def case_bottom_right(draw, Lq, Lkv):
    off = Lkv - Lq  # a Python int captured by the closure: a constant in the trace

    def bottom_right(b, h, q, kv):
        return kv <= q + off
    return Case(bottom_right, closed=True)


def case_window_one_sided(draw, Lq, Lkv):
    return Case(_window(draw(st.integers(-10, 100))), closed=True)


def case_window_two_sided(draw, Lq, Lkv):
    w = draw(st.integers(0, 100))

    def window2(b, h, q, kv):
        return torch.abs(q - kv) <= w
    return Case(window2, closed=True)


def case_causal_window(draw, Lq, Lkv):
    return Case(and_masks(causal, _window(draw(st.integers(1, 100)))), closed=True)


def case_prefix_lm(draw, Lq, Lkv):
    P = draw(st.integers(0, Lkv + 10))

    def prefix(b, h, q, kv):
        return kv < P
    return Case(or_masks(prefix, causal), closed=True)


def case_chunked(draw, Lq, Lkv):
    return Case(_chunk(draw(st.integers(1, 100))), closed=True)


def case_block_causal(draw, Lq, Lkv):
    C = draw(st.integers(1, 100))

    def block_causal(b, h, q, kv):
        return q // C >= kv // C
    return Case(block_causal, closed=True)


def case_chunked_causal(draw, Lq, Lkv):
    C = draw(st.integers(1, 100))
    return Case(and_masks(_chunk(C), causal), closed=True)


def case_chunked_window(draw, Lq, Lkv):
    """A two-sided window inside block-causal chunks (both allow the diagonal)."""
    C, w, v = draw(st.integers(1, 100)), draw(st.integers(0, 60)), draw(st.integers(0, 60))

    def chunk_window(b, h, q, kv):
        return (kv // C <= q // C) & (q - kv <= w) & (kv - q <= v)
    return Case(chunk_window, closed=True)


def case_chunk_off_diagonal(draw, Lq, Lkv):
    """Strictly causal inside chunks: the diagonal is excluded, no closed form is claimed."""
    C = draw(st.integers(1, 100))

    def strict(b, h, q, kv):
        return (q // C == kv // C) & (kv < q)
    return Case(strict)


def case_anti_causal(draw, Lq, Lkv):
    def anti(b, h, q, kv):
        return ~(q >= kv)
    return Case(anti, closed=True)


def case_dilated(draw, Lq, Lkv):
    r = draw(st.integers(1, 6))

    def dilated(b, h, q, kv):
        return (q - kv) % r == 0
    return Case(and_masks(dilated, causal))


def case_sinks(draw, Lq, Lkv):
    S, w = draw(st.integers(0, 20)), draw(st.integers(1, 100))

    def sink(b, h, q, kv):
        return kv < S
    return Case(or_masks(sink, and_masks(causal, _window(w))))


def case_natten(draw, Lq, Lkv):
    W, K = draw(st.integers(2, 24)), draw(st.sampled_from([3, 5, 7]))
    half, rows = K // 2, -(-max(Lq, Lkv) // W)

    def natten(b, h, q, kv):
        cr = torch.clamp(q // W, half, rows - 1 - half)
        cc = torch.clamp(q % W, half, W - 1 - half)
        return (torch.abs(cr - kv // W) <= half) & (torch.abs(cc - kv % W) <= half)
    return Case(natten)


def case_document(draw, Lq, Lkv):
    doc = _doc_ids(draw, max(Lq, Lkv))

    def document(b, h, q, kv):
        return doc[q] == doc[kv]
    return Case(document, mechanism=SUMMARIES)


def case_document_causal(draw, Lq, Lkv):
    return Case(and_masks(case_document(draw, Lq, Lkv).mask_mod, causal), mechanism=SUMMARIES)


def case_padding(draw, Lq, Lkv):
    B = draw(st.integers(1, 3))
    lengths = torch.randint(0, Lkv + 1, (B,), generator=_gen(draw))

    def padding(b, h, q, kv):
        return kv < lengths[b]
    return Case(padding, B=B, H=2, mechanism=SUMMARIES)


def case_head_windows(draw, Lq, Lkv):
    H = draw(st.integers(1, 4))
    win = torch.randint(1, 100, (H,), generator=_gen(draw))

    def head_window(b, h, q, kv):
        return (q - kv < win[h]) & (q >= kv)
    return Case(head_window, B=2, H=H, mechanism=SUMMARIES)


def case_or_combo(draw, Lq, Lkv):
    cw = and_masks(causal, _window(draw(st.integers(1, 60))))
    return Case(or_masks(_chunk(draw(st.integers(1, 64))), cw))


def case_doc_not_window(draw, Lq, Lkv):
    doc, w = case_document(draw, Lq, Lkv).mask_mod, draw(st.integers(0, 50))

    def far(b, h, q, kv):
        return ~(torch.abs(q - kv) <= w)
    return Case(and_masks(doc, far), mechanism=SUMMARIES)


def case_not_doc_or_sink(draw, Lq, Lkv):
    doc, S = case_document(draw, Lq, Lkv).mask_mod, draw(st.integers(0, 40))

    def other_doc_or_sink(b, h, q, kv):
        return ~doc(b, h, q, kv) | (kv < S)
    return Case(other_doc_or_sink, mechanism=SUMMARIES)


def case_dense_table(draw, Lq, Lkv):
    allowed = torch.rand(Lq, Lkv, generator=_gen(draw)) < draw(st.sampled_from([0.0, 0.5, 1.0]))

    def table(b, h, q, kv):
        return allowed[q, kv]
    return Case(table, mechanism=None)


def case_permuted_doc(draw, Lq, Lkv):
    L = max(Lq, Lkv)
    doc, perm = _doc_ids(draw, L), torch.randperm(L, generator=_gen(draw))

    def shuffled(b, h, q, kv):
        return doc[perm[q]] == doc[perm[kv]]
    return Case(shuffled, mechanism=None)


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


# -- references --------------------------------------------------------------------------------

def brute_classes(mask: E.Expr, captured: dict, B: int, H: int, Lq: int, Lkv: int, BM: int,
                  BN: int) -> torch.Tensor:
    """In-range tile classes from a dense eager evaluation of every point."""
    ranges = {"b": torch.arange(B), "h": torch.arange(H), "m": torch.arange(Lq),
              "n": torch.arange(Lkv)}
    dense = eval_expr(mask, ["b", "h", "m", "n"], ranges, captured).bool()
    dense = dense.expand(B, H, Lq, Lkv).to(torch.int8)
    nq, nk = -(-Lq // BM), -(-Lkv // BN)
    pad = (0, nk * BN - Lkv, 0, nq * BM - Lq)
    some = F.pad(dense, pad, value=0).reshape(B, H, nq, BM, nk, BN).amax(dim=(3, 5))
    every = F.pad(dense, pad, value=1).reshape(B, H, nq, BM, nk, BN).amin(dim=(3, 5))
    return torch.where(every == 1, FULL, torch.where(some == 1, PARTIAL, EMPTY)).to(torch.int8)


def assert_sound(ours: torch.Tensor, ref: torch.Tensor) -> None:
    ours = ours.expand_as(ref)
    assert not bool(((ours == FULL) & (ref != FULL)).any()), "a tile called FULL is not full"
    assert not bool(((ours == EMPTY) & (ref != EMPTY)).any()), "a tile called EMPTY is not empty"


def assert_tables_match(ours: BlockMask, theirs, B: int, H: int) -> None:
    """torch guarantees, per row, the count and the first ``count`` indices (the set blocks in
    ascending order); that is compared first.  Beyond the count torch leaves the remaining
    columns in ascending order (stable argsort); we reproduce that too, so the whole index
    tensors are compared as well, with torch's shapes."""
    for pre, side in (("", "kv"), ("full_", "kv"), ("", "q"), ("full_", "q")):
        num_a = getattr(ours, f"{pre}{side}_num_blocks")
        idx_a = getattr(ours, f"{pre}{side}_indices")
        num_b = getattr(theirs, f"{pre}{side}_num_blocks")
        idx_b = getattr(theirs, f"{pre}{side}_indices")
        assert num_a.dtype == idx_a.dtype == torch.int32
        assert num_a.shape == num_b.shape and idx_a.shape == idx_b.shape  # torch's [B, H, ..]
        assert torch.equal(num_a, num_b), f"{pre}{side}_num_blocks differ"
        valid = torch.arange(idx_b.shape[-1]) < num_b.unsqueeze(-1)
        assert torch.equal(idx_a[valid], idx_b[valid]), f"{pre}{side}_indices differ"
        assert torch.equal(idx_a, idx_b), f"{pre}{side}_indices padding differs"


def segments_needed(row: list[int]) -> int:
    """Fewest partial* full* partial* segments covering a row's non-empty tiles, in order."""
    count, state = 0, "out"  # out: after an empty tile; lead, full, tail: inside a segment
    for c in row:
        if c == EMPTY:
            state = "out"
        elif state == "out":
            count, state = count + 1, "full" if c == FULL else "lead"
        elif c == FULL and state == "tail":
            count, state = count + 1, "full"
        elif c == FULL:
            state = "full"
        elif state == "full":
            state = "tail"
    return count


def assert_ranges_match(ranges: torch.Tensor | None, classes: torch.Tensor) -> None:
    """Range tables describe the classes exactly, with as many segments as the row that needs
    most, and exist whenever that is at most MAX_SEGMENTS."""
    need = max([segments_needed(r) for r in classes.reshape(-1, classes.shape[-1]).tolist()])
    assert (ranges is not None) == (need <= MAX_SEGMENTS)
    if ranges is None:
        return
    assert ranges.shape[-1] == 4 * max(1, need)
    col = torch.arange(classes.shape[-1])
    rebuilt = torch.zeros_like(classes)
    for seg in ranges.split(4, -1):
        lo, flo, fhi, hi = (seg[..., i:i + 1] for i in range(4))
        assert bool(((lo <= flo) & (flo <= fhi) & (fhi <= hi)).all())
        inside = (col >= lo) & (col < hi)
        assert not bool((inside & (rebuilt != EMPTY)).any())  # segments are disjoint
        full = (col >= flo) & (col < fhi)
        rebuilt = torch.where(full, FULL, torch.where(inside, PARTIAL, rebuilt))
    assert torch.equal(rebuilt.to(classes.dtype), classes)


# -- (a), (b), (d) -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(CASES))
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_classes_and_tables(kind: str, data: st.DataObject) -> None:
    Lq, Lkv, BM, BN = (data.draw(s) for s in (SIZES, SIZES, BLOCKS, BLOCKS))
    case = CASES[kind](data.draw, Lq, Lkv)
    mask, captured = mask_expr(case.mask_mod)
    ref = brute_classes(mask, captured, case.B, case.H, Lq, Lkv, BM, BN)
    rough = classify_tiles(mask, captured, case.B, case.H, Lq, Lkv, BM, BN, exact=False)
    assert_sound(rough.classes, ref)  # the interval pass alone
    tm = classify_tiles(mask, captured, case.B, case.H, Lq, Lkv, BM, BN)
    assert_sound(tm.classes, ref)
    assert torch.equal(tm.classes.expand_as(ref), ref)  # refinement makes it exact
    free = mask.free_indices()
    assert tm.shape == ((case.B if "b" in free else 1), (case.H if "h" in free else 1),
                        ref.shape[2], ref.shape[3])
    if case.mechanism is not None:  # (d)
        assert tm.mechanism == case.mechanism
        assert tm.stats["exact_tiles"] == 0
    assert_ranges_match(tm.kv_ranges(), tm.classes)
    ours = create_block_mask(case.mask_mod, case.B, case.H, Lq, Lkv, device="cpu",
                             BLOCK_SIZE=(BM, BN))
    theirs = torch_create_block_mask(case.mask_mod, case.B, case.H, Lq, Lkv, device="cpu",
                                     BLOCK_SIZE=(BM, BN))
    assert_tables_match(ours, theirs, case.B, case.H)
    assert (kv_tile_bounds(mask, BM, BN) is not None) == case.closed


# -- (c) -----------------------------------------------------------------------------------------

CLOSED = ["anti_causal", "block_causal", "bottom_right", "causal", "causal_window", "chunked",
          "chunked_causal", "chunked_window", "prefix_lm", "window_one_sided",
          "window_two_sided"]


@pytest.mark.parametrize("kind", CLOSED)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_closed_form_bounds(kind: str, data: st.DataObject) -> None:
    Lq, Lkv, BM, BN = (data.draw(s) for s in (SIZES, SIZES, BLOCKS, BLOCKS))
    case = CASES[kind](data.draw, Lq, Lkv)
    mask, captured = mask_expr(case.mask_mod)
    tm = classify_tiles(mask, captured, 1, 1, Lq, Lkv, BM, BN)
    for torch_boundary, classes in ((False, tm.classes), (True, torch_classes(tm))):
        bounds = kv_tile_bounds(mask, BM, BN, torch_boundary=torch_boundary)
        assert bounds is not None
        v = bounds.evaluate(Lq, Lkv)
        kt = torch.arange(tm.shape[3])
        c = classes[0, 0]
        nonempty = (kt >= v["lo"][:, None]) & (kt < v["hi"][:, None])
        full = (kt >= v["full_lo"][:, None]) & (kt < v["full_hi"][:, None])
        assert torch.equal(nonempty, c != EMPTY), f"{bounds}"
        assert torch.equal(full, c == FULL), f"{bounds}"
        assert bool(((v["lo"] <= v["full_lo"]) & (v["full_lo"] <= v["full_hi"])
                     & (v["full_hi"] <= v["hi"])).all())
        if bounds.edge_full_only:
            assert_full_only_at_cut_tiles(c, Lq, Lkv, BM, BN)


def assert_full_only_at_cut_tiles(classes: torch.Tensor, Lq: int, Lkv: int, BM: int,
                                  BN: int) -> None:
    """Every full tile of ``classes`` [query tiles, key tiles] is cut short by Lq or Lkv."""
    cut_rows = (torch.arange(classes.shape[0]) + 1) * BM > Lq
    cut_cols = (torch.arange(classes.shape[1]) + 1) * BN > Lkv
    uncut = ~cut_rows[:, None] & ~cut_cols[None, :]
    assert not bool(((classes == FULL) & uncut).any())


def test_edge_full_only_marks_windows_narrower_than_two_tiles() -> None:
    """A band of w < BM + BN - 1 keys a row has no full tile that is not cut short (so it is
    marked, and has none at 1024 x 1024); from w = BM + BN - 1 on it may have one (at w = 255
    the tile grid's alignment still leaves none, at 400 there are)."""
    for w, narrow in ((64, True), (254, True), (255, False), (400, False)):
        for mask_mod in (and_masks(causal, _window(w)),
                         lambda b, h, q, kv, w=w: (q - kv >= 3) & (q - kv < 3 + w)):
            mask = mask_expr(mask_mod)[0]
            bounds = kv_tile_bounds(mask, 128, 128)
            assert bounds is not None and bounds.edge_full_only is narrow, (w, str(bounds))
            classes = classify_tiles(mask, {}, 1, 1, 1024, 1024, 128, 128).classes[0, 0]
            if narrow or w == 400:
                assert bool((classes == FULL).any()) is not narrow
    for mask_mod in (causal, lambda b, h, q, kv: (kv < 130) | (kv <= q)):
        assert not kv_tile_bounds(mask_expr(mask_mod)[0], 128, 128).edge_full_only


SEGMENTED = {
    "sinks_window": lambda S, W: or_masks(lambda b, h, q, kv: kv < S,
                                          and_masks(causal, _window(W))),
    "causal_sinks_or_window": lambda S, W: and_masks(
        or_masks(lambda b, h, q, kv: kv < S, _window(W)), causal),
    "prefix_two_sided": lambda S, W: or_masks(lambda b, h, q, kv: kv < S,
                                              lambda b, h, q, kv: (q - kv).abs() <= W),
}


@pytest.mark.parametrize("kind", sorted(SEGMENTED))
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_closed_form_segments(kind: str, data: st.DataObject) -> None:
    """Sinks (or a prefix) beside a window: two closed-form segments, disjoint, covering
    exactly the non-empty tiles; their full ranges hold only full tiles."""
    Lq, Lkv, BM, BN = (data.draw(s) for s in (SIZES, SIZES, BLOCKS, BLOCKS))
    S, W = data.draw(st.integers(1, 64)), data.draw(st.integers(1, 100))
    mask, captured = mask_expr(SEGMENTED[kind](S, W))
    tm = classify_tiles(mask, captured, 1, 1, Lq, Lkv, BM, BN)
    for torch_boundary, classes in ((False, tm.classes), (True, torch_classes(tm))):
        segments = kv_tile_segments(mask, BM, BN, torch_boundary=torch_boundary)
        assert segments is not None and len(segments) <= 2
        c = classes[0, 0]
        kt = torch.arange(c.shape[1])
        covered = torch.zeros(c.shape, dtype=torch.int64)
        for seg in segments:
            v = seg.evaluate(Lq, Lkv)
            covered += (kt >= v["lo"][:, None]) & (kt < v["hi"][:, None])
            full = (kt >= v["full_lo"][:, None]) & (kt < v["full_hi"][:, None])
            assert bool((c[full] == FULL).all()), str(seg)
            if seg.edge_full_only:
                inside = (kt >= v["lo"][:, None]) & (kt < v["hi"][:, None])
                assert_full_only_at_cut_tiles(torch.where(inside, c, EMPTY), Lq, Lkv, BM, BN)
        assert int(covered.max()) <= 1 and torch.equal(covered == 1, c != EMPTY)


def test_closed_form_is_readable() -> None:
    mask, _ = mask_expr(causal)
    text = str(kv_tile_bounds(mask, 128, 64))
    assert "lo = 0" in text and "full_lo = 0" in text and "qt * 128" in text


# -- interval rules --------------------------------------------------------------------------------

_m, _n = E.index("m"), E.index("n")


def _int_exprs() -> st.SearchStrategy:
    leaves = st.one_of(st.just(_m), st.just(_n), st.integers(-20, 20).map(E.const))
    nonzero = st.integers(-9, 9).filter(bool).map(E.const)

    def extend(sub: st.SearchStrategy) -> st.SearchStrategy:
        two = st.tuples(sub, sub)
        return st.one_of(
            st.tuples(st.sampled_from([Op.ADD, Op.SUB, Op.MUL, Op.MAX, Op.MIN]), two).map(
                lambda t: E.binary(t[0], *t[1])),
            st.tuples(st.sampled_from([Op.FLOORDIV, Op.MOD]), sub, nonzero).map(
                lambda t: E.binary(t[0], t[1], t[2])),
            st.tuples(leaves, st.sampled_from([0, 1, 2, 3])).map(
                lambda t: E.binary(Op.POW, t[0], E.const(t[1]))),
            sub.map(lambda x: E.binary(Op.FLOORDIV, x, E.binary(Op.ADD, _n, 1))),
            sub.map(lambda x: E.unary(Op.ABS, x)), sub.map(lambda x: E.unary(Op.NEG, x)),
            st.tuples(_bools(sub), sub, sub).map(lambda t: E.where(*t)),
        )
    return st.recursive(leaves, extend, max_leaves=6)


def _bools(ints: st.SearchStrategy) -> st.SearchStrategy:
    cmp = st.tuples(st.sampled_from([Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE]), ints, ints).map(
        lambda t: E.binary(t[0], t[1], t[2]))
    return st.recursive(cmp, lambda sub: st.one_of(
        st.tuples(st.sampled_from([Op.AND, Op.OR]), sub, sub).map(
            lambda t: E.binary(t[0], t[1], t[2])),
        sub.map(lambda x: E.unary(Op.NOT, x))), max_leaves=3)


@pytest.mark.filterwarnings("ignore:Generating overly large repr")
@settings(max_examples=10 * EXAMPLES)
@given(e=st.one_of(_int_exprs(), _bools(_int_exprs())), mlo=st.integers(0, 40),
       nlo=st.integers(0, 40), dm=st.integers(0, 7), dn=st.integers(0, 7))
def test_interval_rules_are_sound(e: E.Expr, mlo: int, nlo: int, dm: int, dn: int) -> None:
    f = torch.float64
    box = Boxes(*(torch.tensor([float(v)], dtype=f) for v in (0, 0, mlo, mlo + dm, nlo, nlo + dn)))
    iv = IntervalEvaluator({}).evaluate(e, box)
    ranges = {"m": torch.arange(mlo, mlo + dm + 1), "n": torch.arange(nlo, nlo + dn + 1)}
    vals = eval_expr(e, ["m", "n"], ranges, {}).to(f)
    assert float(iv.lo.min()) <= float(vals.min()) and float(vals.max()) <= float(iv.hi.max())
    point = Boxes(*(torch.tensor([float(v)], dtype=f) for v in (0, 0, mlo, mlo, nlo, nlo)))
    exact = IntervalEvaluator({}).evaluate(e, point)  # degenerate boxes are evaluated exactly
    assert float(exact.lo) == float(exact.hi) == float(vals.reshape(-1)[0])


@pytest.mark.parametrize("base, power, mlo, dm", [
    (_m + 100, E.const(-1), 0, 15), (_m - 3, E.const(-1), 0, 7), (_m - 3, E.const(-3), 2, 0),
    (_m + 1, E.const(70), 0, 15), (_m + 1, E.const(64), 1, 0), (_m + 2, _m - 1, 0, 7),
], ids=["(m + 100) ** -1", "(m - 3) ** -1", "(2 - 3) ** -3", "(m + 1) ** 70", "2 ** 64",
        "(m + 2) ** (m - 1)"])
def test_interval_rules_are_sound_for_integer_powers_torch_computes_in_int64(
        base: E.Expr, power: E.Expr, mlo: int, dm: int) -> None:
    """Integer pow is torch's: x ** -k is 0 unless x = +-1 (the real bound [1/115, 1/100] of
    (m + 100) ** -1 excluded it), and x ** 70 wraps in int64 (0 for an even x; the real bound
    [1, 16 ** 70] excluded that too).  A degenerate box stays exact for a negative power; a
    wrapped one is unknown (float64 does not hold the real value exactly)."""
    e = E.binary(Op.POW, base, power)
    f = torch.float64
    iv = IntervalEvaluator({}).evaluate(e, Boxes(*(torch.tensor([float(v)], dtype=f)
                                                         for v in (0, 0, mlo, mlo + dm, 0, 0))))
    vals = eval_expr(e, ["m", "n"], {"m": torch.arange(mlo, mlo + dm + 1),
                                           "n": torch.arange(1)}, {}).to(f)
    assert float(iv.lo.min()) <= float(vals.min()) and float(vals.max()) <= float(iv.hi.max())
    if dm == 0 and power.arg < 0:
        assert float(iv.lo) == float(iv.hi) == float(vals.reshape(-1)[0])


@pytest.mark.parametrize("mask", ["(m - n + 100) ** -1 == 0", "(m + 1) ** 70 == 0",
                                  "(m + 1) * 4611686018427387904 * 4 == n - n",
                                  "m - n + 9223372036854775807 >= 0",
                                  "-(m - 9223372036854775807 - 1) > n"])
def test_a_mask_whose_integers_wrap_in_int64_keeps_the_keys_the_oracle_keeps(
        mask: str) -> None:
    """torch's integer arithmetic (the oracle's, the kernel's) is int64 and wraps: the first
    three hold for every key, the last two only where nothing wraps (m - n <= 0; m = 0).  The
    interval rules had classified every tile empty (powers), and the closed-form bounds,
    real-number algebra, had kept no key or every key."""
    cascade = attndsl.cascade(f"""spec p {{
  index b: B batch, h: H head, m: M query, n: N key, e: E qk, f: F v
  input Q[B, H, M, E], K[B, H, N, E], V[B, H, N, F]
  mask {mask}
  S[b,h,m,n] = Q[b,h,m,e] * K[b,h,n,e]
  O[b,h,m,f] = softmax(n) S[b,h,m,n] * V[b,h,n,f]
  output O
}}""")
    gen = torch.Generator().manual_seed(0)
    inputs = {n: torch.randn(1, 1, 20, 16, generator=gen) for n in "QKV"}
    want = attndsl.run_cascade(cascade, inputs, {})["O"]
    got = attndsl.compile(cascade)(inputs)["O"].double()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


# -- mechanisms and robustness ---------------------------------------------------------------------

def test_non_analysable_masks_use_chunked_evaluation() -> None:
    g = torch.Generator().manual_seed(0)
    allowed = torch.rand(200, 300, generator=g) < 0.5
    doc = torch.sort(torch.randint(0, 6, (300,), generator=g)).values
    perm = torch.randperm(300, generator=g)
    for fn in (lambda b, h, q, kv: allowed[q, kv],
               lambda b, h, q, kv: doc[perm[q]] == doc[perm[kv]]):
        mask, captured = mask_expr(fn)
        tm = classify_tiles(mask, captured, 1, 1, 200, 300, 32, 64)
        assert tm.mechanism == CHUNKED
        assert torch.equal(tm.classes, brute_classes(mask, captured, 1, 1, 200, 300, 32, 64))
        small = classify_tiles(mask, captured, 1, 1, 200, 300, 32, 64, max_elements=1)
        assert torch.equal(small.classes, tm.classes)  # one tile at a time


def test_budget_and_nan_fall_back_to_exact_tiles() -> None:
    # always true, but the bounds of the two halves overlap on the diagonal tiles: no point
    # sample is false there, so only subdivision (or exact evaluation) can call them FULL
    mask, captured = mask_expr(or_masks(causal, lambda b, h, q, kv: q < kv))
    tm = classify_tiles(mask, captured, 1, 1, 300, 280, 64, 32, budget=0)
    assert tm.stats["exact_tiles"] > 0 and tm.mechanism == CLOSED_FORM
    assert torch.equal(tm.classes, brute_classes(mask, captured, 1, 1, 300, 280, 64, 32))
    score = torch.rand(200, generator=torch.Generator().manual_seed(1))
    score[17] = float("nan")
    mask, captured = mask_expr(lambda b, h, q, kv: (score[kv] < 0.5) | (q < 10))
    tm = classify_tiles(mask, captured, 1, 1, 100, 200, 16, 16)
    assert torch.equal(tm.classes, brute_classes(mask, captured, 1, 1, 100, 200, 16, 16))


def test_large_masks_stay_linear_in_tiles() -> None:
    L = 1 << 16
    doc = torch.repeat_interleave(torch.arange(16), L // 16)
    for fn, mech in ((causal, CLOSED_FORM), (and_masks(causal, _window(1024)), CLOSED_FORM),
                     (lambda b, h, q, kv: doc[q] == doc[kv], SUMMARIES)):
        bm = create_block_mask(fn, None, None, L, L, device="cpu")
        assert bm.mechanism == mech and bm.tile_map.stats["exact_tiles"] == 0
        assert bm.tile_map.stats["refine_boxes"] + bm.tile_map.stats["sample_points"] < 8 * 512**2
    counts = create_block_mask(causal, None, None, L, L, device="cpu").tile_map.counts
    assert counts == {"empty": 512 * 511 // 2, "partial": 512, "full": 512 * 511 // 2}


def test_picture_and_counts() -> None:
    mask, captured = mask_expr(causal)
    tm = classify_tiles(mask, captured, 1, 1, 1000, 1000, 16, 16)
    text = tm.picture(max_rows=8, max_cols=16)
    lines = text.splitlines()
    assert CLOSED_FORM in lines[0] and len(lines) == 8 + 3
    assert lines[2] == "|░░" + " " * 14 + "|" and lines[-2] == "|" + "█" * 14 + "░░|"
    assert sum(tm.counts.values()) == 63 * 63 and abs(sum(tm.fractions.values()) - 1) < 1e-9


# -- BlockMask -------------------------------------------------------------------------------------

def test_block_mask_round_trip_and_attention() -> None:
    lengths = torch.tensor([70, 200])

    def padded(b, h, q, kv):
        return kv < lengths[b]
    fn = and_masks(causal, padded)
    bm = create_block_mask(fn, 2, 3, 200, 200, BLOCK_SIZE=64, device="cpu")
    assert bm.shape == (2, 3, 200, 200) and bm.BLOCK_SIZE == (64, 64)
    assert bm.kv_num_blocks.shape == (2, 3, 4)  # torch's shape; one copy along the heads
    assert "sparsity=" in repr(bm) and SUMMARIES in repr(bm)
    tbm = bm.to_torch()
    theirs = torch_create_block_mask(fn, 2, 3, 200, 200, device="cpu", BLOCK_SIZE=64)
    assert abs(torch_block_grid_sparsity(tbm) - bm.sparsity()) < 1e-9
    back = BlockMask.from_torch(theirs)
    assert back.mask is None and back.mechanism == "from torch"
    assert torch.equal(back.classes(), bm.classes().expand(2, 3, -1, -1))
    mask, captured = back.traced()
    assert mask == bm.mask and torch.equal(captured["cap0"], lengths)
    assert bm.to("cpu").kv_indices.device.type == "cpu"
    from torch.nn.attention.flex_attention import flex_attention
    q, k, v = (torch.randn(2, 3, 200, 8, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention on the CPU warns once
        out = flex_attention(q, k, v, block_mask=tbm)
        direct = flex_attention(q, k, v, block_mask=create_block_mask(  # as_tuple, no to_torch
            fn, 2, 3, 200, 200, BLOCK_SIZE=64, device="cpu", _compile=True))
    keep = (torch.arange(200)[:, None] >= torch.arange(200)) & \
        (torch.arange(200) < lengths[:, None, None, None])
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    assert torch.allclose(out, ref, atol=1e-5) and torch.equal(direct, out)
    assert torch.equal(bm.to_dense().expand(2, 3, -1, -1), theirs.to_dense())


def test_compositions_trace_and_match_torch() -> None:
    for fn in (noop_mask, and_masks(), or_masks(), and_masks(causal, _window(5)),
               or_masks(_chunk(16), causal)):
        ours = create_block_mask(fn, None, None, 100, 90, device="cpu", BLOCK_SIZE=(16, 32))
        theirs = torch_create_block_mask(fn, None, None, 100, 90, device="cpu",
                                         BLOCK_SIZE=(16, 32))
        assert_tables_match(ours, theirs, 1, 1)
        assert ours.mechanism == CLOSED_FORM


# -- (e) -------------------------------------------------------------------------------------------

def test_bad_input_errors() -> None:
    with pytest.raises(TraceError, match="boolean"):
        create_block_mask(lambda b, h, q, kv: q - kv, None, None, 64, 64)
    mask, _ = mask_expr(causal)
    with pytest.raises(MaskAnalysisError, match="boolean"):
        classify_tiles(E.binary(Op.SUB, _m, _n), {}, 1, 1, 64, 64, 16, 16)
    for bad in (0, -16, (16, 0), 1.5, True, (16, 16, 16)):
        with pytest.raises(MaskAnalysisError, match="BLOCK_SIZE"):
            create_block_mask(causal, None, None, 64, 64, BLOCK_SIZE=bad)
    with pytest.raises(MaskAnalysisError, match="BLOCK_M"):
        classify_tiles(mask, {}, 1, 1, 64, 64, 0, 16)
    with pytest.raises(MaskAnalysisError, match="BLOCK_N"):
        kv_tile_bounds(mask, 16, -1)
    with pytest.raises(MaskAnalysisError, match="Q_LEN"):  # 0 is torch's empty grid
        create_block_mask(causal, None, None, -1, 64)
    with pytest.raises(MaskAnalysisError, match="callable"):
        create_block_mask("causal", None, None, 64, 64)
    with pytest.raises(MaskAnalysisError, match="not bound"):
        classify_tiles(E.binary(Op.EQ, E.load("cap0", (_m,), "int"), 0), {}, 1, 1, 8, 8, 4, 4)


# -- (f) -------------------------------------------------------------------------------------------

def _attndsl_imports(module: str) -> set[str]:
    """The attndsl modules ``module``'s source names in its import statements (``from a.b
    import c`` names a.b, and a.b.c when that is a module)."""
    root = Path(attndsl.__file__).parent.parent

    def source(name: str) -> Path | None:
        base = root / name.replace(".", "/")
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return path
        return None

    found: set[str] = set()
    path = source(module)
    assert path is not None, module
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names
                      if source(f"{node.module}.{a.name}") is not None}
    return {m for m in found if m.split(".")[0] == "attndsl"}


def test_the_mask_analysis_and_the_table_layout_never_import_the_eager_oracle() -> None:
    """The kernel path shares only the IR with the oracle: nothing the analysis or the table
    layout imports, directly or through other modules, is attndsl.eager."""
    todo = ["attndsl.passes.mask", "attndsl.block_tables"]
    todo += [f"attndsl.passes.mask.{p.stem}" for p in
             (Path(attndsl.__file__).parent / "passes" / "mask").glob("*.py")]
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += sorted(_attndsl_imports(module))
    assert "attndsl.ir.evaluate" in seen and "attndsl.passes.mask.classify" in seen
    assert "attndsl.eager" not in seen, sorted(seen)
