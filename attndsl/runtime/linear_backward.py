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
   always and the intra-chunk ones for a scalar gate; for a vector gate it stores
   ``dA = (dO V^T)`` masked to n <= m instead, and
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

from attndsl.runtime.linear_gates import (
    gate_at,
    gate_at_vec,
    gate_rows,
    gate_rows_vec,
    masked_exp,
)


@triton.jit
def chunk_state_grads_kernel(Q, G, DO, DST, DH, DS0, L, E, F,
                             HAS_GATE: tl.constexpr, VECTOR: tl.constexpr, C: tl.constexpr,
                             BK: tl.constexpr, BV: tl.constexpr):
    """DH [BH, chunks, E, F]: the gradient of the state after each chunk; DS0 [BH, E, F]."""
    bh = tl.program_id(2).to(tl.int64)
    oe = tl.program_id(0) * BK + tl.arange(0, BK)
    of = tl.program_id(1) * BV + tl.arange(0, BV)
    oc = tl.arange(0, C)
    me, mf = oe < E, of < F
    s_off = oe[:, None] * F + of[None, :]
    s_mask = me[:, None] & mf[None, :]
    dS = tl.load(DST + bh * E * F + s_off, mask=s_mask, other=0.0)
    chunks = tl.cdiv(L, C)
    for r in range(0, chunks):
        c = chunks - 1 - r
        tl.store(DH + (bh * chunks + c) * E * F + s_off, dS, mask=s_mask)
        t = c * C + oc
        mt = t < L
        q = tl.load(Q + bh * L * E + t[:, None] * E + oe[None, :],
                    mask=mt[:, None] & me[None, :], other=0.0)
        do = tl.load(DO + bh * L * F + t[:, None] * F + of[None, :],
                     mask=mt[:, None] & mf[None, :], other=0.0)
        last = tl.minimum(c * C + C, L) - 1
        if HAS_GATE:
            if VECTOR:
                g = gate_rows_vec(G, bh, t, L, E, oe, me, mt)
                g_prev = gate_at_vec(G, bh, c * C - 1, L, E, oe, me)
                g_last = gate_at_vec(G, bh, last, L, E, oe, me)
                q = (q * masked_exp(g - g_prev[None, :], mt[:, None])).to(do.dtype)
                dS = dS * tl.exp(g_last - g_prev)[:, None]
            else:
                g = gate_rows(G, bh, t, L, mt)
                g_prev = gate_at(G, bh, c * C - 1, L)
                q = (q * masked_exp(g - g_prev, mt)[:, None]).to(do.dtype)  # Q . exp(g - g(s-1))
                dS = dS * tl.exp(gate_at(G, bh, last, L) - g_prev)
        dS += tl.dot(tl.trans(q), do)
    tl.store(DS0 + bh * E * F + s_off, dS, mask=s_mask)


@triton.jit
def chunk_dv_kernel(Q, K, G, A, DO, DH, DV, L, E, F,
                    HAS_GATE: tl.constexpr, VECTOR: tl.constexpr, C: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr):
    """DV [BH, L, F] (fp32): ``P^T dO + (K . exp(g(t) - g)) dS[c]``; A as in the forward
    (vector gates)."""
    c = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    of = tl.program_id(0) * BV + tl.arange(0, BV)
    oc = tl.arange(0, C)
    t = c * C + oc
    mt, mf = t < L, of < F
    chunks = tl.cdiv(L, C)
    last = tl.minimum(c * C + C, L) - 1
    do = tl.load(DO + bh * L * F + t[:, None] * F + of[None, :],
                 mask=mt[:, None] & mf[None, :], other=0.0)
    dv = tl.zeros([C, BV], dtype=tl.float32)
    pt = tl.zeros([C, C], dtype=tl.float32)  # P^T: keys x queries
    for e0 in range(0, E, BK):
        oe = e0 + tl.arange(0, BK)
        me = oe < E
        k = tl.load(K + bh * L * E + t[:, None] * E + oe[None, :],
                    mask=mt[:, None] & me[None, :], other=0.0)
        ds = tl.load(DH + (bh * chunks + c) * E * F + oe[:, None] * F + of[None, :],
                     mask=me[:, None] & mf[None, :], other=0.0)
        if VECTOR:
            g = gate_rows_vec(G, bh, t, L, E, oe, me, mt)
            g_last = gate_at_vec(G, bh, last, L, E, oe, me)
            k_out = k * masked_exp(g_last[None, :] - g, mt[:, None])
            dv += tl.dot(k_out.to(k.dtype), ds.to(k.dtype))
        else:
            q = tl.load(Q + bh * L * E + t[:, None] * E + oe[None, :],
                        mask=mt[:, None] & me[None, :], other=0.0)
            dv += tl.dot(k, ds.to(k.dtype))  # K dS[c]
            pt += tl.dot(k, tl.trans(q))  # K Q^T
    causal_t = (oc[:, None] <= oc[None, :]) & mt[:, None] & mt[None, :]   # key n <= query m
    if VECTOR:
        pt = tl.load(A + bh * L * C + t[None, :] * C + oc[:, None], mask=causal_t, other=0.0)
    elif HAS_GATE:
        g = gate_rows(G, bh, t, L, mt)
        dv *= masked_exp(gate_at(G, bh, last, L) - g, mt)[:, None]
        pt *= masked_exp(g[None, :] - g[:, None], causal_t)
    else:
        pt = tl.where(causal_t, pt, 0.0)
    dv += tl.dot(pt.to(do.dtype), do)  # + P^T dO
    tl.store(DV + bh * L * F + t[:, None] * F + of[None, :], dv,
             mask=mt[:, None] & mf[None, :])


@triton.jit
def chunk_dqk_kernel(Q, K, V, G, H, DO, DH, DQ, DK, DA, L, E, F,
                     HAS_GATE: tl.constexpr, VECTOR: tl.constexpr, C: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr):
    """DQ, DK [BH, L, E] (fp32) of one chunk and block of key dims; with a vector gate only
    the inter-chunk terms, and DA [BH, L, C] (fp32) = dO V^T masked to n <= m."""
    c = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    oe = tl.program_id(0) * BK + tl.arange(0, BK)
    oc = tl.arange(0, C)
    t = c * C + oc
    mt, me = t < L, oe < E
    chunks = tl.cdiv(L, C)
    last = tl.minimum(c * C + C, L) - 1
    qe = bh * L * E + t[:, None] * E + oe[None, :]
    qe_mask = mt[:, None] & me[None, :]
    dq = tl.zeros([C, BK], dtype=tl.float32)
    dk = tl.zeros([C, BK], dtype=tl.float32)
    dov = tl.zeros([C, C], dtype=tl.float32)
    for f0 in range(0, F, BV):
        of = f0 + tl.arange(0, BV)
        mf = of < F
        vf_mask = mt[:, None] & mf[None, :]
        do = tl.load(DO + bh * L * F + t[:, None] * F + of[None, :], mask=vf_mask, other=0.0)
        v = tl.load(V + bh * L * F + t[:, None] * F + of[None, :], mask=vf_mask, other=0.0)
        s_off = (bh * chunks + c) * E * F + oe[:, None] * F + of[None, :]
        s_mask = me[:, None] & mf[None, :]
        h = tl.load(H + s_off, mask=s_mask, other=0.0)
        ds = tl.load(DH + s_off, mask=s_mask, other=0.0)
        dq += tl.dot(do, tl.trans(h.to(do.dtype)))  # dO H[c]^T
        dk += tl.dot(v, tl.trans(ds.to(v.dtype)))  # V dS[c]^T
        dov += tl.dot(do, tl.trans(v))  # dO V^T
    causal = (oc[:, None] >= oc[None, :]) & mt[:, None] & mt[None, :]
    if HAS_GATE:
        if VECTOR:
            g = gate_rows_vec(G, bh, t, L, E, oe, me, mt)
            g_prev = gate_at_vec(G, bh, c * C - 1, L, E, oe, me)
            g_last = gate_at_vec(G, bh, last, L, E, oe, me)
            dq *= masked_exp(g - g_prev[None, :], mt[:, None])
            dk *= masked_exp(g_last[None, :] - g, mt[:, None])
        else:
            g = gate_rows(G, bh, t, L, mt)
            dq *= masked_exp(g - gate_at(G, bh, c * C - 1, L), mt)[:, None]
            dk *= masked_exp(gate_at(G, bh, last, L) - g, mt)[:, None]
            dov *= masked_exp(g[:, None] - g[None, :], causal)
    if VECTOR:
        if tl.program_id(0) == 0:
            tl.store(DA + bh * L * C + t[:, None] * C + oc[None, :],
                     tl.where(causal, dov, 0.0), mask=mt[:, None])
    else:
        dp = tl.where(causal, dov, 0.0).to(Q.dtype.element_ty)  # dP = (dO V^T) . D
        q = tl.load(Q + qe, mask=qe_mask, other=0.0)
        k = tl.load(K + qe, mask=qe_mask, other=0.0)
        dq += tl.dot(dp, k)  # + dP K
        dk += tl.dot(tl.trans(dp), q)  # + dP^T Q
    tl.store(DQ + qe, dq, mask=qe_mask)
    tl.store(DK + qe, dk, mask=qe_mask)


@triton.jit
def vector_intra_grads_kernel(Q, K, G, DA, DQ, DK, L, E,
                              C: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr):
    """Adds the intra-chunk terms of a vector gate to DQ and DK for one sub-chunk (rows
    [start, start + SUB)) and block of key dims."""
    oe = tl.program_id(0) * BK + tl.arange(0, BK)
    c = tl.program_id(1) // (C // SUB)
    i = tl.program_id(1) % (C // SUB)
    bh = tl.program_id(2).to(tl.int64)
    start = c * C + i * SUB
    if start >= L:
        return
    osub = tl.arange(0, SUB)
    rows = start + osub
    mr, me = rows < L, oe < E
    qe = bh * L * E + rows[:, None] * E + oe[None, :]
    qe_mask = mr[:, None] & me[None, :]
    q = tl.load(Q + qe, mask=qe_mask, other=0.0)
    k = tl.load(K + qe, mask=qe_mask, other=0.0)
    g = gate_rows_vec(G, bh, rows, L, E, oe, me, mr)
    da_rows = DA + bh * L * C + rows[:, None] * C
    # dq from earlier sub-chunks j < i, reference g(start): k exp(r - g) <= 1, exp(g - r) <= 1
    ref = gate_at_vec(G, bh, start, L, E, oe, me)
    dq = tl.zeros([SUB, BK], dtype=tl.float32)
    for j in range(0, i):
        cols = c * C + j * SUB + osub
        kj = tl.load(K + bh * L * E + cols[:, None] * E + oe[None, :], mask=me[None, :],
                     other=0.0)
        gj = gate_rows_vec(G, bh, cols, L, E, oe, me, cols < L)
        da = tl.load(da_rows + (j * SUB + osub)[None, :], mask=mr[:, None], other=0.0)
        dq += tl.dot(da.to(kj.dtype), (kj * tl.exp(ref[None, :] - gj)).to(kj.dtype))
    dq *= masked_exp(g - ref[None, :], mr[:, None])
    # dk from later sub-chunks j > i, reference g at the sub-chunk's last row
    ref = gate_at_vec(G, bh, tl.minimum(start + SUB, L) - 1, L, E, oe, me)
    dk = tl.zeros([SUB, BK], dtype=tl.float32)
    for j in range(i + 1, C // SUB):
        rj = c * C + j * SUB + osub
        mj = rj < L
        qj = tl.load(Q + bh * L * E + rj[:, None] * E + oe[None, :],
                     mask=mj[:, None] & me[None, :], other=0.0)
        gj = gate_rows_vec(G, bh, rj, L, E, oe, me, mj)
        da = tl.load(DA + bh * L * C + rj[:, None] * C + (i * SUB + osub)[None, :],
                     mask=mj[:, None], other=0.0)
        qd = qj * masked_exp(gj - ref[None, :], mj[:, None])
        dk += tl.dot(tl.trans(da.to(qj.dtype)), qd.to(qj.dtype))
    dk *= masked_exp(ref[None, :] - g, mr[:, None])
    # the diagonal block: exact, the decay formed per pair n <= m
    causal = (osub[:, None] >= osub[None, :]) & mr[:, None] & mr[None, :]
    da = tl.load(da_rows + (i * SUB + osub)[None, :], mask=mr[:, None], other=0.0)
    d = masked_exp(g[:, None, :] - g[None, :, :], causal[:, :, None])
    d = da[:, :, None] * d
    dq += tl.sum(d * k.to(tl.float32)[None, :, :], axis=1)
    dk += tl.sum(d * q.to(tl.float32)[:, None, :], axis=0)
    tl.store(DQ + qe, tl.load(DQ + qe, mask=qe_mask, other=0.0) + dq, mask=qe_mask)
    tl.store(DK + qe, tl.load(DK + qe, mask=qe_mask, other=0.0) + dk, mask=qe_mask)
