"""T5 relative position bias: the key-query offset is mapped to one of 32 buckets (exact for
small offsets, log-spaced up to 128, one half per direction) and a learned per-head bias of
that bucket is added to the score (Raffel et al. 2020, "Exploring the Limits of Transfer
Learning").

The bucket is computed symbolically with torch ops (abs, log2, where, clamp, integer casts).
T5 writes the log-spaced part as log(n / e) / log(d / e) * (half - e); here it is the same
value in base 2, log2(n / e) * ((half - e) / log2(d / e)), because log2 is exact at the powers
of two where the truncation to an integer bucket would otherwise depend on rounding.
"""

from __future__ import annotations

import math

import torch
from _common import ScoreMod, demo, generator

NUM_BUCKETS = 32
MAX_DISTANCE = 128


def t5_bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bidirectional bucket (int64) of ``relative = kv - q``."""
    half = num_buckets // 2
    max_exact = half // 2
    bucket = (relative > 0).to(torch.int64) * half
    distance = torch.abs(relative)
    far = torch.clamp(distance, min=max_exact).to(torch.float32)
    log_bucket = max_exact + (torch.log2(far / max_exact)
                              * ((half - max_exact) / math.log2(max_distance / max_exact))
                              ).to(torch.int64)
    log_bucket = torch.clamp(log_bucket, max=half - 1)
    return bucket + torch.where(distance < max_exact, distance, log_bucket)


def generate_t5_bias(table: torch.Tensor, num_buckets: int, max_distance: int) -> ScoreMod:
    """score + table[h, bucket(kv - q)]; ``table`` is [H, num_buckets]."""

    def t5_bias(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                kv_idx: torch.Tensor) -> torch.Tensor:
        return score + table[h, t5_bucket(kv_idx - q_idx, num_buckets, max_distance)]

    return t5_bias


def make(B: int, H: int, Lq: int, Lkv: int, device: str | torch.device = "cpu") -> dict:
    """Returns {"score_mod": t5_bias (table [H, 32] captured), "mask_mod": None}."""
    table = torch.randn(H, NUM_BUCKETS, generator=generator()).to(device)
    return {"score_mod": generate_t5_bias(table, NUM_BUCKETS, MAX_DISTANCE), "mask_mod": None}


if __name__ == "__main__":
    demo(make)
