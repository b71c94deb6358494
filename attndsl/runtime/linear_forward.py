"""The chunked forward of the linear form: per-chunk states, then outputs in parallel.

Per (batch * head) row, features q, k (L x E), v (L x F), the gate g (positions -1..L-1,
:mod:`attndsl.runtime.linear_tiles`) and an initial state S0 (E x F):

    o(m) = q(m) . S(m),  S(m) = sum_{n <= m} exp(g(m) - g(n)) k(n) (x) v(n)
                                + exp(g(m) - g(-1)) S0

Chunk c holds positions [s, s + C), t = its last one.  Three kernels, as
flash-linear-attention splits them:

1. :func:`chunk_states_kernel`, grid (E blocks, F blocks, BH), sequential over chunks:
   ``H[c]``, the state at s - 1 (fp32, to memory), from the recurrence
   ``H[c + 1] = exp(g(t) - g(s-1)) H[c] + (K . exp(g(t) - g))^T V`` (the final state too).
   Only this kernel walks the chunks in order, with one E x F tile in registers.
2. :func:`vector_scores_kernel` (vector gates only), grid (chunks x sub-chunks, sub-chunks,
   BH): the intra-chunk scores ``A(m, n) = sum_e q(m, e) k(n, e) exp(g(m, e) - g(n, e))``,
   n <= m in the same chunk, fp32 to memory (see its docstring for the numerical range).
3. :func:`chunk_output_kernel`, grid (F blocks, chunks, BH), every chunk at once:
   ``O = (Q . exp(g - g(s-1))) H[c] + P V`` with ``P = (Q K^T) . exp(g(m) - g(n))`` (scalar
   gate) or ``P = A`` (vector gate), masked to n <= m.

Precision: q, k, v arrive in the operand dtype (fp16 / bf16, or fp32); every tensor-core
product takes operands in it (a state, a decayed key or a score block is cast to it) and
accumulates in fp32; gates, decays and the stored states are fp32.  Every exponent formed is
<= 0 for a decaying gate and none is formed for a masked pair, so nothing overflows however
small the gates are.
"""

from __future__ import annotations

import triton
import triton.language as tl

from attndsl.runtime.linear_tiles import (
    gate_at,
    gate_at_vec,
    gate_rows,
    gate_rows_vec,
    masked_exp,
    store_tile,
    tile,
)


@triton.jit
def chunk_states_kernel(K, V, G, S0, H, ST, L, E: tl.constexpr, F: tl.constexpr,
                        HAS_GATE: tl.constexpr, VECTOR: tl.constexpr, HAS_S0: tl.constexpr,
                        C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """H [BH, chunks, E, F]: the state before each chunk; ST [BH, E, F]: the final state."""
    e0 = tl.program_id(0) * BK
    f0 = tl.program_id(1) * BV
    bh = tl.program_id(2).to(tl.int64)
    Kb, Vb = K + bh * L * E, V + bh * L * F
    chunks = tl.cdiv(L, C)
    Hb = H + bh * chunks * E * F
    if HAS_S0:
        S = tile(S0 + bh * E * F, E, F, F, e0, f0, BK, BV)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    oc = tl.arange(0, C)
    for c in range(0, chunks):
        store_tile(Hb + c * E * F, E, F, F, e0, f0, S, BK, BV)
        k = tile(Kb, L, E, E, c * C, e0, C, BK)
        v = tile(Vb, L, F, F, c * C, f0, C, BV)
        if HAS_GATE:
            mt = c * C + oc < L
            last = tl.minimum(c * C + C, L) - 1
            if VECTOR:
                g = gate_rows_vec(G, bh, c * C, e0, L, E, C, BK)
                g_prev = gate_at_vec(G, bh, c * C - 1, e0, L, E, BK)
                g_last = gate_at_vec(G, bh, last, e0, L, E, BK)
                k = (k * masked_exp(g_last[None, :] - g, mt[:, None])).to(v.dtype)
                S = S * tl.exp(g_last - g_prev)[:, None]
            else:
                g_last = gate_at(G, bh, last, L)
                decay = masked_exp(g_last - gate_rows(G, bh, c * C, L, C), mt)
                k = (k * decay[:, None]).to(v.dtype)                  # K . exp(g(t) - g)
                S = S * tl.exp(g_last - gate_at(G, bh, c * C - 1, L))
        S += tl.dot(tl.trans(k), v)                                   # + K^T V
    store_tile(ST + bh * E * F, E, F, F, e0, f0, S, BK, BV)


@triton.jit
def vector_scores_kernel(Q, K, G, A, L, E: tl.constexpr,
                         C: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr):
    """A [BH, L, C]: ``A[bh, s + i, j] = sum_e q k exp(g(s+i, e) - g(s+j, e))`` for j <= i,
    one SUB x SUB block (query sub-chunk i, key sub-chunk j) per program (A starts zeroed).

    Numerical range (why sub-chunks): writing the decay as
    ``exp(g(m) - r) * exp(r - g(n))`` turns the score into one tensor-core product of
    ``q . exp(g - r)`` and ``k . exp(r - g)``, but with one reference r per chunk one factor
    exceeds 1 and overflows once a chunk's decay passes exp(88) (fp32; exp(11) in fp16).
    With r = g at the first row of the query sub-chunk, every key of an earlier sub-chunk has
    g(n) >= r >= g(m), so both factors are <= 1: the off-diagonal blocks are tensor-core dots
    that cannot overflow (an underflow to 0 only where the true decay is below the smallest
    normal).  The diagonal blocks, where no such r exists, are exact element-wise SUB x SUB x
    BK products with the decay exp(g(m) - g(n)) formed per pair (masked pairs none): a
    SUB / C share of the work off the tensor cores."""
    c = tl.program_id(0) // (C // SUB)
    i = tl.program_id(0) % (C // SUB)
    j = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    start = c * C + i * SUB
    if (j > i) | (start >= L):
        return
    col0 = c * C + j * SUB
    Qb, Kb = Q + bh * L * E, K + bh * L * E
    osub = tl.arange(0, SUB)
    mr = start + osub < L
    acc = tl.zeros([SUB, SUB], dtype=tl.float32)
    if j < i:
        for e0 in range(0, E, BK):
            q = tile(Qb, L, E, E, start, e0, SUB, BK)
            k = tile(Kb, L, E, E, col0, e0, SUB, BK)
            ref = gate_at_vec(G, bh, start, e0, L, E, BK)
            gq = gate_rows_vec(G, bh, start, e0, L, E, SUB, BK)
            gk = gate_rows_vec(G, bh, col0, e0, L, E, SUB, BK)
            qd = (q * masked_exp(gq - ref[None, :], mr[:, None])).to(q.dtype)
            kd = (k * tl.exp(ref[None, :] - gk)).to(k.dtype)          # keys before the rows
            acc += tl.dot(qd, tl.trans(kd))
    else:
        causal = (osub[:, None] >= osub[None, :]) & mr[:, None]
        for e0 in range(0, E, BK):
            q = tile(Qb, L, E, E, start, e0, SUB, BK).to(tl.float32)
            k = tile(Kb, L, E, E, start, e0, SUB, BK).to(tl.float32)
            g = gate_rows_vec(G, bh, start, e0, L, E, SUB, BK)
            d = masked_exp(g[:, None, :] - g[None, :, :], causal[:, :, None])
            acc += tl.sum(q[:, None, :] * k[None, :, :] * d, axis=2)
    store_tile(A + bh * L * C, L, C, C, start, j * SUB, acc, SUB, SUB)


@triton.jit
def chunk_output_kernel(Q, K, V, G, H, A, Out, L, E: tl.constexpr, F: tl.constexpr,
                        HAS_GATE: tl.constexpr, VECTOR: tl.constexpr, HAS_S0: tl.constexpr,
                        C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Out [BH, L, F] (fp32) of one chunk and block of value columns.

    A term the sum does not hold is skipped or selected away, never multiplied by an exact
    0: the first chunk without an initial state has no earlier keys (no Q H[0]), and a
    masked pair contributes nothing -- so an infinite q or k gives the literal sum's
    +-inf, not inf * 0 = NaN."""
    f0 = tl.program_id(0) * BV
    c = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    Qb, Kb = Q + bh * L * E, K + bh * L * E
    Hc = H + (bh * tl.cdiv(L, C) + c) * E * F
    oc = tl.arange(0, C)
    mt = c * C + oc < L
    v = tile(V + bh * L * F, L, F, F, c * C, f0, C, BV)
    o = tl.zeros([C, BV], dtype=tl.float32)
    p = tl.zeros([C, C], dtype=tl.float32)
    earlier = (c > 0) | HAS_S0  # keys (or a state) before the chunk: the term Q H[c]
    for e0 in range(0, E, BK):
        q = tile(Qb, L, E, E, c * C, e0, C, BK)
        h = tile(Hc, E, F, F, e0, f0, BK, BV).to(v.dtype)
        if VECTOR:
            g = gate_rows_vec(G, bh, c * C, e0, L, E, C, BK)
            g_prev = gate_at_vec(G, bh, c * C - 1, e0, L, E, BK)
            q = (q * masked_exp(g - g_prev[None, :], mt[:, None])).to(v.dtype)
            if earlier:
                o += tl.dot(q, h)                                      # (Q . exp(g - g(s-1))) H
        else:
            if earlier:
                o += tl.dot(q, h)                                      # Q H[c]
            p += tl.dot(q, tl.trans(tile(Kb, L, E, E, c * C, e0, C, BK)))  # Q K^T
    causal = (oc[:, None] >= oc[None, :]) & mt[:, None]
    if VECTOR:
        p = tl.where(causal, tile(A + bh * L * C, L, C, C, c * C, 0, C, C), 0.0)
    elif HAS_GATE:
        g = gate_rows(G, bh, c * C, L, C)
        o *= masked_exp(g - gate_at(G, bh, c * C - 1, L), mt)[:, None]  # exp(g(m) - g(s-1))
        p = tl.where(causal, p * masked_exp(g[:, None] - g[None, :], causal), 0.0)
    else:
        p = tl.where(causal, p, 0.0)
    o += tl.dot(p.to(v.dtype), v)                                      # + P V
    store_tile(Out + bh * L * F, L, F, F, c * C, f0, o, C, BV)
