"""A score with a per-element term that has no multiply of its own (a bias table read at
``m - n``) is printed in natural units: ``T = qk * scale + b`` once per score, the running
max as ``rowmax(T) * log2e`` and each weight as ``exp2(T * log2e - m)``, one FMA, instead of
``log2e`` distributed over the terms (``b * log2e`` a multiply per score, then a subtraction;
codegen.triton._natural_scores).  The answers stay the float64 oracle's; scores whose terms
all keep a multiply print as before."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from attndsl.codegen.triton import _natural_score, _read_as_weight

import attndsl
from attndsl.ir import expr as E
from attndsl.ir.expr import Op
from attndsl.passes.rules import LOG2E
from attndsl.runtime.gpu_report import record_launches

CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
L2E = E.const(LOG2E)


def _source(q, k, v, **kwargs) -> str:
    launch, = record_launches(lambda: attndsl.flex_attention(q, k, v, **kwargs))
    return Path(inspect.getsourcefile(launch.fn)).read_text()


def _qkv(lq: int, lkv: int, seed: int = 3) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, lq, 16, generator=gen)
    return (q,) + tuple(torch.randn(1, 2, lkv, 16, generator=gen) for _ in range(2))


def _oracle(q, k, v, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softmax(q k^T / 4 + bias) v, its log-sum-exp and row max, in float64."""
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.25 + bias.double()
    return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1), s.amax(-1)


@pytest.mark.parametrize("lq, lkv", [(64, 64), (45, 37)])
def test_a_relative_bias_is_added_in_natural_units_and_the_weights_scale_it_by_log2e(
        lq: int, lkv: int) -> None:
    """table[h, q - kv + lkv - 1] with -inf entries and large finite ones: the printed step
    adds the table read to qk * scale without a multiply, scales the row max and the weights
    by log2e, and the output, lse and row max are the oracle's."""
    table = torch.randn(2, lq + lkv - 1, generator=torch.Generator().manual_seed(2)) * 30
    table[:, ::7] = float("-inf")

    def bias(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + (lkv - 1)]

    q, k, v = _qkv(lq, lkv)
    kwargs = dict(score_mod=bias, kernel_options=dict(CONFIG))
    out, aux = attndsl.flex_attention(q, k, v, **kwargs,
                                      return_aux=attndsl.AuxRequest(lse=True, max_scores=True))
    m, n = torch.arange(lq)[:, None], torch.arange(lkv)[None, :]
    ref, lse, top = _oracle(q, k, v, table[:, m - n + (lkv - 1)][None])
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(aux.lse.double(), lse, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(aux.max_scores.double(), top, atol=2e-5, rtol=2e-5)
    source = _source(q, k, v, **kwargs)
    score, = [ln.strip() for ln in source.splitlines() if ln.strip().startswith("y_m_i = (")]
    assert score.startswith("y_m_i = ((qk * sm_scale) + ") and "1.4426950408889634" not in \
        score, score
    assert "m_i_tile = tl.max(y_m_i, 1) * 1.4426950408889634" in source
    assert "tl.exp2(((y_m_i * 1.4426950408889634) - m_i_use_new[:, None]))" in source


def test_a_row_whose_every_bias_is_minus_inf_gives_zero_and_an_lse_of_minus_inf() -> None:
    """A full [M, N] bias with one row all -inf: that row's weights are exp2(-inf) = 0 (its
    stabiliser stays finite), the output 0 and the lse -inf, as flex attention's fully masked
    rows; the other rows are the oracle's."""
    lq = lkv = 48
    full = torch.randn(2, lq, lkv, generator=torch.Generator().manual_seed(5))
    full[:, 7] = float("-inf")

    def bias(score, b, h, q_idx, kv_idx):
        return score + full[h, q_idx, kv_idx]

    q, k, v = _qkv(lq, lkv, seed=6)
    out, lse = attndsl.flex_attention(q, k, v, score_mod=bias, return_lse=True,
                                      kernel_options=dict(CONFIG))
    ref, ref_lse, _ = _oracle(q, k, v, full[None])
    keep = torch.arange(lq) != 7
    torch.testing.assert_close(out.double()[:, :, keep], ref[:, :, keep], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double()[:, :, keep], ref_lse[:, :, keep], atol=2e-5,
                               rtol=2e-5)
    assert bool((out[:, :, 7] == 0).all()) and bool((lse[:, :, 7] == float("-inf")).all())
    assert "tl.max(y_m_i, 1) * 1.4426950408889634" in _source(
        q, k, v, score_mod=bias, kernel_options=dict(CONFIG))


def test_scores_whose_terms_all_keep_a_multiply_stay_in_log2_units() -> None:
    """ALiBi's slope[h] * (kv - q) and a keys-only gate g[kv] gain nothing in natural units
    (a multiply per score stays, or one per column against one per row): printed as before."""
    slopes = torch.tensor([0.5, 0.25])
    gate = torch.randn(40, generator=torch.Generator().manual_seed(7))

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    def gated(score, b, h, q_idx, kv_idx):
        return score + gate[kv_idx]

    q, k, v = _qkv(40, 40)
    for mod in (alibi, gated):
        source = _source(q, k, v, score_mod=mod, kernel_options=dict(CONFIG))
        assert "rowmax(T log2e)" not in source and "tl.max(y_m_i, 1) * 1.44" not in source


def test_the_natural_score_drops_log2e_from_each_term_and_keeps_their_signs() -> None:
    """qk (s log2e) - b[m - n] log2e + 3 log2e -> qk s - b[m - n] + 3 (a constant c becomes
    c / log2e); a term without a constant, or no multiply-free tile term, gives None."""
    qk, s = E.row("qk"), E.param("scale")
    b = E.load("b", (E.index("m") - E.index("n"),))
    y = qk * (s * L2E) - b * L2E + E.const(3.0)
    z = _natural_score(y, {"qk"}, "m", "n")
    assert z == qk * s - b + E.const(3.0 / LOG2E)
    assert _natural_score(qk * (s * L2E) + b * E.param("w"), {"qk"}, "m", "n") is None
    assert _natural_score(qk * (s * L2E) + b * (E.param("w") * L2E), {"qk"}, "m", "n") is None
    g = E.load("g", (E.index("n"),))
    assert _natural_score(qk * (s * L2E) + g * L2E, {"qk"}, "m", "n") is None
    assert _natural_score(qk * L2E, {"qk"}, "m", "n") is None  # one term: rowmax(qk) s


def test_a_score_read_outside_a_weight_is_not_rescaled() -> None:
    """_read_as_weight: exp2(y - m) reads y as a weight (its multiply contracts into the
    subtraction); y itself, or exp2(m - y), does not."""
    y, m = E.row("qk") + E.const(1.0), E.row("m_i")
    assert _read_as_weight(E.unary(Op.EXP2, y - m) * E.const(2.0), y)
    assert not _read_as_weight(E.unary(Op.EXP2, y - m) * y, y)
    assert not _read_as_weight(E.unary(Op.EXP2, m - y), y)



SOFTPICK_BIAS = """
spec softpick_bias {
  index b: B batch, h: H head, m: M query, n: N key, e: E qk, f: F v
  input Q[B, H, M, E], K[B, H, N, E], V[B, H, N, F]
  tensor table[H, T]: float
  param scale: float
  mask n <= m
  S[b,h,m,n] = Q[b,h,m,e] * K[b,h,n,e] * scale + table[h, m - n + N - 1]
  P[b,h,m,n] = relu(exp(S[b,h,m,n]) - 1) / sum(n) abs(exp(S[b,h,m,n]) - 1)
  O[b,h,m,f] = P[b,h,m,n] * V[b,h,n,f]
  output O
}
"""


def test_a_softpick_with_a_bias_table_reads_its_floored_stabiliser_in_log2_units() -> None:
    """Softpick's exp(S) - 1 reads its stabiliser outside its own weights (exp2(-m)), kept
    >= 0: the max is the natural-units rowmax times log2e, the units every other read of it
    has, so the output is the float64 oracle's on causal, ragged tiles with -inf entries."""
    spec = attndsl.frontend.text.parse_text(SOFTPICK_BIAS)["softpick_bias"]
    kernel = attndsl.compile(spec)
    q, k, v = _qkv(45, 37, seed=8)
    table = torch.randn(2, 45 + 37 - 1, generator=torch.Generator().manual_seed(9)) * 4
    table[:, ::5] = float("-inf")
    inputs, params, captured = {"Q": q, "K": k, "V": v}, {"scale": 0.25}, {"table": table}
    out = kernel(inputs, params, captured, kernel_options=dict(CONFIG))["O"]
    ref = attndsl.run_cascade(spec, {**inputs, **captured}, params)["O"]
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    launch, = record_launches(lambda: kernel(inputs, params, captured,
                                             kernel_options=dict(CONFIG)))
    source = Path(inspect.getsourcefile(launch.fn)).read_text()
    assert "_tile = tl.max(y_m_i, 1) * 1.4426950408889634" in source
    assert "tl.maximum(m_i_new, 0.0)" in source
