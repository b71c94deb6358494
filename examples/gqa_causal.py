"""Grouped-query attention, causal: H query heads share H / G key/value heads
(Ainslie et al. 2023, "GQA"); enable_gqa=True routes query head h to key/value head h // G."""

from __future__ import annotations

import torch
from _common import causal_mask, demo

ENABLE_GQA = True


def make(B: int, H: int, Lq: int, Lkv: int, device: str | torch.device = "cpu") -> dict:
    """Returns {"score_mod": None, "mask_mod": causal_mask}; H is the number of query heads."""
    return {"score_mod": None, "mask_mod": causal_mask}


if __name__ == "__main__":
    demo(make, enable_gqa=ENABLE_GQA)
