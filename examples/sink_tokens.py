"""Attention sinks: the first 4 tokens stay visible to every query next to a causal sliding
window of 32 (StreamingLLM, Xiao et al. 2024, "Efficient Streaming Language Models with
Attention Sinks")."""

from __future__ import annotations

import torch
from _common import MaskMod, and_masks, causal_mask, demo, or_masks
from sliding_window import generate_sliding_window

NUM_SINKS = 4
WINDOW = 32


def generate_sinks(num_sinks: int) -> MaskMod:
    """The first ``num_sinks`` keys."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                 kv_idx: torch.Tensor) -> torch.Tensor:
        return kv_idx < num_sinks

    mask_mod.__name__ = f"sinks_{num_sinks}"
    return mask_mod


def make(B: int, H: int, Lq: int, Lkv: int, device: str | torch.device = "cpu") -> dict:
    """Returns {"score_mod": None, "mask_mod": (4 sinks | window of 32) & causal}."""
    visible = or_masks(generate_sinks(NUM_SINKS), generate_sliding_window(WINDOW))
    return {"score_mod": None, "mask_mod": and_masks(visible, causal_mask)}


if __name__ == "__main__":
    demo(make)
