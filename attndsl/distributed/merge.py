"""Merging partial attention states computed over disjoint sets of keys.

The streamed schedule of a softmax-family cascade keeps, per query row, a running maximum and
sums scaled by it; finalised, a run over a key set K_i gives ``O_i = sum_{n in K_i} e^{t_n}
v_n / Z_i`` and ``lse_i = log Z_i`` with ``Z_i = sum_{n in K_i} e^{t_n}``.  Over the union of
disjoint key sets the sums add, so::

    lse = log sum_i e^{lse_i}            O = sum_i e^{lse_i - lse} O_i

exactly (no approximation: the rescaling is the schedule's ``alpha`` correction applied once
per shard).  Rows no key reaches have lse_i = -inf; a row empty in every shard gives O = 0 and
lse = -inf, never NaN.

Normaliser terms that are not sums over keys -- a learned sink ``exp(z[h])`` in the
denominator -- belong to no shard: they are added once, after the merge::

    O_sink = O * Z / (Z + e^z) = O * sigmoid(lse - z)      lse_sink = logaddexp(lse, z)

Ring attention (ranks merge their ring steps) and the decode path's split-KV reuse this rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass
class Partial:
    """A running merged state: ``out`` (float32, [..., rows, F]) and ``lse`` ([..., rows])."""

    out: Tensor
    lse: Tensor

    @classmethod
    def empty(cls, out_shape: tuple[int, ...], device: torch.device) -> Partial:
        """No keys yet: O = 0, lse = -inf."""
        return cls(torch.zeros(out_shape, dtype=torch.float32, device=device),
                   torch.full(out_shape[:-1], float("-inf"), dtype=torch.float32,
                              device=device))

    def add(self, out: Tensor, lse: Tensor) -> None:
        """Merge one more disjoint key set's (O_i, lse_i) into this state, in place."""
        lse = lse.float()
        new = torch.logaddexp(self.lse, lse)
        self.out.mul_(_weight(self.lse, new).unsqueeze(-1))
        self.out.add_(out.float() * _weight(lse, new).unsqueeze(-1))
        self.lse = new


def _weight(lse: Tensor, total: Tensor) -> Tensor:
    """e^{lse - total}, 0 where the total is -inf (no key anywhere: no NaN from -inf + inf)."""
    finite = torch.isfinite(total)
    return torch.where(finite, torch.exp(lse - torch.where(finite, total, 0.0)), 0.0)


def merge(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(O, lse) over the union of the key sets of ``parts`` = [(O_i, lse_i), ...]."""
    state = Partial.empty(tuple(parts[0][0].shape), parts[0][0].device)
    for out, lse in parts:
        state.add(out, lse)
    return state.out, state.lse


def add_sink(out: Tensor, lse: Tensor, sink: Tensor) -> tuple[Tensor, Tensor]:
    """The extra denominator term ``e^{sink[h]}`` added once: (O, lse) with the sink.

    ``out`` is [B, H, rows, F], ``lse`` [B, H, rows], ``sink`` [H] (a per-head logit).  Each
    row is scaled by e^lse / (e^lse + e^sink) = sigmoid(lse - sink); a row with no kept key
    (lse = -inf, O = 0) keeps weight 0 whatever the sink, also a sink of -inf, where lse -
    sink would be NaN.  Differentiable in all three (torch ops; no NaN reaches a gradient)."""
    z = sink.float().view(1, -1, 1)
    empty = lse == float("-inf")
    weight = torch.where(empty, 0.0, torch.sigmoid(torch.where(empty, 0.0, lse - z)))
    nothing = empty & (z == float("-inf"))  # logaddexp(-inf, -inf): -inf, its gradient NaN
    total = torch.where(nothing, lse, torch.logaddexp(torch.where(nothing, 0.0, lse), z))
    return out * weight.unsqueeze(-1).to(out.dtype), total
