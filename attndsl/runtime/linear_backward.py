"""The chunked backward of the linear form, split like the forward
(:mod:`attndsl.runtime.linear_forward`): one kernel sequential over chunks, the rest parallel.

Per chunk (positions [s, s + C), t the last), with ``H[c]`` the state before it (from the
forward's :func:`~attndsl.runtime.linear_forward.chunk_states_kernel`), ``dS[c]`` the
gradient of the state after it, D(m, n) = exp(g(m) - g(n)) for n <= m (0 above the diagonal)
and P = (Q K^T) . D:

    dP = (dO V^T) . D
    dQ = dP K + exp(g - g(s-1)) . (dO H[c]^T)
    dK = dP^T Q + exp(g(t) - g) . (V dS[c]^T)
    dV = P^T dO + (K . exp(g(t) - g)) dS[c]
    dS[c - 1] = exp(g(t) - g(s-1)) dS[c] + (Q . exp(g - g(s-1)))^T dO

Kernels:

1. :func:`chunk_state_grads_kernel`, grid (E blocks, F blocks, BH), reverse over chunks:
   ``DH[c] = dS[c]`` (fp32, to memory) from the final state's gradient, and the initial
   state's gradient.
2. :func:`chunk_dv_kernel`, grid (F blocks, chunks, BH): dV.
3. :func:`chunk_dqk_kernel`, grid (E blocks, chunks, BH): dQ and dK, the inter-chunk terms
   always and the intra-chunk ones for a scalar gate; for a vector gate
   :func:`chunk_da_kernel` (grid (chunks, BH)) stores ``dA = (dO V^T)`` masked to n <= m
   and
4. :func:`vector_intra_grads_kernel`, grid (E blocks, chunks x sub-chunks, BH), adds the
   intra-chunk terms ``dq(m, e) = sum_n dA(m, n) k(n, e) exp(g(m, e) - g(n, e))`` and
   ``dk(n, e) = sum_m dA(m, n) q(m, e) exp(g(m, e) - g(n, e))`` with the sub-chunk scheme
   of :func:`~attndsl.runtime.linear_forward.vector_scores_kernel`: tensor-core dots between
   sub-chunks, each factor's exponent <= 0 against a reference inside the sub-chunk pair
   (for dq the first row of the query sub-chunk, for dk the last row of the key sub-chunk),
   exact element-wise products on the diagonal blocks.

Precision as in the forward: tensor-core operands in the operand dtype (scores, states and
their gradients cast to it), fp32 accumulation, fp32 outputs.
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
def chunk_state_grads_kernel(Q, G, DO, DST, DH, DS0, L, E: tl.constexpr, F: tl.constexpr,
                             HAS_GATE: tl.constexpr, VECTOR: tl.constexpr, C: tl.constexpr,
                             BK: tl.constexpr, BV: tl.constexpr):
    """DH [BH, chunks, E, F]: the gradient of the state after each chunk; DS0 [BH, E, F]."""
    e0 = tl.program_id(0) * BK
    f0 = tl.program_id(1) * BV
    bh = tl.program_id(2).to(tl.int64)
    Qb, DOb = Q + bh * L * E, DO + bh * L * F
    chunks = tl.cdiv(L, C)
    DHb = DH + bh * chunks * E * F
    dS = tile(DST + bh * E * F, E, F, F, e0, f0, BK, BV)
    oc = tl.arange(0, C)
    for r in range(0, chunks):
        c = chunks - 1 - r
        store_tile(DHb + c * E * F, E, F, F, e0, f0, dS, BK, BV)
        q = tile(Qb, L, E, E, c * C, e0, C, BK)
        do = tile(DOb, L, F, F, c * C, f0, C, BV)
        if HAS_GATE:
            mt = c * C + oc < L
            last = tl.minimum(c * C + C, L) - 1
            if VECTOR:
                g = gate_rows_vec(G, bh, c * C, e0, L, E, C, BK)
                g_prev = gate_at_vec(G, bh, c * C - 1, e0, L, E, BK)
                g_last = gate_at_vec(G, bh, last, e0, L, E, BK)
                q = (q * masked_exp(g - g_prev[None, :], mt[:, None])).to(do.dtype)
                dS = dS * tl.exp(g_last - g_prev)[:, None]
            else:
                g_prev = gate_at(G, bh, c * C - 1, L)
                decay = masked_exp(gate_rows(G, bh, c * C, L, C) - g_prev, mt)
                q = (q * decay[:, None]).to(do.dtype)                  # Q . exp(g - g(s-1))
                dS = dS * tl.exp(gate_at(G, bh, last, L) - g_prev)
        dS += tl.dot(tl.trans(q), do)
    store_tile(DS0 + bh * E * F, E, F, F, e0, f0, dS, BK, BV)


@triton.jit
def chunk_dv_kernel(Q, K, G, A, DO, DH, DV, L, E: tl.constexpr, F: tl.constexpr,
                    HAS_GATE: tl.constexpr, VECTOR: tl.constexpr, C: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr):
    """DV [BH, L, F] (fp32): ``P^T dO + (K . exp(g(t) - g)) dS[c]``; A as in the forward
    (vector gates)."""
    f0 = tl.program_id(0) * BV
    c = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    Qb, Kb = Q + bh * L * E, K + bh * L * E
    DHc = DH + (bh * tl.cdiv(L, C) + c) * E * F
    oc = tl.arange(0, C)
    mt = c * C + oc < L
    last = tl.minimum(c * C + C, L) - 1
    do = tile(DO + bh * L * F, L, F, F, c * C, f0, C, BV)
    dv = tl.zeros([C, BV], dtype=tl.float32)
    pt = tl.zeros([C, C], dtype=tl.float32)                            # P^T: keys x queries
    for e0 in range(0, E, BK):
        k = tile(Kb, L, E, E, c * C, e0, C, BK)
        ds = tile(DHc, E, F, F, e0, f0, BK, BV).to(do.dtype)
        if VECTOR:
            g = gate_rows_vec(G, bh, c * C, e0, L, E, C, BK)
            g_last = gate_at_vec(G, bh, last, e0, L, E, BK)
            k_out = (k * masked_exp(g_last[None, :] - g, mt[:, None])).to(do.dtype)
            dv += tl.dot(k_out, ds)                                    # (K . exp(g(t) - g)) dS
        else:
            dv += tl.dot(k, ds)                                        # K dS[c]
            pt += tl.dot(k, tl.trans(tile(Qb, L, E, E, c * C, e0, C, BK)))  # K Q^T
    causal_t = (oc[:, None] <= oc[None, :]) & mt[None, :]              # key n <= query m
    if VECTOR:
        pt = tl.trans(tile(A + bh * L * C, L, C, C, c * C, 0, C, C))
    elif HAS_GATE:
        g = gate_rows(G, bh, c * C, L, C)
        dv *= masked_exp(gate_at(G, bh, last, L) - g, mt)[:, None]
        pt *= masked_exp(g[None, :] - g[:, None], causal_t)
    else:
        pt = tl.where(causal_t, pt, 0.0)
    dv += tl.dot(pt.to(do.dtype), do)                                  # + P^T dO
    store_tile(DV + bh * L * F, L, F, F, c * C, f0, dv, C, BV)


@triton.jit
def chunk_da_kernel(V, DO, DA, L, F: tl.constexpr, C: tl.constexpr, BV: tl.constexpr):
    """DA [BH, L, C] (fp32) = dO V^T of one chunk, masked to n <= m (vector gates: the
    intra-chunk gradients' input, :func:`vector_intra_grads_kernel`)."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    Vb, DOb = V + bh * L * F, DO + bh * L * F
    oc = tl.arange(0, C)
    dov = tl.zeros([C, C], dtype=tl.float32)
    for f0 in range(0, F, BV):
        dov += tl.dot(tile(DOb, L, F, F, c * C, f0, C, BV),
                      tl.trans(tile(Vb, L, F, F, c * C, f0, C, BV)))
    causal = (oc[:, None] >= oc[None, :]) & (c * C + oc < L)[:, None]
    store_tile(DA + bh * L * C, L, C, C, c * C, 0, tl.where(causal, dov, 0.0), C, C)


@triton.jit
def chunk_dqk_kernel(Q, K, V, G, H, DO, DH, DQ, DK, L, E: tl.constexpr, F: tl.constexpr,
                     HAS_GATE: tl.constexpr, VECTOR: tl.constexpr, C: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr):
    """DQ, DK [BH, L, E] (fp32) of one chunk and block of key dims; with a vector gate only
    the inter-chunk terms (:func:`vector_intra_grads_kernel` adds the rest)."""
    e0 = tl.program_id(0) * BK
    c = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    Vb, DOb = V + bh * L * F, DO + bh * L * F
    s_off = (bh * tl.cdiv(L, C) + c) * E * F
    oc = tl.arange(0, C)
    mt = c * C + oc < L
    last = tl.minimum(c * C + C, L) - 1
    dq = tl.zeros([C, BK], dtype=tl.float32)
    dk = tl.zeros([C, BK], dtype=tl.float32)
    dov = tl.zeros([C, C], dtype=tl.float32)
    for f0 in range(0, F, BV):
        do = tile(DOb, L, F, F, c * C, f0, C, BV)
        v = tile(Vb, L, F, F, c * C, f0, C, BV)
        h = tile(H + s_off, E, F, F, e0, f0, BK, BV).to(do.dtype)
        ds = tile(DH + s_off, E, F, F, e0, f0, BK, BV).to(do.dtype)
        dq += tl.dot(do, tl.trans(h))                                  # dO H[c]^T
        dk += tl.dot(v, tl.trans(ds))                                  # V dS[c]^T
        if not VECTOR:
            dov += tl.dot(do, tl.trans(v))                             # dO V^T
    causal = (oc[:, None] >= oc[None, :]) & mt[:, None]
    if HAS_GATE:
        if VECTOR:
            g = gate_rows_vec(G, bh, c * C, e0, L, E, C, BK)
            dq *= masked_exp(g - gate_at_vec(G, bh, c * C - 1, e0, L, E, BK)[None, :],
                             mt[:, None])
            dk *= masked_exp(gate_at_vec(G, bh, last, e0, L, E, BK)[None, :] - g, mt[:, None])
        else:
            g = gate_rows(G, bh, c * C, L, C)
            dq *= masked_exp(g - gate_at(G, bh, c * C - 1, L), mt)[:, None]
            dk *= masked_exp(gate_at(G, bh, last, L) - g, mt)[:, None]
            dov *= masked_exp(g[:, None] - g[None, :], causal)
    if not VECTOR:
        dp = tl.where(causal, dov, 0.0).to(Q.dtype.element_ty)         # dP = (dO V^T) . D
        dq += tl.dot(dp, tile(K + bh * L * E, L, E, E, c * C, e0, C, BK))           # + dP K
        dk += tl.dot(tl.trans(dp), tile(Q + bh * L * E, L, E, E, c * C, e0, C, BK))  # + dP^T Q
    store_tile(DQ + bh * L * E, L, E, E, c * C, e0, dq, C, BK)
    store_tile(DK + bh * L * E, L, E, E, c * C, e0, dk, C, BK)


@triton.jit
def vector_intra_grads_kernel(Q, K, G, DA, DQ, DK, L, E: tl.constexpr,
                              C: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr):
    """Adds the intra-chunk terms of a vector gate to DQ and DK for one sub-chunk (rows
    [start, start + SUB)) and block of key dims."""
    e0 = tl.program_id(0) * BK
    c = tl.program_id(1) // (C // SUB)
    i = tl.program_id(1) % (C // SUB)
    bh = tl.program_id(2).to(tl.int64)
    start = c * C + i * SUB
    if start >= L:
        return
    Qb, Kb, DAb = Q + bh * L * E, K + bh * L * E, DA + bh * L * C
    osub = tl.arange(0, SUB)
    mr = start + osub < L
    q = tile(Qb, L, E, E, start, e0, SUB, BK)
    k = tile(Kb, L, E, E, start, e0, SUB, BK)
    g = gate_rows_vec(G, bh, start, e0, L, E, SUB, BK)
    # dq from earlier sub-chunks j < i, reference g(start): k exp(r - g) <= 1, exp(g - r) <= 1
    ref = gate_at_vec(G, bh, start, e0, L, E, BK)
    dq = tl.zeros([SUB, BK], dtype=tl.float32)
    for j in range(0, i):
        kj = tile(Kb, L, E, E, c * C + j * SUB, e0, SUB, BK)
        gj = gate_rows_vec(G, bh, c * C + j * SUB, e0, L, E, SUB, BK)
        da = tile(DAb, L, C, C, start, j * SUB, SUB, SUB).to(kj.dtype)
        dq += tl.dot(da, (kj * tl.exp(ref[None, :] - gj)).to(kj.dtype))
    dq *= masked_exp(g - ref[None, :], mr[:, None])
    # dk from later sub-chunks j > i, reference g at the sub-chunk's last row
    ref = gate_at_vec(G, bh, tl.minimum(start + SUB, L) - 1, e0, L, E, BK)
    dk = tl.zeros([SUB, BK], dtype=tl.float32)
    for j in range(i + 1, C // SUB):
        row0 = c * C + j * SUB
        qj = tile(Qb, L, E, E, row0, e0, SUB, BK)
        gj = gate_rows_vec(G, bh, row0, e0, L, E, SUB, BK)
        da = tile(DAb, L, C, C, row0, i * SUB, SUB, SUB).to(qj.dtype)
        qd = qj * masked_exp(gj - ref[None, :], (row0 + osub < L)[:, None])
        dk += tl.dot(tl.trans(da), qd.to(qj.dtype))
    dk *= masked_exp(ref[None, :] - g, mr[:, None])
    # the diagonal block: exact, the decay formed per pair n <= m
    causal = (osub[:, None] >= osub[None, :]) & mr[:, None]
    da = tile(DAb, L, C, C, start, i * SUB, SUB, SUB)
    d = da[:, :, None] * masked_exp(g[:, None, :] - g[None, :, :], causal[:, :, None])
    dq += tl.sum(d * k.to(tl.float32)[None, :, :], axis=1)
    dk += tl.sum(d * q.to(tl.float32)[:, None, :], axis=0)
    store_tile(DQ + bh * L * E, L, E, E, start, e0,
               tile(DQ + bh * L * E, L, E, E, start, e0, SUB, BK) + dq, SUB, BK)
    store_tile(DK + bh * L * E, L, E, E, start, e0,
               tile(DK + bh * L * E, L, E, E, start, e0, SUB, BK) + dk, SUB, BK)
