"""Rows with infinite scores: the rule, against torch and the float64 oracle.

A kept score of +inf (an inf in Q or K, an infinite scale, a score program giving +inf)
makes the row's softmax inf / inf: the output is NaN (as torch's), and the row's
log-sum-exp, log(sum(n) exp(s)), is +inf -- torch's flex_attention and attndsl's oracle both
say so.  A row whose kept scores are all -inf is an empty row: output 0, lse -inf."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import attndsl
from attndsl.checking import index_sizes, oracle, random_problem
from attndsl.frontend.text import parse_file

INF = math.inf


def _plus_inf_at_key_3(score, b, h, q_idx, kv_idx):
    return torch.where(kv_idx == 3, score + INF, score)


def _minus_inf_in_row_0(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx == 0, score - INF, score)


def _qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, 20, 16, generator=gen) for _ in range(3))


def _oracle(score_mod, q, k, v, scale: float) -> dict[str, torch.Tensor]:
    kernel = attndsl.compile(score_mod=score_mod)
    return attndsl.run_cascade(kernel.compiled.cascade, {"Q": q, "K": k, "V": v,
                                                         **kernel.captured},
                               {"scale": scale, "G": 1})


def test_the_oracle_gives_nan_outputs_and_an_infinite_lse_for_a_plus_infinite_score() -> None:
    q, k, v = _qkv()
    ref = _oracle(_plus_inf_at_key_3, q, k, v, 0.25)
    assert ref["O"].isnan().all()
    assert torch.equal(ref["LSE"], torch.full_like(ref["LSE"], INF))


def test_a_row_of_minus_infinite_scores_is_an_empty_row_in_the_kernel() -> None:
    q, k, v = _qkv()
    out, lse = attndsl.flex_attention(q, k, v, score_mod=_minus_inf_in_row_0, return_lse=True)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    assert torch.equal(lse[:, :, 0], torch.full_like(lse[:, :, 0], -INF))
    ref = _oracle(_minus_inf_in_row_0, q, k, v, 0.25)
    torch.testing.assert_close(out[:, :, 1:].double(), ref["O"][:, :, 1:], atol=2e-5,
                               rtol=2e-5)


def test_a_plus_infinite_score_gives_nan_outputs_in_the_kernel() -> None:
    q, k, v = _qkv()
    out = attndsl.flex_attention(q, k, v, score_mod=_plus_inf_at_key_3)
    assert out.isnan().all()


@pytest.mark.parametrize("case", ["score +inf", "scale inf", "inf in Q"])
def test_the_kernels_lse_is_plus_infinity_where_a_kept_score_is(case: str) -> None:
    q, k, v = _qkv()
    score_mod, scale = (_plus_inf_at_key_3, None) if case == "score +inf" else (None, None)
    if case == "scale inf":
        scale = INF
    if case == "inf in Q":
        q[0, 0, 1, 0] = INF  # row 1 of head 0: +inf and -inf scores, none NaN
    _, lse = attndsl.flex_attention(q, k, v, score_mod=score_mod, scale=scale,
                                    return_lse=True)
    rows = lse[0, 0, 1] if case == "inf in Q" else lse
    assert torch.equal(rows, torch.full_like(rows, INF))


def test_the_max_that_starts_at_minus_flt_max_is_minus_inf_again_on_an_empty_row() -> None:
    """After the key tiles the raw max of a row with no kept key is -inf (its row sum is 0),
    a row with a kept key keeps its max: max_scores, lse and the output as the oracle's."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=gen) for _ in range(3))

    def score_mod(score, b, h, q_idx, kv_idx):  # rows 0..4 empty, row 5 keeps one key
        return torch.where(q_idx < 5, -math.inf, torch.where((q_idx == 5) & (kv_idx > 0),
                                                             -math.inf, score))

    out, aux = attndsl.flex_attention(q, k, v, score_mod=score_mod,
                                      return_aux=attndsl.AuxRequest(lse=True, max_scores=True))
    assert torch.equal(aux.max_scores[:, :, :5], torch.full_like(aux.max_scores[:, :, :5],
                                                                 -math.inf))
    assert torch.equal(aux.lse[:, :, :5], torch.full_like(aux.lse[:, :, :5], -math.inf))
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    scores = (q[:, :, 5] * k[:, :, 0]).sum(-1) / 4.0
    torch.testing.assert_close(aux.max_scores[:, :, 5], scores)
    torch.testing.assert_close(aux.lse[:, :, 5], scores)
    torch.testing.assert_close(out[:, :, 5], v[:, :, 0])


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["causal", "off_by_one", "sink", "differential", "softpick",
                                  "softmax_3pass"])
def test_a_plus_infinite_score_in_a_spec_matches_the_oracle_nan_for_nan_and_inf_for_inf(
        name: str) -> None:
    """Every store of a row holding a +inf score, as the oracle evaluates the spec: the
    log-sum-exp of ``causal`` is +inf, a 3-pass softmax's ``GM + log(SD)`` is NaN as written
    (``SD = sum exp(QK - GM)`` with ``GM = +inf``), outputs NaN."""
    (c,) = parse_file(EXAMPLES / f"{name}.attn").values()
    gen = torch.Generator().manual_seed(0)
    prob = random_problem(c, index_sizes(c, 1, 2, 2, 20, 20, 16, 16), torch.float32, gen)
    q = next(n for n in prob.inputs if n.startswith("Q"))
    prob.inputs[q][0, 0, 1, 0] = INF  # row 1 of head 0: +inf and -inf scores
    out = attndsl.compile(c)(prob.inputs, prob.params, prob.captured)
    ref = oracle(c, prob)
    for store in ref:
        got, want = out[store].double(), ref[store]
        assert torch.equal(got.isnan(), want.isnan()), store
        kept = ~want.isnan()
        torch.testing.assert_close(got[kept], want[kept], atol=1e-4, rtol=1e-4)


def test_the_kernels_max_is_nan_on_a_row_with_a_kept_nan_score_as_the_oracles() -> None:
    """tl.max skips NaN, so the running max of a row with a NaN score is the max of the rest;
    that score's weight makes the row sum NaN, which the stored max now reads.  Rows without
    a NaN, a row whose NaN is masked out and a row of +inf keep their max."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=gen) for _ in range(3))

    def score_mod(score, b, h, q_idx, kv_idx):  # row 3: NaN at key 7; row 9: +inf at key 2
        score = torch.where((q_idx == 3) & (kv_idx == 7), math.nan, score)
        return torch.where((q_idx == 9) & (kv_idx == 2), math.inf, score)

    def mask_mod(b, h, q_idx, kv_idx):  # row 5's NaN (key 30) is masked out
        return ~((q_idx == 5) & (kv_idx == 30))

    def nan_at_30(score, b, h, q_idx, kv_idx):
        return torch.where((q_idx == 5) & (kv_idx == 30), math.nan, score_mod(score, b, h,
                                                                             q_idx, kv_idx))

    _, aux = attndsl.flex_attention(q, k, v, score_mod=nan_at_30, mask_mod=mask_mod,
                                    return_aux=attndsl.AuxRequest(max_scores=True))
    s = (q.double() @ k.double().transpose(-1, -2)) / 4.0
    s[:, :, 3, 7], s[:, :, 9, 2], s[:, :, 5, 30] = math.nan, math.inf, -math.inf
    want = s.max(-1).values.float()
    assert aux.max_scores[:, :, 3].isnan().all() and want[:, :, 3].isnan().all()
    assert torch.equal(aux.max_scores[:, :, 9], want[:, :, 9])  # +inf
    rest = [r for r in range(40) if r != 3]
    torch.testing.assert_close(aux.max_scores[:, :, rest], want[:, :, rest])


LINEAR = ["lightning", "retention", "simple_gla", "gla", "linear_attention"]


@pytest.mark.parametrize("name", LINEAR)
def test_an_infinite_query_in_the_linear_forms_gives_the_oracles_infinities_not_nan(name):
    """+inf in a query against positive keys and values: every kept term of the row's sum
    is +inf, so the oracle's output is +inf (a normalised form: inf / inf = NaN).  The
    chunked kernel multiplied the first chunk's empty state (no Q H[0] in the sum) and the
    masked pairs of a gated chunk by an exact 0, giving inf * 0 = NaN; the recurrent form
    and the quadratic kernel agreed with the oracle already.  Rows in the first and in a
    later chunk, a length not a multiple of the chunk."""
    (c,) = parse_file(EXAMPLES / f"{name}.attn").values()
    kernel = attndsl.compile(c)
    gen = torch.Generator().manual_seed(0)
    problem = random_problem(c, index_sizes(c, 1, 2, 2, 40, 40, 16, 16), torch.float32, gen)
    inputs = dict(problem.inputs)
    k_name, v_name = (n for n in inputs if n != next(iter(inputs)))
    for n in (k_name, v_name):
        inputs[n] = inputs[n].abs() + 0.1
    q_name = next(iter(inputs))
    inputs[q_name] = inputs[q_name].clone()
    inputs[q_name][0, 0, 3, 2] = INF  # first chunk
    inputs[q_name][0, 1, 21, 5] = INF  # second chunk of 16
    want = attndsl.run_cascade(c, {n: t.double() for n, t in
                                   {**inputs, **problem.captured}.items()}, problem.params)
    for chunk in (16, None):
        got, _ = kernel.linear(inputs, problem.params, problem.captured, chunk=chunk)
        for out in c.outputs:
            assert torch.isinf(want[out]).any() or torch.isnan(want[out]).any()
            torch.testing.assert_close(got[out].double(), want[out], atol=1e-4, rtol=1e-4,
                                       equal_nan=True, msg=lambda m, at=chunk: f"chunk={at}: {m}")


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_an_infinite_first_query_of_the_delta_rule_gives_the_oracles_infinities_not_nan(name):
    """+inf in the first query: its output q(0) . S(0) is one term per value column, so
    the oracle's row is +-inf.  The chunked kernel added q(0) times the zero state before
    the first chunk (a term the sum does not hold), inf * 0 = NaN.  Later rows of a chunk
    sum several infinite terms in another order than the recurrence (the UT form), which
    the README describes."""
    (c,) = parse_file(EXAMPLES / f"{name}.attn").values()
    kernel = attndsl.compile(c)
    gen = torch.Generator().manual_seed(0)
    problem = random_problem(c, index_sizes(c, 1, 2, 2, 40, 40, 16, 16), torch.float32, gen)
    inputs = dict(problem.inputs)
    q_name = next(iter(inputs))
    inputs[q_name] = inputs[q_name].clone()
    inputs[q_name][0, 0, 0, 2] = INF
    want = attndsl.run_cascade(c, {n: t.double() for n, t in
                                   {**inputs, **problem.captured}.items()}, problem.params)
    for chunk in (16, None):
        got, _ = kernel.linear(inputs, problem.params, problem.captured, chunk=chunk)
        for out in c.outputs:
            assert torch.isinf(want[out][0, 0, 0]).all()
            torch.testing.assert_close(got[out].double(), want[out], atol=1e-4, rtol=1e-4,
                                       equal_nan=True, msg=lambda m, at=chunk: f"chunk={at}: {m}")
