"""Arbitrary additive bias: a captured dense tensor bias[b, h, q, kv] of shape (B, H, Lq, Lkv)
is added to the scores (e.g. AlphaFold's pair bias, Jumper et al. 2021; any precomputed mask)."""

from __future__ import annotations

import torch
from _common import ScoreMod, demo, generator


def generate_full_bias(bias: torch.Tensor) -> ScoreMod:
    """score + bias[b, h, q, kv]."""

    def full_bias(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                  kv_idx: torch.Tensor) -> torch.Tensor:
        return score + bias[b, h, q_idx, kv_idx]

    return full_bias


def make(B: int, H: int, Lq: int, Lkv: int, device: str | torch.device = "cpu") -> dict:
    """Returns {"score_mod": full_bias (bias (B, H, Lq, Lkv) captured), "mask_mod": None}."""
    bias = torch.randn(B, H, Lq, Lkv, generator=generator()).to(device)
    return {"score_mod": generate_full_bias(bias), "mask_mod": None}


if __name__ == "__main__":
    demo(make)
