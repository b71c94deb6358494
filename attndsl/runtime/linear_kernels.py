"""The linear form's kernels and their launches: the chunked prefill forward and backward
(:mod:`attndsl.runtime.linear_forward`, :mod:`attndsl.runtime.linear_backward`) and the
recurrent (decode) step.

Per (batch * head) row ``bh``, with features q, k (L x E), v (L x F), the gate g over positions
-1..L-1 (:mod:`attndsl.runtime.linear_tiles`) and an initial state S0 (E x F):

    o(m) = q(m) . S(m),  S(m) = sum_{n <= m} exp(g(m) - g(n)) k(n) (x) v(n)
                                + exp(g(m) - g(-1)) S0

and the final state S(L-1).  The chunked form (chunk C) is flash-linear-attention's split:
the per-chunk states by one kernel sequential over chunks (fp32, to memory), then the
outputs by a kernel parallel over (chunk, value block, row); the backward the same way (the
state gradients in reverse, then dV and dQ/dK in parallel).  A vector gate's intra-chunk
scores use sub-chunks of :data:`SUB` positions (tensor-core dots between sub-chunks, exact
element-wise products inside one; :func:`~attndsl.runtime.linear_forward.vector_scores_kernel`).

q, k, v are read in their own dtype, the operand dtype of every tensor-core product (fp16,
bf16 or fp32); gates, states and outputs are fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attndsl.runtime.linear_backward import (
    chunk_da_kernel,
    chunk_dqk_kernel,
    chunk_dv_kernel,
    chunk_state_grads_kernel,
    vector_intra_grads_kernel,
)
from attndsl.runtime.linear_forward import (
    chunk_output_kernel,
    chunk_states_kernel,
    vector_scores_kernel,
)
from attndsl.runtime.linear_tiles import gate_at, gate_at_vec

Tensor = torch.Tensor


@triton.jit
def recurrent_kernel(Q, K, V, G, S0, Out, ST, L, E, F,
                     HAS_GATE: tl.constexpr, VECTOR: tl.constexpr, HAS_S0: tl.constexpr,
                     BE: tl.constexpr, BF: tl.constexpr):
    """One key at a time: S = diag(exp(g(t) - g(t-1))) S + k(t) (x) v(t); o(t) = q(t) S."""
    bh = tl.program_id(0).to(tl.int64)
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
        q = tl.load(Q + bh * L * E + t * E + oe, mask=me, other=0.0).to(tl.float32)
        k = tl.load(K + bh * L * E + t * E + oe, mask=me, other=0.0).to(tl.float32)
        v = tl.load(V + bh * L * F + t * F + of, mask=mf, other=0.0).to(tl.float32)
        if HAS_GATE:
            if VECTOR:
                step = gate_at_vec(G, bh, t, 0, L, E, BE) - \
                    gate_at_vec(G, bh, t - 1, 0, L, E, BE)
                S = S * tl.exp(step)[:, None]
            else:
                S = S * tl.exp(gate_at(G, bh, t, L) - gate_at(G, bh, t - 1, L))
        S = S + k[:, None] * v[None, :]
        tl.store(Out + bh * L * F + t * F + of, tl.sum(q[:, None] * S, axis=0), mask=mf)
    tl.store(ST + s_off, S, mask=s_mask)


WARPS = 4  # every chunked kernel (sm90: no spills at E = F = 128 with bf16 operands)
RECURRENT_WARPS = 8
BLOCK = 64  # key / value dims per program (E and F above it are split over programs)
VECTOR_BLOCK = 32  # key dims per step of the element-wise sub-chunk products (SUB x SUB x 32)
SUB = 16  # positions per sub-chunk of a vector gate's intra-chunk scores
CHUNK = 64  # positions per chunk by default (any power of two >= 16 is exact)


def default_chunk(e: int) -> int:
    """Positions per chunk for qk dim ``e``: :data:`CHUNK` (every dim is split into blocks of
    at most :data:`BLOCK`, so the chunk no longer shrinks with the head dim)."""
    del e
    return CHUNK


def _block(n: int, cap: int = BLOCK) -> int:
    return min(cap, max(16, triton.next_power_of_2(n)))


def _states(k: Tensor, v: Tensor, g: Tensor | None, s0: Tensor | None, chunk: int,
            vector: bool) -> tuple[Tensor, Tensor]:
    """(H [BH, chunks, E, F]: the state before each chunk, the final state [BH, E, F])."""
    bh, length, e = k.shape
    f = v.shape[-1]
    h = k.new_empty((bh, triton.cdiv(length, chunk), e, f), dtype=torch.float32)
    st = k.new_empty((bh, e, f), dtype=torch.float32)
    bk, bv = _block(e), _block(f)
    chunk_states_kernel[(triton.cdiv(e, bk), triton.cdiv(f, bv), bh)](
        k, v, h if g is None else g, h if s0 is None else s0, h, st, length, e, f,
        HAS_GATE=g is not None, VECTOR=vector, HAS_S0=s0 is not None, C=chunk, BK=bk, BV=bv,
        num_warps=WARPS)
    return h, st


def _scores(q: Tensor, k: Tensor, g: Tensor, chunk: int) -> Tensor:
    """A vector gate's intra-chunk scores A [BH, L, C] (fp32, zero above the diagonal)."""
    bh, length, e = q.shape
    a = q.new_zeros((bh, length, chunk), dtype=torch.float32)
    sub = min(SUB, chunk)
    vector_scores_kernel[(triton.cdiv(length, chunk) * (chunk // sub), chunk // sub, bh)](
        q, k, g, a, length, e, C=chunk, SUB=sub, BK=_block(e, VECTOR_BLOCK), num_warps=WARPS)
    return a


def launch(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, s0: Tensor | None,
           chunk: int | None, vector: bool, save_states: bool = False
           ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run the chunked kernels (``chunk``: a power of two >= 16) or, with ``chunk=None``, the
    recurrent one, on contiguous [BH, L, E|F] features of one dtype (fp16, bf16 or fp32),
    g [BH, L + 1(, E)] (fp32) or None and s0 [BH, E, F] (fp32) or None; returns (o [BH, L, F],
    final state [BH, E, F], the state before each chunk [BH, chunks, E, F] with
    ``save_states``, else None), all fp32."""
    bh, length, e = q.shape
    f = v.shape[-1]
    o = torch.zeros((bh, length, f), dtype=torch.float32, device=q.device)
    chunks = 0 if chunk is None else triton.cdiv(length, chunk)
    if bh == 0 or e == 0 or f == 0 or length == 0:
        st = torch.zeros((bh, e, f), dtype=torch.float32, device=q.device) if s0 is None \
            else s0.clone()
        sp = torch.zeros((bh, chunks, e, f), dtype=torch.float32, device=q.device)
        return o, st, (sp if save_states else None)
    if chunk is None:
        st = torch.zeros((bh, e, f), dtype=torch.float32, device=q.device)
        be, bf = max(16, triton.next_power_of_2(e)), min(32, max(16, triton.next_power_of_2(f)))
        recurrent_kernel[(bh, triton.cdiv(f, bf))](
            q, k, v, o if g is None else g, o if s0 is None else s0, o, st, length, e, f,
            HAS_GATE=g is not None, VECTOR=vector, HAS_S0=s0 is not None, BE=be, BF=bf,
            num_warps=RECURRENT_WARPS)
        return o, st, None
    h, st = _states(k, v, g, s0, chunk, vector)
    a = _scores(q, k, g, chunk) if vector else o
    bv = _block(f)
    chunk_output_kernel[(triton.cdiv(f, bv), chunks, bh)](
        q, k, v, o if g is None else g, h, a, o, length, e, f, HAS_GATE=g is not None,
        VECTOR=vector, HAS_S0=s0 is not None, C=chunk, BK=_block(e), BV=bv, num_warps=WARPS)
    return o, st, (h if save_states else None)


def launch_backward(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, states: Tensor,
                    do: Tensor, dst: Tensor, chunk: int, vector: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv [BH, L, E|F] and the initial state's gradient [BH, E, F] (fp32) from the
    output's and the final state's gradients; ``states`` from ``launch(save_states=True)``
    (same features and chunk)."""
    bh, length, e = q.shape
    f = v.shape[-1]
    dq = torch.zeros((bh, length, e), dtype=torch.float32, device=q.device)
    dk, dv = torch.zeros_like(dq), torch.zeros((bh, length, f), dtype=torch.float32,
                                               device=q.device)
    ds0 = dst.float().clone()
    if bh == 0 or e == 0 or f == 0 or length == 0:
        return dq, dk, dv, ds0
    do = do.to(q.dtype).contiguous()
    dst = dst.float().contiguous()
    chunks = triton.cdiv(length, chunk)
    bk, bv = _block(e), _block(f)
    gate = dq if g is None else g
    flags = dict(HAS_GATE=g is not None, VECTOR=vector, C=chunk, BK=bk, BV=bv,
                 num_warps=WARPS)
    dh = torch.empty_like(states)
    chunk_state_grads_kernel[(triton.cdiv(e, bk), triton.cdiv(f, bv), bh)](
        q, gate, do, dst, dh, ds0, length, e, f, **flags)
    a = _scores(q, k, g, chunk) if vector else dq
    chunk_dv_kernel[(triton.cdiv(f, bv), chunks, bh)](q, k, gate, a, do, dh, dv, length, e, f,
                                                      **flags)
    chunk_dqk_kernel[(triton.cdiv(e, bk), chunks, bh)](q, k, v, gate, states, do, dh, dq, dk,
                                                       length, e, f, **flags)
    if vector:
        da = q.new_empty((bh, length, chunk), dtype=torch.float32)
        chunk_da_kernel[(chunks, bh)](v, do, da, length, f, C=chunk, BV=bv, num_warps=WARPS)
        sub = min(SUB, chunk)
        vbk = _block(e, VECTOR_BLOCK)
        vector_intra_grads_kernel[(triton.cdiv(e, vbk), chunks * (chunk // sub), bh)](
            q, k, g, da, dq, dk, length, e, C=chunk, SUB=sub, BK=vbk, num_warps=WARPS)
    return dq, dk, dv, ds0


def static_specs(variant: str, dim: int, target: str, dtype: str = "bf16",
                 chunk: int = CHUNK) -> list:
    """The kernels the runtime launches for ``variant`` (``retention`` / ``simple_gla``: a
    scalar gate; ``gla``: a vector gate) at qk and v dim ``dim`` with ``dtype`` features
    (Triton's name: bf16, fp16, fp32), forward then backward, as ahead-of-time compile
    requests ``[(name, KernelSpec)]`` (benchmarks/linear_static.py, tests)."""
    from attndsl.runtime.aot import KernelSpec

    vector = variant == "gla"
    dims = {"L": "i32"}
    gate = dict(HAS_GATE=True, VECTOR=vector, E=dim, F=dim)
    blocks = dict(C=chunk, BK=_block(dim), BV=_block(dim))
    vec = dict(C=chunk, SUB=min(SUB, chunk), BK=_block(dim, VECTOR_BLOCK), E=dim)

    def sig(feats: str, rest: str, **extra: str) -> dict[str, str]:
        out = {n: f"*{dtype}" for n in feats.split()}
        out.update({n: "*fp32" for n in rest.split()})
        return {**out, **extra}

    def spec(fn: object, signature: dict[str, str], const: dict) -> KernelSpec:
        return KernelSpec(fn, signature, const, target, WARPS, 1)

    vector_only = {"L": "i32"}
    out = [("chunk_states_kernel", spec(chunk_states_kernel, sig("K V", "G S0 H ST", **dims),
                                        dict(gate, HAS_S0=False, **blocks)))]
    if vector:
        out.append(("vector_scores_kernel", spec(vector_scores_kernel,
                                                 sig("Q K", "G A", **vector_only), vec)))
    out.append(("chunk_output_kernel", spec(chunk_output_kernel,
                                            sig("Q K V", "G H A Out", **dims),
                                            dict(gate, HAS_S0=False, **blocks))))
    out.append(("chunk_state_grads_kernel", spec(chunk_state_grads_kernel,
                                                 {**sig("Q", "G"), **sig("DO", "DST DH DS0"),
                                                  **dims}, dict(gate, **blocks))))
    out.append(("chunk_dv_kernel", spec(chunk_dv_kernel,
                                        {**sig("Q K", "G A"), **sig("DO", "DH DV"), **dims},
                                        dict(gate, **blocks))))
    out.append(("chunk_dqk_kernel", spec(chunk_dqk_kernel,
                                         {**sig("Q K V", "G H"), **sig("DO", "DH DQ DK"),
                                          **dims}, dict(gate, **blocks))))
    if vector:
        out.append(("chunk_da_kernel", spec(chunk_da_kernel, sig("V DO", "DA", **dims),
                                             dict(F=dim, C=chunk, BV=_block(dim)))))
        out.append(("vector_intra_grads_kernel", spec(vector_intra_grads_kernel,
                                                      sig("Q K", "G DA DQ DK", **vector_only),
                                                      vec)))
    return out
