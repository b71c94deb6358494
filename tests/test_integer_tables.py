"""Integer tables captured in any integer dtype: a read is computed in its table's dtype where
that is exact and widened where it is not (codegen.expr._widen).

Compared only (``doc[q] == doc[kv]``, ``ids[q] <= kv``), a read keeps its dtype: each operand
is exact and Triton compares an int32 with an int64 in int64.  Under integer arithmetic
(``doc[q] - doc[kv]``) an int32 read is widened like any int32 value, or the difference of ids
near +-2^31 wraps.  Every answer is the float64 oracle's (``attndsl.run_cascade``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import attndsl
from attndsl.runtime.gpu_report import record_launches

Tensor = torch.Tensor
CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
L = 40  # two and a half key tiles: masked, unmasked and ragged tiles
BIG = 2**31 - 1


def _qkv() -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(3)
    return tuple(torch.randn(1, 2, L, 16, generator=gen) for _ in range(3))


def _oracle(score_mod: Callable | None, mask_mod: Callable | None) -> Tensor:
    q, k, v = _qkv()
    kernel = attndsl.compile(score_mod=score_mod, mask_mod=mask_mod)
    return attndsl.run_cascade(kernel.compiled.cascade,
                               {"Q": q, "K": k, "V": v, **kernel.captured},
                               {"scale": 1.0 / math.sqrt(16), "G": 1})["O"]


def _check(score_mod: Callable | None = None, mask_mod: Callable | None = None) -> str:
    """The kernel's output against the oracle's; returns the generated module's source."""
    q, k, v = _qkv()
    run = lambda: attndsl.flex_attention(q, k, v, score_mod=score_mod,  # noqa: E731
                                         mask_mod=mask_mod, kernel_options=dict(CONFIG))
    torch.testing.assert_close(run().double(), _oracle(score_mod, mask_mod).double(),
                               atol=2e-5, rtol=2e-5)
    launch, = record_launches(run)
    return Path(inspect.getsourcefile(launch.fn)).read_text()


def _extreme_ids(dtype: torch.dtype) -> Tensor:
    """Sorted document ids at both ends of int32: -2^31, -2^31 + 1, 0, 2^31 - 2, 2^31 - 1."""
    ids = torch.tensor([-2**31] * 9 + [-2**31 + 1] * 7 + [0] * 8 + [BIG - 1] * 9 + [BIG] * 7)
    return ids.to(dtype)


def _document(q_doc: Tensor, kv_doc: Tensor) -> Callable:
    def document(b, h, q_idx, kv_idx):
        return (q_doc[q_idx] == kv_doc[kv_idx]) & (q_idx >= kv_idx)
    return document


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_a_document_mask_over_ids_at_both_ends_of_int32_gives_the_oracles_attention(
        dtype: torch.dtype) -> None:
    """doc[q] == doc[kv] over int32 and int64 tables holding -2^31 .. 2^31 - 1."""
    ids = _extreme_ids(dtype)
    _check(mask_mod=_document(ids, ids))


def test_mixed_int32_and_int64_tables_compare_without_truncating_the_int64_ids() -> None:
    """int32 query ids against int64 key ids that differ from them by 2^32 (equal if either
    were truncated to int32): only the ids that are really equal match."""
    q_doc = _extreme_ids(torch.int32)
    kv_doc = _extreme_ids(torch.int64) + torch.where(torch.arange(L) % 3 == 0, 2**32, 0)
    _check(mask_mod=_document(q_doc, kv_doc))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_arithmetic_on_int32_ids_is_widened_and_does_not_wrap(dtype: torch.dtype) -> None:
    """doc[q] - doc[kv] over ids at both ends of int32 is outside int32 (up to 2^32 - 1): the
    mask (difference >= 0) and a score term ((difference > 2^31) as a bias) are torch's."""
    ids = _extreme_ids(dtype)[torch.randperm(L, generator=torch.Generator().manual_seed(1))]

    def mask_mod(b, h, q_idx, kv_idx):
        return ids[q_idx] - ids[kv_idx] >= 0

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + (ids[q_idx] - ids[kv_idx] > 2**31) * 1.5

    _check(score_mod, mask_mod)


def test_a_read_compared_with_an_index_expression_is_compared_in_its_dtype() -> None:
    """ids[q] <= kv // 2 (a read against integer index math) converts neither side to int64:
    the mask line of the key-tile step holds no int64 conversion, and the answer is right
    for ids beyond int32 (int64 table) too."""
    for ids in (torch.arange(L, dtype=torch.int32) // 3,
                torch.arange(L, dtype=torch.int64) // 3 - 2**40 * (torch.arange(L) % 2)):
        def mask_mod(b, h, q_idx, kv_idx, ids=ids):
            return ids[q_idx] <= kv_idx // 2

        source = _check(mask_mod=mask_mod)
        keep = [ln for ln in source.splitlines() if ln.strip().startswith("keep = (")]
        assert keep and not any("int64" in ln for ln in keep), keep


@pytest.mark.parametrize("dtype, bound", [(torch.int8, 300), (torch.uint8, -1),
                                          (torch.int16, -40000), (torch.int32, 2**40)])
def test_a_narrow_table_compared_with_a_constant_outside_its_dtype_gives_the_oracles_attention(
        dtype: torch.dtype, bound: int) -> None:
    """ids[q] < c and ids[kv] != c with c outside the table's dtype (300 for int8, -1 for
    uint8): the constant is a typed scalar the read is promoted with, not a Python int cast
    to the read's dtype (out of range: Triton refuses it)."""
    ids = (torch.arange(L) % 7).to(dtype)

    def mask_mod(b, h, q_idx, kv_idx):
        return (ids[q_idx] < bound) != (ids[kv_idx] == bound) | (ids[kv_idx] <= ids[q_idx])

    _check(mask_mod=mask_mod)


def test_the_backward_widens_arithmetic_on_int32_ids_too() -> None:
    """The fused backward prints the same expressions: dQ, dK and dV of the score
    (doc[q] - doc[kv] > 2^31) * 1.5 over int32 ids at both ends of int32 are torch's float64
    gradients of the int64 difference."""
    ids = _extreme_ids(torch.int32)[torch.randperm(L, generator=torch.Generator().manual_seed(1))]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + (ids[q_idx] - ids[kv_idx] > 2**31) * 1.5

    q, k, v = (t.requires_grad_() for t in _qkv())
    out = attndsl.flex_attention(q, k, v, score_mod=score_mod)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    wide = ids.long()
    bias = ((wide[:, None] - wide[None, :]) > 2**31).double() * 1.5
    ref = torch.softmax(qd @ kd.transpose(-1, -2) * 0.25 + bias, -1) @ vd
    want = torch.autograd.grad(ref.sum(), (qd, kd, vd))
    for got, exp in zip(grads, want, strict=True):
        torch.testing.assert_close(got.double(), exp, atol=1e-4, rtol=1e-4)


def _launch(mask_mod: Callable) -> tuple[str, dict]:
    """(the generated module's source, the launch's constexprs) of a masked flex attention."""
    q, k, v = _qkv()
    launch, = record_launches(lambda: attndsl.flex_attention(
        q, k, v, mask_mod=mask_mod, kernel_options=dict(CONFIG)))
    return Path(inspect.getsourcefile(launch.fn)).read_text(), launch.constexprs


def test_int64_ids_that_fit_int32_are_compared_in_int32_and_ids_beyond_it_in_int64() -> None:
    """doc[q] == doc[kv] over an int64 table: an int64 equality is two compares per element
    on the GPU (sm90 document D=64 masked loop 544 instructions against 520).  The compared
    reads are in narrow_ranges, so the launch sets I32_INDICES, and the mask compares in
    int32, only when every id fits int32; ids 2^32 apart keep I32_INDICES off (int64, not
    truncated to equal ids), and both answers are the oracle's."""
    small = _extreme_ids(torch.int64)
    source, consts = _launch(_document(small, small))
    keep, = [ln for ln in source.splitlines() if ln.strip().startswith("keep = (")]
    assert keep.count(".to(tl.int32) if I32_INDICES else") == 2, keep
    assert consts["I32_INDICES"] is True
    _check(mask_mod=_document(small, small))
    wide = small + torch.where(torch.arange(L) % 3 == 0, 2**32, 0)
    _, consts = _launch(_document(wide, wide))
    assert consts["I32_INDICES"] is False
    _check(mask_mod=_document(wide, wide))
