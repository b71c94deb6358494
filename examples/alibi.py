"""ALiBi: a per-head linear penalty on the query-key distance instead of position embeddings,
with slopes 2^(-8(h+1)/H) (Press et al. 2022, "Train Short, Test Long"), causal."""

from __future__ import annotations

import torch
from _common import ScoreMod, causal_mask, demo


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The geometric slopes 2^(-8(h+1)/H), h = 0..H-1 (float32)."""
    return torch.exp2(-8.0 * torch.arange(1, num_heads + 1, dtype=torch.float64) / num_heads
                      ).to(torch.float32)


def generate_alibi_bias(slopes: torch.Tensor) -> ScoreMod:
    """score + slope[h] * (kv - q): zero on the diagonal, more negative further back."""

    def alibi_bias(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                   kv_idx: torch.Tensor) -> torch.Tensor:
        return score + slopes[h] * (kv_idx - q_idx)

    return alibi_bias


def make(B: int, H: int, Lq: int, Lkv: int, device: str | torch.device = "cpu") -> dict:
    """Returns {"score_mod": alibi_bias (slopes captured, shape [H]), "mask_mod": causal}."""
    return {"score_mod": generate_alibi_bias(alibi_slopes(H).to(device)),
            "mask_mod": causal_mask}


if __name__ == "__main__":
    demo(make)
