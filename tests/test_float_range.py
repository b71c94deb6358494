"""Static float bounds (attndsl.passes.float_range) and the stabiliser they spare: a score
bounded below (soft-capping's ``cap * tanh(qk / cap)``) makes the running max finite on a full
unmasked tile, where the kernel reads it without its -inf guard; a score that can be -inf keeps
the guard.  Bounds are checked against values computed in float32 at infinite and huge leaves;
kernels against the float64 oracle."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attndsl
from attndsl.ir import expr as E
from attndsl.ir.expr import Op
from attndsl.passes.float_range import bounded_below, float_ranges
from attndsl.runtime.gpu_report import record_launches

QK = E.row("qk")
# leaf values: the infinities, fp32 overflow, zeros and ordinary values
SAMPLES = torch.tensor([-math.inf, -3e38, -1e30, -70.0, -1.5, -1e-30, 0.0, 1e-30, 0.5, 3.0,
                        88.0, 1e30, 3e38, math.inf], dtype=torch.float32)
_UNARY = {Op.NEG: torch.neg, Op.EXP: torch.exp, Op.EXP2: torch.exp2, Op.LOG: torch.log,
          Op.LOG2: torch.log2, Op.TANH: torch.tanh, Op.SIGMOID: torch.sigmoid,
          Op.SQRT: torch.sqrt, Op.ABS: torch.abs}
_BINARY = {Op.ADD: torch.add, Op.SUB: torch.sub, Op.MUL: torch.mul, Op.TRUEDIV: torch.div,
           Op.MAX: torch.maximum, Op.MIN: torch.minimum,
           Op.DIV: lambda a, b: torch.where((a == 0) & (b == 0), 0.0, a / b)}  # 0 / 0 = 0
CONSTS = st.sampled_from([-2.0, -0.5, 0.0, 1.0, 30.0, 1e30, math.inf, -math.inf])


def _exprs() -> st.SearchStrategy[E.Expr]:
    leaves = st.one_of(st.just(QK), CONSTS.map(E.const))

    def grow(children: st.SearchStrategy[E.Expr]) -> st.SearchStrategy[E.Expr]:
        return st.one_of(
            st.tuples(st.sampled_from(sorted(_UNARY, key=str)), children).map(
                lambda t: E.unary(t[0], t[1])),
            st.tuples(st.sampled_from(sorted(_BINARY, key=str)), children, children).map(
                lambda t: E.binary(t[0], t[1], t[2])))
    return st.recursive(leaves, grow, max_leaves=6)


def _value(e: E.Expr, x: torch.Tensor) -> torch.Tensor:
    """``e`` at qk = x, in float32 as a kernel computes it."""
    if e.op is Op.ROW:
        return x
    if e.op is Op.CONST:
        return torch.full_like(x, float(e.arg))
    args = [_value(s, x) for s in e.src]
    return (_UNARY[e.op] if e.op in _UNARY else _BINARY[e.op])(*args)


@settings(max_examples=300, deadline=None)
@given(_exprs())
def test_every_float32_value_lies_in_its_bounds_and_a_bound_below_excludes_minus_inf(
        e: E.Expr) -> None:
    """At every sampled qk (infinities included) each node's float32 value is NaN or inside
    its bounds (up to float32 rounding); a finite lower bound means no value is -inf."""
    bounds = float_ranges(e)
    with torch.no_grad():
        for node in e.walk():
            v = _value(node, SAMPLES)
            v = v[~torch.isnan(v)].double()
            lo, hi = (b + math.copysign(1e-5 * (1 + abs(b)), b - c) if math.isfinite(b)
                      else b for b, c in zip(bounds[node], (math.inf, -math.inf)))
            assert bool((v >= lo).all()) and bool((v <= hi).all()), (E.render(node), (lo, hi), v)
    if bounded_below(e):
        assert not bool((_value(e, SAMPLES) == -math.inf).any())


def test_softcapped_scores_are_bounded_below_and_plain_or_masked_scores_are_not() -> None:
    cap = E.binary(Op.MUL, E.const(30.0), E.unary(Op.TANH, E.binary(Op.TRUEDIV, QK,
                                                                       E.const(30.0))))
    assert bounded_below(cap) and float_ranges(cap)[cap] == (-30.0, 30.0)
    assert not bounded_below(E.binary(Op.MUL, QK, E.param("scale")))
    assert not bounded_below(E.binary(Op.ADD, cap, E.binary(Op.MUL, QK, E.const(0.5))))
    assert bounded_below(E.binary(Op.MAX, E.const(-math.inf), cap))
    assert not bounded_below(E.binary(Op.MIN, cap, E.const(-math.inf)))


def _softcap(score, b, h, q_idx, kv_idx):
    return 30.0 * torch.tanh(score / 30.0)


def _source_and_check(q, k, v, score_mod) -> str:
    """The kernel's output against the oracle's (NaN where it is NaN); the module's source."""
    kernel = attndsl.compile(score_mod=score_mod)
    ref = attndsl.run_cascade(kernel.compiled.cascade, {"Q": q, "K": k, "V": v,
                                                         **kernel.captured},
                              {"scale": 1.0 / math.sqrt(q.shape[-1]), "G": 1})["O"]
    options = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    run = lambda: attndsl.flex_attention(q, k, v, score_mod=score_mod,  # noqa: E731
                                         kernel_options=dict(options))
    torch.testing.assert_close(run().double(), ref.double(), atol=2e-5, rtol=2e-5,
                               equal_nan=True)
    launch, = record_launches(run)
    return Path(inspect.getsourcefile(launch.fn)).read_text()


def test_a_softcapped_kernel_reads_its_finite_max_unguarded_on_full_tiles() -> None:
    """Soft-capping over 48 keys (full tiles) and 40 (a ragged last tile), with query rows
    whose dot products overflow to +-inf in float32: every score is +-cap there, the answer
    is the oracle's, and the unmasked full-tile step skips the -inf replacement."""
    gen = torch.Generator().manual_seed(5)
    for lkv in (48, 40):
        q = torch.randn(1, 2, 32, 16, generator=gen)
        q[:, :, :3] = 1e20
        q[:, :, 3:5] = -1e20
        k = torch.rand(1, 2, lkv, 16, generator=gen) * 1e20 + 1e19
        v = torch.randn(1, 2, lkv, 16, generator=gen)
        source = _source_and_check(q, k, v, _softcap)
        # the stabiliser starts at -FLT_MAX (codegen/triton.py _empty_row_sum): no tile of
        # any kind replaces it
        assert "    m_i_use_new = m_i_new  # the stabiliser: finite (>= its start)\n" in source


def test_a_score_that_can_be_minus_inf_keeps_the_guard_and_empty_rows_give_zero() -> None:
    """cap * tanh(s / cap) for q >= 8, -inf before: rows 0..7 have no finite score, so the
    stabiliser must be replaced (their output is the oracle's, not NaN)."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx >= 8, 30.0 * torch.tanh(score / 30.0), -math.inf)

    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 32, 16, generator=gen) for _ in range(3))
    source = _source_and_check(q, k, v, score_mod)
    assert "every score of the tile is > -inf" not in source
    # replaced by -FLT_MAX (codegen/triton.py _empty_row_sum): the running max starts there,
    # exp2 of -inf minus it is 0
    assert "m_i = tl.full([BLOCK_M], -3.4028234663852886e+38, tl.float32)" in source
