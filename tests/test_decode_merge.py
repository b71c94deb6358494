"""The pieces of decode: the merge of split states, the split count, the bandwidth model."""

from __future__ import annotations

import math

import pytest
import torch

import attndsl
from attndsl.decoding.merge import add_sink, merge_splits
from attndsl.decoding.split import MIN_BLOCKS, choose_splits
from attndsl.decoding.traffic import decode_traffic


def test_merging_splits_equals_softmax_over_all_keys_and_empty_splits_add_nothing() -> None:
    t, v = torch.randn(3, 10, dtype=torch.float64), torch.randn(10, 5, dtype=torch.float64)
    t[1, 4:] = -math.inf  # row 1: its keys are all in the first split
    t[2] = -math.inf  # row 2: no keys at all
    parts = [(0, 4), (4, 4), (4, 10)]  # the middle split is empty
    outs, lses, mxs = [], [], []
    for lo, hi in parts:
        s = t[:, lo:hi]
        lse = torch.logsumexp(s, -1)
        p = torch.where(torch.isfinite(lse)[:, None], torch.exp(s - lse[:, None]), 0.0)
        outs.append(p @ v[lo:hi]), lses.append(lse)
        mxs.append(s.amax(-1) if hi > lo else torch.full((3,), -math.inf, dtype=t.dtype))
    out, lse, mx = merge_splits(torch.stack(outs, 1), torch.stack(lses, 1),
                                torch.stack(mxs, 1), 1)
    full = torch.logsumexp(t, -1)
    ref = torch.softmax(t[:2], -1) @ v
    torch.testing.assert_close(out[:2].double(), ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(out[2], torch.zeros(5, dtype=out.dtype))
    torch.testing.assert_close(lse.double(), full.float().double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mx.double(), t.amax(-1).float().double())


def test_a_sink_of_zero_is_off_by_one_softmax_and_a_row_without_keys_keeps_only_the_sink(
        ) -> None:
    t, v = torch.randn(2, 6), torch.randn(6, 3)
    lse = torch.logsumexp(t, -1)
    out = torch.softmax(t, -1) @ v
    got, got_lse = add_sink(out, lse, torch.zeros(()))
    torch.testing.assert_close(got, (torch.exp(t) @ v) / (1 + torch.exp(t).sum(-1, True)))
    empty, empty_lse = add_sink(torch.zeros(1, 3), torch.full((1,), -math.inf),
                                torch.tensor(0.7))
    assert torch.equal(empty, torch.zeros(1, 3)) and empty_lse.item() == pytest.approx(0.7)
    assert got_lse.shape == (2,)


def test_splits_fill_the_sms_but_keep_enough_key_blocks_each_and_cpus_do_not_split() -> None:
    assert choose_splits(64, 8192, 0) == 1  # CPU: no SMs
    assert choose_splits(64, 8192, 132) == 5  # 2 waves of 132 SMs over 64 programs
    assert choose_splits(64, 3 * MIN_BLOCKS, 132) == 3  # short sequences: fewer splits
    assert choose_splits(1000, 8192, 132) == 1  # the grid already fills the GPU


@pytest.mark.parametrize("context", [8192, 131072])
def test_gqa_packed_decode_moves_each_kv_byte_about_once_and_unpacked_g_times(
        context: int) -> None:
    shapes = dict(q_heads=32, kv_heads=8, q_len=1, head_dim=128, v_dim=128, elem=2, page=16,
                  kv_block=16, splits=5)
    lengths = torch.full((8,), context)
    assert decode_traffic(lengths, **shapes).ratio <= 1.05
    assert decode_traffic(lengths, packed=False, **shapes).ratio == pytest.approx(4, rel=0.02)


def test_decode_refuses_cascades_and_gradients_with_what_to_do_instead() -> None:
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 8, 16)
    sig = attndsl.parse_text("""
spec sig {
  index b: B batch, h: H head, m: M query, n: N key, e: E qk, f: F v
  input Q[B, H, M, E], K[B, H, N, E], V[B, H, N, F]
  S[b,h,m,n] = Q[b,h,m,e] * K[b,h,n,e]
  O[b,h,m,f] = sum(n) sigmoid(S[b,h,m,n]) * V[b,h,n,f]
  output O
}""")
    with pytest.raises(attndsl.AttnDSLError, match="no split merge here"):
        attndsl.decode(q, k, k, torch.tensor([3]), score_mod=sig)
    with pytest.raises(attndsl.AttnDSLError, match="forward-only"):
        attndsl.decode(q.requires_grad_(), k, k, torch.tensor([3]))
