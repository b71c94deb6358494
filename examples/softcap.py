"""Logit soft-capping: scores squashed by cap * tanh(score / cap) with cap 30
(Gemma 2, Gemma Team 2024; Grok-1)."""

from __future__ import annotations

import torch
from _common import ScoreMod, demo

CAP = 30


def generate_tanh_softcap(cap: float) -> ScoreMod:
    """cap * tanh(score / cap): the identity for small scores, bounded by +-cap."""

    def score_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                  kv_idx: torch.Tensor) -> torch.Tensor:
        return cap * torch.tanh(score / cap)

    score_mod.__name__ = f"tanh_softcap_{cap}"
    return score_mod


def make(B: int, H: int, Lq: int, Lkv: int, device: str | torch.device = "cpu") -> dict:
    """Returns {"score_mod": tanh_softcap_30, "mask_mod": None}."""
    return {"score_mod": generate_tanh_softcap(CAP), "mask_mod": None}


if __name__ == "__main__":
    demo(make)
