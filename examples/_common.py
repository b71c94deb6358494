"""Shared pieces of the examples: mask/score composition and a small demo runner.

The mask combinators are attndsl's own ``and_masks`` / ``or_masks`` (plain Python composition,
so attndsl's tracer and torch's vmap both see through them).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import attndsl
from attndsl import and_masks, or_masks  # noqa: F401 - re-exported for the examples

MaskMod = Callable[..., torch.Tensor]
ScoreMod = Callable[..., torch.Tensor]


def causal_mask(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                kv_idx: torch.Tensor) -> torch.Tensor:
    """Causal (top-left aligned, as torch's FlexAttention examples): query i sees keys <= i."""
    return q_idx >= kv_idx


def compose_score_mods(*mods: ScoreMod) -> ScoreMod:
    """A score_mod applying ``mods`` in order: ``compose(f, g)(s, ...) = g(f(s, ...), ...)``."""
    if not mods:
        raise ValueError("compose_score_mods needs at least one score_mod")

    def score_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                  kv_idx: torch.Tensor) -> torch.Tensor:
        for mod in mods:
            score = mod(score, b, h, q_idx, kv_idx)
        return score

    score_mod.__name__ = "_then_".join(m.__name__ for m in mods)
    return score_mod


def generator() -> torch.Generator:
    """The seeded CPU generator every example draws its captured tensors from (then moves
    them to the device: the values are the same on every device)."""
    return torch.Generator().manual_seed(0)


def demo(make: Callable[..., dict], enable_gqa: bool = False, B: int = 2, H: int = 4,
         Lq: int = 80, Lkv: int = 96) -> None:
    """Run one example through attndsl and torch's eager flex_attention; print the error."""
    mods = make(B, H, Lq, Lkv)
    hkv = H // 2 if enable_gqa else H
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, Lq, 32, generator=gen)
    k = torch.randn(B, hkv, Lkv, 32, generator=gen)
    v = torch.randn(B, hkv, Lkv, 48, generator=gen)
    out = attndsl.flex_attention(q, k, v, score_mod=mods["score_mod"],
                                 mask_mod=mods["mask_mod"], enable_gqa=enable_gqa)
    block_mask = None
    if mods["mask_mod"] is not None:
        block_mask = create_block_mask(mods["mask_mod"], B, H, Lq, Lkv, device="cpu")
    ref = flex_attention(q, k, v, score_mod=mods["score_mod"], block_mask=block_mask,
                         enable_gqa=enable_gqa)
    names = [getattr(mods[k], "__name__", "-") for k in ("score_mod", "mask_mod")]
    err = (out - ref).abs().max().item()
    print(f"score_mod={names[0]} mask_mod={names[1]}: max |attndsl - torch| = {err:.2e}")
    if not math.isfinite(err) or err > 1e-4:
        raise SystemExit(1)
