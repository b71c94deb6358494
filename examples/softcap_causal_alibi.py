"""Composition: ALiBi bias then tanh soft-capping (cap 30) as one score_mod, with a causal
mask_mod -- score and mask programs combine freely (ALiBi, Press et al. 2022; Gemma 2)."""

from __future__ import annotations

import torch
from _common import causal_mask, compose_score_mods, demo
from alibi import alibi_slopes, generate_alibi_bias
from softcap import CAP, generate_tanh_softcap


def make(B: int, H: int, Lq: int, Lkv: int, device: str | torch.device = "cpu") -> dict:
    """Returns {"score_mod": alibi_bias then tanh_softcap_30, "mask_mod": causal_mask}."""
    score_mod = compose_score_mods(generate_alibi_bias(alibi_slopes(H).to(device)),
                                   generate_tanh_softcap(CAP))
    return {"score_mod": score_mod, "mask_mod": causal_mask}


if __name__ == "__main__":
    demo(make)
