"""Causal attention: each query attends to itself and earlier keys (autoregressive decoding,
"Attention Is All You Need", Vaswani et al. 2017)."""

from __future__ import annotations

import torch
from _common import causal_mask, demo


def make(B: int, H: int, Lq: int, Lkv: int, device: str | torch.device = "cpu") -> dict:
    """Returns {"score_mod": None, "mask_mod": causal_mask}."""
    return {"score_mod": None, "mask_mod": causal_mask}


if __name__ == "__main__":
    demo(make)
