"""Triton kernels of the delta rule: chunked prefill (UT transform) and the recurrent step.

Per (batch * head) row ``bh`` and block of value columns, with features k, q (L x E),
u (L x F), the erase coefficient c and the log decay la = log a (L), a per-row length
``LEN[bh]`` (positions at or after it are not read; their outputs are 0) and an initial
state S0 (E x F), both compute

    S_n = a_n S_{n-1} - c_n k_n (k_n^T S_{n-1}) + k_n u_n^T,    o_n = q_n^T S_n

and store the final state S_{len-1}.  The chunked kernel takes la = log a (the decay must be
positive), the recurrent one a itself.  Value columns are independent (every product acts on
S from the left), so programs split F.

Chunked (chunk C; attndsl.passes.delta derives it): inside a chunk, G = cumsum(la) (G_t the
log of a_1 ... a_t) and Gx = G - la (up to t - 1);

    A     = strictly-lower(c_t (k_t . k_i) exp(Gx_t - G_i))       (C x C, tl.dot)
    T     = (I + A)^-1                                              forward substitution
    Delta = T (U - diag(c exp(Gx)) K S)                             (the WY/UT form)
    O     = diag(exp(G)) Q S + (lower(Q K^T) . exp(G_t - G_i)) Delta
    S    <- exp(G_C) S + (K . exp(G_C - G))^T Delta

Positions past the length load as k = u = c = la = 0: their rows of Delta are 0 and the
state passes through, so the final state is the one at the length.  Every exponent formed is
G_t - G_i with t >= i (masked before exp), <= 0 for a <= 1.  fp32 throughout; the products
use IEEE fp32 dots (the inverse T amplifies rounding; tf32 would not meet the oracle's
tolerance).
"""

from __future__ import annotations

import triton
import triton.language as tl

WARPS = 8  # sm90, E = 64: no spills at C = 16 with BF = 16 (C = 32 or BF = 32 spill)
BF = 16  # value columns per program


@triton.jit
def _rows(P, bh, t, mt, L, W, ow, mw):
    """Rows ``t`` of a [BH, L, W] tensor: [C, BW] (0 outside)."""
    return tl.load(P + bh * L * W + t[:, None] * W + ow[None, :],
                   mask=mt[:, None] & mw[None, :], other=0.0)


@triton.jit
def _inverse_unit_lower(A, oc, C: tl.constexpr):
    """(I + A)^-1 for a strictly lower triangular A, row by row: T_i = e_i - A_i T (rows
    j < i of T are final and A_ij = 0 for j >= i)."""
    T = tl.where(oc[:, None] == oc[None, :], 1.0, 0.0)
    for i in range(1, C):
        a_i = tl.sum(tl.where(oc[:, None] == i, A, 0.0), axis=0)         # row i of A
        row = tl.where(oc == i, 1.0, 0.0) - tl.sum(a_i[:, None] * T, axis=0)
        T = tl.where(oc[:, None] == i, row[None, :], T)
    return T


@triton.jit
def delta_chunked_kernel(Q, K, U, CE, LA, S0, LEN, Out, ST, L, E, F,
                         HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr, C: tl.constexpr,
                         BE: tl.constexpr, BF: tl.constexpr):
    """One program per (batch * head) row and block of BF value columns."""
    bh = tl.program_id(0).to(tl.int64)  # bh * L * E may pass 2**31
    oe = tl.arange(0, BE)
    of = tl.program_id(1) * BF + tl.arange(0, BF)
    oc = tl.arange(0, C)
    me, mf = oe < E, of < F
    s_off = bh * E * F + oe[:, None] * F + of[None, :]
    s_mask = me[:, None] & mf[None, :]
    if HAS_S0:
        S = tl.load(S0 + s_off, mask=s_mask, other=0.0)
    else:
        S = tl.zeros([BE, BF], dtype=tl.float32)
    n = tl.load(LEN + bh)
    lower = oc[:, None] >= oc[None, :]
    strict = oc[:, None] > oc[None, :]
    for c in range(0, tl.cdiv(n, C)):
        t = c * C + oc
        mt = t < n
        q = _rows(Q, bh, t, mt, L, E, oe, me)
        k = _rows(K, bh, t, mt, L, E, oe, me)
        u = _rows(U, bh, t, mt, L, F, of, mf)
        ce = tl.load(CE + bh * L + t, mask=mt, other=0.0)
        if HAS_DECAY:
            la = tl.load(LA + bh * L + t, mask=mt, other=0.0)
            g = tl.cumsum(la, 0)                                          # log a_1 ... a_t
        else:
            la = tl.zeros([C], dtype=tl.float32)
            g = la
        gx = g - la                                                       # up to t - 1
        g_last = tl.sum(tl.where(oc == C - 1, g, 0.0))                    # flat past the end
        kk = tl.dot(k, tl.trans(k), input_precision="ieee")               # K K^T
        a = tl.where(strict, ce[:, None] * kk *
                     tl.exp(tl.where(strict, gx[:, None] - g[None, :], 0.0)), 0.0)
        tinv = _inverse_unit_lower(a, oc, C)                              # (I + A)^-1
        w = k * (ce * tl.exp(gx))[:, None]                                # diag(c a..) K
        delta = tl.dot(tinv, u - tl.dot(w, S, input_precision="ieee"),
                       input_precision="ieee")                            # T (U - W S)
        p = tl.where(lower, tl.dot(q, tl.trans(k), input_precision="ieee") *
                     tl.exp(tl.where(lower, g[:, None] - g[None, :], 0.0)), 0.0)
        inter = tl.dot(q * tl.exp(g)[:, None], S, input_precision="ieee")
        if not HAS_S0:  # the first chunk has no state before it: its product with the zero
            # state is not a term of the sum (it would make an infinite query NaN: inf * 0).
            # A select, not a branch: a branch in the loop made triton 3.6 spill on sm90.
            inter = tl.where(c > 0, inter, 0.0)
        o = inter + tl.dot(p, delta, input_precision="ieee")              # inter + intra
        k_out = k * tl.exp(g_last - g)[:, None]
        S = S * tl.exp(g_last) + tl.dot(tl.trans(k_out), delta, input_precision="ieee")
        tl.store(Out + bh * L * F + t[:, None] * F + of[None, :], o,
                 mask=mt[:, None] & mf[None, :])
    tl.store(ST + s_off, S, mask=s_mask)


@triton.jit
def delta_recurrent_kernel(Q, K, U, CE, A, S0, LEN, Out, ST, L, E, F,
                           HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr,
                           BE: tl.constexpr, BF: tl.constexpr):
    """One position at a time (decode): S = a S + k (u - c S^T k)^T, o = S^T q.  ``A`` holds
    the decay a itself (any sign: the recurrent form needs no logarithm)."""
    bh = tl.program_id(0).to(tl.int64)  # bh * L * E may pass 2**31
    oe = tl.arange(0, BE)
    of = tl.program_id(1) * BF + tl.arange(0, BF)
    me, mf = oe < E, of < F
    s_off = bh * E * F + oe[:, None] * F + of[None, :]
    s_mask = me[:, None] & mf[None, :]
    if HAS_S0:
        S = tl.load(S0 + s_off, mask=s_mask, other=0.0)
    else:
        S = tl.zeros([BE, BF], dtype=tl.float32)
    n = tl.load(LEN + bh)
    for t in range(0, n):
        q = tl.load(Q + (bh * L + t) * E + oe, mask=me, other=0.0)
        k = tl.load(K + (bh * L + t) * E + oe, mask=me, other=0.0)
        u = tl.load(U + (bh * L + t) * F + of, mask=mf, other=0.0)
        ce = tl.load(CE + bh * L + t)
        ks = tl.sum(k[:, None] * S, axis=0)                                # S^T k
        if HAS_DECAY:
            S = S * tl.load(A + bh * L + t)
        S = S + k[:, None] * (u - ce * ks)[None, :]
        o = tl.sum(q[:, None] * S, axis=0)                                 # S^T q
        tl.store(Out + (bh * L + t) * F + of, o, mask=mf)
    tl.store(ST + s_off, S, mask=s_mask)
