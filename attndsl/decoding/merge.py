"""The merge of partial softmax states over splits of the key index.

Split ``s`` of a row returns its normalised output ``o_s = sum_{n in s} e^{t_n} v_n / l_s``,
``lse_s = log l_s`` (``l_s = sum_{n in s} e^{t_n}``) and ``max_s``.  The whole row's state is
the same sums over the union (FuseMax's per-partition correction)::

    lse = log sum_s e^{lse_s}              (computed as mx + log sum_s e^{lse_s - mx})
    o   = sum_s e^{lse_s - lse} o_s
    max = max_s max_s

An extra normaliser term with no value, a sink logit ``z`` per query head
(``softmax([t, z])``; off-by-one softmax is ``z = 0``), enters the denominator once, after
the splits are merged: ``lse' = log(e^{lse} + e^{z})``, ``o' = e^{lse - lse'} o``.  A split
with no keys has ``lse_s = -inf`` and contributes nothing; a row with no keys at all gives
``o = 0`` and ``lse = -inf`` (``lse' = z`` with a sink), as the prefill kernel does.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def merge_splits(out: Tensor, lse: Tensor, mx: Tensor, dim: int) -> tuple[Tensor, Tensor,
                                                                         Tensor]:
    """Merge partial states along ``dim`` of ``lse`` / ``mx`` (``out`` has one more trailing
    dim, the value dim).  Returns (out in out's dtype, lse float32, max float32)."""
    lse32 = lse.float()
    top = lse32.amax(dim, keepdim=True)
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(lse32 - safe)  # exp(-inf) = 0 for empty splits
    total = w.sum(dim, keepdim=True)
    merged_lse = (safe + torch.log(total)).squeeze(dim)  # log 0 = -inf: no keys
    weight = torch.where(total > 0, w / total, torch.zeros_like(w))
    merged = (weight.unsqueeze(-1) * out.float()).sum(dim)
    return merged.to(out.dtype), merged_lse, mx.float().amax(dim)


def add_sink(out: Tensor, lse: Tensor, sink: Tensor) -> tuple[Tensor, Tensor]:
    """Add ``e^{sink}`` to each row's denominator (``sink`` broadcasts against ``lse``)."""
    z = sink.float().expand_as(lse)
    total = torch.logaddexp(lse, z)
    scale = torch.exp(lse - total)  # 0 where lse = -inf
    return (out.float() * scale.unsqueeze(-1)).to(out.dtype), total


__all__ = ["add_sink", "merge_splits"]
