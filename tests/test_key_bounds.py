"""Masks that bound the key index n are printed cheaper and stay the same boolean
(codegen.key_bounds): bounds of one direction joined by ``|`` / ``&`` merge into one
(prefix-LM's ``(n < 32) | (m >= n)`` is ``n <= max(m, 31)``), and a bound ``n OP A`` is read
relative to the key tile, ``j OP (A - start_n)`` on the constant columns, when int32 holds
``A - start_n`` exactly (``-1 <= A <= 2**31 - 1``)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from attndsl.codegen.key_bounds import (
    _truth,
    decided_compares,
    distance_bounds,
    key_bound,
    merge_key_bounds,
    relative_bound,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

import attndsl
from attndsl.ir import expr as E
from attndsl.ir.expr import Op
from attndsl.passes.int_range import int_ranges
from attndsl.runtime.gpu_report import record_launches

M, N = E.index("m"), E.index("n")
COMPARES = [Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE]
_PY = {Op.LT: lambda a, b: a < b, Op.LE: lambda a, b: a <= b, Op.GT: lambda a, b: a > b,
       Op.GE: lambda a, b: a >= b, Op.EQ: lambda a, b: a == b, Op.NE: lambda a, b: a != b,
       Op.AND: lambda a, b: a and b, Op.OR: lambda a, b: a or b, Op.ADD: lambda a, b: a + b,
       Op.SUB: lambda a, b: a - b, Op.MAX: max, Op.MIN: min, Op.MUL: lambda a, b: a * b,
       Op.NEG: lambda a: -a}


def _wrap(v):
    """An integer as int64 holds it (torch's and the kernels' arithmetic wraps)."""
    if isinstance(v, bool):
        return v
    return (v + 2**63) % 2**64 - 2**63


def _value(e: E.Expr, m: int, n: int):
    """``e`` at the point (m, n), in int64 integers and booleans."""
    if e.op is Op.INDEX:
        return {"m": m, "n": n}[e.arg]
    if e.op is Op.CONST:
        return e.arg
    return _wrap(_PY[e.op](*(_value(s, m, n) for s in e.src)))


# the n-free side of a bound: a constant (negative ones included), m, m + c
sides = st.one_of(st.integers(-40, 40).map(E.const), st.just(M),
                  st.integers(-9, 9).map(lambda c: E.binary(Op.ADD, M, E.const(c))))
bounds = st.builds(lambda op, a, flip: E.binary(op, a, N) if flip else E.binary(op, N, a),
                   st.sampled_from(COMPARES), sides, st.booleans())
terms = st.one_of(bounds, st.builds(lambda op: E.binary(op, M, N), st.sampled_from(COMPARES)))


def _chain(draw_terms: list[E.Expr], joins: list[Op]) -> E.Expr:
    e = draw_terms[0]
    for t, j in zip(draw_terms[1:], joins, strict=False):
        e = E.binary(j, e, t)
    return e


@settings(max_examples=300, deadline=None)
@given(st.lists(terms, min_size=1, max_size=5),
       st.lists(st.sampled_from([Op.AND, Op.OR]), min_size=4, max_size=4))
def test_merged_key_bounds_are_the_same_boolean(parts: list[E.Expr], joins: list[Op]) -> None:
    mask = _chain(parts, joins)
    merged = merge_key_bounds(mask, "n")
    for m in range(-3, 45, 3):
        for n in range(-45, 50):
            assert _value(merged, m, n) == _value(mask, m, n), (E.render(mask), m, n)


# a side of a distance comparison: c * index + k, with big constants (near int64's end) too
_consts = st.one_of(st.integers(-40, 40), st.sampled_from([2**31 - 2, -(2**31), 2**40,
                                                          2**62, -(2**62), 2**63 - 1]))
_affine = st.builds(lambda cm, cn, k: E.binary(Op.ADD, E.binary(Op.ADD, E.binary(
    Op.MUL, E.const(cm), M), E.binary(Op.MUL, E.const(cn), N)), E.const(k)),
    st.integers(-3, 3), st.integers(-3, 3), _consts)
_POINTS = [(m, n) for m in (0, 1, 2, 5, 17, 40, 2**31 - 2) for n in (0, 1, 3, 16, 39, 2**31 - 2)]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(COMPARES), _affine, _affine)
@example(Op.GE, M, E.binary(Op.ADD, N, E.const(2**63 - 1)))  # n + k wraps: kept as written
@example(Op.LT, E.binary(Op.SUB, M, E.const(2**63 - 1)), E.binary(Op.SUB, N, E.const(4)))
@example(Op.EQ, E.binary(Op.MUL, E.const(3), M), E.binary(
    Op.ADD, E.binary(Op.MUL, E.const(3), N), E.const(2)))  # 3 does not divide 2: never
def test_distance_bounds_are_the_same_boolean(op: Op, a: E.Expr, b: E.Expr) -> None:
    """``c (m - n) + k OP 0`` as ``(m - n) OP' K``: the same truth at every index pair (in
    int64, wrapping as torch does), including constants that decide it and sides that wrap."""
    mask = E.binary(op, a, b)
    lowered = distance_bounds(mask, "m", "n")
    for m, n in _POINTS + [(m, n) for m in range(0, 12) for n in range(0, 12)]:
        assert _value(lowered, m, n) == _value(mask, m, n), (E.render(mask), m, n)


_range = st.tuples(st.integers(-4, 4), st.integers(0, 3)).map(lambda t: (t[0], t[0] + t[1]))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(COMPARES), _range, _range)
def test_a_comparison_is_decided_exactly_when_every_pair_of_values_agrees(op, a, b) -> None:
    truths = {_PY[op](x, y) for x in range(a[0], a[1] + 1) for y in range(b[0], b[1] + 1)}
    assert _truth(op, a, b) == (truths.pop() if len(truths) == 1 else None)


@pytest.mark.parametrize("mask, printed", [
    (E.binary(Op.AND, E.binary(Op.GE, M, E.const(0)), E.binary(Op.GE, M, N)), "m >= n"),
    (E.binary(Op.OR, E.binary(Op.LT, N, E.const(0)), E.binary(Op.GE, M, N)), "m >= n"),
    (E.binary(Op.OR, E.binary(Op.LT, N, E.const(2**31)), E.binary(Op.GE, M, N)), "True"),
    (E.binary(Op.AND, E.binary(Op.LT, M, E.const(5)), E.binary(Op.GE, M, N)), "(m < 5) & (m >= n)"),
])
def test_comparisons_the_index_ranges_decide_are_folded(mask: E.Expr, printed: str) -> None:
    assert E.render(decided_compares(mask)) == printed


def test_the_query_index_read_alone_keeps_the_mask_relative_to_the_tile() -> None:
    q = torch.randn(1, 1, 64, 16)
    text = _source(q, q, q, mask_mod=lambda b, h, qi, kv: (qi < 40) & (qi - kv <= 8) & (qi >= kv),
                   kernel_options=dict(CONFIG))
    assert "keep = (((offs_m[:, None] < 40) & (diag <= 8)) & (diag >= 0))" in text


@pytest.mark.parametrize("mask, printed", [
    (E.binary(Op.GE, M, E.binary(Op.ADD, N, E.const(3))), "m - n >= 3"),
    (E.binary(Op.LE, N, E.binary(Op.SUB, M, E.const(3))), "m - n >= 3"),  # not int32-relative
    (E.binary(Op.GE, E.binary(Op.MUL, E.const(2), M), E.binary(
        Op.ADD, E.binary(Op.MUL, E.const(2), N), E.const(3))), "m - n >= 2"),
    (E.binary(Op.LT, N, E.binary(Op.ADD, M, E.const(1))), "n < m + 1"),  # a relative bound
    (E.binary(Op.AND, E.binary(Op.LT, N, E.binary(Op.ADD, M, E.const(1))), E.binary(
        Op.GE, N, E.binary(Op.SUB, M, E.const(9)))), "(m - n >= 0) & (m - n <= 9)"),  # window
    (E.binary(Op.GE, M, N), "m >= n"),  # a pair already
    (E.binary(Op.GE, M, E.binary(Op.ADD, N, E.const(2**40))), "False"),
])
def test_distance_comparisons_are_printed_on_the_distance(mask: E.Expr, printed: str) -> None:
    assert E.render(distance_bounds(mask, "m", "n")) == printed


@pytest.mark.parametrize("mask, printed", [
    (E.binary(Op.OR, E.binary(Op.LT, N, E.const(32)), E.binary(Op.GE, M, N)), "n <= max(m, 31)"),
    (E.binary(Op.AND, E.binary(Op.LT, N, E.const(32)), E.binary(Op.LT, N, E.const(40))),
     "n < 32"),
    (E.binary(Op.OR, E.binary(Op.GT, N, E.const(4)), E.binary(Op.GE, N, M)), "n >= min(m, 5)"),
    (E.binary(Op.OR, E.binary(Op.GT, N, M), E.binary(Op.GE, N, E.const(5))),
     "(n > m) | (n >= 5)"),  # strict against m: m + 1 could leave int32, kept
    (E.binary(Op.AND, E.binary(Op.GE, N, E.const(3)), E.binary(Op.GT, E.binary(
        Op.ADD, M, E.const(2)), N)), "(n >= 3) & (m + 2 > n)"),  # two directions: kept
])
def test_bounds_of_one_direction_merge_and_others_stay(mask: E.Expr, printed: str) -> None:
    assert E.render(merge_key_bounds(mask, "n")) == printed


def test_a_key_bound_is_read_relative_to_the_tile_only_where_int32_holds_it() -> None:
    near = E.binary(Op.LT, N, E.const(-1))
    far = E.binary(Op.LT, N, E.const(-2))
    mask = E.binary(Op.OR, near, far)
    ranges = int_ranges(mask)
    assert relative_bound(key_bound(near, "n"), ranges)
    assert not relative_bound(key_bound(far, "n"), ranges)
    assert key_bound(E.binary(Op.LT, N, E.binary(Op.ADD, N, E.const(1))), "n") is None


def _source(q, k, v, **kwargs) -> str:
    launch, = record_launches(lambda: attndsl.flex_attention(q, k, v, **kwargs))
    return Path(inspect.getsourcefile(launch.fn)).read_text()


CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
MASKS = {
    "prefix_lm": lambda b, h, q, kv: (kv < 7) | (q >= kv),
    "window_after_prefix": lambda b, h, q, kv: (kv >= q - 5) & (kv > 3) & (kv <= q + 2),
    "negative_bound": lambda b, h, q, kv: (kv > -3) & (q >= kv) | (kv == 20),
    "far_bound": lambda b, h, q, kv: (kv > -2**40) & (q - 9 < kv),
    "shifted_causal": lambda b, h, q, kv: q >= kv + 3,
    "far_shifted": lambda b, h, q, kv: q >= kv + 300,
    "shifted_ahead": lambda b, h, q, kv: kv <= q + 5,
    "window_of_sums": lambda b, h, q, kv: (kv + 5 >= q) & (q + 2 >= kv),
    "scaled_distance": lambda b, h, q, kv: 2 * q >= 2 * kv - 3,
    "decided_distance": lambda b, h, q, kv: (q >= kv + 2**40) | (kv < 4),
    "bound_window": lambda b, h, q, kv: (kv <= q - 1) & (kv >= q - 64),
    "query_bounded": lambda b, h, q, kv: (q < 20) & (q - kv <= 8) & (q >= kv) | (q >= 0) & (kv < 0),
}


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("lq, lkv", [(45, 37), (32, 53)])
def test_masks_with_key_bounds_give_the_oracles_attention(name: str, lq: int, lkv: int) -> None:
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, length, 16, generator=gen) for length in (lq, lkv, lkv))
    mask_mod = MASKS[name]
    out = attndsl.flex_attention(q, k, v, mask_mod=mask_mod, kernel_options=dict(CONFIG))
    keep = mask_mod(0, 0, torch.arange(lq)[:, None], torch.arange(lkv)[None, :])
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.25
    w = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    torch.testing.assert_close(out.double(), w @ v.double(), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name, printed", [
    ("shifted_causal", "keep = ((offs_m_rel - 3)[:, None] >= tl.arange(0, BLOCK_N)[None, :])"),
    ("far_shifted", "keep = (offs_m_rel[:, None] >= (tl.arange(0, BLOCK_N) + 300)[None, :])"),
    ("window_of_sums", "keep = ((diag <= 5) & (diag >= -2))"),
    ("bound_window", "keep = ((diag >= 1) & (diag <= 64))"),
])
def test_distance_masks_are_compared_on_the_tile(name: str, printed: str) -> None:
    """One distance compare: the relative rows moved by the distance against the constant
    columns (one compare per element; a distance past the launchers' length margin moves the
    columns instead); two: both on diag = m - n (LLVM merges them into one unsigned compare),
    relative key bounds included."""
    q = torch.randn(1, 1, 64, 16)
    text = _source(q, q, q, mask_mod=MASKS[name], kernel_options=dict(CONFIG))
    assert printed in text


_OPS = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
# one side of a distance comparison, as a mask_mod writes it: c * index + k
_side = st.tuples(st.sampled_from([-2, -1, 1, 2]), st.sampled_from(["q", "kv"]),
                  st.integers(-20, 20))


def _distance_term(op: str, a: tuple, b: tuple):
    (ca, ia, ka), (cb, ib, kb) = a, b

    def term(q, kv):
        at = {"q": q, "kv": kv}
        return _OPS[op](ca * at[ia] + ka, cb * at[ib] + kb)
    return term


def joined_mask(terms: list[tuple], join: str):
    """The mask_mod of the distance terms ``(op, side, side)`` joined by ``&`` or ``|``."""
    parts = [_distance_term(*t) for t in terms]

    def mask_mod(b, h, q, kv):
        out = parts[0](q, kv)
        for part in parts[1:]:
            out = (out & part(q, kv)) if join == "&" else (out | part(q, kv))
        return out
    return mask_mod


@settings(max_examples=12, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(_OPS)), _side, _side), min_size=1, max_size=3),
       st.sampled_from(["&", "|"]), st.integers(1, 40), st.integers(1, 40))
def test_random_distance_masks_give_the_oracles_attention(terms, join, lq, lkv) -> None:
    """Comparisons of affine index forms (distances among them, rewritten by
    distance_bounds; others printed as written), joined, on ragged tiles, Lq != Lkv."""
    mask_mod = joined_mask(terms, join)
    gen = torch.Generator().manual_seed(lq * 41 + lkv)
    q, k, v = (torch.randn(1, 1, length, 16, generator=gen) for length in (lq, lkv, lkv))
    out = attndsl.flex_attention(q, k, v, mask_mod=mask_mod, kernel_options=dict(CONFIG))
    keep = mask_mod(0, 0, torch.arange(lq)[:, None], torch.arange(lkv)[None, :])
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.25
    w = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    torch.testing.assert_close(out.double(), w @ v.double(), atol=2e-5, rtol=2e-5)


def test_the_prefix_lm_mask_is_one_compare_of_the_tile_columns() -> None:
    q = torch.randn(1, 1, 64, 16)
    text = _source(q, q, q, mask_mod=MASKS["prefix_lm"], kernel_options=dict(CONFIG))
    assert "keep = (tl.arange(0, BLOCK_N)[None, :] <= (tl.maximum(offs_m[:, None], 6) - " \
           "start_n))" in text


SLOPES = torch.tensor([0.5, -0.25])
SCORES = {  # scores that read the indices only in pairs, with their torch form
    "alibi": lambda s, h, q, kv: s + SLOPES[h] * (kv - q),
    "alibi_other_sign": lambda s, h, q, kv: s - (q - kv) * SLOPES[h],
    "compared": lambda s, h, q, kv: torch.where(q >= kv, s, s * 0.5 + (q - kv)),
    "distance_compared": lambda s, h, q, kv: torch.where(q - kv >= 3, s, s * 0.5),
    "sum_compared": lambda s, h, q, kv: torch.where(kv + 2 <= q, s, s * 0.5 + (q - kv)),
    "far_sum_compared": lambda s, h, q, kv: torch.where(q >= kv + 300, s * 2.0, s),
}


@pytest.mark.parametrize("name", list(SCORES))
@pytest.mark.parametrize("lq, lkv, causal", [(45, 37, True), (32, 53, False), (19, 64, True)])
def test_scores_read_on_tile_relative_pairs_give_the_oracles_attention(
        name: str, lq: int, lkv: int, causal: bool) -> None:
    """A score that reads m and n only as ``n - m``, ``m - n`` or their comparisons prints
    them on the rows relative to start_n against the constant columns (the int32 values are
    the same); ragged tiles, Lq != Lkv, with and without a causal mask."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, length, 16, generator=gen) for length in (lq, lkv, lkv))
    score = SCORES[name]
    mask_mod = (lambda b, h, qi, kv: qi >= kv) if causal else None
    kwargs = dict(score_mod=lambda s, b, h, qi, kv: score(s, h, qi, kv), mask_mod=mask_mod,
                  kernel_options=dict(CONFIG))
    out = attndsl.flex_attention(q, k, v, **kwargs)
    text = _source(q, k, v, **kwargs)
    score_line = text.split("y_m_i = ", 1)[1].split("\n", 1)[0]
    assert "tl.arange(0, BLOCK_N)" in score_line and "offs_n" not in score_line
    m, n = torch.arange(lq)[:, None], torch.arange(lkv)[None, :]
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.25
    s = score(s, torch.arange(2)[:, None, None], m, n)
    if causal:
        s = s.masked_fill(~(m >= n), float("-inf"))
    w = torch.softmax(s, -1).nan_to_num(0.0)
    torch.testing.assert_close(out.double(), w @ v.double(), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mask", ["mask m >= n + W", "mask n + W <= m & m - n < 40",
                                  "mask n < W + 4294967296 | m == n"])
@pytest.mark.parametrize("w", [3, 2**63 - 1, -(2**40), -(2**63)])
def test_parameters_past_int32_keep_masks_of_sums_as_torch_wraps_them(mask: str, w: int) -> None:
    """An int parameter may arrive as any int64, where ``n + W`` wraps: a distance or a
    decided compare reading it would differ from torch, so it is printed as written."""
    from dataclasses import replace

    from attndsl.checking import TOLERANCE, compare, index_sizes, oracle, random_problem
    from attndsl.frontend.text import parse_text
    from attndsl.passes.pipeline import compile_cascade
    from attndsl.runtime.modules import load_kernel_module

    text = f"""spec s {{
  index b: B batch, h: H head, m: M query, n: N key, e: E qk, f: F v
  input Q[B, H, M, E], K[B, H, N, E], V[B, H, N, F]
  param W: int
  S[b,h,m,n] = Q[b,h,m,e] * K[b,h,n,e]
  {mask}
  O[b,h,m,f] = softmax(n) S[b,h,m,n] * V[b,h,n,f]
  output O
}}
"""
    (c,) = parse_text(text).values()
    module = load_kernel_module(compile_cascade(c).kernel)
    prob = random_problem(c, index_sizes(c, 1, 2, 1, 37, 29, 16, 16), torch.float32,
                          torch.Generator().manual_seed(3))
    prob = replace(prob, params={**prob.params, "W": w})
    ours = module.launch(prob.inputs, prob.params, prob.captured)
    ref = oracle(c, prob)
    result = compare(ours, ref)
    assert not result.nan and result.worst() <= TOLERANCE[torch.float32], result


@pytest.mark.parametrize("name", ["window_of_sums", "shifted_causal", "query_bounded"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_distance_masks_give_the_oracles_gradients(name: str, deterministic: bool) -> None:
    """The backward kernels evaluate the same lowered mask (codegen.key_bounds.lowered_mask):
    dQ, dK, dV against float64 autograd, ragged tiles, Lq != Lkv."""
    gen = torch.Generator().manual_seed(11)
    lq, lkv = 45, 37
    q, k, v = (torch.randn(1, 2, length, 16, generator=gen).requires_grad_()
               for length in (lq, lkv, lkv))
    mask_mod = MASKS[name]
    options = {"deterministic": deterministic}
    out = attndsl.flex_attention(q, k, v, mask_mod=mask_mod, kernel_options=options)
    grad = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, (q, k, v), grad)
    keep = mask_mod(0, 0, torch.arange(lq)[:, None], torch.arange(lkv)[None, :])
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = (q64 @ k64.transpose(-1, -2)) * 0.25
    w = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    want = torch.autograd.grad(w @ v64, (q64, k64, v64), grad.double())
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4)
