"""Reading the gate of the linear form inside the Triton kernels.

The gate g is the cumulative log decay, fp32, over positions -1..L-1 of one (batch * head)
row ``bh``: ``G[bh, p + 1]`` is g(p) for a scalar gate ([BH, L + 1]); ``G[bh, p + 1, e]`` for a
vector gate ([BH, L + 1, E]).  g(-1) is the reference point of an initial state.  The decay
between positions n <= m is exp(g(m) - g(n)).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gate_rows(G, bh, pos, L, mt):
    """Scalar gate g at positions ``pos`` (-1..L-1): [C] (0 where ``mt`` is false)."""
    return tl.load(G + bh * (L + 1) + pos + 1, mask=mt, other=0.0)


@triton.jit
def gate_rows_vec(G, bh, pos, L, E, oe, me, mt):
    """Vector gate g at positions ``pos`` and key dims ``oe``: [C, BK]."""
    return tl.load(G + bh * (L + 1) * E + (pos[:, None] + 1) * E + oe[None, :],
                   mask=mt[:, None] & me[None, :], other=0.0)


@triton.jit
def gate_at(G, bh, pos, L):
    """Scalar gate g at one position ``pos``."""
    return tl.load(G + bh * (L + 1) + pos + 1)


@triton.jit
def gate_at_vec(G, bh, pos, L, E, oe, me):
    """Vector gate g at one position ``pos``: [BK]."""
    return tl.load(G + bh * (L + 1) * E + (pos + 1) * E + oe, mask=me, other=0.0)


@triton.jit
def masked_exp(d, valid):
    """exp(d) where ``valid``, else 0 without forming the exponent (a padded row's gate reads
    0, and exp(0 - g) of a long decay would overflow)."""
    return tl.exp(tl.where(valid, d, -float("inf")))
