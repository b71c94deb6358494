"""2-D neighbourhood attention: tokens laid out row-major on a W x W grid attend to the 7 x 7
neighbourhood around their position, clamped to stay inside the grid (NATTEN, Hassani et al.
2023, "Neighborhood Attention Transformer").

W = ceil(sqrt(max(Lq, Lkv))), so queries and keys share one grid; on grids no wider than the
kernel every key is visible, and queries whose neighbourhood holds no key see nothing.
"""

from __future__ import annotations

import math

import torch
from _common import MaskMod, demo

KERNEL_SIZE = 7


def generate_natten(width: int, kernel_size: int) -> MaskMod:
    """Keys in the ``kernel_size`` x ``kernel_size`` window around the query's clamped centre."""
    half = kernel_size // 2

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                 kv_idx: torch.Tensor) -> torch.Tensor:
        q_row, q_col = q_idx // width, q_idx % width
        kv_row, kv_col = kv_idx // width, kv_idx % width
        centre_row = q_row.clamp(half, width - 1 - half)
        centre_col = q_col.clamp(half, width - 1 - half)
        return ((centre_row - kv_row).abs() <= half) & ((centre_col - kv_col).abs() <= half)

    mask_mod.__name__ = f"natten_{width}x{width}_k{kernel_size}"
    return mask_mod


def make(B: int, H: int, Lq: int, Lkv: int, device: str | torch.device = "cpu") -> dict:
    """Returns {"score_mod": None, "mask_mod": 7 x 7 neighbourhood on the W x W grid}."""
    width = math.isqrt(max(Lq, Lkv) - 1) + 1
    return {"score_mod": None, "mask_mod": generate_natten(width, KERNEL_SIZE)}


if __name__ == "__main__":
    demo(make)
