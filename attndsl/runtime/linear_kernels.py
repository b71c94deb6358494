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

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor


@triton.jit
def _gate_rows(G, bh, pos, L, mt):
    """Scalar gate g at positions ``pos`` (-1..L-1): [C]."""
    return tl.load(G + bh * (L + 1) + pos + 1, mask=mt, other=0.0)


@triton.jit
def _gate_rows_vec(G, bh, pos, L, E, oe, me, mt):
    """Vector gate g at positions ``pos``: [C, BE]."""
    return tl.load(G + bh * (L + 1) * E + (pos[:, None] + 1) * E + oe[None, :],
                   mask=mt[:, None] & me[None, :], other=0.0)


@triton.jit
def _gate_at(G, bh, pos, L):
    """Scalar gate g at one position ``pos``."""
    return tl.load(G + bh * (L + 1) + pos + 1)


@triton.jit
def _gate_at_vec(G, bh, pos, L, E, oe, me):
    """Vector gate g at one position ``pos``: [BE]."""
    return tl.load(G + bh * (L + 1) * E + (pos + 1) * E + oe, mask=me, other=0.0)


@triton.jit
def chunked_forward_kernel(Q, K, V, G, S0, Out, ST, SP, L, E, F,
                           HAS_GATE: tl.constexpr, VECTOR: tl.constexpr,
                           HAS_S0: tl.constexpr, SAVE: tl.constexpr, C: tl.constexpr,
                           BE: tl.constexpr, BF: tl.constexpr):
    """``SAVE``: store the state at each chunk's start in SP [BH, chunks, E, F] (for the
    backward)."""
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
    chunks = tl.cdiv(L, C)
    for c in range(0, chunks):
        if SAVE:
            tl.store(SP + (bh * chunks + c) * E * F + oe[:, None] * F + of[None, :], S,
                     mask=s_mask)
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
            if VECTOR:
                g = _gate_rows_vec(G, bh, t, L, E, oe, me, mt)
                g_prev = _gate_at_vec(G, bh, c * C - 1, L, E, oe, me)
                g_last = _gate_at_vec(G, bh, last, L, E, oe, me)
                q_in = q * tl.exp(g - g_prev[None, :])                 # q(m) exp(g(m) - g(s-1))
                d = tl.where(causal[:, :, None], g[:, None, :] - g[None, :, :], -float("inf"))
                p = tl.sum(q[:, None, :] * k[None, :, :] * tl.exp(d), axis=2)
                k_out = k * tl.exp(tl.where(mt[:, None], g_last[None, :] - g, -float("inf")))
                carry = tl.exp(g_last - g_prev)[:, None]
            else:
                g = _gate_rows(G, bh, t, L, mt)
                g_prev = _gate_at(G, bh, c * C - 1, L)
                g_last = _gate_at(G, bh, last, L)
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
def chunked_backward_kernel(Q, K, V, G, SP, DO, DST, DQ, DK, DV, DS0, L, E, F,
                            HAS_GATE: tl.constexpr, VECTOR: tl.constexpr, C: tl.constexpr,
                            BE: tl.constexpr, BF: tl.constexpr):
    """Chunks in reverse, carrying dS (the gradient of the state at the chunk's end), from
    the final state's gradient DST; SP holds each chunk's starting state.  Per chunk, with
    D(i, j) = exp(g(i) - g(j)) for j <= i (0 above the diagonal) and P = (Q K^T) . D:

        dP = (dO V^T) . D
        dQ = dP K + exp(g - g(s-1)) . (dO S_prev^T)
        dK = dP^T Q + exp(g(t) - g) . (V dS^T)
        dV = P^T dO + (K . exp(g(t) - g)) dS
        dS <- exp(g(t) - g(s-1)) dS + (Q . exp(g - g(s-1)))^T dO

    (with a vector gate the decay is inside the e-sums: explicit C x C x E products).  The
    gate's gradient follows from these (see :func:`chunked_backward`).  One program per
    (batch * head) row, all of E and F in one tile."""
    bh = tl.program_id(0)
    oe = tl.arange(0, BE)
    of = tl.arange(0, BF)
    oc = tl.arange(0, C)
    me, mf = oe < E, of < F
    s_off = oe[:, None] * F + of[None, :]
    s_mask = me[:, None] & mf[None, :]
    dS = tl.load(DST + bh * E * F + s_off, mask=s_mask, other=0.0)
    chunks = tl.cdiv(L, C)
    for r in range(0, chunks):
        c = chunks - 1 - r
        t = c * C + oc
        mt = t < L
        qe_off = bh * L * E + t[:, None] * E + oe[None, :]
        vf_off = bh * L * F + t[:, None] * F + of[None, :]
        qe_mask = mt[:, None] & me[None, :]
        vf_mask = mt[:, None] & mf[None, :]
        q = tl.load(Q + qe_off, mask=qe_mask, other=0.0)
        k = tl.load(K + qe_off, mask=qe_mask, other=0.0)
        v = tl.load(V + vf_off, mask=vf_mask, other=0.0)
        do = tl.load(DO + vf_off, mask=vf_mask, other=0.0)
        s_prev = tl.load(SP + (bh * chunks + c) * E * F + s_off, mask=s_mask, other=0.0)
        causal = (oc[:, None] >= oc[None, :]) & mt[:, None] & mt[None, :]
        last = tl.minimum(c * C + C, L) - 1
        dov = tl.where(causal, tl.dot(do, tl.trans(v)), 0.0)          # dO V^T
        if HAS_GATE:
            if VECTOR:
                g = _gate_rows_vec(G, bh, t, L, E, oe, me, mt)
                g_prev = _gate_at_vec(G, bh, c * C - 1, L, E, oe, me)
                g_last = _gate_at_vec(G, bh, last, L, E, oe, me)
                d = tl.exp(tl.where(causal[:, :, None], g[:, None, :] - g[None, :, :],
                                    -float("inf")))
                p = tl.sum(q[:, None, :] * k[None, :, :] * d, axis=2)
                dq = tl.sum(dov[:, :, None] * k[None, :, :] * d, axis=1)
                dk = tl.sum(dov[:, :, None] * q[:, None, :] * d, axis=0)
                q_in = q * tl.exp(g - g_prev[None, :])
                k_out = k * tl.exp(tl.where(mt[:, None], g_last[None, :] - g, -float("inf")))
                dq += tl.exp(g - g_prev[None, :]) * tl.dot(do, tl.trans(s_prev))
                dk += tl.exp(tl.where(mt[:, None], g_last[None, :] - g, -float("inf"))) * \
                    tl.dot(v, tl.trans(dS))
                carry = tl.exp(g_last - g_prev)[:, None]
            else:
                g = _gate_rows(G, bh, t, L, mt)
                g_prev = _gate_at(G, bh, c * C - 1, L)
                g_last = _gate_at(G, bh, last, L)
                dd = tl.exp(tl.where(causal, g[:, None] - g[None, :], -float("inf")))
                p = tl.dot(q, tl.trans(k)) * dd
                dp = dov * dd
                dq = tl.dot(dp, k) + tl.exp(g - g_prev)[:, None] * tl.dot(do, tl.trans(s_prev))
                k_decay = tl.exp(tl.where(mt, g_last - g, -float("inf")))[:, None]
                dk = tl.dot(tl.trans(dp), q) + k_decay * tl.dot(v, tl.trans(dS))
                q_in = q * tl.exp(g - g_prev)[:, None]
                k_out = k * k_decay
                carry = tl.exp(g_last - g_prev)
        else:
            p = tl.where(causal, tl.dot(q, tl.trans(k)), 0.0)
            dq = tl.dot(dov, k) + tl.dot(do, tl.trans(s_prev))
            dk = tl.dot(tl.trans(dov), q) + tl.dot(v, tl.trans(dS))
            q_in, k_out, carry = q, k, 1.0
        dv = tl.dot(tl.trans(p), do) + tl.dot(k_out, dS)
        dS = dS * carry + tl.dot(tl.trans(q_in), do)
        tl.store(DQ + qe_off, dq, mask=qe_mask)
        tl.store(DK + qe_off, dk, mask=qe_mask)
        tl.store(DV + vf_off, dv, mask=vf_mask)
    tl.store(DS0 + bh * E * F + s_off, dS, mask=s_mask)


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
            if VECTOR:
                step = _gate_at_vec(G, bh, t, L, E, oe, me) - \
                    _gate_at_vec(G, bh, t - 1, L, E, oe, me)
                S = S * tl.exp(step)[:, None]
            else:
                S = S * tl.exp(_gate_at(G, bh, t, L) - _gate_at(G, bh, t - 1, L))
        S = S + k[:, None] * v[None, :]
        tl.store(Out + bh * L * F + t * F + of, tl.sum(q[:, None] * S, axis=0), mask=mf)
    tl.store(ST + s_off, S, mask=s_mask)


WARPS = 8  # sm90, fp32 features: no spills at C=64, E=64, BF=32 (forward), C=16 (backward)
FORWARD_BF = 32  # value columns per forward program (the grid's second axis)


def default_chunk(e: int) -> int:
    """Positions per chunk for qk dim ``e``: 64 up to e = 64, else 16 (the largest that
    compiles for sm90 without spills with fp32 features; BENCHMARKS.md)."""
    return 64 if e <= 64 else 16


def _blocks(e: int, f: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(e)), max(16, triton.next_power_of_2(f))


def launch(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, s0: Tensor | None,
           chunk: int | None, vector: bool, save_states: bool = False
           ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run the chunked kernel (``chunk``: a power of two >= 16) or, with ``chunk=None``, the
    recurrent one, on contiguous fp32 [BH, L, E|F] features, g [BH, L + 1(, E)] or None and
    s0 [BH, E, F] or None; returns (o [BH, L, F], final state [BH, E, F], the state at each
    chunk's start [BH, chunks, E, F] with ``save_states``, else None)."""
    bh, length, e = q.shape
    f = v.shape[-1]
    o = torch.zeros((bh, length, f), dtype=torch.float32, device=q.device)
    st = torch.zeros((bh, e, f), dtype=torch.float32, device=q.device)
    chunks = 0 if chunk is None else triton.cdiv(length, chunk)
    sp = torch.zeros((bh, chunks, e, f), dtype=torch.float32, device=q.device) \
        if save_states else None
    if bh == 0 or e == 0 or f == 0:
        return o, (st if s0 is None else s0.clone()), sp
    be, bf = _blocks(e, f)
    bf = bf if save_states else min(FORWARD_BF, bf)
    grid = (bh, triton.cdiv(f, bf))
    args = (q, k, v, o if g is None else g, o if s0 is None else s0, o, st)
    flags = dict(HAS_GATE=g is not None, VECTOR=vector, HAS_S0=s0 is not None, BE=be, BF=bf)
    if chunk is None:
        recurrent_kernel[grid](*args, length, e, f, **flags, num_warps=WARPS)
    else:
        chunked_forward_kernel[grid](*args, o if sp is None else sp, length, e, f,
                                     SAVE=sp is not None, C=chunk, **flags, num_warps=WARPS)
    return o, st, sp


def launch_backward(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, states: Tensor,
                    do: Tensor, dst: Tensor, chunk: int, vector: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv [BH, L, E|F] and the initial state's gradient [BH, E, F] (fp32) from the
    output's and the final state's gradients; ``states`` from ``launch(save_states=True)``."""
    bh, length, e = q.shape
    f = v.shape[-1]
    dq, dk = torch.zeros_like(q), torch.zeros_like(k)
    dv, ds0 = torch.zeros_like(v), dst.clone()
    if bh == 0 or e == 0 or f == 0 or length == 0:
        return dq, dk, dv, ds0
    be, bf = _blocks(e, f)
    chunked_backward_kernel[(bh,)](q, k, v, q if g is None else g, states, do, dst, dq, dk,
                                   dv, ds0, length, e, f, HAS_GATE=g is not None,
                                   VECTOR=vector, C=chunk, BE=be, BF=bf, num_warps=WARPS)
    return dq, dk, dv, ds0


def static_specs(variant: str, dim: int, target: str) -> list:
    """The kernels the runtime launches for ``variant`` (``retention`` / ``simple_gla``: a
    scalar gate; ``gla``: a vector gate) at qk and v dim ``dim``, as ahead-of-time compile
    requests ``[(name, KernelSpec)]`` (benchmarks/linear_static.py)."""
    from attndsl.runtime.aot import KernelSpec

    vector = variant == "gla"
    sig = {n: "*fp32" for n in ("Q", "K", "V", "G", "S0", "Out", "ST", "SP")}
    sig.update({"L": "i32", "E": "i32", "F": "i32"})
    fwd = dict(HAS_GATE=True, VECTOR=vector, HAS_S0=False, SAVE=False, C=default_chunk(dim),
               BE=dim, BF=FORWARD_BF)
    bsig = {n: "*fp32" for n in ("Q", "K", "V", "G", "SP", "DO", "DST", "DQ", "DK", "DV",
                                 "DS0")}
    bsig.update({"L": "i32", "E": "i32", "F": "i32"})
    bwd = dict(HAS_GATE=True, VECTOR=vector, C=16, BE=dim, BF=dim)
    return [("chunked_forward_kernel", KernelSpec(chunked_forward_kernel, sig, fwd, target,
                                                  WARPS, 1)),
            ("chunked_backward_kernel", KernelSpec(chunked_backward_kernel, bsig, bwd, target,
                                                   WARPS, 1))]
