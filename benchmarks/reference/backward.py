"""Hand-written FlashAttention-2 backward kernels: the baseline of the backward comparison.

In the shape of Triton's fused-attention tutorial backward: a preprocess kernel
``delta = rowsum(O * dO)``; a dK/dV kernel, one program per key tile looping over the query
tiles (masked on the causal diagonal, then unmasked below it), working on transposed tiles;
and a dQ kernel, one program per query tile looping over the key tiles. Scores in log2 units
(``exp2`` with ``scale * log2 e`` folded into the multiply), the forward's ``lse`` read once
per query row, head dim a constexpr, lengths multiples of the tiles. Per key/query tile pair,
with ``s`` the modified score and ``p = exp(s - lse)``::

    dV += P^T dO;   dP = dO V^T;   dS = P * (dP - delta);   dK += dS^T Q scale';   dQ += dS K scale'

where ``scale' = d s / d(q.k)``: ``scale`` for plain and ALiBi scores, ``scale * (1 - t^2)``
for softcap ``s = cap * t``, ``t = tanh(q.k scale / cap)``.

Sigmoid attention (``P = sigmoid(s + b)``, no normaliser, causal; Ramapuram et al. 2024) has no
``lse`` and no ``delta``: ``dS = dP * P * (1 - P)``, the rest as above.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# score functions of the backward (benchmark case -> (MOD, MASK))
BMOD_SOFTMAX: tl.constexpr = tl.constexpr(0)
BMOD_ALIBI: tl.constexpr = tl.constexpr(1)
BMOD_SOFTCAP: tl.constexpr = tl.constexpr(2)
BMOD_SIGMOID: tl.constexpr = tl.constexpr(3)
CASES: dict[str, tuple[int, int]] = {
    "dense": (0, 0),
    "causal": (0, 1),
    "alibi_causal": (1, 1),
    "softcap": (2, 0),
    "sigmoid": (3, 1),
}
SIGMOID_BIAS = -6.0  # examples/sigmoid.attn's default: about -log(N)


@triton.jit
def _prob(qk, offs_m, offs_n, lse2, qk_scale, slope2, cap2, bias2, MOD: tl.constexpr):
    """(P, softcap's 1 - t^2) of a score tile whose rows are ``offs_m`` and columns ``offs_n``
    (either orientation: the dK/dV kernel passes the transposed tile and index grids)."""
    grad = 1.0
    if MOD == BMOD_SIGMOID:  # 1 / (1 + exp(-(qk scale + b))), in one FFMA and one exp2
        p = tl.fdiv(1.0, 1.0 + tl.math.exp2(qk * qk_scale + bias2), ieee_rounding=False)
    elif MOD == BMOD_SOFTCAP:  # s = cap tanh(x), tanh(x) = 1 - 2 / (exp2(2 x log2 e) + 1)
        t = 1.0 - tl.fdiv(2.0, tl.math.exp2(qk * qk_scale) + 1.0, ieee_rounding=False)
        p = tl.math.exp2(cap2 * t - lse2)
        grad = 1.0 - t * t
    elif MOD == BMOD_ALIBI:
        p = tl.math.exp2(qk * qk_scale + slope2 * (offs_n - offs_m).to(tl.float32) - lse2)
    else:
        p = tl.math.exp2(qk * qk_scale - lse2)
    return p, grad


@triton.jit
def reference_bwd_preprocess(Out, DO, Delta, stride_om, n_ctx, BLOCK_M: tl.constexpr,
                             HEAD_DIM: tl.constexpr):
    """delta = rowsum(O * dO), one program per BLOCK_M rows of one (batch, head)."""
    off_hz = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    ptrs = off_hz * n_ctx * stride_om + offs_m[:, None] * stride_om + offs_d[None, :]
    o = tl.load(Out + ptrs).to(tl.float32)
    do = tl.load(DO + ptrs).to(tl.float32)
    tl.store(Delta + off_hz * n_ctx + offs_m, tl.sum(o * do, axis=1))


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, lo, hi, stride_m, offs_n,
                offs_mt, qk_scale, slope2, cap2, bias2, BLOCK_M: tl.constexpr,
                MASKED: tl.constexpr, MOD: tl.constexpr):
    """Query tiles ``[lo, hi)`` of one key tile: transposed tiles, keys along rows."""
    q_ptrs += lo * stride_m
    do_ptrs += lo * stride_m
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_mt
        qT = tl.load(q_ptrs)  # Q^T tile [HEAD_DIM, BLOCK_M]
        lse2 = tl.zeros([BLOCK_M], tl.float32)
        if MOD != BMOD_SIGMOID:
            lse2 = tl.load(lse_ptr + offs_m) * 1.4426950408889634  # 1/ln 2
        qkT = tl.dot(k, qT)
        pT, gT = _prob(qkT, offs_m[None, :], offs_n[:, None], lse2[None, :], qk_scale, slope2,
                       cap2, bias2, MOD)
        if MASKED:
            pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        do = tl.load(do_ptrs)
        dv += tl.dot(pT.to(do.dtype), do)  # dV += P^T dO
        dpT = tl.dot(v, tl.trans(do))  # dP^T = V dO^T
        if MOD == BMOD_SIGMOID:  # dS = dP P (1 - P), zero where masked (P = 0)
            dsT = dpT * pT * (1.0 - pT)
        else:
            dsT = pT * (dpT - tl.load(delta_ptr + offs_m)[None, :])
            if MOD == BMOD_SOFTCAP:
                dsT = dsT * gT
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT))  # dK += dS^T Q (scale applied at the end)
        q_ptrs += BLOCK_M * stride_m
        do_ptrs += BLOCK_M * stride_m
    return dk, dv


@triton.jit
def reference_bwd_dkdv(Q, K, V, DO, DK, DV, Lse, Delta, stride_m, n_heads, n_ctx, sm_scale,
                       slopes, cap, bias, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, MOD: tl.constexpr, MASK: tl.constexpr):
    """dK, dV of BLOCK_N keys of one (batch, head); all tensors [B, H, L, HEAD_DIM]."""
    start_n = tl.program_id(0) * BLOCK_N
    off_hz = tl.program_id(1)
    base = off_hz * n_ctx * stride_m
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_mt = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_ptrs = base + offs_n[:, None] * stride_m + offs_d[None, :]
    k = tl.load(K + kv_ptrs)
    v = tl.load(V + kv_ptrs)
    q_ptrs = Q + base + offs_mt[None, :] * stride_m + offs_d[:, None]
    do_ptrs = DO + base + offs_mt[:, None] * stride_m + offs_d[None, :]
    lse_ptr = Lse + off_hz * n_ctx
    delta_ptr = Delta + off_hz * n_ctx
    qk_scale = sm_scale * 1.4426950408889634  # 1/ln 2
    slope2 = 0.0
    cap2 = 0.0
    bias2 = 0.0
    if MOD == BMOD_ALIBI:
        slope2 = tl.load(slopes + off_hz % n_heads) * 1.4426950408889634  # 1/ln 2
    if MOD == BMOD_SOFTCAP:
        qk_scale = sm_scale * (2.0 * 1.4426950408889634) / cap  # exp2 argument of tanh
        cap2 = cap * 1.4426950408889634  # 1/ln 2
    if MOD == BMOD_SIGMOID:  # exp2 argument of exp(-(s + b))
        qk_scale = -sm_scale * 1.4426950408889634
        bias2 = -bias * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    lo = 0
    if MASK:  # query tiles crossing the diagonal of this key tile: masked; below it: not
        lo = start_n // BLOCK_M * BLOCK_M
        mid = tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, lo, mid,
                             stride_m, offs_n, offs_mt, qk_scale, slope2, cap2, bias2, BLOCK_M,
                             True, MOD)
        lo = mid
    dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, lo, n_ctx,
                         stride_m, offs_n, offs_mt, qk_scale, slope2, cap2, bias2, BLOCK_M,
                         False, MOD)
    tl.store(DK + kv_ptrs, (dk * sm_scale).to(DK.dtype.element_ty))
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty))


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, lo, hi, stride_n, offs_m, offs_nt,
              qk_scale, slope2, cap2, bias2, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              MOD: tl.constexpr):
    """Key tiles ``[lo, hi)`` of one query tile."""
    k_ptrs += lo * stride_n
    v_ptrs += lo * stride_n
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_nt
        kT = tl.load(k_ptrs)  # K^T tile [HEAD_DIM, BLOCK_N]
        vT = tl.load(v_ptrs)
        qk = tl.dot(q, kT)
        p, g = _prob(qk, offs_m[:, None], offs_n[None, :], lse2, qk_scale, slope2, cap2, bias2,
                     MOD)
        if MASKED:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = tl.dot(do, vT)  # dP = dO V^T
        if MOD == BMOD_SIGMOID:  # dS = dP P (1 - P), zero where masked (P = 0)
            ds = dp * p * (1.0 - p)
        else:
            ds = p * (dp - delta)
            if MOD == BMOD_SOFTCAP:
                ds = ds * g
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT))  # dQ += dS K (scale applied at the end)
        k_ptrs += BLOCK_N * stride_n
        v_ptrs += BLOCK_N * stride_n
    return dq


@triton.jit
def reference_bwd_dq(Q, K, V, DO, DQ, Lse, Delta, stride_m, n_heads, n_ctx, sm_scale,
                     slopes, cap, bias, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, MOD: tl.constexpr, MASK: tl.constexpr):
    """dQ of BLOCK_M queries of one (batch, head)."""
    start_m = tl.program_id(0) * BLOCK_M
    off_hz = tl.program_id(1)
    base = off_hz * n_ctx * stride_m
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_nt = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = base + offs_m[:, None] * stride_m + offs_d[None, :]
    q = tl.load(Q + q_ptrs)
    do = tl.load(DO + q_ptrs)
    k_ptrs = K + base + offs_nt[None, :] * stride_m + offs_d[:, None]
    v_ptrs = V + base + offs_nt[None, :] * stride_m + offs_d[:, None]
    qk_scale = sm_scale * 1.4426950408889634  # 1/ln 2
    slope2 = 0.0
    cap2 = 0.0
    bias2 = 0.0
    lse2 = tl.zeros([BLOCK_M, 1], tl.float32)
    delta = tl.zeros([BLOCK_M, 1], tl.float32)
    if MOD != BMOD_SIGMOID:
        lse2 = (tl.load(Lse + off_hz * n_ctx + offs_m) * 1.4426950408889634)[:, None]  # 1/ln 2
        delta = tl.load(Delta + off_hz * n_ctx + offs_m)[:, None]
    if MOD == BMOD_ALIBI:
        slope2 = tl.load(slopes + off_hz % n_heads) * 1.4426950408889634  # 1/ln 2
    if MOD == BMOD_SOFTCAP:
        qk_scale = sm_scale * (2.0 * 1.4426950408889634) / cap  # exp2 argument of tanh
        cap2 = cap * 1.4426950408889634  # 1/ln 2
    if MOD == BMOD_SIGMOID:  # exp2 argument of exp(-(s + b))
        qk_scale = -sm_scale * 1.4426950408889634
        bias2 = -bias * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    hi = n_ctx
    if MASK:  # key tiles crossing the diagonal: masked; below it: not
        lo = start_m // BLOCK_N * BLOCK_N
        dq = _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, lo, start_m + BLOCK_M, stride_m,
                       offs_m, offs_nt, qk_scale, slope2, cap2, bias2, BLOCK_N, True, MOD)
        hi = lo
    dq = _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, 0, hi, stride_m, offs_m, offs_nt,
                   qk_scale, slope2, cap2, bias2, BLOCK_N, False, MOD)
    tl.store(DQ + q_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty))


def _launch_backward(q, k, v, do, lse, delta, mod: int, mask: int, slopes, cap: float,
                     bias: float, block_m: int, block_n: int, num_warps: int, num_stages: int):
    batch, heads, length, dim = q.shape
    if k.shape != q.shape or length % block_m or length % block_n:
        raise ValueError(f"q, k, v must be one shape [B, H, L, D] with L a multiple of the "
                         f"tiles ({block_m}, {block_n}); got {list(q.shape)}, {list(k.shape)}")
    q, k, v, do = (t.contiguous() for t in (q, k, v, do))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    scale = 1.0 / math.sqrt(dim)
    common = dict(HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=block_n, MOD=mod, MASK=mask,
                  num_warps=num_warps, num_stages=num_stages)
    reference_bwd_dkdv[(length // block_n, batch * heads)](
        q, k, v, do, dk, dv, lse, delta, q.stride(2), heads, length, scale, slopes, cap, bias,
        **common)
    reference_bwd_dq[(length // block_m, batch * heads)](
        q, k, v, do, dq, lse, delta, q.stride(2), heads, length, scale, slopes, cap, bias,
        **common)
    return dq, dk, dv


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, do: torch.Tensor, case: str, *,
                       slopes: torch.Tensor | None = None, cap: float = 30.0,
                       block_m: int = 64, block_n: int = 64, num_warps: int = 8,
                       num_stages: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) of softmax attention ``case`` from the forward's ``o`` and ``lse``."""
    mod, mask = CASES[case]
    if mod == BMOD_SIGMOID.value:
        raise ValueError("sigmoid attention has no lse; use sigmoid_attention_backward")
    o, do = o.contiguous(), do.contiguous()
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    reference_bwd_preprocess[(q.shape[2] // block_m, q.shape[0] * q.shape[1])](
        o, do, delta, o.stride(2), q.shape[2], BLOCK_M=block_m, HEAD_DIM=q.shape[3])
    return _launch_backward(q, k, v, do, lse.contiguous(), delta, mod, mask, slopes, cap, 0.0,
                            block_m, block_n, num_warps, num_stages)


def sigmoid_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               do: torch.Tensor, *, bias: float = SIGMOID_BIAS,
                               block_m: int = 64, block_n: int = 64, num_warps: int = 8,
                               num_stages: int = 2
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) of causal ``O = sigmoid(Q K^T scale + bias) V``."""
    unused = torch.empty(1, dtype=torch.float32, device=q.device)  # no lse, no delta
    return _launch_backward(q, k, v, do, unused, unused, BMOD_SIGMOID.value, 1, None, 0.0,
                            bias, block_m, block_n, num_warps, num_stages)
