"""Causal sliding-window attention: a query sees the previous 64 keys only
(Longformer, Beltagy et al. 2020; Mistral 7B)."""

from __future__ import annotations

import torch
from _common import MaskMod, and_masks, causal_mask, demo

WINDOW = 64


def generate_sliding_window(window: int) -> MaskMod:
    """Keys at most ``window`` positions before the query."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                 kv_idx: torch.Tensor) -> torch.Tensor:
        return q_idx - kv_idx <= window

    mask_mod.__name__ = f"sliding_window_{window}"
    return mask_mod


def make(B: int, H: int, Lq: int, Lkv: int, device: str | torch.device = "cpu") -> dict:
    """Returns {"score_mod": None, "mask_mod": causal & window of 64}."""
    return {"score_mod": None, "mask_mod": and_masks(causal_mask, generate_sliding_window(WINDOW))}


if __name__ == "__main__":
    demo(make)
