"""Learned relative position bias: a per-head table indexed by the query-key offset is added
to the scores (Shaw et al. 2018; the bias form of Swin / Music Transformer)."""

from __future__ import annotations

import torch
from _common import ScoreMod, demo, generator


def generate_relative_bias(table: torch.Tensor, kv_len: int) -> ScoreMod:
    """score + table[h, q - kv + kv_len - 1]; ``table`` is [H, Lq + Lkv - 1]."""

    def relative_bias(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor,
                      q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return score + table[h, q_idx - kv_idx + (kv_len - 1)]

    return relative_bias


def make(B: int, H: int, Lq: int, Lkv: int, device: str | torch.device = "cpu") -> dict:
    """Returns {"score_mod": relative_bias (table [H, Lq + Lkv - 1] captured), "mask_mod": None}."""
    table = torch.randn(H, Lq + Lkv - 1, generator=generator()).to(device)
    return {"score_mod": generate_relative_bias(table, Lkv), "mask_mod": None}


if __name__ == "__main__":
    demo(make)
