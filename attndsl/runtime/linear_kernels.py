"""Triton kernels of the linear form: chunked prefill and the recurrent (decode) step.

Both compute, per (batch * head) row ``bh`` and block of value columns, with features
q, k (L x E), v (L x F), the gate g over positions -1..L-1 (``G[bh, p + 1]`` is g(p); g(-1)
is the reference of the initial state) and an initial state S0 (E x F):

    o(m) = q(m) . S(m),  S(m) = sum_{n <= m} exp(g(m) - g(n)) k(n) (x) v(n)
                                + exp(g(m) - g(-1)) S0

(a scalar gate is one value per position; a vector gate one per position and key dim e, the
decay then acting per row e of S).  The final state S(L-1) is stored.

Chunked (chunk C, positions [s, s + C)): with the state S_prev at s - 1,

    o(m)   = (q(m) exp(g(m) - g(s-1))) S_prev                       # inter-chunk (tl.dot)
           + sum_{s <= n <= m} (q(m) . k(n) exp(g(m) - g(n))) v(n)  # intra-chunk (tl.dot)
    S_next = exp(g(t) - g(s-1)) S_prev + sum_n (k(n) exp(g(t) - g(n))) (x) v(n)

with t the chunk's last position: every exponent is <= 0 for a decaying gate and none is
formed for a masked pair (n > m), so nothing overflows however small the gates are.  With a
vector gate the intra-chunk scores need the decay inside the e-sum: they are an explicit
C x C x E product (exact; not on tensor cores).  States are fp32; inputs are cast to fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _decay_rows(G, bh, pos, L, E, oe, me, mt, VECTOR: tl.constexpr):
    """g at positions ``pos`` (-1..L-1): [C, BE] for a vector gate, [C] for a scalar one."""
    if VECTOR:
        return tl.load(G + bh * (L + 1) * E + (pos[:, None] + 1) * E + oe[None, :],
                       mask=mt[:, None] & me[None, :], other=0.0)
    return tl.load(G + bh * (L + 1) + pos + 1, mask=mt, other=0.0)


@triton.jit
def _decay_at(G, bh, pos, L, E, oe, me, VECTOR: tl.constexpr):
    """g at one position ``pos``: [BE] (vector gate) or a scalar."""
    if VECTOR:
        return tl.load(G + bh * (L + 1) * E + (pos + 1) * E + oe, mask=me, other=0.0)
    return tl.load(G + bh * (L + 1) + pos + 1)


@triton.jit
def chunked_forward_kernel(Q, K, V, G, S0, Out, ST, L, E, F,
                           HAS_GATE: tl.constexpr, VECTOR: tl.constexpr,
                           HAS_S0: tl.constexpr, C: tl.constexpr, BE: tl.constexpr,
                           BF: tl.constexpr):
    bh = tl.program_id(0)
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
    for c in range(0, tl.cdiv(L, C)):
        t = c * C + oc
        mt = t < L
        q = tl.load(Q + bh * L * E + t[:, None] * E + oe[None, :],
                    mask=mt[:, None] & me[None, :], other=0.0)
        k = tl.load(K + bh * L * E + t[:, None] * E + oe[None, :],
                    mask=mt[:, None] & me[None, :], other=0.0)
        v = tl.load(V + bh * L * F + t[:, None] * F + of[None, :],
                    mask=mt[:, None] & mf[None, :], other=0.0)
        causal = (oc[:, None] >= oc[None, :]) & mt[:, None] & mt[None, :]
        last = tl.minimum(c * C + C, L) - 1
        if HAS_GATE:
            g = _decay_rows(G, bh, t, L, E, oe, me, mt, VECTOR)
            g_prev = _decay_at(G, bh, c * C - 1, L, E, oe, me, VECTOR)
            g_last = _decay_at(G, bh, last, L, E, oe, me, VECTOR)
            if VECTOR:
                q_in = q * tl.exp(g - g_prev[None, :])                 # q(m) exp(g(m) - g(s-1))
                d = tl.where(causal[:, :, None], g[:, None, :] - g[None, :, :], -float("inf"))
                p = tl.sum(q[:, None, :] * k[None, :, :] * tl.exp(d), axis=2)
                k_out = k * tl.exp(tl.where(mt[:, None], g_last[None, :] - g, -float("inf")))
                carry = tl.exp(g_last - g_prev)[:, None]
            else:
                q_in = q * tl.exp(g - g_prev)[:, None]
                d = tl.where(causal, g[:, None] - g[None, :], -float("inf"))
                p = tl.dot(q, tl.trans(k)) * tl.exp(d)                # (Q K^T) . decay
                k_out = k * tl.exp(tl.where(mt, g_last - g, -float("inf")))[:, None]
                carry = tl.exp(g_last - g_prev)
            o = tl.dot(q_in, S) + tl.dot(p, v)                         # inter + intra (P V)
            S = S * carry + tl.dot(tl.trans(k_out), v)                 # S = decay S + K^T V
        else:
            p = tl.where(causal, tl.dot(q, tl.trans(k)), 0.0)
            o = tl.dot(q, S) + tl.dot(p, v)
            S = S + tl.dot(tl.trans(k), v)
        tl.store(Out + bh * L * F + t[:, None] * F + of[None, :], o,
                 mask=mt[:, None] & mf[None, :])
    tl.store(ST + s_off, S, mask=s_mask)


@triton.jit
def recurrent_kernel(Q, K, V, G, S0, Out, ST, L, E, F,
                     HAS_GATE: tl.constexpr, VECTOR: tl.constexpr, HAS_S0: tl.constexpr,
                     BE: tl.constexpr, BF: tl.constexpr):
    """One key at a time: S = diag(exp(g(t) - g(t-1))) S + k(t) (x) v(t); o(t) = q(t) S."""
    bh = tl.program_id(0)
    oe = tl.arange(0, BE)
    of = tl.program_id(1) * BF + tl.arange(0, BF)
    me, mf = oe < E, of < F
    s_off = bh * E * F + oe[:, None] * F + of[None, :]
    s_mask = me[:, None] & mf[None, :]
    if HAS_S0:
        S = tl.load(S0 + s_off, mask=s_mask, other=0.0)
    else:
        S = tl.zeros([BE, BF], dtype=tl.float32)
    for t in range(0, L):
        q = tl.load(Q + bh * L * E + t * E + oe, mask=me, other=0.0)
        k = tl.load(K + bh * L * E + t * E + oe, mask=me, other=0.0)
        v = tl.load(V + bh * L * F + t * F + of, mask=mf, other=0.0)
        if HAS_GATE:
            step = _decay_at(G, bh, t, L, E, oe, me, VECTOR) - \
                _decay_at(G, bh, t - 1, L, E, oe, me, VECTOR)
            if VECTOR:
                S = S * tl.exp(step)[:, None]
            else:
                S = S * tl.exp(step)
        S = S + k[:, None] * v[None, :]
        tl.store(Out + bh * L * F + t * F + of, tl.sum(q[:, None] * S, axis=0), mask=mf)
    tl.store(ST + s_off, S, mask=s_mask)


def launch(q, k, v, g, s0, chunk: int | None, vector: bool):  # noqa: ANN001, ANN201
    """Run the chunked kernel (``chunk``: a power of two >= 16) or, with ``chunk=None``, the
    recurrent one, on contiguous fp32 [BH, L, E|F] features, g [BH, L + 1(, E)] or None and
    s0 [BH, E, F] or None; returns (o [BH, L, F], final state [BH, E, F])."""
    import torch

    bh, length, e = q.shape
    f = v.shape[-1]
    o = torch.empty((bh, length, f), dtype=torch.float32, device=q.device)
    st = torch.empty((bh, e, f), dtype=torch.float32, device=q.device)
    if bh == 0 or e == 0 or f == 0:
        return o.zero_(), st.zero_()
    be = max(16, triton.next_power_of_2(e))
    bf = min(64, max(16, triton.next_power_of_2(f)))
    grid = (bh, triton.cdiv(f, bf))
    dummy = o
    args = (q, k, v, dummy if g is None else g, dummy if s0 is None else s0, o, st,
            length, e, f)
    flags = dict(HAS_GATE=g is not None, VECTOR=vector, HAS_S0=s0 is not None, BE=be, BF=bf)
    if chunk is None:
        recurrent_kernel[grid](*args, **flags)
    else:
        chunked_forward_kernel[grid](*args, C=chunk, **flags)
    return o, st
