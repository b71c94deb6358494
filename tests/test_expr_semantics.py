"""Expression semantics are torch's in every executor: the tracer, the .attn text, the oracle and
the generated kernel agree with torch evaluating the same Python function on index grids (or with
torch's own flex_attention on the CPU).

Covered: bitwise ``^ & | ~ << >>`` on integers and booleans, int64 index arithmetic (no int32
wrap-around in the kernel), refused integer division by zero, IEEE ``0 / 0`` in a score_mod,
integer arguments of float functions, 16-bit rounding casts, and one depth limit for every
construct that nests.
"""

from __future__ import annotations

import ast
import math
from dataclasses import replace

import pytest
import torch
from attndsl.codegen.expr import HELPERS
from attndsl.codegen.triton import generate
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask as torch_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

import attndsl
from attndsl.checking import TOLERANCE, compare, index_sizes, oracle, random_problem
from attndsl.eager import EagerError, eval_expr
from attndsl.frontend.flex import mask_expr
from attndsl.frontend.text import SpecError, parse_text
from attndsl.ir import expr as E
from attndsl.ir.expr import MAX_DEPTH
from attndsl.passes.pipeline import compile_cascade
from attndsl.runtime.modules import load_kernel_module, load_source

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log")
Tensor = torch.Tensor
B, H, L, D = 1, 2, 40, 16


def _qkv(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, L, D, generator=gen) for _ in range(3))


def _both(score_mod=None, mask_mod=None) -> tuple[Tensor, Tensor]:
    """attndsl's kernel and torch's flex_attention on the same problem."""
    q, k, v = _qkv()
    ours = attndsl.flex_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod)
    block = None if mask_mod is None else torch_block_mask(mask_mod, B, H, L, L, device="cpu")
    return ours, torch_flex_attention(q, k, v, score_mod=score_mod, block_mask=block)


# -- 1. bitwise operators ---------------------------------------------------------------------

BITWISE_MASKS = {
    "xor parity": lambda b, h, q, kv: ((q ^ kv) & 1) == 0,
    "xor window": lambda b, h, q, kv: (q ^ kv) < 5,
    "or": lambda b, h, q, kv: (q | kv) <= q + 3,
    "shifts": lambda b, h, q, kv: (q >> 3) == ((kv << 2) >> 5),
    "bitwise not": lambda b, h, q, kv: (~kv) >= -q - 1,
    "boolean xor": lambda b, h, q, kv: (q >= kv) ^ (kv < 4),
    "boolean not": lambda b, h, q, kv: ~(q < kv),
}


@pytest.mark.parametrize("name", BITWISE_MASKS)
def test_bitwise_masks_match_torch_flex_attention(name: str) -> None:
    ours, ref = _both(mask_mod=BITWISE_MASKS[name])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_integer_bitwise_score_terms_match_torch_flex_attention() -> None:
    def score(s, b, h, q, kv):
        return s + ((q << 3) >> (kv % 5)).float() * 0.01 + (~q ^ kv).float() * 0.001

    ours, ref = _both(score_mod=score)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_torch_bitwise_functions_trace_like_the_operators() -> None:
    q, kv = torch.arange(20)[:, None], torch.arange(20)[None, :]
    fns = [lambda b, h, q, kv: torch.bitwise_xor(q, kv) < 3,
           lambda b, h, q, kv: torch.logical_xor(q & 1, kv & 2),
           lambda b, h, q, kv: torch.logical_and(q % 3, kv),
           lambda b, h, q, kv: torch.bitwise_left_shift(q, kv % 70) > 100,
           lambda b, h, q, kv: torch.bitwise_not(q) < -kv]
    for fn in fns:
        got = _grid(mask_expr(fn)[0], 20)
        assert torch.equal(got, fn(0, 0, q, kv).expand(20, 20)), fn


def _grid(e, n: int) -> Tensor:
    """An expression over (b, h, m, n) evaluated on an n x n query/key grid."""
    ranges = {"b": torch.arange(1), "h": torch.arange(1), "m": torch.arange(n),
              "n": torch.arange(n)}
    out = eval_expr(e, ["b", "h", "m", "n"], ranges, {})
    return out.expand(1, 1, n, n)[0, 0]


_SYM = st.sampled_from(["q", "kv"])
_CONST = st.integers(-70, 70).map(str)
_BIN = st.sampled_from(["^", "&", "|", "<<", ">>", "+", "-", "*"])


def _expr(depth: int) -> st.SearchStrategy[str]:
    """Integer expressions in which every subexpression uses q or kv (so that Python never
    folds constants itself)."""
    if depth == 0:
        return _SYM
    sub = _expr(depth - 1)
    pairs = st.one_of(st.tuples(sub, sub), st.tuples(sub, _CONST), st.tuples(_CONST, sub))
    return st.one_of(sub, st.tuples(pairs, _BIN).map(lambda t: f"({t[0][0]} {t[1]} {t[0][1]})"),
                     sub.map(lambda t: f"(~{t})"))


@settings(max_examples=150, deadline=None)
@given(text=_expr(3), bound=st.integers(-100, 100))
def test_random_integer_bitwise_expressions_evaluate_as_in_torch(text: str, bound: int) -> None:
    """Random int64 expressions (shift amounts beyond 63 and negative ones included) give the
    values torch gives on the index grid, through the tracer and the oracle."""
    fn = eval(f"lambda b, h, q, kv: {text} < {bound}")  # noqa: S307 -- test-built text
    q, kv = torch.arange(12)[:, None], torch.arange(12)[None, :]
    assert torch.equal(_grid(mask_expr(fn)[0], 12), fn(0, 0, q, kv).expand(12, 12))


def test_text_frontend_parses_bitwise_operators_with_python_like_precedence() -> None:
    spec = _TEXT.format(mask="mask (m ^ n) < 3 ^ m >> 2 == n >> 2 & ~n < 0 | m == n + 1",
                        extra="", score="S[b,h,m,n]")
    (c,) = parse_text(spec).values()
    keep = c.mask.expr
    q, kv = torch.arange(16)[:, None], torch.arange(16)[None, :]
    want = (((q ^ kv) < 3) ^ (((q >> 2) == (kv >> 2)) & ((~kv) < 0))) | (q == kv + 1)
    assert torch.equal(_grid(keep, 16), want)


def test_bitwise_operators_refuse_floats_with_a_located_error() -> None:
    with pytest.raises(SpecError) as err:
        parse_text(_TEXT.format(mask="", extra="", score="S[b,h,m,n] ^ 1"))
    assert (err.value.line, err.value.col) == (6, 16) and "^ needs" in err.value.what
    with pytest.raises(attndsl.TraceError, match="bitwise not"):
        attndsl.compile(score_mod=lambda s, b, h, q, kv: ~s)


# -- 2. int64 arithmetic and division by zero ----------------------------------------------

def test_index_arithmetic_beyond_int32_matches_torch() -> None:
    ours, ref = _both(mask_mod=lambda b, h, q, kv: q + 2147483647 >= kv + 2147483647)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    ours, ref = _both(score_mod=lambda s, b, h, q, kv: s + ((q + 4294967296) % 7).float()
                      - ((q * 3000000019 + kv) % 11).float())
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)


def test_wide_integer_nodes_are_computed_in_int64_in_the_kernel() -> None:
    def mask_lines(mask_mod) -> str:
        src = attndsl.compile(mask_mod=mask_mod).source
        return "\n".join(ln for ln in src.splitlines() if "keep = " in ln)

    assert ".to(tl.int64)" in mask_lines(lambda b, h, q, kv: 3 * q >= kv + 2147483647)
    # a distance compare is decided over the distances of int32 indices instead
    assert "keep = True" in mask_lines(lambda b, h, q, kv: q + 2147483647 >= kv)
    assert "int64" not in mask_lines(lambda b, h, q, kv: q - kv <= 8)


def test_integer_division_by_constant_zero_is_refused_where_it_is_written() -> None:
    with pytest.raises(attndsl.TraceError, match=r"integer // by zero[\s\S]*test_expr_semantics"):
        attndsl.compile(mask_mod=lambda b, h, q, kv: q // 0 == kv)
    with pytest.raises(SpecError) as err:
        parse_text(_TEXT.format(mask="", extra="", score="S[b,h,m,n] + m % 0"))
    assert (err.value.line, err.value.col) == (6, 33) and "by zero" in err.value.what


def test_integer_division_by_a_value_that_can_be_zero_is_refused() -> None:
    with pytest.raises(attndsl.TraceError, match="can be zero"):
        attndsl.compile(mask_mod=lambda b, h, q, kv: q % kv == 0)
    ours, ref = _both(mask_mod=lambda b, h, q, kv: q % (kv + 1) == 0)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_an_integer_parameter_that_divides_is_checked_at_launch() -> None:
    (c,) = parse_text(_TEXT.format(mask="mask m // W == n // W", extra="param W: int",
                                   score="S[b,h,m,n]")).values()
    module = load_kernel_module(compile_cascade(c).kernel)
    prob = random_problem(c, index_sizes(c, 1, 2, 2, 8, 8, 16, 16), torch.float32,
                          torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"divisor W takes values in \[0, 0\], which includes 0"):
        module.launch(prob.inputs, {**prob.params, "W": 0}, prob.captured)
    with pytest.raises(EagerError, match="by zero"):
        oracle(c, replace(prob, params={**prob.params, "W": 0}))


def test_a_divisor_read_from_a_captured_tensor_is_checked_at_launch() -> None:
    chunk = torch.tensor([3, 5], dtype=torch.int64)

    def per_head_chunks(b, h, q, kv):
        return (q // chunk[h] == kv // chunk[h]) & (kv % chunk[h] <= q % chunk[h])

    ours, ref = _both(mask_mod=per_head_chunks)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    chunk[1] = 0  # torch raises ZeroDivisionError; so do the mask analysis and the launch
    with pytest.raises(ValueError, match="by zero"):
        _both(mask_mod=per_head_chunks)
    kernel = attndsl.compile(mask_mod=per_head_chunks)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"divisor .* takes values in \[0, 3\], which includes 0"):
        kernel({"Q": q, "K": k, "V": v})


def test_zero_over_zero_in_a_score_mod_is_nan_as_in_torch() -> None:
    def score(s, b, h, q, kv):
        return torch.where(q == 3, s * 0.0 / (q - q).float(), s)

    ours, ref = _both(score_mod=score)
    assert torch.equal(ours.isnan(), ref.isnan()) and ref.isnan().any()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5, equal_nan=True)



_DIV_PROBE = """
import triton
import triton.language as tl
""" + HELPERS + """

@triton.jit
def _div_probe(a_ptr, b_ptr, out_ptr, N: tl.constexpr, ROW_DIVISOR: tl.constexpr):
    rows = tl.arange(0, N)[:, None]
    cols = tl.arange(0, N)[None, :]
    a = tl.load(a_ptr + rows * N + cols)
    if ROW_DIVISOR:  # one divisor per row, broadcast along it (the epilogue's l_i[:, None])
        b = tl.load(b_ptr + tl.arange(0, N))[:, None]
    else:
        b = tl.load(b_ptr + rows * N + cols)
    tl.store(out_ptr + rows * N + cols, _safe_div(a, b))
"""


@pytest.mark.parametrize("row_divisor", [True, False])
def test_the_normalising_division_is_ieee_except_that_zero_over_zero_is_zero(
        row_divisor: bool) -> None:
    """x / y of the language (the kernels' _safe_div) for every pair of signed zeros,
    infinities, NaN, a subnormal and ordinary numbers, with one divisor per element or one per
    row: bit for bit torch's IEEE quotient (signs of zeros and infinities included), 0 / 0 = 0."""
    special = [0.0, -0.0, 1.5, -2.0, math.inf, -math.inf, math.nan, 1e-40]
    n = len(special)
    a = torch.tensor(special).repeat(n, 1)  # a[i, j] = special[j]
    b = torch.tensor(special)
    b_full = b[:, None].expand(n, n).contiguous()  # b[i, j] = special[i]
    out = torch.empty(n, n)
    module = load_source(_DIV_PROBE, prefix="div_probe")
    module._div_probe[(1,)](a, b if row_divisor else b_full, out, N=n, ROW_DIVISOR=row_divisor)
    want = torch.where((a == 0) & (b_full == 0), torch.zeros(()), a / b_full)
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(want))
    assert torch.equal(out.signbit() | out.isnan(), want.signbit() | want.isnan())


# -- 4. integer arguments of float functions -----------------------------------------------

def test_float_functions_of_integers_compile_and_match_the_oracle() -> None:
    score = "S[b,h,m,n] * log(N) / sqrt(N) + exp(-m) + log2(n + 1) - sigmoid(m - n)"
    (c,) = parse_text(_TEXT.format(mask="", extra="", score=score)).values()
    module = load_kernel_module(compile_cascade(c).kernel)
    prob = random_problem(c, index_sizes(c, 1, 2, 2, 19, 23, 16, 16), torch.float32,
                          torch.Generator().manual_seed(1))
    res = compare(module.launch(prob.inputs, prob.params, prob.captured), oracle(c, prob))
    assert not res.nan and res.worst() <= TOLERANCE[torch.float32], res


POWERS = {
    "an integer to a negative constant": "S[b,h,m,n] + (m - n + 1) ** -1",
    "an integer to an integer": "S[b,h,m,n] + (m + 1) ** (n - m) + 2 ** (m - n) * 0.01",
    "an integer to the 0th": "S[b,h,m,n] + (m - n) ** 0",
    "a constant power past int64 (wraps)": "S[b,h,m,n] + (2 ** 63) * 1e-19",
    "zero to integers": "S[b,h,m,n] + 0 ** (m - n)",
    "a negative float to -1": "S[b,h,m,n] ** -1 * 0.01",
    "a negative float to odd and fractional powers": "(S[b,h,m,n] - 1) ** 9 * 1e-3 + "
                                                     "S[b,h,m,n] ** 0.5",
    "a float to an integer": "S[b,h,m,n] + 1.5 ** (m - n)",
}


@pytest.mark.parametrize("name", POWERS)
def test_powers_of_every_form_match_the_oracle_in_the_kernel(name: str) -> None:
    """x ** y was exp2(log2(x) y) unless y was a constant 0..8: NaN for a negative x (-2.0 **
    -1 is -0.5), a Triton type error on integers, and (m - n) ** 0 printed a float 1.0."""
    (c,) = parse_text(_TEXT.format(mask="", extra="", score=POWERS[name])).values()
    module = load_kernel_module(compile_cascade(c).kernel)
    prob = random_problem(c, index_sizes(c, 1, 1, 1, 9, 11, 16, 16), torch.float32,
                          torch.Generator().manual_seed(2))
    got = module.launch(prob.inputs, prob.params, prob.captured)["O"].double()
    want = oracle(c, prob)["O"]
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, equal_nan=True)


_POW_PROBE = """
import triton
import triton.language as tl
""" + HELPERS + """

@triton.jit
def _pow_probe(a_ptr, b_ptr, out_ptr, N: tl.constexpr, INTEGER: tl.constexpr):
    offs = tl.arange(0, N)[:, None] * N + tl.arange(0, N)[None, :]
    a = tl.load(a_ptr + offs)
    b = tl.load(b_ptr + offs)
    if INTEGER:
        tl.store(out_ptr + offs, _int_pow(a, b))
    else:
        tl.store(out_ptr + offs, _pow(a, b))
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_the_kernels_powers_are_torch_pow_on_special_values(dtype: torch.dtype) -> None:
    """_pow on every pair of signed zeros, +-1, negative and positive whole and fractional
    numbers, infinities and NaN; _int_pow on small, negative and int32-edge bases and
    exponents -3 .. 64 (wrapping in int64 as torch does)."""
    if dtype.is_floating_point:
        special = [0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 3.0, -3.0, 2.5, -2.5,
                   math.inf, -math.inf, math.nan, 1e-3]
    else:
        special = [0, 1, -1, 2, -2, 3, -3, 7, 2**31 - 1, -2**31, -5, 10, 63, 64, 31, -4]
    n = len(special)
    a = torch.tensor(special, dtype=dtype)[None, :].expand(n, n).contiguous()
    b = a.t().contiguous()
    out = torch.empty(n, n, dtype=dtype)
    module = load_source(_POW_PROBE, prefix="pow_probe")
    module._pow_probe[(1,)](a, b, out, N=n, INTEGER=not dtype.is_floating_point)
    want = torch.pow(a, b)
    if dtype.is_floating_point:
        torch.testing.assert_close(out, want, rtol=1e-6, atol=0, equal_nan=True)
        assert torch.equal(out.signbit() | out.isnan(), want.signbit() | want.isnan())
    else:
        assert torch.equal(out, want)


# -- 5. 16-bit casts -------------------------------------------------------------------------

HALF_CASTS = {
    "half": lambda s, b, h, q, kv: (s * 37.3).half(),
    "bfloat16": lambda s, b, h, q, kv: (s * 37.3).bfloat16(),
    "to float16": lambda s, b, h, q, kv: (s * 37.3).to(torch.float16) + 0.0,
    "to bfloat16 of an int": lambda s, b, h, q, kv:
        s + (q * 1001 + kv).to(torch.bfloat16).float() * 1e-3,
}


@pytest.mark.parametrize("name", HALF_CASTS)
def test_16_bit_casts_round_as_torch_in_oracle_and_kernel(name: str) -> None:
    """The row maxima of the scores show the rounding itself: they equal torch's maxima of
    score_mod evaluated on the float32 score grid (a float32 cast would be off by ~2^-9)."""
    fn = HALF_CASTS[name]
    q, k, v = _qkv()
    _, aux = attndsl.flex_attention(q, k, v, score_mod=fn, return_aux=attndsl.AuxRequest(
        max_scores=True))
    s = (q @ k.transpose(-1, -2)) * D ** -0.5
    qi, ki = torch.arange(L)[:, None], torch.arange(L)[None, :]
    want = fn(s, 0, 0, qi, ki).float().amax(-1)
    torch.testing.assert_close(aux.max_scores, want, atol=2e-5, rtol=2e-6)
    (cas,) = [attndsl.compile(score_mod=fn).compiled.cascade]
    inputs = {"Q": q.double(), "K": k.double(), "V": v.double()}
    got = attndsl.run_cascade(cas, inputs, {"scale": D ** -0.5, "G": 1})["MAX"]
    torch.testing.assert_close(got.float(), want, atol=2e-5, rtol=2e-6)


# -- 3. one depth limit ------------------------------------------------------------------------

_TEXT = """spec s {{
  index b: B batch, h: H head, m: M query, n: N key, e: E qk, f: F v
  input Q[B, H, M, E], K[B, H, N, E], V[B, H, N, F]
  {extra}
  S[b,h,m,n] = Q[b,h,m,e] * K[b,h,n,e]
  T[b,h,m,n] = {score}
  {mask}
  O[b,h,m,f] = softmax(n) T[b,h,m,n] * V[b,h,n,f]
  output O
}}
"""


def test_chained_comparisons_past_the_depth_limit_are_a_located_error() -> None:
    chain = " < ".join(["m"] * (MAX_DEPTH + 10))
    with pytest.raises(SpecError) as err:
        parse_text(_TEXT.format(mask=f"mask {chain}", extra="", score="S[b,h,m,n]"))
    assert err.value.line == 7 and "nested too deeply" in err.value.what


def test_equation_chains_past_the_depth_limit_are_a_located_error() -> None:
    eqs = "\n".join(f"  A{i}[b,h,m,n] = A{i - 1}[b,h,m,n] * 0.5 + 1.0"
                    for i in range(1, MAX_DEPTH // 2 + 5))
    with pytest.raises(SpecError) as err:
        parse_text(_TEXT.format(mask="", extra=f"A0[b,h,m,n] = Q[b,h,m,0]\n{eqs}",
                                score=f"S[b,h,m,n] + A{MAX_DEPTH // 2 + 4}[b,h,m,n]"))
    assert "nested too deeply once the equations it reads are substituted" in err.value.what
    assert err.value.line > 4


def test_a_deep_traced_score_mod_is_a_located_error_not_a_recursion_error() -> None:
    def deep(s, b, h, q, kv):
        for _ in range(5 * MAX_DEPTH):
            s = s * 0.5 + 1.0
        return s

    with pytest.raises(attndsl.TraceError, match=r"nested too deeply[\s\S]*in deep"):
        attndsl.compile(score_mod=deep)


def test_specs_just_within_the_depth_limit_generate_source_that_parses_and_runs() -> None:
    chain = " <= ".join(["n"] + ["m"] * (MAX_DEPTH - 20))
    terms = "S[b,h,m,n]" + " * 0.5 + 0.25" * ((MAX_DEPTH - 20) // 2)
    (c,) = parse_text(_TEXT.format(mask=f"mask {chain}", extra="", score=terms)).values()
    kernel = compile_cascade(c).kernel
    ast.parse(generate(kernel, "x", "0"))
    module = load_kernel_module(kernel)
    prob = random_problem(c, index_sizes(c, 1, 1, 1, 9, 11, 16, 16), torch.float32,
                          torch.Generator().manual_seed(2))
    res = compare(module.launch(prob.inputs, prob.params, prob.captured), oracle(c, prob))
    assert not res.nan and res.worst() <= TOLERANCE[torch.float32], res


def test_the_flex_backward_of_a_deep_score_mod_still_compiles() -> None:
    def deep(s, b, h, q, kv):
        for _ in range(MAX_DEPTH // 3):
            s = torch.tanh(s) * 0.9 + 0.05
        return s

    q, k, v = (t.requires_grad_() for t in _qkv())
    out = attndsl.flex_attention(q, k, v, score_mod=deep)
    out.sum().backward()
    assert all(math.isfinite(float(t.grad.abs().sum())) for t in (q, k, v))


@pytest.mark.parametrize("backward", [False, True])
def test_an_integer_difference_times_a_constant_is_not_split_into_cancelling_products(
        backward: bool) -> None:
    """``((q + k) - (kv + k)) * c`` is the distance times c: the integer difference is computed
    exactly and converted once.  Distributed into ``(q + k) c - (kv + k) c`` in float32 it
    cancelled, and at k = 3e6 the output was off by 0.026 (forward and gradients)."""
    big = 3_000_000
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=gen, dtype=torch.float64).float()
               .requires_grad_(backward) for _ in range(3))

    def score(s, b, h, qi, kv):
        return s - ((qi + big) - (kv + big)) * 0.3

    config = None if backward else {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4,
                                    "num_stages": 1}
    out = attndsl.flex_attention(q, k, v, score_mod=score, kernel_options=config)
    m, n = torch.arange(40)[:, None], torch.arange(40)[None, :]
    q64, k64, v64 = (t.detach().double().requires_grad_(backward) for t in (q, k, v))
    s = (q64 @ k64.transpose(-1, -2)) * 0.25 - (m - n).double() * 0.3
    ref = torch.softmax(s, -1) @ v64
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    if backward:
        grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        out.backward(grad.float())
        ref.backward(grad)
        for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


# -- int64 constants wrap as torch's ----------------------------------------------------------

@pytest.mark.parametrize("op", [E.Op.NEG, E.Op.ABS])
def test_folding_negation_and_abs_of_int64_min_wraps_as_torch(op) -> None:
    """torch: -(-2**63) and abs(-2**63) are -2**63 in int64; the folded constant is too."""
    from attndsl.passes.rules import _fold_unary

    folded = _fold_unary(E.unary(op, E.const(-2**63)))
    want = int(torch.tensor(-2**63).neg() if op is E.Op.NEG else torch.tensor(-2**63).abs())
    assert folded is not None and folded.arg == want == -2**63


def test_a_printed_floor_division_of_two_int64_literals_wraps_as_torch() -> None:
    """-2**63 // -1 is -2**63 in torch's int64: the printed literal holds it (2**63 would not
    fit the kernel's int64 constant)."""
    from attndsl.codegen.expr import Env, render

    e = E.binary(E.Op.FLOORDIV, E.const(-2**63), E.const(-1))
    printed = render(e, Env({}, {}, {}, {}, {}))
    assert printed == "tl.full((), -9223372036854775808, tl.int64)", printed
