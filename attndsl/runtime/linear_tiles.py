"""How the linear form's Triton kernels read and write memory: zero-padded tiles and the gate.

A tile is addressed from a scalar base pointer (the (batch * head) row's offset, int64,
formed once per program) plus int32 offsets inside the row's matrix: 64-bit offsets per
element, kept live across the chunk loops, cost registers the kernels need for their tiles.
(Block pointers, which would avoid the offsets altogether, are gone from Triton 3.9.)

The gate g is the cumulative log decay, fp32, over positions -1..L-1 of one (batch * head)
row: ``G[bh, p + 1]`` is g(p) for a scalar gate ([BH, L + 1]); ``G[bh, p + 1, e]`` for a
vector gate ([BH, L + 1, E]).  g(-1) is the reference point of an initial state.  The decay
between positions n <= m is exp(g(m) - g(n)).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile(base, rows, cols, stride, r0, c0, BR: tl.constexpr, BC: tl.constexpr):
    """The [BR, BC] tile at (r0, c0) of the rows x cols row-major matrix at ``base``
    (``stride`` elements per row), zero outside it."""
    r = r0 + tl.arange(0, BR)
    k = c0 + tl.arange(0, BC)
    return tl.load(base + r[:, None] * stride + k[None, :],
                   mask=(r[:, None] < rows) & (k[None, :] < cols), other=0.0)


@triton.jit
def store_tile(base, rows, cols, stride, r0, c0, value, BR: tl.constexpr, BC: tl.constexpr):
    """Store ``value`` as the [BR, BC] tile at (r0, c0), clipped to the matrix."""
    r = r0 + tl.arange(0, BR)
    k = c0 + tl.arange(0, BC)
    tl.store(base + r[:, None] * stride + k[None, :], value.to(base.dtype.element_ty),
             mask=(r[:, None] < rows) & (k[None, :] < cols))


@triton.jit
def gate_rows(G, bh, r0, L, BR: tl.constexpr):
    """Scalar gate g at positions r0..r0+BR-1 (0 past L - 1): [BR]."""
    r = r0 + tl.arange(0, BR)
    return tl.load(G + bh * (L + 1) + 1 + r, mask=r < L, other=0.0)


@triton.jit
def gate_rows_vec(G, bh, r0, e0, L, E, BR: tl.constexpr, BK: tl.constexpr):
    """Vector gate g at positions r0..r0+BR-1 and key dims e0..e0+BK-1: [BR, BK]."""
    return tile(G + bh * (L + 1) * E + E, L, E, E, r0, e0, BR, BK)


@triton.jit
def gate_at(G, bh, pos, L):
    """Scalar gate g at one position ``pos`` (-1..L-1)."""
    return tl.load(G + bh * (L + 1) + pos + 1)


@triton.jit
def gate_at_vec(G, bh, pos, e0, L, E, BK: tl.constexpr):
    """Vector gate g at one position ``pos`` (-1..L-1) and key dims e0..e0+BK-1: [BK]."""
    oe = e0 + tl.arange(0, BK)
    return tl.load(G + bh * (L + 1) * E + (pos + 1) * E + oe, mask=oe < E, other=0.0)


@triton.jit
def masked_exp(d, valid):
    """exp(d) where ``valid``, else 0 without forming the exponent (a padded row's gate reads
    0, and exp(0 - g) of a long decay would overflow)."""
    return tl.exp(tl.where(valid, d, -float("inf")))
