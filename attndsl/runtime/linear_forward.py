"""The chunked forward of the linear form: per-chunk states, then outputs in parallel.

Per (batch * head) row, features q, k (L x E), v (L x F), the gate g (positions -1..L-1,
:mod:`attndsl.runtime.linear_gates`) and an initial state S0 (E x F):

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

from attndsl.runtime.linear_gates import (
    gate_at,
    gate_at_vec,
    gate_rows,
    gate_rows_vec,
    masked_exp,
)


@triton.jit
def chunk_states_kernel(K, V, G, S0, H, ST, L, E, F,
                        HAS_GATE: tl.constexpr, VECTOR: tl.constexpr, HAS_S0: tl.constexpr,
                        C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """H [BH, chunks, E, F]: the state before each chunk; ST [BH, E, F]: the final state."""
    bh = tl.program_id(2).to(tl.int64)
    oe = tl.program_id(0) * BK + tl.arange(0, BK)
    of = tl.program_id(1) * BV + tl.arange(0, BV)
    oc = tl.arange(0, C)
    me, mf = oe < E, of < F
    s_off = oe[:, None] * F + of[None, :]
    s_mask = me[:, None] & mf[None, :]
    if HAS_S0:
        S = tl.load(S0 + bh * E * F + s_off, mask=s_mask, other=0.0)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    chunks = tl.cdiv(L, C)
    for c in range(0, chunks):
        tl.store(H + (bh * chunks + c) * E * F + s_off, S, mask=s_mask)
        t = c * C + oc
        mt = t < L
        k = tl.load(K + bh * L * E + t[:, None] * E + oe[None, :],
                    mask=mt[:, None] & me[None, :], other=0.0)
        v = tl.load(V + bh * L * F + t[:, None] * F + of[None, :],
                    mask=mt[:, None] & mf[None, :], other=0.0)
        last = tl.minimum(c * C + C, L) - 1
        if HAS_GATE:
            if VECTOR:
                g = gate_rows_vec(G, bh, t, L, E, oe, me, mt)
                g_prev = gate_at_vec(G, bh, c * C - 1, L, E, oe, me)
                g_last = gate_at_vec(G, bh, last, L, E, oe, me)
                decay = masked_exp(g_last[None, :] - g, mt[:, None])
                S = S * tl.exp(g_last - g_prev)[:, None]
            else:
                g = gate_rows(G, bh, t, L, mt)
                g_last = gate_at(G, bh, last, L)
                decay = masked_exp(g_last - g, mt)[:, None]
                S = S * tl.exp(g_last - gate_at(G, bh, c * C - 1, L))
            k = (k * decay).to(v.dtype)  # K . exp(g(t) - g)
        S += tl.dot(tl.trans(k), v)  # + K^T V
    tl.store(ST + bh * E * F + s_off, S, mask=s_mask)


@triton.jit
def vector_scores_kernel(Q, K, G, A, L, E,
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
    normal).  The diagonal blocks, where no such r exists, are exact element-wise C-sub x
    C-sub x BK products with the decay exp(g(m) - g(n)) formed per pair (masked pairs
    none): a SUB / C share of the work off the tensor cores."""
    c = tl.program_id(0) // (C // SUB)
    i = tl.program_id(0) % (C // SUB)
    j = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    start = c * C + i * SUB
    if (j > i) | (start >= L):
        return
    rows = start + tl.arange(0, SUB)
    cols = c * C + j * SUB + tl.arange(0, SUB)
    mr, mc = rows < L, cols < L
    acc = tl.zeros([SUB, SUB], dtype=tl.float32)
    for e0 in range(0, E, BK):
        oe = e0 + tl.arange(0, BK)
        me = oe < E
        q = tl.load(Q + bh * L * E + rows[:, None] * E + oe[None, :],
                    mask=mr[:, None] & me[None, :], other=0.0)
        k = tl.load(K + bh * L * E + cols[:, None] * E + oe[None, :],
                    mask=mc[:, None] & me[None, :], other=0.0)
        gq = gate_rows_vec(G, bh, rows, L, E, oe, me, mr)
        gk = gate_rows_vec(G, bh, cols, L, E, oe, me, mc)
        if j < i:
            ref = gate_at_vec(G, bh, start, L, E, oe, me)
            qd = q * masked_exp(gq - ref[None, :], mr[:, None])
            kd = k * tl.exp(ref[None, :] - gk)  # keys before the rows
            acc += tl.dot(qd.to(q.dtype), tl.trans(kd.to(k.dtype)))
        else:
            causal = (rows[:, None] >= cols[None, :]) & mr[:, None] & mc[None, :]
            d = masked_exp(gq[:, None, :] - gk[None, :, :], causal[:, :, None])
            acc += tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :]
                          * d, axis=2)
    tl.store(A + bh * L * C + rows[:, None] * C + (j * SUB + tl.arange(0, SUB))[None, :],
             acc, mask=mr[:, None])


@triton.jit
def chunk_output_kernel(Q, K, V, G, H, A, Out, L, E, F,
                        HAS_GATE: tl.constexpr, VECTOR: tl.constexpr, C: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr):
    """Out [BH, L, F] (fp32) of one chunk and block of value columns."""
    c = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    of = tl.program_id(0) * BV + tl.arange(0, BV)
    oc = tl.arange(0, C)
    t = c * C + oc
    mt, mf = t < L, of < F
    chunks = tl.cdiv(L, C)
    v = tl.load(V + bh * L * F + t[:, None] * F + of[None, :],
                mask=mt[:, None] & mf[None, :], other=0.0)
    o = tl.zeros([C, BV], dtype=tl.float32)
    p = tl.zeros([C, C], dtype=tl.float32)
    for e0 in range(0, E, BK):
        oe = e0 + tl.arange(0, BK)
        me = oe < E
        q = tl.load(Q + bh * L * E + t[:, None] * E + oe[None, :],
                    mask=mt[:, None] & me[None, :], other=0.0)
        h = tl.load(H + (bh * chunks + c) * E * F + oe[:, None] * F + of[None, :],
                    mask=me[:, None] & mf[None, :], other=0.0)
        if VECTOR:
            g = gate_rows_vec(G, bh, t, L, E, oe, me, mt)
            g_prev = gate_at_vec(G, bh, c * C - 1, L, E, oe, me)
            q_in = (q * masked_exp(g - g_prev[None, :], mt[:, None])).to(q.dtype)
            o += tl.dot(q_in, h.to(q.dtype))
        else:
            k = tl.load(K + bh * L * E + t[:, None] * E + oe[None, :],
                        mask=mt[:, None] & me[None, :], other=0.0)
            o += tl.dot(q, h.to(q.dtype))  # Q H[c]
            p += tl.dot(q, tl.trans(k))  # Q K^T
    causal = (oc[:, None] >= oc[None, :]) & mt[:, None] & mt[None, :]
    if VECTOR:
        p = tl.load(A + bh * L * C + t[:, None] * C + oc[None, :], mask=causal, other=0.0)
    elif HAS_GATE:
        g = gate_rows(G, bh, t, L, mt)
        o *= masked_exp(g - gate_at(G, bh, c * C - 1, L), mt)[:, None]  # exp(g(m) - g(s-1))
        p *= masked_exp(g[:, None] - g[None, :], causal)
    else:
        p = tl.where(causal, p, 0.0)
    o += tl.dot(p.to(v.dtype), v)  # + P V
    tl.store(Out + bh * L * F + t[:, None] * F + of[None, :], o,
             mask=mt[:, None] & mf[None, :])
