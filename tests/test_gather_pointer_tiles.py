"""Captured-table reads linear in the key index (``table[h, q - kv + c]``) are read through a
pointer tile made once before the key loops and moved by a scalar per key tile
(codegen.triton._Gather): the answer stays the float64 oracle's for every layout, length and
sparsity path, and a read that is not linear keeps the per-element subscript."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

import attndsl
from attndsl.runtime.gpu_report import record_launches

CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}


def _run(subscript, table: torch.Tensor, lq: int, lkv: int, mask_mod=None,
         block_mask=None) -> tuple[torch.Tensor, torch.Tensor, str, dict]:
    """flex attention with ``score + table[h, subscript(q, kv)]``: the output, the float64
    reference, the generated module's source and the launch's constexprs."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(1, 2, lq, 16, generator=gen)
    k, v = (torch.randn(1, 2, lkv, 16, generator=gen) for _ in range(2))

    def bias(score, b, h, q_idx, kv_idx):
        return score + table[h, subscript(q_idx, kv_idx)]

    kwargs = dict(score_mod=bias, mask_mod=mask_mod, block_mask=block_mask,
                  kernel_options=dict(CONFIG))
    out = attndsl.flex_attention(q, k, v, **kwargs)
    launch, = record_launches(lambda: attndsl.flex_attention(q, k, v, **kwargs))
    m, n = torch.arange(lq)[:, None], torch.arange(lkv)[None, :]
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.25 + \
        table.double()[torch.arange(2)[:, None, None], subscript(m, n)][None]
    if mask_mod is not None:
        s = s.masked_fill(~mask_mod(0, 0, m, n), float("-inf"))
    ref = torch.softmax(s, -1) @ v.double()
    source = Path(inspect.getsourcefile(launch.fn)).read_text()
    return out, ref, source, launch.constexprs


@pytest.mark.parametrize("lq, lkv", [(64, 64), (45, 37)])
def test_a_relative_bias_read_through_a_pointer_tile_gives_the_oracles_attention(
        lq: int, lkv: int) -> None:
    """table[h, q - kv + lkv - 1], full and ragged tiles: the pointer tile is made in the
    kernel scope and the answer is torch's."""
    table = torch.randn(2, lq + lkv - 1, generator=torch.Generator().manual_seed(2))
    out, ref, source, consts = _run(lambda q, kv: q - kv + (lkv - 1), table, lq, lkv)
    assert "    gather_0 = " in source and "tl.load(gather_0 + " in source
    assert consts["I32_INDICES"] is True
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_a_key_coefficient_other_than_one_and_a_transposed_table_give_the_oracles_attention(
        ) -> None:
    """table[h, 2 kv - q + 63] on a table stored transposed (the subscripted dim's stride is
    not 1): the pointer tile moves by 2 * start_n * stride per key tile."""
    table = torch.randn(192, 2, generator=torch.Generator().manual_seed(4)).t()
    out, ref, source, _ = _run(lambda q, kv: 2 * kv - q + 63, table, 64, 64)
    assert "gather_0" in source
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_a_block_mask_that_skips_key_tiles_moves_the_pointer_tile_to_each_visited_tile(
        ) -> None:
    """Causal with a block mask: the visited key tiles are not contiguous from 0, so each
    tile's pointer is the tile at key 0 moved by its own start (no carried state)."""
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    block_mask = attndsl.create_block_mask(causal, 1, 2, 96, 96, device="cpu",
                                           BLOCK_SIZE=32)
    table = torch.randn(2, 191, generator=torch.Generator().manual_seed(6))
    out, ref, source, consts = _run(lambda q, kv: q - kv + 95, table, 96, 96, causal,
                                    block_mask)
    assert "gather_0" in source and consts["SPARSITY"] == 2
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_a_subscript_not_linear_in_the_key_index_keeps_the_per_element_read() -> None:
    """table[h, (q - kv) // 2 + 32] is not linear in kv: no pointer tile, still torch's."""
    table = torch.randn(2, 64, generator=torch.Generator().manual_seed(8))
    out, ref, source, _ = _run(lambda q, kv: (q - kv) // 2 + 32, table, 64, 64)
    assert "gather_0" not in source
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_a_negative_subscript_reads_through_torchs_wrap_not_the_pointer_tile() -> None:
    """table[h, q - kv] is negative above the diagonal: the pointer tile drops the wrap, so
    the launch takes the per-element read (NONNEG_SUBSCRIPTS False) and wraps as torch."""
    table = torch.randn(2, 64, generator=torch.Generator().manual_seed(9))
    out, ref, source, consts = _run(lambda q, kv: q - kv, table, 64, 64)
    assert "if NONNEG_SUBSCRIPTS else" in source and consts["NONNEG_SUBSCRIPTS"] is False
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_a_pointer_tile_term_whose_offset_leaves_int32_turns_the_int32_indices_off() -> None:
    """_gathers_fit: a term times its stride of 2^31 or more is not computed in int32."""
    table = torch.randn(2, 127, generator=torch.Generator().manual_seed(2))
    _, _, source, _ = _run(lambda q, kv: q - kv + 63, table, 64, 64)
    module: dict = {}
    exec(compile(source, "<generated>", "exec"), module)  # noqa: S102 - our own output
    strides = module["STRIDES"]
    ptr, dim, _, _ = module["GATHERS"][0]
    args = {s: 1 for stride in strides.values() for s in stride}
    pieces = [(ptr, dim, (0, 63))]
    assert module["_gathers_fit"](args, pieces, 64 + 16)
    args[strides[ptr][dim]] = 2**31 // 64
    assert not module["_gathers_fit"](args, pieces, 64 + 16)


def test_a_pointer_tiles_key_column_term_is_its_first_addition() -> None:
    """The key column term (c * arange(BLOCK_N) * stride) is added to the pointer first: added
    last, LLVM rebuilt the column of a thread's first element apart from the others', and
    each key tile moved two bases instead of one (sm90 relative bias D=64 loop 435 -> 433)."""
    table = torch.randn(2, 127, generator=torch.Generator().manual_seed(2))
    out, ref, source, _ = _run(lambda q, kv: q - kv + 63, table, 64, 64)
    line, = [ln.strip() for ln in source.splitlines() if ln.strip().startswith("gather_0 = ")]
    first = line.split(" = ", 1)[1].split(" + ")[1]
    assert "tl.arange(0, BLOCK_N)" in first, line
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def _document_case(ids_q: torch.Tensor, ids_kv: torch.Tensor, strict: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """flex attention under ``doc[q] == doc[kv] & q >= kv`` (``q > kv`` when ``strict``): the
    output and lse, the float64 reference's, and the generated module's source."""
    lq, lkv = len(ids_q), len(ids_kv)
    gen = torch.Generator().manual_seed(lq * 131 + lkv)
    q = torch.randn(1, 2, lq, 16, generator=gen)
    k, v = (torch.randn(1, 2, lkv, 16, generator=gen) for _ in range(2))

    def document(b, h, q_idx, kv_idx):
        order = q_idx > kv_idx if strict else q_idx >= kv_idx
        return (ids_q[q_idx] == ids_kv[kv_idx]) & order

    options = dict(CONFIG)
    out, lse = attndsl.flex_attention(q, k, v, mask_mod=document, return_lse=True,
                                      kernel_options=options)
    launch, = record_launches(lambda: attndsl.flex_attention(
        q, k, v, mask_mod=document, kernel_options=options))
    m, n = torch.arange(lq)[:, None], torch.arange(lkv)[None, :]
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.25
    s = s.masked_fill(~document(0, 0, m, n), float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    ref = torch.nan_to_num(torch.softmax(s, -1)) @ v.double()
    return out, lse, ref, ref_lse, Path(inspect.getsourcefile(launch.fn)).read_text()


@pytest.mark.parametrize("lq, lkv, dtype, sort", [
    (64, 64, torch.int32, True), (45, 37, torch.int64, True), (37, 53, torch.int32, False),
    (80, 80, torch.int64, False)])
def test_a_mask_reading_gathered_ids_keeps_its_causal_pair_relative_to_the_key_tile(
        lq: int, lkv: int, dtype: torch.dtype, sort: bool) -> None:
    """doc[q] == doc[kv] & q >= kv: doc[q] is a row value hoisted above the key loop and
    doc[kv] a gathered pointer tile, neither a per-element read of the indices, so the causal
    pair is still read on the rows relative to start_n (``offs_m_rel``) against the constant
    columns.  Sorted ids (documents) and unsorted ones (the mask alone), ragged lengths."""
    gen = torch.Generator().manual_seed(lq + lkv)
    ids_q = torch.randint(0, 4, (lq,), generator=gen).to(dtype)
    ids_kv = torch.randint(0, 4, (lkv,), generator=gen).to(dtype)
    if sort:
        ids_q, ids_kv = ids_q.sort().values, ids_kv.sort().values
    out, lse, ref, ref_lse, source = _document_case(ids_q, ids_kv, strict=False)
    step = source[source.index("if MASKED:  # a partial tile"):]
    assert "offs_m_rel = offs_m - start_n" in step.split("keep = keep & col_ok")[0]
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    finite = ref_lse.isfinite()
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=2e-5, rtol=2e-5)
    assert torch.equal(lse.isfinite(), finite)


def test_rows_a_gathered_document_mask_leaves_empty_give_zero_and_minus_infinite_lse(
        ) -> None:
    """doc[q] == doc[kv] & q > kv: each document's first query sees no key, so its row is 0
    with lse -inf (no NaN), and the other rows are the oracle's."""
    ids = torch.tensor([0] * 5 + [1] * 17 + [2] * 3 + [3] * 22, dtype=torch.int32)
    out, lse, ref, ref_lse, _ = _document_case(ids, ids, strict=True)
    empty = ~ref_lse.isfinite()
    assert empty.sum() == 2 * 4  # two heads, four documents
    assert not out.isnan().any() and torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert torch.equal(lse[empty], torch.full_like(lse[empty], float("-inf")))
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
