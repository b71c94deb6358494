"""The hand-written reference kernels of benchmarks/reference/ compute attention.

They are the baseline of the static kernel benchmark, so they must be real attention kernels:
each forward variant and each FlashAttention-2 backward is checked in Triton's interpreter
against a float64 torch evaluation of the same definition, on shapes that exercise several
query and key tiles, the diagonal, the window edge, the prefix and document boundaries.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.reference import backward as ref_bwd  # noqa: E402
from benchmarks.reference import forward as ref_fwd  # noqa: E402

B, H, L, D = 1, 4, 128, 32
TILES = {"block_m": 32, "block_n": 16, "num_warps": 4, "num_stages": 1}
WINDOW, PREFIX, CAP = 24, 40, 5.0  # a small cap so that tanh saturates somewhere


def _inputs(group: int = 1, dtype: torch.dtype = torch.float16):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, L, D, generator=gen).to(dtype)
    k = torch.randn(B, H // group, L, D, generator=gen).to(dtype)
    v = torch.randn(B, H // group, L, D, generator=gen).to(dtype)
    extras = {
        "slopes": torch.exp2(-8.0 * torch.arange(1, H + 1) / H).float(),
        "bias": torch.randn(H, 2 * L - 1, generator=gen).float(),
        "doc": torch.sort(torch.randint(0, 4, (L,), generator=gen)).values,
    }
    return q, k, v, extras


def _scores(q, k, case: str, extras: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, keep) in float64, as the definition of each case says."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    s = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    m = torch.arange(L)[:, None]
    n = torch.arange(L)[None, :]
    if case == "alibi_causal":
        s = s + extras["slopes"].double()[None, :, None, None] * (n - m)
    elif case == "softcap":
        s = CAP * torch.tanh(s / CAP)
    elif case == "relative_bias":
        s = s + extras["bias"].double()[:, m - n + L - 1][None]
    doc = extras["doc"]
    keep = {
        "sliding_window": (m >= n) & (m - n <= WINDOW),
        "prefix_lm": (m >= n) | (n < PREFIX),
        "document": (m >= n) & (doc[:, None] == doc[None, :]),
    }.get(case, m >= n if "causal" in case else torch.ones(L, L, dtype=torch.bool))
    return s, keep.expand_as(s)


def _attention(q, k, v, case: str, extras: dict) -> tuple[torch.Tensor, torch.Tensor]:
    s, keep = _scores(q, k, case, extras)
    s = s.masked_fill(~keep, float("-inf"))
    group = q.shape[1] // k.shape[1]
    out = torch.softmax(s, -1) @ v.double().repeat_interleave(group, dim=1)
    return out, torch.logsumexp(s, -1)


def _run_forward(case: str, q, k, v, extras: dict):
    return ref_fwd.attention(q, k, v, case, slopes=extras["slopes"], bias=extras["bias"],
                             cap=CAP, doc=extras["doc"], window=WINDOW, prefix=PREFIX, **TILES)


@pytest.mark.parametrize("case", sorted(ref_fwd.CASES))
def test_reference_forward_matches_the_float64_definition(case: str) -> None:
    q, k, v, extras = _inputs(group=ref_fwd.CASES[case][2])
    out, lse = _run_forward(case, q, k, v, extras)
    want, want_lse = _attention(q, k, v, case, extras)
    assert torch.allclose(out.double(), want, atol=2e-2, rtol=0), (out.double() - want).abs().max()
    assert torch.allclose(lse.double(), want_lse, atol=1e-2, rtol=0)


def test_document_ranges_cover_exactly_the_visible_key_tiles() -> None:
    doc = torch.tensor([0] * 40 + [1] * 50 + [2] * 38)
    ranges = ref_fwd.document_ranges(doc, 32, 16)
    m = torch.arange(L)
    keep = (doc[:, None] == doc[None, :]) & (m[:, None] >= m[None, :])
    for tile, (lo, full_lo, full_hi, hi) in enumerate(ranges.tolist()):
        rows = keep[tile * 32:(tile + 1) * 32].reshape(32, L // 16, 16)
        seen = rows.any(2).any(0)
        assert not seen[:lo].any() and not seen[hi:].any()
        assert rows[:, full_lo:full_hi].all()  # the unmasked range needs no mask
        assert lo <= full_lo <= full_hi <= hi


@pytest.mark.parametrize("case", sorted(ref_bwd.CASES))
def test_reference_backward_matches_autograd_of_the_definition(case: str) -> None:
    q, k, v, extras = _inputs()
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.dtype)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    if case == "sigmoid":
        s, keep = _scores(qd, kd, "causal", extras)
        p = torch.sigmoid(s + ref_bwd.SIGMOID_BIAS) * keep
        out = p @ vd
        got = ref_bwd.sigmoid_attention_backward(q, k, v, do, bias=ref_bwd.SIGMOID_BIAS,
                                                 **TILES)
    else:
        out, _ = _attention(qd, kd, vd, case, extras)
        o, lse = ref_fwd.attention(q, k, v, case, slopes=extras["slopes"], cap=CAP, **TILES)
        got = ref_bwd.attention_backward(q, k, v, o, lse, do, case, slopes=extras["slopes"],
                                         cap=CAP, **TILES)
    out.backward(do.double())
    for name, mine, want in zip("qkv", got, (qd.grad, kd.grad, vd.grad), strict=True):
        err = (mine.double() - want).abs().max().item()
        assert err < 3e-2 * max(1.0, want.abs().max().item()), f"d{name}: {err}"
