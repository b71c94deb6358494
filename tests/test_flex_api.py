"""attndsl.flex_attention as a drop-in for torch's: block masks, auxiliary outputs, scale,
strided inputs, GQA, kernel options, and the errors bad inputs and untraceable functions raise.

Numbers are checked against the float64 oracle (``attndsl.run_cascade``) or, for behaviour that
must not change the computation (layouts, block tables, GQA), against attndsl itself.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

import attndsl
from attndsl.api import AttentionError
from attndsl.passes.mask import MaskAnalysisError

Tensor = torch.Tensor
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
O_TOL = {torch.float32: (5e-5, 5e-5), torch.float16: (5e-3, 5e-3),
         torch.bfloat16: (3e-2, 3e-2)}
SCORE_TOL = (5e-5, 5e-5)  # lse and max_scores: float32 for every input dtype
LENGTHS = st.one_of(st.sampled_from([1, 31, 32, 33, 64, 65, 96]), st.integers(1, 96))
DOC_IDS = torch.sort(torch.randint(0, 4, (96,), generator=torch.Generator().manual_seed(0))).values
# Log-sum-exp of a fully masked row: the interpreter's numpy log(0) warns on its way to -inf.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log")


def causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return q_idx >= kv_idx


def band(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return (q_idx - kv_idx).abs() <= 20


def document(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return (DOC_IDS[q_idx] == DOC_IDS[kv_idx]) & (q_idx >= kv_idx)


def per_head(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return ((kv_idx + h + b) % 3 != 0) & (kv_idx <= q_idx + 8 * h)


MASKS = (causal, band, document, per_head)
BLOCK_SIZES = (32, 64, 128, (32, 64), (64, 32), (128, 64), (32, 128))


def qkv(B: int, H: int, Lq: int, Lkv: int, E: int = 32, F: int = 48, Hkv: int | None = None,
        dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hkv = H if Hkv is None else Hkv
    q = torch.randn(B, H, Lq, E, generator=gen)
    k = torch.randn(B, hkv, Lkv, E, generator=gen)
    v = torch.randn(B, hkv, Lkv, F, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def oracle(q: Tensor, k: Tensor, v: Tensor, score_mod: Callable | None = None,
           mask_mod: Callable | None = None, scale: float | None = None) -> dict[str, Tensor]:
    kernel = attndsl.compile(score_mod=score_mod, mask_mod=mask_mod)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return attndsl.run_cascade(kernel.compiled.cascade,
                               {"Q": q, "K": k, "V": v, **kernel.captured},
                               {"scale": scale, "G": q.shape[1] // k.shape[1]})


def assert_row_stats(got: Tensor, ref: Tensor) -> None:
    """lse / max_scores: -inf exactly where the oracle's is, close elsewhere, never NaN."""
    assert got.dtype == torch.float32 and not torch.isnan(got).any()
    empty = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(got), empty)
    torch.testing.assert_close(got.double()[~empty], ref[~empty], atol=SCORE_TOL[0],
                               rtol=SCORE_TOL[1])


def assert_output(got: Tensor, ref: Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and not torch.isnan(got).any()
    atol, rtol = O_TOL[dtype]
    torch.testing.assert_close(got.double(), ref, atol=atol, rtol=rtol)


# -- block masks ------------------------------------------------------------------------------

@given(mask=st.sampled_from(MASKS), block=st.sampled_from(BLOCK_SIZES), b=st.integers(1, 2),
       h=st.integers(1, 3), lq=LENGTHS, lkv=LENGTHS, broadcast=st.booleans())
def test_torch_block_mask_matches_mask_mod(mask: Callable, block: int | tuple[int, int], b: int,
                                           h: int, lq: int, lkv: int, broadcast: bool) -> None:
    """torch's BlockMask as block_mask= (alone, or with the same mask_mod=) == mask_mod= alone."""
    q, k, v = qkv(b, h, lq, lkv)
    bh = (None, None) if broadcast and mask is not per_head else (b, h)
    block_mask = create_block_mask(mask, *bh, lq, lkv, device="cpu", BLOCK_SIZE=block)
    want = attndsl.flex_attention(q, k, v, mask_mod=mask)
    for got in (attndsl.flex_attention(q, k, v, block_mask=block_mask),
                attndsl.flex_attention(q, k, v, block_mask=block_mask, mask_mod=mask)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert_output(want, oracle(q, k, v, mask_mod=mask)["O"], torch.float32)


def test_block_mask_of_any_block_size() -> None:
    q, k, v = qkv(1, 2, 70, 70)
    block_mask = create_block_mask(causal, 1, 2, 70, 70, device="cpu", BLOCK_SIZE=48)
    torch.testing.assert_close(attndsl.flex_attention(q, k, v, block_mask=block_mask),
                               attndsl.flex_attention(q, k, v, mask_mod=causal))


# -- auxiliary outputs, scale -------------------------------------------------------------------

@given(dtype=st.sampled_from(DTYPES), lq=LENGTHS, lkv=LENGTHS, mask=st.sampled_from(MASKS))
def test_lse_and_max_scores(dtype: torch.dtype, lq: int, lkv: int, mask: Callable) -> None:
    """return_lse and return_aux=AuxRequest(lse, max_scores) against the oracle's LSE and MAX;
    max_scores are the scores after scale and score_mod."""
    table = torch.randn(3, 96, generator=torch.Generator().manual_seed(2))

    def shifted(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return 2 * score + table[h, kv_idx]

    q, k, v = qkv(2, 3, lq, lkv, E=16, F=32, dtype=dtype)
    ref = oracle(q, k, v, shifted, mask)
    out, aux = attndsl.flex_attention(q, k, v, score_mod=shifted, mask_mod=mask,
                                      return_aux=attndsl.AuxRequest(lse=True, max_scores=True))
    assert_output(out, ref["O"], dtype)
    assert aux.lse.shape == aux.max_scores.shape == (2, 3, lq)
    assert_row_stats(aux.lse, ref["LSE"])
    assert_row_stats(aux.max_scores, ref["MAX"])
    plain = attndsl.flex_attention(q, k, v, score_mod=shifted, mask_mod=mask)
    out2, lse = attndsl.flex_attention(q, k, v, score_mod=shifted, mask_mod=mask,
                                       return_lse=True)
    assert torch.equal(plain, out) and torch.equal(out2, out) and torch.equal(lse, aux.lse)


def test_aux_request_fields_are_optional() -> None:
    q, k, v = qkv(1, 2, 33, 40)
    out, aux = attndsl.flex_attention(q, k, v, return_aux=attndsl.AuxRequest(max_scores=True))
    assert aux.lse is None and aux.max_scores.shape == (1, 2, 33)
    out, aux = attndsl.flex_attention(q, k, v, return_aux=attndsl.AuxRequest(lse=True))
    assert aux.max_scores is None and aux.lse.shape == (1, 2, 33)


@given(e=st.sampled_from([16, 32, 48, 80]), scale=st.floats(0.05, 2.0))
def test_scale(e: int, scale: float) -> None:
    """scale=None is 1/sqrt(E); an explicit scale multiplies q.k before score_mod."""
    q, k, v = qkv(1, 2, 40, 57, E=e)
    default = attndsl.flex_attention(q, k, v, mask_mod=band)
    assert torch.equal(default, attndsl.flex_attention(q, k, v, mask_mod=band, scale=None))
    assert torch.equal(default,
                       attndsl.flex_attention(q, k, v, mask_mod=band, scale=1 / math.sqrt(e)))
    out = attndsl.flex_attention(q, k, v, mask_mod=band, scale=scale)
    assert_output(out, oracle(q, k, v, mask_mod=band, scale=scale)["O"], torch.float32)


def test_scale_zero_averages_visible_values() -> None:
    q, k, v = qkv(1, 1, 50, 50)
    out = attndsl.flex_attention(q, k, v, mask_mod=causal, scale=0.0)
    mean = v[0, 0].cumsum(0) / torch.arange(1, 51).unsqueeze(1)
    torch.testing.assert_close(out[0, 0], mean, atol=1e-5, rtol=1e-5)


# -- layouts, GQA, kernel options ---------------------------------------------------------------

def strided(t: Tensor, layout: str) -> Tensor:
    """A view of ``t``'s values with another memory layout."""
    if layout == "transposed":  # stored (B, L, H, E)
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "sliced":  # every other element of a wider head dim, with a storage offset
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype)
        wide[..., 1::2] = t
        return wide[..., 1::2]
    if layout == "seq_minor":  # stored (B, H, E, L)
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "broadcast":  # batch expanded with stride 0
        return t[:1].expand_as(t) if t.shape[0] > 1 else t
    return t


LAYOUTS = ("contiguous", "transposed", "sliced", "seq_minor", "broadcast")


@given(layouts=st.tuples(*(st.sampled_from(LAYOUTS),) * 3), lq=LENGTHS, lkv=LENGTHS,
       dtype=st.sampled_from(DTYPES))
def test_strided_inputs(layouts: tuple[str, str, str], lq: int, lkv: int,
                        dtype: torch.dtype) -> None:
    """Any strides (transposes, slices, storage offsets, stride-0 batch) give the same result
    as the contiguous tensors."""
    views = [strided(t, lay) for t, lay in zip(qkv(2, 2, lq, lkv, dtype=dtype), layouts)]
    want = attndsl.flex_attention(*(t.contiguous() for t in views), mask_mod=document,
                                  return_lse=True)
    got = attndsl.flex_attention(*views, mask_mod=document, return_lse=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@given(hkv=st.integers(1, 2), group=st.sampled_from([2, 3]), lq=LENGTHS, lkv=LENGTHS,
       dtype=st.sampled_from(DTYPES))
def test_gqa_equals_repeated_heads(hkv: int, group: int, lq: int, lkv: int,
                                   dtype: torch.dtype) -> None:
    """enable_gqa: query head h reads key/value head h // G; score_mod and mask_mod see the
    query head."""

    def head_bias(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score - 0.25 * h * (q_idx - kv_idx).abs()

    q, k, v = qkv(2, hkv * group, lq, lkv, Hkv=hkv, dtype=dtype)
    got = attndsl.flex_attention(q, k, v, score_mod=head_bias, mask_mod=per_head,
                                 enable_gqa=True)
    want = attndsl.flex_attention(q, k.repeat_interleave(group, 1),
                                  v.repeat_interleave(group, 1), score_mod=head_bias,
                                  mask_mod=per_head)
    assert torch.equal(got, want)
    assert_output(got, oracle(q, k, v, head_bias, per_head)["O"], dtype)


def test_gqa_matches_torch() -> None:
    def head_bias(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score - 0.25 * h * (q_idx - kv_idx).abs()

    q, k, v = qkv(2, 4, 45, 70, Hkv=2)
    block_mask = create_block_mask(per_head, 2, 4, 45, 70, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        want = torch_flex_attention(q, k, v, score_mod=head_bias, block_mask=block_mask,
                                    enable_gqa=True)
    got = attndsl.flex_attention(q, k, v, score_mod=head_bias, block_mask=block_mask,
                                 enable_gqa=True)
    torch.testing.assert_close(got, want, atol=5e-5, rtol=5e-5)


@given(block_m=st.sampled_from([16, 32, 64, 128]), block_n=st.sampled_from([16, 32, 64, 128]),
       lq=LENGTHS, lkv=LENGTHS, with_block_mask=st.booleans())
def test_kernel_options(block_m: int, block_n: int, lq: int, lkv: int,
                        with_block_mask: bool) -> None:
    """BLOCK_M/BLOCK_N (and warps/stages, and torch's options attndsl ignores) change the
    tiling, not the result."""
    q, k, v = qkv(1, 2, lq, lkv)
    options = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 2, "num_stages": 1,
               "PRESCALE_QK": False, "ROWS_GUARANTEED_SAFE": False}
    block_mask = None
    if with_block_mask:
        block_mask = create_block_mask(document, 1, 2, lq, lkv, device="cpu", BLOCK_SIZE=128)
    out, lse = attndsl.flex_attention(q, k, v, mask_mod=document, block_mask=block_mask,
                                      kernel_options=options, return_lse=True)
    ref = oracle(q, k, v, mask_mod=document)
    assert_output(out, ref["O"], torch.float32)
    assert_row_stats(lse, ref["LSE"])


def test_kernel_option_not_a_power_of_two() -> None:
    q, k, v = qkv(1, 1, 40, 40)
    with pytest.raises(AttentionError, match="BLOCK_N"):
        attndsl.flex_attention(q, k, v, kernel_options={"BLOCK_N": 24})


@pytest.mark.parametrize("options", [{"BLOCK_M": 32.5}, {"BLOCK_N": "32"}, {"num_warps": 4.0},
                                     {"num_stages": True}, {"USE_TMA": "false"}, {"tma": 0}])
def test_kernel_options_of_the_wrong_type_are_refused_not_truncated(options: dict) -> None:
    """int() turned 32.5 into 32 and "32" into 32, and bool("false") is True: each ran a
    launch other than the one asked for.  Integer options take integers, the load option
    True, False or None."""
    q, k, v = qkv(1, 1, 40, 40)
    (name, value), = options.items()
    with pytest.raises(AttentionError, match=f"kernel option {name}={value!r}"):
        attndsl.flex_attention(q, k, v, kernel_options=options)


def test_integer_like_kernel_options_are_taken() -> None:
    import numpy as np

    q, k, v = qkv(1, 1, 40, 40)
    out = attndsl.flex_attention(q, k, v, kernel_options={"BLOCK_M": np.int64(32),
                                                          "tma": False})
    torch.testing.assert_close(out, attndsl.flex_attention(q, k, v), atol=1e-5, rtol=1e-5)


# -- captured tensors and integer semantics ----------------------------------------------------

def test_captured_tensors_indexed_by_batch_and_head_only() -> None:
    """Loads whose address is the same for the whole tile (b, h, or no index at all)."""
    gen = torch.Generator().manual_seed(3)
    per_b, per_h, scalar = torch.randn(2, generator=gen), torch.randn(3, generator=gen), \
        torch.tensor(0.7)
    limits = torch.tensor([5, 30, 60])

    def bias(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score * scalar + per_b[b] + per_h[h] * (kv_idx - q_idx)

    def window(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (q_idx - kv_idx).abs() <= limits[h]

    q, k, v = qkv(2, 3, 45, 70)
    out, lse = attndsl.flex_attention(q, k, v, score_mod=bias, mask_mod=window, return_lse=True)
    ref = oracle(q, k, v, bias, window)
    assert_output(out, ref["O"], torch.float32)
    assert_row_stats(lse, ref["LSE"])


CAPTURED_DTYPES = [
    torch.float64,
    torch.float16,
    torch.bfloat16,
]


@pytest.mark.parametrize("dtype", CAPTURED_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_captured_float_dtypes(dtype: torch.dtype) -> None:
    """A captured bias of any float dtype is added to float32 scores in float32."""
    bias = torch.randn(2, 3, 45, 70, generator=torch.Generator().manual_seed(4)).to(dtype)

    def full_bias(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score + bias[b, h, q_idx, kv_idx]

    q, k, v = qkv(2, 3, 45, 70)
    assert_output(attndsl.flex_attention(q, k, v, score_mod=full_bias),
                  oracle(q, k, v, score_mod=full_bias)["O"], torch.float32)


def test_large_float16_bias() -> None:
    """-60000 (finite in float16) on every key shifts the scores; it masks nothing (float32
    resolves scores near -60000 to about 0.004, hence the tolerance)."""
    bias = torch.full((40, 50), -60000.0, dtype=torch.float16)

    def shift(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score + bias[q_idx, kv_idx]

    q, k, v = qkv(1, 2, 40, 50)
    torch.testing.assert_close(attndsl.flex_attention(q, k, v, score_mod=shift),
                               attndsl.flex_attention(q, k, v), atol=2e-2, rtol=2e-2)


def test_captured_strides_and_integer_dtypes() -> None:
    """Transposed and stride-0 captured tensors; int32 / uint8 / bool tables in a mask."""
    gen = torch.Generator().manual_seed(5)
    transposed = torch.randn(2, 3, 70, 45, generator=gen).transpose(2, 3)
    expanded = torch.randn(1, 1, 1, 70, generator=gen).expand(2, 3, 45, 70)
    groups = torch.randint(0, 3, (70,), generator=gen, dtype=torch.int32)
    keep = torch.rand(70, generator=gen) < 0.8
    keep_u8 = (torch.rand(45, generator=gen) < 0.9).to(torch.uint8)

    def bias(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score + transposed[b, h, q_idx, kv_idx] - expanded[b, h, q_idx, kv_idx]

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (groups[kv_idx] != h) & keep[kv_idx] & (keep_u8[q_idx] == 1)

    q, k, v = qkv(2, 3, 45, 70)
    out, lse = attndsl.flex_attention(q, k, v, score_mod=bias, mask_mod=mask_mod,
                                      return_lse=True)
    ref = oracle(q, k, v, bias, mask_mod)
    assert_output(out, ref["O"], torch.float32)
    assert_row_stats(lse, ref["LSE"])


def test_empty_lengths() -> None:
    """No queries: empty outputs.  No keys: every row is fully masked (0, lse -inf)."""
    q, k, v = qkv(2, 2, 30, 40)
    out, lse = attndsl.flex_attention(q[:, :, :0], k, v, return_lse=True)
    assert out.shape == (2, 2, 0, 48) and lse.shape == (2, 2, 0)
    out, lse = attndsl.flex_attention(q, k[:, :, :0], v[:, :, :0], mask_mod=causal,
                                      return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize(("lq", "lkv"), [(0, 40), (30, 0)])
def test_oracle_of_empty_lengths(lq: int, lkv: int) -> None:
    q, k, v = qkv(1, 1, lq, lkv)
    ref = oracle(q, k, v, mask_mod=causal)
    assert ref["O"].shape == (1, 1, lq, 48) and (ref["O"] == 0).all()
    assert torch.isneginf(ref["LSE"]).all()


@given(divisor=st.sampled_from([-7, -4, -2, 2, 3, 5]), offset=st.integers(-3, 3))
def test_floor_division_and_modulo_of_negatives(divisor: int, offset: int) -> None:
    """// and % floor like Python and torch, also for negative operands."""

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        rel = q_idx - kv_idx
        return ((rel % divisor) == offset % divisor) | ((rel // divisor) == offset)

    q, k, v = qkv(1, 1, 40, 60)
    block_mask = create_block_mask(mask_mod, 1, 1, 40, 60, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        want = torch_flex_attention(q, k, v, block_mask=block_mask)
    got = attndsl.flex_attention(q, k, v, mask_mod=mask_mod)
    torch.testing.assert_close(got, want, atol=5e-5, rtol=5e-5)


def test_oracle_lse_of_large_scores() -> None:
    def shift(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score - 1000.0

    q, k, v = qkv(1, 1, 4, 8)
    _, lse = attndsl.flex_attention(q, k, v, return_lse=True)
    _, shifted = attndsl.flex_attention(q, k, v, score_mod=shift, return_lse=True)
    torch.testing.assert_close(shifted, lse - 1000.0)
    assert_row_stats(shifted, oracle(q, k, v, score_mod=shift)["LSE"])


# -- errors ---------------------------------------------------------------------------------------

def _bad_calls() -> list:
    q, k, v = qkv(2, 4, 40, 70)
    old_mask = create_block_mask(causal, 2, 4, 64, 64, device="cpu")
    cases = {
        "rank": ((q[0], k, v), {}, ["query must have shape (B, H, L, E)", "(4, 40, 32)"]),
        "batch": ((q, k[:1], v[:1]), {}, ["batch sizes differ", "query 2, key 1"]),
        "dtype": ((q.half(), k, v), {}, ["must share a dtype", "torch.float16"]),
        "float64": ((q.double(), k.double(), v.double()), {},
                    ["dtype torch.float64", "float16, bfloat16 or float32"]),
        "head_dim_8": ((q[..., :8], k[..., :8], v), {}, ["head dim is 8", "16 to 256"]),
        "head_dim_512": ((q, k, v.repeat(1, 1, 1, 11)[..., :512]), {},
                         ["value head dim is 512", "16 to 256"]),
        "qk_dims": ((q, k[..., :16], v), {}, ["query head dim 32 != key head dim 16"]),
        "kv_length": ((q, k, v[:, :, :50]), {}, ["must agree on heads and length"]),
        "groups": ((q[:, :3], k[:, :2], v[:, :2]), {"enable_gqa": True},
                   ["3 query heads are not a multiple of 2 key/value heads"]),
        "gqa_off": ((q, k[:, :2], v[:, :2]), {}, ["enable_gqa=True", "4 heads", "have 2"]),
        "block_mask_lengths": ((q, k, v), {"block_mask": old_mask},
                               ["(Q_LEN, KV_LEN) = (64, 64)", "(40, 70)"]),
        "not_a_block_mask": ((q, k, v), {"block_mask": causal},
                             ["block_mask must be a BlockMask"]),
        "kernel_option": ((q, k, v), {"kernel_options": {"BLOCK_Q": 32}},
                          ["unknown kernel option 'BLOCK_Q'", "BLOCK_M"]),
        "not_a_tensor": ((q.tolist(), k, v), {}, ["query must be a torch.Tensor", "list"]),
        "device": ((q, k.to("meta"), v), {}, ["must be on one device", "meta"]),
    }
    return [pytest.param(args, kwargs, parts, id=name)
            for name, (args, kwargs, parts) in cases.items()]


@pytest.mark.parametrize(("args", "kwargs", "parts"), _bad_calls())
def test_bad_inputs(args: tuple, kwargs: dict, parts: list[str]) -> None:
    with pytest.raises(AttentionError) as info:
        attndsl.flex_attention(*args, **kwargs)
    for part in parts:
        assert part in str(info.value)


def data_dependent_if(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor,
                      kv_idx: Tensor) -> Tensor:
    if score > 0:  # line: data_dependent_if
        return score
    return -score


def in_place(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return score.add_(1)  # line: in_place


def unsupported_op(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return torch.cumsum(score, 0)  # line: unsupported_op


def python_float(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return math.exp(score)  # line: python_float


def integer_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return q_idx - kv_idx  # line: integer_mask


def boolean_score(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return q_idx >= kv_idx  # line: boolean_score


def line_of(fn: Callable) -> str:
    """'file:line' of the line of ``fn`` tagged '# line: <name>'."""
    lines, start = inspect.getsourcelines(fn)
    offset = next(i for i, text in enumerate(lines) if f"# line: {fn.__name__}" in text)
    return f"{inspect.getsourcefile(fn)}:{start + offset}"


@pytest.mark.parametrize(("fn", "kind", "what"), [
    (data_dependent_if, "score_mod", "data-dependent Python control flow"),
    (in_place, "score_mod", "in-place operation .add_()"),
    (unsupported_op, "score_mod", "torch operation 'cumsum' is not supported"),
    (python_float, "score_mod", "converted to a Python float"),
], ids=lambda x: getattr(x, "__name__", None))
def test_untraceable_body(fn: Callable, kind: str, what: str) -> None:
    """The error names the function, the operation and the offending line."""
    q, k, v = qkv(1, 1, 8, 8)
    with pytest.raises(attndsl.TraceError) as info:
        attndsl.flex_attention(q, k, v, **{kind: fn})
    message = str(info.value)
    assert f"cannot trace {fn.__name__}" in message and what in message
    assert line_of(fn) in message


@pytest.mark.parametrize(("fn", "kind", "what"), [
    (integer_mask, "mask_mod", "mask_mod must return a boolean"),
    (boolean_score, "score_mod", "did you mean to pass it as mask_mod?"),
], ids=lambda x: getattr(x, "__name__", None))
def test_wrong_return_type(fn: Callable, kind: str, what: str) -> None:
    q, k, v = qkv(1, 1, 8, 8)
    with pytest.raises(attndsl.TraceError) as info:
        attndsl.flex_attention(q, k, v, **{kind: fn})
    assert f"cannot trace {fn.__name__}" in str(info.value) and what in str(info.value)


@pytest.mark.parametrize("fn", [integer_mask, boolean_score], ids=lambda f: f.__name__)
def test_wrong_return_type_names_the_line(fn: Callable) -> None:
    q, k, v = qkv(1, 1, 8, 8)
    kind = "mask_mod" if fn is integer_mask else "score_mod"
    with pytest.raises(attndsl.TraceError) as info:
        attndsl.flex_attention(q, k, v, **{kind: fn})
    assert line_of(fn) in str(info.value)


def test_inference_under_torch_compile_fullgraph() -> None:
    """A forward-only call inside torch.compile(fullgraph=True) runs as custom ops."""
    def model(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attndsl.flex_attention(q, k, v, mask_mod=causal) * 2

    q, k, v = qkv(1, 2, 40, 40)
    with torch.no_grad():
        got = torch.compile(model, fullgraph=True)(q, k, v)
        want = model(q, k, v)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("q_len", "kv_len", "block"), [(0, 5, 128), (5, 0, 128), (0, 0, 128),
                                                        (0, 300, (32, 64)), (300, 0, 16)])
def test_a_block_mask_of_an_empty_length_has_torchs_empty_tables(q_len, kv_len, block):
    """torch builds a BlockMask with Q_LEN or KV_LEN 0 (an empty block grid); attndsl refused
    it ('must be a positive int') although flex_attention takes empty lengths.  The tables
    equal torch's, and the mask runs forward and backward (0 out, zero gradients: the
    custom op's table arguments had read an empty table back as a missing one)."""
    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    ours = attndsl.create_block_mask(causal, 2, 3, q_len, kv_len, device="cpu",
                                     BLOCK_SIZE=block)
    theirs = create_block_mask(causal, 2, 3, q_len, kv_len, device="cpu", BLOCK_SIZE=block)
    assert ours.shape == theirs.shape == (2, 3, q_len, kv_len)
    for got, want in zip(ours.as_tuple()[2:10], theirs.as_tuple()[2:10], strict=True):
        assert got.shape == want.shape and torch.equal(got, want)
    assert ours.sparsity() == 100.0  # no block computed (torch divides 0 by 0 here)
    q = torch.randn(2, 3, q_len, 16, requires_grad=True)
    k = torch.randn(2, 3, kv_len, 16, requires_grad=True)
    out = attndsl.flex_attention(q, k, k, block_mask=ours)
    assert out.shape == (2, 3, q_len, 16) and not out.any()
    out.sum().backward()
    assert not q.grad.any() and not k.grad.any()


def test_a_negative_block_mask_length_is_refused_by_name():
    with pytest.raises(MaskAnalysisError, match="KV_LEN must be an int >= 0, got -1"):
        attndsl.create_block_mask(lambda b, h, q, k: k <= q, 1, 1, 4, -1)
