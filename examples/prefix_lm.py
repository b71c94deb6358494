"""Prefix LM: the first 32 tokens (the prefix) are visible to every query, the rest is causal
(T5 / UniLM prefix language modelling, Raffel et al. 2020)."""

from __future__ import annotations

import torch
from _common import MaskMod, causal_mask, demo, or_masks

PREFIX = 32


def generate_prefix_lm(prefix_length: int) -> MaskMod:
    """Keys inside the bidirectional prefix."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                 kv_idx: torch.Tensor) -> torch.Tensor:
        return kv_idx < prefix_length

    mask_mod.__name__ = f"prefix_lm_{prefix_length}"
    return mask_mod


def make(B: int, H: int, Lq: int, Lkv: int, device: str | torch.device = "cpu") -> dict:
    """Returns {"score_mod": None, "mask_mod": prefix of 32 | causal}."""
    return {"score_mod": None, "mask_mod": or_masks(generate_prefix_lm(PREFIX), causal_mask)}


if __name__ == "__main__":
    demo(make)
