"""Tensors whose element offsets pass 2**31 are read in place, not refused and not wrapped.

Every generated kernel computes each program's (batch, head) base offset in int64 unless the
launcher proves every tensor spans fewer than 2**31 elements (the constexpr I32_BASES), and its
in-tile offsets in int64 unless it proves every (batch, head) slice does (I32_TILES;
codegen/writer.py).  These tests run the
real kernels in Triton's interpreter on views into one 4 GiB storage that is never written
outside the few slices they touch (the pages stay unallocated), against a float64 reference
on the same small values.  Without int64 offsets the interpreter reads at a wrapped, negative
offset (a crash, or another slice's numbers)."""

from __future__ import annotations

import pytest
import torch

import attndsl
from attndsl.runtime.gpu_report import record_launches

pytestmark = pytest.mark.big_offsets

CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
PAST = 2**31  # element offset every test reads past
L, D = 16, 16


@pytest.fixture(scope="module")
def storage() -> torch.Tensor:
    """2**31 + 1 Mi fp16 elements, untouched (sparse until written)."""
    try:
        return torch.empty(PAST + 2**20, dtype=torch.float16)
    except RuntimeError as err:  # no 4 GiB of address space here
        pytest.skip(f"cannot allocate the 4 GiB storage: {err}")


def _view(storage: torch.Tensor, shape: tuple, strides: tuple, values: torch.Tensor,
          offset: int = 0) -> torch.Tensor:
    """A view of ``storage`` holding ``values``, written element by slice (only its pages)."""
    t = storage.as_strided(shape, strides, offset)
    t.copy_(values.to(t.dtype))
    return t


def _reference(q, k, v, bias=None, causal=False) -> torch.Tensor:
    """Float64 softmax attention (scale 1/sqrt(D)), with an additive bias and a causal mask."""
    s = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    if bias is not None:
        s = s + bias.double()
    if causal:
        m, n = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
        s = s.masked_fill(n > m, float("-inf"))
    return torch.softmax(s, -1) @ v.double()


def _causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def _constexprs(q, k, v, **kwargs) -> dict:
    launch, = record_launches(lambda: attndsl.flex_attention(q, k, v, **kwargs))
    return launch.constexprs


def test_a_batch_starting_past_element_2_31_is_read_through_int64_base_offsets(
        storage: torch.Tensor) -> None:
    """K and V of 3 batches 2**30 + 64 elements apart: batch 2 starts past 2**31, each slice
    is small: int64 bases, int32 tile offsets."""
    gen = torch.Generator().manual_seed(1)
    q, k0, v0 = (torch.randn(3, 2, L, D, generator=gen).half() for _ in range(3))
    stride = (2**30 + 64, L * D, D, 1)
    k = _view(storage, (3, 2, L, D), stride, k0)
    v = _view(storage, (3, 2, L, D), stride, v0, offset=2 * L * D)
    kwargs = dict(mask_mod=_causal, kernel_options=dict(CONFIG))
    out = attndsl.flex_attention(q, k, v, **kwargs)
    torch.testing.assert_close(out.double(), _reference(q, k0, v0, causal=True),
                               atol=2e-3, rtol=2e-3)
    flags = _constexprs(q, k, v, **kwargs)
    assert (flags["I32_BASES"], flags["I32_TILES"]) == (False, True)


def test_one_slice_spanning_2_31_elements_runs_the_int64_tile_path(storage) -> None:
    """K rows 2**28 elements apart: row 8 of the one (batch, head) slice starts at 2**31, so
    its in-tile offsets need int64 (I32_TILES off); ragged L = 9 keys."""
    gen = torch.Generator().manual_seed(2)
    n = 9
    q = torch.randn(1, 1, L, D, generator=gen).half()
    k0, v0 = (torch.randn(1, 1, n, D, generator=gen).half() for _ in range(2))
    k = _view(storage, (1, 1, n, D), (n * 2**28, n * 2**28, 2**28, 1), k0)
    v = _view(storage, (1, 1, n, D), (n * D, n * D, D, 1), v0, offset=64)
    kwargs = dict(kernel_options=dict(CONFIG))
    out = attndsl.flex_attention(q, k, v, **kwargs)
    torch.testing.assert_close(out.double(), _reference(q, k0, v0), atol=2e-3, rtol=2e-3)
    assert _constexprs(q, k, v, **kwargs)["I32_TILES"] is False


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """``t`` (a view into the storage, same strides) as a leaf that requires grad."""
    return t.detach().requires_grad_()


def _gradients(q, k, v, run) -> tuple:
    """The output of ``run(q, k, v)`` and the gradients of a fixed weighting of it."""
    out = run(q, k, v)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    return (out,) + torch.autograd.grad((out.float() * weight).sum(), (q, k, v))


def _check_backward(big: tuple, small: tuple, run, causal: bool) -> None:
    """Gradients through ``run`` on the big views against float64 autograd on the values."""
    got = _gradients(*big, run)
    want = _gradients(*(t.detach().double().requires_grad_() for t in small),
                      lambda q, k, v: _reference(q, k, v, causal=causal))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("rows", [L * D, 2**28], ids=["batch-past-2-31", "slice-of-2-31"])
def test_the_flexattention_backward_reads_tensors_past_element_2_31(storage, rows) -> None:
    """Q, K and V of 3 batches, the last past 2**31; or K with rows 2**28 apart (its one
    slice reaches 2**31: int64 tile offsets).  dQ, dK, dV against float64 autograd."""
    gen = torch.Generator().manual_seed(3)
    b, n = (3, L) if rows == L * D else (1, 9)
    small = [torch.randn(b, 1, m, D, generator=gen).half() for m in (L, n, n)]
    batch = 2**30 + 64 if b == 3 else 0
    q = _view(storage, small[0].shape, (batch, L * D, D, 1), small[0], offset=4096)
    k = _view(storage, small[1].shape, (batch, rows * n, rows, 1), small[1])
    v = _view(storage, small[2].shape, (batch, n * D, D, 1), small[2], offset=8192)
    _check_backward(tuple(map(_leaf, (q, k, v))), tuple(small),
                    lambda q, k, v: attndsl.flex_attention(q, k, v, mask_mod=_causal),
                    causal=True)


@pytest.mark.parametrize("rows", [L * D, 2**28], ids=["batch-past-2-31", "slice-of-2-31"])
def test_the_fused_backward_reads_tensors_past_element_2_31(storage, rows) -> None:
    """The fused tile backward of a compiled kernel, on the same layouts."""
    kernel = attndsl.compile(score_mod=lambda s, b, h, q, kv: s)
    assert kernel.fused_backward is not None
    gen = torch.Generator().manual_seed(4)
    b, n = (3, L) if rows == L * D else (1, 9)
    small = [torch.randn(b, 1, m, D, generator=gen).half() for m in (L, n, n)]
    batch = 2**30 + 64 if b == 3 else 0
    q = _view(storage, small[0].shape, (batch, L * D, D, 1), small[0], offset=4096)
    k = _view(storage, small[1].shape, (batch, rows * n, rows, 1), small[1])
    v = _view(storage, small[2].shape, (batch, n * D, D, 1), small[2], offset=8192)

    def run(q, k, v):
        return kernel({"Q": q, "K": k, "V": v}, {"scale": D ** -0.5},
                      kernel_options=dict(CONFIG))["O"]

    _check_backward(tuple(map(_leaf, (q, k, v))), tuple(small), run, causal=False)


def test_a_captured_bias_past_element_2_31_is_read_forward_and_backward(storage) -> None:
    """score + bias[b, h, q, kv] with the bias's last batch past 2**31 (the forward reads it
    with int64 offsets: I32_INDICES off), and its gradient through the FlexAttention
    backward, which reads it there too."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(3, 1, L, D, generator=gen).half() for _ in range(3))
    bias0 = torch.randn(3, 1, L, L, generator=gen).half()
    bias = _leaf(_view(storage, (3, 1, L, L), (2**30 + 64, L * L, L, 1), bias0))

    def run(q, k, v, bias=bias, **kwargs):
        return attndsl.flex_attention(q, k, v, score_mod=lambda s, b, h, m, n: s + bias[b, h, m, n],
                                      **kwargs)

    fixed = bias.detach()  # kernel options need a launch without gradients
    out = run(q, k, v, fixed, kernel_options=dict(CONFIG))
    torch.testing.assert_close(out.double(), _reference(q, k, v, bias0), atol=2e-3, rtol=2e-3)
    assert _constexprs(q, k, v, score_mod=lambda s, b, h, m, n: s + fixed[b, h, m, n],
                       kernel_options=dict(CONFIG))["I32_INDICES"] is False
    weight = torch.randn(out.shape, generator=gen)
    got, = torch.autograd.grad((run(q, k, v).float() * weight).sum(), (bias,))
    ref_bias = bias0.double().requires_grad_()
    want, = torch.autograd.grad((_reference(q, k, v, ref_bias) * weight).sum(), (ref_bias,))
    torch.testing.assert_close(got.double(), want, atol=5e-3, rtol=5e-3)


def test_decode_reads_a_page_pool_past_element_2_31(storage) -> None:
    """A K/V page pool ("NPHD") whose pages lie 2**30 + 512 elements apart: the pool, viewed
    as one physical sequence, spans 2**31 (int64 tile offsets), and page 2 starts past it."""
    gen = torch.Generator().manual_seed(7)
    pages, page, heads = 3, 16, 2
    page_stride = 2**30 + 512  # 2**25 + 16 rows: pages start on 16-row blocks
    lengths = torch.tensor([20, 9])
    table = torch.tensor([[2, 0], [1, 1]])  # sequence 0 reads page 2 (past 2**31), then 0
    k_pool, v_pool = (storage.as_strided((pages, page, heads, D), (page_stride, heads * D, D, 1),
                                         offset) for offset in (0, page * heads * D))
    seqs = []
    for b, n in enumerate(lengths.tolist()):
        kv = [torch.randn(n, heads, D, generator=gen).half() for _ in range(2)]
        for i in range(-(-n // page)):  # write each logical page into its physical page
            rows = slice(i * page, min(n, (i + 1) * page))
            for pool, x in zip((k_pool, v_pool), kv, strict=True):
                pool[table[b, i], : rows.stop - rows.start].copy_(x[rows])
        seqs.append(kv)
    q = torch.randn(2, 4, 1, D, generator=gen).half()
    out = attndsl.decode(q, k_pool, v_pool, lengths, page_table=table)
    for b, (k, v) in enumerate(seqs):  # GQA: query heads 2h, 2h + 1 read kv head h
        k, v = (x.transpose(0, 1).repeat_interleave(2, 0)[None] for x in (k, v))
        torch.testing.assert_close(out[b:b + 1].double(), _reference(q[b:b + 1], k, v),
                                   atol=2e-3, rtol=2e-3)
