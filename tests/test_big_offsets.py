"""Tensors whose element offsets pass 2**31 are read in place, not refused and not wrapped.

Every generated kernel computes each program's (batch, head) base offset in int64, and its
in-tile offsets in int32 unless the launcher finds a (batch, head) slice reaching 2**31, when
it sets the constexpr I64_TILES (codegen/writer.py ``widen_strides``).  These tests run the
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
    is small (int32 tile offsets, I64_TILES off)."""
    gen = torch.Generator().manual_seed(1)
    q, k0, v0 = (torch.randn(3, 2, L, D, generator=gen).half() for _ in range(3))
    stride = (2**30 + 64, L * D, D, 1)
    k = _view(storage, (3, 2, L, D), stride, k0)
    v = _view(storage, (3, 2, L, D), stride, v0, offset=2 * L * D)
    kwargs = dict(mask_mod=_causal, kernel_options=dict(CONFIG))
    out = attndsl.flex_attention(q, k, v, **kwargs)
    torch.testing.assert_close(out.double(), _reference(q, k0, v0, causal=True),
                               atol=2e-3, rtol=2e-3)
    assert _constexprs(q, k, v, **kwargs)["I64_TILES"] is False


def test_one_slice_spanning_2_31_elements_runs_the_int64_tile_path(storage) -> None:
    """K rows 2**28 elements apart: row 8 of the one (batch, head) slice starts at 2**31, so
    its in-tile offsets need int64 (the launch sets I64_TILES); ragged L = 9 keys."""
    gen = torch.Generator().manual_seed(2)
    n = 9
    q = torch.randn(1, 1, L, D, generator=gen).half()
    k0, v0 = (torch.randn(1, 1, n, D, generator=gen).half() for _ in range(2))
    k = _view(storage, (1, 1, n, D), (n * 2**28, n * 2**28, 2**28, 1), k0)
    v = _view(storage, (1, 1, n, D), (n * D, n * D, D, 1), v0, offset=64)
    kwargs = dict(kernel_options=dict(CONFIG))
    out = attndsl.flex_attention(q, k, v, **kwargs)
    torch.testing.assert_close(out.double(), _reference(q, k0, v0), atol=2e-3, rtol=2e-3)
    assert _constexprs(q, k, v, **kwargs)["I64_TILES"] is True
