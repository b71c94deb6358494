"""Edge values the kernel must compute as torch and the float64 oracle do, or refuse.

NaN through max / min / clamp / relu; a quotient whose common factor may be zero (0 / 0 = 0,
never cancelled); booleans in integer arithmetic (0 / 1, not 1-bit wrap-around); floor division
of literals; int64 wrap-around in constant folding; int() of a constant no int64 holds; an
output that keeps the key index; an integer power far past int64 in the launcher's ranges.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

import attndsl
from attndsl.frontend.text import parse_text

B, H, L, D = 1, 2, 16, 16
HEAD = """spec t {
  index b: B batch, h: H head, m: M query, n: N key, e: E qk, f: F v
  input Q[B, H, M, E], K[B, H, N, E], V[B, H, N, F]
"""


def _spec(body: str):
    return next(iter(parse_text(HEAD + body + "\n}").values()))


def _qkv() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {n: torch.randn(B, H, L, D, generator=gen) for n in "QKV"}


def _kernel_and_oracle(body: str, params: dict | None = None,
                       captured: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    c, qkv = _spec(body), _qkv()
    got = attndsl.compile(c)(qkv, params or {}, captured or {})["O"].double()
    want = attndsl.run_cascade(c, {**qkv, **(captured or {})}, params or {})["O"]
    return got, want


@pytest.mark.parametrize("score_mod", [
    lambda s, b, h, q, kv: torch.relu(torch.sqrt(s)),
    lambda s, b, h, q, kv: torch.clamp(torch.log(s), min=-1.0),
    lambda s, b, h, q, kv: torch.minimum(torch.sqrt(s), torch.zeros_like(s)),
])
def test_max_and_min_keep_a_nan_operand_as_torch_does(score_mod) -> None:
    q, k, v = _qkv().values()
    got = attndsl.flex_attention(q, k, v, score_mod=score_mod)
    want = torch_flex_attention(q, k, v, score_mod=score_mod)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and bool(torch.isnan(want).any())


def test_a_common_factor_that_may_be_zero_is_not_cancelled() -> None:
    """(sum exp(S) V w[h]) / (sum exp(S) w[h]) is 0 / 0 = 0 where w[h] = 0, not softmax."""
    got, want = _kernel_and_oracle(
        """  tensor w[H]: float
  S[b,h,m,n] = Q[b,h,m,e] * K[b,h,n,e] * 0.25
  O[b,h,m,f] = (sum(n) exp(S[b,h,m,n]) * V[b,h,n,f] * w[h]) / (sum(n) exp(S[b,h,m,n]) * w[h])
  output O""", captured={"w": torch.tensor([0.0, 2.0])})
    assert torch.equal(want[:, 0], torch.zeros_like(want[:, 0]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got, want = _kernel_and_oracle(
        """  param c: float
  S[b,h,m,n] = Q[b,h,m,e] * K[b,h,n,e] * 0.25
  O[b,h,m,f] = softmax(n) S[b,h,m,n] * V[b,h,n,f] * (c / c)
  output O""", params={"c": 0.0})
    assert torch.equal(got, torch.zeros_like(got)) and torch.equal(want, torch.zeros_like(want))


@pytest.mark.parametrize("term", ["float((m > 3) + (m > 5))", "float(((n > 3) + (n > 5)) // 1)",
                                  "float((m > 2) * (n > 2) - (m > 9))"])
def test_booleans_in_integer_arithmetic_count_as_zero_and_one(term: str) -> None:
    got, want = _kernel_and_oracle(f"""  S[b,h,m,n] = Q[b,h,m,e] * K[b,h,n,e] * 0.25 + {term}
  O[b,h,m,f] = softmax(n) S[b,h,m,n] * V[b,h,n,f]
  output O""")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("term, value", [("-7 // 2", -4), ("7 // -2", -4), ("(0 - 7) // 2", -4),
                                         ("-7 % 3", 2), ("(9223372036854775807 + 1) % 3", 1)])
def test_integer_literals_fold_with_python_floors_and_int64_wrap_around(term: str,
                                                                          value: int) -> None:
    got, want = _kernel_and_oracle(f"""  S[b,h,m,n] = Q[b,h,m,e] * K[b,h,n,e] * 0.25
  O[b,h,m,f] = softmax(n) S[b,h,m,n] * V[b,h,n,f] * float({term})
  output O""")
    base, _ = _kernel_and_oracle("""  S[b,h,m,n] = Q[b,h,m,e] * K[b,h,n,e] * 0.25
  O[b,h,m,f] = softmax(n) S[b,h,m,n] * V[b,h,n,f]
  output O""")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, base * value, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("term", ["int(inf)", "int(1e19) % 7"])
def test_int_of_a_constant_no_int64_holds_is_refused(term: str) -> None:
    c = _spec(f"""  S[b,h,m,n] = Q[b,h,m,e] * K[b,h,n,e] * 0.25
  O[b,h,m,f] = softmax(n) S[b,h,m,n] * V[b,h,n,f] * float({term})
  output O""")
    with pytest.raises(attndsl.AttnDSLError, match="no int64 holds it"):
        attndsl.compile(c)({"Q": torch.zeros(1, 1, 16, 16), "K": torch.zeros(1, 1, 16, 16),
                            "V": torch.zeros(1, 1, 16, 16)})


def test_an_output_that_keeps_the_key_index_is_a_located_error() -> None:
    c = _spec("""  S[b,h,m,n] = Q[b,h,m,e] * K[b,h,n,e] * 0.25
  O[b,h,m,f] = softmax(n) S[b,h,m,n] * V[b,h,n,f]
  output O, S""")
    with pytest.raises(attndsl.AttnDSLError, match=r"<string>:4:3: .*output S\[b, h, m, n\] "
                                                    r"keeps the key index n"):
        attndsl.compile(c)


def test_an_integer_power_far_past_int64_does_not_stall_the_launch() -> None:
    t0 = time.perf_counter()
    got, want = _kernel_and_oracle("""  S[b,h,m,n] = Q[b,h,m,e] * K[b,h,n,e] * 0.25
  O[b,h,m,f] = softmax(n) S[b,h,m,n] * V[b,h,n,f] * float((10 ** 10 ** 10) % 3 + m * 0)
  output O""")
    assert time.perf_counter() - t0 < 60
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert math.isfinite(float(got.abs().max()))


def test_a_prefix_sum_named_as_an_output_is_a_located_error() -> None:
    with pytest.raises(attndsl.SpecError, match=r"<string>:5:3: error: output 'G' is a prefix "
                                                r"sum \(cumsum\)"):
        _spec("""  tensor A[B, H, N]: float
  G[b,h,n] = cumsum(n) A[b,h,n]
  S[b,h,m,n] = Q[b,h,m,e] * K[b,h,n,e] * 0.25
  O[b,h,m,f] = softmax(n) S[b,h,m,n] * V[b,h,n,f]
  output O, G""")


def test_torch_div_with_floor_rounding_traces_as_floor_division_and_trunc_is_refused() -> None:
    from torch.nn.attention.flex_attention import create_block_mask

    q = _qkv()["Q"]
    blocks = lambda b, h, i, j: torch.div(i, 4, rounding_mode="floor") >= \
        torch.div(j - 3, 4, rounding_mode="floor")  # noqa: E731
    want = torch_flex_attention(q, q, q, block_mask=create_block_mask(blocks, B, H, L, L,
                                                                      device="cpu"))
    torch.testing.assert_close(attndsl.flex_attention(q, q, q, mask_mod=blocks), want)
    with pytest.raises(attndsl.TraceError, match=r"rounding_mode='trunc'\) is not supported"):
        attndsl.flex_attention(q, q, q, mask_mod=lambda b, h, i, j: torch.div(
            i, 4, rounding_mode="trunc") >= j)


def test_x_minus_x_is_nan_where_x_is_infinite() -> None:
    got, want = _kernel_and_oracle("""  S[b,h,m,n] = Q[b,h,m,e] * K[b,h,n,e] * 0.25
  X[b,h,m,n] = exp(S[b,h,m,n] * 1000.0)
  T[b,h,m,n] = S[b,h,m,n] + (X[b,h,m,n] - X[b,h,m,n])
  O[b,h,m,f] = softmax(n) T[b,h,m,n] * V[b,h,n,f]
  output O""")
    assert bool(torch.isnan(want).any())
    assert torch.equal(torch.isnan(got), torch.isnan(want))
