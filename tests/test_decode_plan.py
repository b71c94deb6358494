"""The pieces of decode: the split count, the bandwidth model, what decode refuses."""

from __future__ import annotations

import pytest
import torch

import attndsl
from attndsl.decoding.split import MIN_BLOCKS, choose_splits
from attndsl.decoding.traffic import decode_traffic


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


def test_decode_refuses_other_normalisers_and_gradients_with_what_to_do_instead() -> None:
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 8, 16)
    sig = attndsl.parse_text("""
spec sig {
  index b: B batch, h: H head, m: M query, n: N key, e: E qk, f: F v
  input Q[B, H, M, E], K[B, H, N, E], V[B, H, N, F]
  S[b,h,m,n] = Q[b,h,m,e] * K[b,h,n,e]
  O[b,h,m,f] = sum(n) sigmoid(S[b,h,m,n]) * V[b,h,n,f]
  output O
}""")["sig"]
    with pytest.raises(attndsl.AttnDSLError, match="pass a cascade as cascade="):
        attndsl.decode(q, k, k, torch.tensor([3]), score_mod=sig)
    with pytest.raises(attndsl.AttnDSLError, match="decode: cascade 'sig': output O .* not of "
                                                   "the softmax family"):
        attndsl.decode(q, k, k, torch.tensor([3]), cascade=sig)
    with pytest.raises(attndsl.AttnDSLError, match="cascade= must be a Cascade, got dict"):
        attndsl.decode(q, k, k, torch.tensor([3]), cascade={"sig": sig})
    with pytest.raises(attndsl.AttnDSLError, match="forward-only"):
        attndsl.decode(q.requires_grad_(), k, k, torch.tensor([3]))
