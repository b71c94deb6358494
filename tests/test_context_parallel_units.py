"""Context parallelism without processes: layouts, the positions rewrite, the merge rule,
pair classes, load balance and the normaliser check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import attndsl
from attndsl.api import AttentionError
from attndsl.distributed import (
    LAYOUTS,
    choose_layout,
    context_parallel_attention,
    positions,
    shard,
    unshard,
)
from attndsl.distributed.additive import AdditivePairs, is_additive
from attndsl.distributed.merge import add_sink, merge
from attndsl.distributed.normaliser import softmax_form
from attndsl.distributed.pairs import imbalance, pair_classes, work
from attndsl.distributed.positions import positioned
from attndsl.frontend.flex import lower_flex
from attndsl.frontend.text import parse_file, parse_text
from attndsl.passes.mask import EMPTY, FULL, PARTIAL

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("length,world", [(37, 2), (40, 4), (3, 4), (0, 2)])
def test_every_layout_shards_and_restores_every_row_once(layout, length, world):
    x = torch.randn(1, 2, length, 3)
    pieces = [shard(x, layout, world, r) for r in range(world)]
    assert sorted(torch.cat([positions(layout, length, world, r) for r in range(world)])
                  .tolist()) == list(range(length))
    assert max(p.shape[2] for p in pieces) - min(p.shape[2] for p in pieces) <= 2
    assert torch.equal(unshard(pieces, layout), x)


def test_zigzag_gives_each_rank_one_early_and_one_late_piece():
    assert positions("zigzag", 16, 4, 1).tolist() == [2, 3, 12, 13]
    assert positions("striped", 10, 4, 1).tolist() == [1, 5, 9]


def test_unshard_names_the_rank_whose_shard_has_the_wrong_length():
    with pytest.raises(ValueError, match="rank 0's shard has 5 rows .* gives it 4"):
        unshard([torch.zeros(1, 1, 5, 2), torch.zeros(1, 1, 3, 2)], "contiguous")


def test_programs_read_global_positions_and_tensors_stay_local():
    doc = torch.tensor([0, 0, 1])

    def alibi(score, b, h, q_idx, kv_idx):
        return score - (q_idx - kv_idx)

    def same_doc(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    c = positioned(lower_flex(alibi, same_doc).cascade)
    assert str(c.mask) == "Keep[b, h, m, n] = cap0[QPOS[m]] == cap0[KPOS[n]]"
    assert str(c.equation("T")) == "T[b, h, m, n] = S[b, h, m, n] - (QPOS[m] - KPOS[n])"
    assert "Q[b, h, m, e] * K[b, h // G, n, e]" in str(c.equation("S"))


def test_a_cascade_already_naming_qpos_is_refused():
    qpos = torch.tensor([0, 1])
    spec = lower_flex(None, lambda b, h, q, k: qpos[q] >= k).cascade
    renamed = spec.__class__(spec.name, spec.indices,
                             tuple(t.__class__("QPOS", t.dims, t.dtype, t.kind)
                                   if t.kind == "captured" else t for t in spec.tensors),
                             spec.params, spec.equations, spec.outputs, None)
    with pytest.raises(AttentionError, match="already names a tensor 'QPOS'"):
        positioned(renamed)


def test_merging_disjoint_key_sets_gives_attention_over_their_union():
    q, k, v = (torch.randn(1, 2, 20, 16) for _ in range(3))
    full, lse = attndsl.flex_attention(q, k, v, mask_mod=causal, return_lse=True)
    parts = [attndsl.flex_attention(q, k, v, mask_mod=m, return_lse=True) for m in
             (lambda b, h, i, j: (j <= i) & (j < 7), lambda b, h, i, j: (j <= i) & (j >= 7))]
    out, merged = merge(parts)
    torch.testing.assert_close(out, full, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(merged, lse, atol=2e-6, rtol=1e-5)


def test_rows_empty_in_every_part_merge_to_zero_and_minus_infinity_not_nan():
    none = (torch.zeros(1, 1, 3, 4), torch.full((1, 1, 3), float("-inf")))
    out, lse = merge([none, none])
    assert torch.equal(out, torch.zeros(1, 1, 3, 4)) and bool(torch.isneginf(lse).all())
    out, lse = add_sink(out, lse, torch.tensor([0.5]))
    assert torch.equal(out, torch.zeros(1, 1, 3, 4)) and torch.equal(lse, torch.full_like(lse,
                                                                                          0.5))


def test_a_sink_of_minus_infinity_leaves_an_empty_row_zero_with_finite_gradients():
    """e^-inf adds nothing: an empty row stays (0, -inf) and a kept row is unchanged; lse -
    sink is NaN there, which must reach neither the output nor a gradient."""
    out = torch.zeros(1, 1, 2, 4)
    out[0, 0, 1] = torch.tensor([1.0, -2.0, 3.0, 0.5])
    out.requires_grad_(True)
    lse = torch.tensor([[[float("-inf"), 0.25]]], requires_grad=True)
    sink = torch.tensor([float("-inf")], requires_grad=True)
    got, got_lse = add_sink(out, lse, sink)
    assert torch.equal(got.detach(), out.detach()) and torch.equal(got_lse.detach(), lse.detach())
    (got.sum() + got_lse[..., 1].sum()).backward()
    for t in (out, lse, sink):
        assert bool(torch.isfinite(t.grad).all()), t.grad


def _classes(mask_mod, length: int, world: int, layout: str = "contiguous"):
    spec = lower_flex(None, mask_mod)
    pos = [positions(layout, length, world, r) for r in range(world)]
    return pair_classes(positioned(spec.cascade).mask.expr, spec.captured, 1, 1, pos, pos)


def test_causal_pairs_below_the_diagonal_are_full_and_above_it_empty():
    got = _classes(causal, 64, 4)
    assert got == [[PARTIAL if i == j else FULL if j < i else EMPTY for j in range(4)]
                   for i in range(4)]


def test_a_sliding_window_leaves_only_neighbouring_shards_to_send():
    got = _classes(lambda b, h, i, j: (j <= i) & (i - j < 8), 128, 8)
    needed = [(i, j) for i in range(8) for j in range(8) if got[i][j] != EMPTY]
    assert needed == [(i, j) for i in range(8) for j in (i - 1, i) if j >= 0]


def test_keys_no_query_attends_are_sent_nowhere():
    got = _classes(lambda b, h, i, j: (j <= i) & (i < 25) & (j < 25), 40, 4)
    assert all(got[i][3] == EMPTY for i in range(4)) and all(c == EMPTY for c in got[3])


def test_causal_work_is_balanced_by_striped_and_zigzag_and_chosen_by_it():
    spec = lower_flex(None, causal)
    mask = positioned(spec.cascade).mask.expr
    per = {lay: work(mask, {}, 1, 1, 2048, 4, lay, block=64) for lay in LAYOUTS}
    assert imbalance(per["contiguous"]) > 1.5
    assert imbalance(per["zigzag"]) < 1.05 and imbalance(per["striped"]) < 1.1
    assert choose_layout(causal, 1, 1, 2048, 4, block=64) in ("striped", "zigzag")
    assert choose_layout(None, 1, 1, 2048, 4) == "contiguous"


def test_sinks_and_off_by_one_are_merged_with_their_extra_term():
    sink = softmax_form(parse_file(str(EXAMPLES / "sink.attn"))["sink"], {},
                        {"sink": torch.tensor([0.0, 1.0])})
    assert str(sink.extra) == "exp(sink[h])"
    torch.testing.assert_close(sink.sink_logit(2), torch.tensor([0.0, 1.0]))
    one = softmax_form(parse_file(str(EXAMPLES / "off_by_one.attn"))["off_by_one"])
    torch.testing.assert_close(one.sink_logit(3), torch.zeros(3))


def test_a_normaliser_without_an_exact_merge_is_refused_by_name():
    spec = parse_file(str(EXAMPLES / "sigmoid.attn"))["sigmoid"]
    with pytest.raises(AttentionError, match="output O = .* is not of the softmax family"):
        softmax_form(spec)


def test_an_extra_term_that_depends_on_the_query_is_refused():
    spec = parse_text("""
spec posbias {
  index b: B batch, h: H head, m: M query, n: N key, e: E qk, f: F v
  input Q[B, H, M, E], K[B, H, N, E], V[B, H, N, F]
  param scale: float
  S[b,h,m,n] = Q[b,h,m,e] * K[b,h,n,e] * scale
  D[b,h,m]   = exp(m * 0.1) + sum(n) exp(S[b,h,m,n])
  O[b,h,m,f] = exp(S[b,h,m,n]) / D[b,h,m] * V[b,h,n,f]
  output O
}""")
    spec = spec["posbias"] if isinstance(spec, dict) else spec
    with pytest.raises(AttentionError, match=r"depends on \['m'\]"):
        softmax_form(spec)


def test_calling_without_torch_distributed_says_how_to_start_it():
    x = torch.randn(1, 1, 4, 16)
    with pytest.raises(AttentionError, match="init_process_group"):
        context_parallel_attention(x, x, x)


def _spec(name: str):
    return parse_file(str(EXAMPLES / f"{name}.attn"))[name]


@pytest.mark.parametrize("name, additive", [("sigmoid", True), ("relu2", True),
                                            ("causal", False), ("softpick", False),
                                            ("sink", False)])
def test_outputs_that_are_plain_sums_over_the_keys_are_recognised_as_additive(name, additive):
    assert is_additive(_spec(name)) is additive


WINDOW_TO_END = """
spec near_end {
  index b: B batch, h: H head, m: M query, n: N key, e: E qk, f: F v
  input Q[B, H, M, E], K[B, H, N, E], V[B, H, N, F]
  param scale: float
  mask n < N - 2
  S[b,h,m,n] = Q[b,h,m,e] * K[b,h,n,e] * scale
  O[b,h,m,f] = softmax(n) S[b,h,m,n] * V[b,h,n,f]
  output O
}"""


def test_a_key_extent_read_is_bound_to_the_whole_sequence_not_a_shard():
    spec = parse_text(WINDOW_TO_END)["near_end"]
    with pytest.raises(AttentionError, match="reads the key extent N as a value"):
        softmax_form(spec)
    form = softmax_form(spec, extents={"N": 40, "M": 40})
    assert str(form.flex.mask) == "Keep[b, h, m, n] = n < 40 - 2"


@pytest.mark.parametrize("name", ["sigmoid", "relu2"])
def test_additive_pairs_over_two_key_shards_sum_to_the_whole_output_and_gradients(name):
    """Without processes: one query shard against both key shards of a 2-way zigzag split,
    forward summed and backward per pair, equal the single-process kernel and autograd."""
    spec = _spec(name)
    L, world = 26, 2
    q, k, v = (torch.randn(1, 2, L, 16, dtype=torch.float64).float() for _ in range(3))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attndsl.compile(spec)(dict(zip("QKV", leaves)), {"scale": 0.25})["O"]
    dout = torch.randn(ref.shape)
    ref.backward(dout)
    pairs = AdditivePairs.of(spec, None, None, L, L)
    pos = [positions("zigzag", L, world, r) for r in range(world)]
    mine = pos[0]
    out = sum(pairs.forward(q[:, :, mine], k[:, :, p], v[:, :, p], mine, p, PARTIAL, 0.25)[0]
              for p in pos)
    torch.testing.assert_close(out, ref.detach()[:, :, mine], atol=2e-5, rtol=1e-4)
    dq = torch.zeros_like(q[:, :, mine])
    for p in pos:
        g = pairs.backward(q[:, :, mine], k[:, :, p], v[:, :, p], out, None,
                           dout[:, :, mine], None, mine, p, PARTIAL, 0.25, ())
        dq += g["Q"]
        # the key shard's gradient from this query shard alone: autograd restricted likewise
        part = [t.clone().requires_grad_() for t in (q, k, v)]
        o = attndsl.compile(spec)(dict(zip("QKV", part)), {"scale": 0.25})["O"]
        o[:, :, mine].backward(dout[:, :, mine])
        torch.testing.assert_close(g["K"], part[1].grad[:, :, p], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(g["V"], part[2].grad[:, :, p], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(dq, leaves[0].grad[:, :, mine], atol=2e-5, rtol=1e-4)
