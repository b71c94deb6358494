"""Dilated sliding window, causal: within a window of 64 keys only every second offset is
visible (the dilated windows of Longformer, Beltagy et al. 2020)."""

from __future__ import annotations

import torch
from _common import MaskMod, and_masks, causal_mask, demo
from sliding_window import generate_sliding_window

WINDOW = 64
DILATION = 2


def generate_dilation(dilation: int) -> MaskMod:
    """Offsets q - kv that are multiples of ``dilation``."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                 kv_idx: torch.Tensor) -> torch.Tensor:
        return (q_idx - kv_idx) % dilation == 0

    mask_mod.__name__ = f"dilation_{dilation}"
    return mask_mod


def make(B: int, H: int, Lq: int, Lkv: int, device: str | torch.device = "cpu") -> dict:
    """Returns {"score_mod": None, "mask_mod": dilation 2 & window 64 & causal}."""
    mask = and_masks(generate_dilation(DILATION), generate_sliding_window(WINDOW), causal_mask)
    return {"score_mod": None, "mask_mod": mask}


if __name__ == "__main__":
    demo(make)
