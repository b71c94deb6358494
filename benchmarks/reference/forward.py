"""Hand-written FlashAttention-2 forward kernels: the baseline of benchmarks/static_kernel.py.

Written in the shape of Triton's fused-attention tutorial (``06-fused-attention.py``), not
generated: one ``@triton.jit`` inner loop, called once unmasked for the key tiles every query
of the tile sees and once masked for the tiles on the mask's edge (the causal diagonal); scores
in log2 units, ``qk_scale = sm_scale * log2(e)`` folded into one multiply so that ``exp2``
replaces ``exp``; the head dim a constexpr with no head-dim mask; sequence lengths multiples of
the tiles (no boundary masks, as in the tutorial). Each variant's score modification is written
inline by hand in :func:`_score` and its mask in :func:`_keep`, selected by constexpr flags, so a
compiled kernel holds exactly one variant.

Online softmax per key tile (all in log2 units, ``s`` the modified score)::

    m_new = max(m_i, rowmax(s));  p = exp2(s - m_new);  alpha = exp2(m_i - m_new)
    l_i = l_i * alpha + rowsum(p);  acc = acc * alpha + p @ V;  m_i = m_new

Masked entries get ``-1.0e6`` (the tutorial's choice) instead of ``-inf``: a row whose first
tile is fully masked then holds finite garbage that the first real score wipes out
(``alpha = exp2(-1e6 - m) = 0``); every mask here gives each row a visible key (its own).

Variants (``MOD`` score modification, ``MASK`` mask, :data:`CASES` the benchmark's names):

* ALiBi ``s += slope[h] * (n - m)``; the slope is loaded once per program, times log2(e).
* softcap ``s = cap * tanh(s / cap)`` with ``tanh(x) = 1 - 2 / (exp2(2 x log2 e) + 1)`` and a
  fast (non-IEEE) division; one extra ``exp2`` per score.
* relative bias ``s += table[h, m - n + N - 1]`` (a captured ``[H, M + N - 1]`` table).
* masks: causal ``m >= n``; sliding window ``m >= n and m - n <= WINDOW``; prefix-LM
  ``n < PREFIX or m >= n``; document ``doc[m] == doc[n] and m >= n`` over a range table.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # 1/ln 2

# score modifications
MOD_NONE: tl.constexpr = tl.constexpr(0)
MOD_ALIBI: tl.constexpr = tl.constexpr(1)
MOD_SOFTCAP: tl.constexpr = tl.constexpr(2)
MOD_RELBIAS: tl.constexpr = tl.constexpr(3)
# masks
MASK_NONE: tl.constexpr = tl.constexpr(0)
MASK_CAUSAL: tl.constexpr = tl.constexpr(1)
MASK_WINDOW: tl.constexpr = tl.constexpr(2)
MASK_PREFIX: tl.constexpr = tl.constexpr(3)
MASK_DOCUMENT: tl.constexpr = tl.constexpr(4)

# benchmark case -> (score modification, mask, query heads per key/value head)
CASES: dict[str, tuple[int, int, int]] = {
    "dense": (0, 0, 1),
    "causal": (0, 1, 1),
    "sliding_window": (0, 2, 1),
    "prefix_lm": (0, 3, 1),
    "alibi_causal": (1, 1, 1),
    "softcap": (2, 0, 1),
    "relative_bias": (3, 0, 1),
    "document": (0, 4, 1),
    "gqa_causal": (0, 1, 4),
}


@triton.jit
def _score(qk, offs_m, offs_n, qk_scale, slope2, cap2, bias_ptrs, MOD: tl.constexpr):
    """The modified score of a ``[BLOCK_M, BLOCK_N]`` tile of ``q k^T``, in log2 units."""
    if MOD == MOD_ALIBI:  # (qk * scale + slope * (n - m)) * log2(e)
        dist = (offs_n[None, :] - offs_m[:, None]).to(tl.float32)
        s = qk * qk_scale + slope2 * dist
    elif MOD == MOD_SOFTCAP:  # cap * tanh(qk * scale / cap) * log2(e), qk_scale = 2 scale/cap
        e = tl.math.exp2(qk * qk_scale)
        s = cap2 - tl.fdiv(2.0 * cap2, e + 1.0, ieee_rounding=False)
    elif MOD == MOD_RELBIAS:  # (qk * scale + table[h, m - n + N - 1]) * log2(e)
        s = qk * qk_scale + tl.load(bias_ptrs) * 1.4426950408889634  # 1/ln 2
    else:
        s = qk * qk_scale
    return s


@triton.jit
def _keep(offs_m, offs_n, doc_q, kv_doc_ptr, WINDOW, PREFIX, MASK: tl.constexpr):
    """The mask of one key tile on the mask's edge (``True``: the score is kept)."""
    causal = offs_m[:, None] >= offs_n[None, :]
    if MASK == MASK_WINDOW:
        keep = causal & (offs_m[:, None] - offs_n[None, :] <= WINDOW)
    elif MASK == MASK_PREFIX:
        keep = causal | (offs_n[None, :] < PREFIX)
    elif MASK == MASK_DOCUMENT:
        doc_k = tl.load(kv_doc_ptr + offs_n)
        keep = causal & (doc_q[:, None] == doc_k[None, :])
    else:
        keep = causal
    return keep


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptrs, lo, hi, stride_kn, stride_vn,
               offs_m, offs_n, qk_scale, slope2, cap2, doc_q, kv_doc_ptr, WINDOW, PREFIX,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, MOD: tl.constexpr,
               MASK: tl.constexpr):
    """Key tiles ``[lo, hi)``: the online-softmax step, masked or not."""
    k_ptrs += lo * stride_kn
    v_ptrs += lo * stride_vn
    bias_ptrs -= lo
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = tl.load(k_ptrs)  # K^T tile [HEAD_DIM, BLOCK_N]
        qk = tl.dot(q, k)
        s = _score(qk, offs_m, start_n + offs_n, qk_scale, slope2, cap2, bias_ptrs, MOD)
        if MASKED:
            keep = _keep(offs_m, start_n + offs_n, doc_q, kv_doc_ptr, WINDOW, PREFIX, MASK)
            s = tl.where(keep, s, -1.0e6)
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_ij
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        bias_ptrs -= BLOCK_N
    return acc, l_i, m_i


@triton.jit
def reference_fwd_kernel(
    Q, K, V, Out, Lse,
    stride_qz, stride_qh, stride_qm,
    stride_kz, stride_kh, stride_kn,
    stride_vz, stride_vh, stride_vn,
    stride_oz, stride_oh, stride_om,
    n_heads, group, n_ctx, n_kv, sm_scale,
    slopes, bias, stride_bh, cap, ranges, q_doc, kv_doc, WINDOW, PREFIX,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MOD: tl.constexpr, MASK: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch, head); the output and the row lse."""
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_z = off_hz // n_heads
    off_h = off_hz % n_heads
    off_hk = off_h // group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + off_z * stride_qz + off_h * stride_qh + offs_m[:, None] * stride_qm \
        + offs_d[None, :]
    k_ptrs = K + off_z * stride_kz + off_hk * stride_kh + offs_n[None, :] * stride_kn \
        + offs_d[:, None]
    v_ptrs = V + off_z * stride_vz + off_hk * stride_vh + offs_n[:, None] * stride_vn \
        + offs_d[None, :]
    qk_scale = sm_scale * 1.4426950408889634  # 1/ln 2: exp(x) = exp2(x log2 e)
    slope2 = 0.0
    cap2 = 0.0
    doc_q = offs_m
    bias_ptrs = Q  # unused unless MOD_RELBIAS
    if MOD == MOD_ALIBI:
        slope2 = tl.load(slopes + off_h) * 1.4426950408889634  # 1/ln 2
    if MOD == MOD_SOFTCAP:
        qk_scale = sm_scale * (2.0 * 1.4426950408889634) / cap  # exp2 argument of tanh
        cap2 = cap * 1.4426950408889634  # 1/ln 2
    if MOD == MOD_RELBIAS:  # table[h, m - n + N - 1] at n = 0; moves back as n advances
        bias_ptrs = bias + off_h * stride_bh + offs_m[:, None] - offs_n[None, :] + n_kv - 1
    if MASK == MASK_DOCUMENT:
        doc_q = tl.load(q_doc + offs_m)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    q = tl.load(q_ptrs)
    m0 = start_m * BLOCK_M
    if MASK == MASK_NONE:  # every key tile unmasked
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptrs, 0, n_kv,
                                   stride_kn, stride_vn, offs_m, offs_n, qk_scale, slope2, cap2,
                                   doc_q, kv_doc, WINDOW, PREFIX, BLOCK_N, False, MOD, MASK)
    elif MASK == MASK_WINDOW:  # no key tile lies inside a window narrower than BLOCK_M
        lo = tl.maximum(m0 - WINDOW, 0) // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptrs, lo,
                                   m0 + BLOCK_M, stride_kn, stride_vn, offs_m, offs_n, qk_scale,
                                   slope2, cap2, doc_q, kv_doc, WINDOW, PREFIX, BLOCK_N, True,
                                   MOD, MASK)
    elif MASK == MASK_DOCUMENT:  # a table of key-tile ranges per query tile (units of BLOCK_N)
        row = ranges + start_m * 4
        lo = tl.load(row) * BLOCK_N
        full_lo = tl.load(row + 1) * BLOCK_N
        full_hi = tl.load(row + 2) * BLOCK_N
        hi = tl.load(row + 3) * BLOCK_N
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptrs, lo, full_lo,
                                   stride_kn, stride_vn, offs_m, offs_n, qk_scale, slope2, cap2,
                                   doc_q, kv_doc, WINDOW, PREFIX, BLOCK_N, True, MOD, MASK)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptrs, full_lo,
                                   full_hi, stride_kn, stride_vn, offs_m, offs_n, qk_scale,
                                   slope2, cap2, doc_q, kv_doc, WINDOW, PREFIX, BLOCK_N, False,
                                   MOD, MASK)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptrs, full_hi, hi,
                                   stride_kn, stride_vn, offs_m, offs_n, qk_scale, slope2, cap2,
                                   doc_q, kv_doc, WINDOW, PREFIX, BLOCK_N, True, MOD, MASK)
    else:  # causal, prefix-LM: unmasked below the diagonal, masked on it (and the prefix)
        hi = m0 + BLOCK_M
        if MASK == MASK_PREFIX:
            hi = tl.minimum(tl.maximum(hi, tl.cdiv(PREFIX, BLOCK_N) * BLOCK_N), n_kv)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptrs, 0, m0,
                                   stride_kn, stride_vn, offs_m, offs_n, qk_scale, slope2, cap2,
                                   doc_q, kv_doc, WINDOW, PREFIX, BLOCK_N, False, MOD, MASK)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptrs, m0, hi,
                                   stride_kn, stride_vn, offs_m, offs_n, qk_scale, slope2, cap2,
                                   doc_q, kv_doc, WINDOW, PREFIX, BLOCK_N, True, MOD, MASK)
    # epilogue: O = acc / l, lse = (m + log2 l) ln 2
    acc = acc / l_i[:, None]
    tl.store(Lse + off_hz * n_ctx + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453)
    o_ptrs = Out + off_z * stride_oz + off_h * stride_oh + offs_m[:, None] * stride_om \
        + offs_d[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty))


def document_ranges(doc: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """Per query tile of a document-causal mask: key tiles ``lo, full_lo, full_hi, hi``
    (units of ``block_n``; masked ``[lo, full_lo)``, unmasked ``[full_lo, full_hi)``, masked
    ``[full_hi, hi)``) from sorted document ids ``doc`` [L], as int32 ``[L / block_m, 4]``.

    A key tile is unmasked when every query of the tile sees every key of it (one document and
    below the diagonal), empty when none does, masked otherwise."""
    length = doc.shape[0]
    m = torch.arange(length)
    keep = (doc[:, None] == doc[None, :]) & (m[:, None] >= m[None, :])
    tiles = keep.reshape(length // block_m, block_m, length // block_n, block_n)
    anyk, allk = tiles.any(3).any(1), tiles.all(3).all(1)
    rows = []
    for any_row, all_row in zip(anyk.tolist(), allk.tolist(), strict=True):
        used = [j for j, a in enumerate(any_row) if a]
        full = [j for j, a in enumerate(all_row) if a]
        lo, hi = used[0], used[-1] + 1
        full_lo, full_hi = (full[0], full[-1] + 1) if full else (lo, lo)
        if full and any(not all_row[j] for j in range(full_lo, full_hi)):
            raise ValueError("the unmasked key tiles of a query tile are not contiguous")
        rows.append([lo, full_lo, full_hi, hi])
    return torch.tensor(rows, dtype=torch.int32)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, case: str, *,
              slopes: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              cap: float = 30.0, doc: torch.Tensor | None = None, window: int = 64,
              prefix: int = 32, block_m: int = 128, block_n: int = 64, num_warps: int = 8,
              num_stages: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the reference kernel of ``case`` on ``q`` [B, H, L, D], ``k``/``v`` [B, H/G, L, D]
    (L a multiple of both tiles); returns (output, lse [B, H, L]).

    ``slopes`` [H] for ALiBi, ``bias`` [H, 2L - 1] for the relative bias, ``doc`` [L] sorted
    document ids for the document mask."""
    mod, mask, _ = CASES[case]
    batch, heads, length, dim = q.shape
    if length % block_m or k.shape[2] % block_n or block_m % block_n:
        raise ValueError(f"lengths ({length}, {k.shape[2]}) must be multiples of the tiles "
                         f"({block_m}, {block_n}) and block_m of block_n")
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    ranges = q_doc = kv_doc = None
    if mask == 4:
        doc = doc.to(device=q.device, dtype=torch.int32)
        ranges = document_ranges(doc.cpu(), block_m, block_n).to(q.device)
        q_doc = kv_doc = doc
    grid = (length // block_m, batch * heads)
    reference_fwd_kernel[grid](
        q, k, v, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        heads, heads // k.shape[1], length, k.shape[2], 1.0 / math.sqrt(dim),
        slopes, bias, bias.stride(0) if bias is not None else 0, cap, ranges, q_doc, kv_doc,
        window, prefix,
        HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=block_n, MOD=mod, MASK=mask,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse
