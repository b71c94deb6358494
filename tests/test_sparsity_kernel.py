"""Kernel work accounting (instrumented interpreter runs): the kernel visits exactly the
non-empty key tiles and evaluates the mask only on partial ones, whether the tiles come from
closed-form bounds, from the analysis' range or block tables, or from torch's BlockMask."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch_compat import torch_block_grid_sparsity

import attndsl
from attndsl.api import _compiled
from attndsl.frontend.flex import lower_flex
from attndsl.key_tile_plan import SPARSE_BLOCK
from attndsl.passes.mask import classify_tiles
from attndsl.runtime.plan import mask_plan

L_DOC = 384
doc = torch.div(torch.arange(L_DOC) * 5, L_DOC, rounding_mode="floor")

MASKS = {
    "causal": lambda b, h, q, kv: kv <= q,
    "sliding": lambda b, h, q, kv: (kv <= q) & (q - kv < 200),
    "prefix": lambda b, h, q, kv: (kv < 130) | (kv <= q),
    "document": lambda b, h, q, kv: (doc[q] == doc[kv]) & (kv <= q),
    "dilated": lambda b, h, q, kv: ((q - kv) % 3 == 0) & (kv <= q),
    "sinks_chunks": lambda b, h, q, kv: (kv < 16) | ((kv <= q) & (kv // 128 == q // 128)),
    "striped": lambda b, h, q, kv: (kv // 128) % 2 == 0,
    "chunked_causal": lambda b, h, q, kv: (q // 100 == kv // 100) & (kv <= q),
    "sinks_window": lambda b, h, q, kv: (kv < 16) | ((kv <= q) & (q - kv < 100)),
}
# how the kernel finds its key tiles: closed forms, a range table, block tables
PLANS = {"causal": "closed_form", "sliding": "closed_form", "prefix": "closed_form",
         "document": "kv_ranges", "dilated": "kv_ranges", "sinks_chunks": "kv_ranges",
         "striped": "kv_indices", "chunked_causal": "closed_form",
         "sinks_window": "closed_form"}  # sinks_window: two closed-form segments
SEGMENTS = {"sinks_chunks": 2}  # key-tile segments per query tile of a range table (else 1)


def _run_counting(mask_mod, lq: int, lkv: int, plan: dict | None = None):
    """Run with counters; also check the output against the float64 oracle."""
    spec = lower_flex(None, mask_mod)
    _, module = _compiled(spec.cascade)
    q = torch.randn(1, 1, lq, 16)
    k = torch.randn(1, 1, lkv, 16)
    ref = attndsl.run_cascade(spec.cascade, {"Q": q, "K": k, "V": k, **spec.captured},
                              {"scale": 0.25, "G": 1})
    if plan is None:
        plan = mask_plan(spec.cascade.mask.expr, spec.captured, 1, 1, lq, lkv,
                         q.device).launch_tables()
    stats = torch.zeros(2, dtype=torch.int32)
    out = module.launch({"Q": q, "K": k, "V": k}, {"scale": 0.25}, spec.captured, plan,
                        {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1,
                         "stats": stats})
    torch.testing.assert_close(out["O"].double(), ref["O"], atol=1e-5, rtol=1e-5)
    return spec, plan, stats, out


# Masks checked at one size only: the size where the plan is the one named (document,
# sinks_chunks), five runs of key tiles, more than a range table holds (striped).
FIXED_SIZES = {"document": (L_DOC, L_DOC), "sinks_chunks": (L_DOC, L_DOC),
               "striped": (128, 1152)}


@pytest.mark.parametrize("name", sorted(set(MASKS) - set(FIXED_SIZES)))
@given(lq=st.sampled_from([128, 256, 384]), lkv=st.sampled_from([128, 256, 384]))
def test_visits_exactly_the_non_empty_tiles(name: str, lq: int, lkv: int) -> None:
    check_visits(name, lq, lkv)


@pytest.mark.parametrize("name", sorted(FIXED_SIZES))
def test_visits_exactly_the_non_empty_tiles_at_the_size_its_plan_needs(name: str) -> None:
    check_visits(name, *FIXED_SIZES[name])


def check_visits(name: str, lq: int, lkv: int) -> None:
    """The kernel's counters: every non-empty key tile visited once, the mask evaluated on
    exactly the partial ones, through the plan PLANS names."""
    spec, plan, stats, out = _run_counting(MASKS[name], lq, lkv)
    tiles = classify_tiles(spec.cascade.mask.expr, spec.captured, 1, 1, lq, lkv,
                           SPARSE_BLOCK, SPARSE_BLOCK).classes[0, 0]
    programs_per_row, subtiles = SPARSE_BLOCK // 32, SPARSE_BLOCK // 32
    visited = int((tiles > 0).sum()) * programs_per_row * subtiles
    masked = int((tiles == 1).sum()) * programs_per_row * subtiles
    assert (int(stats[0]) + int(stats[1]), int(stats[1])) == (visited, masked)
    assert plan.get(PLANS[name]) is not None
    if PLANS[name] == "kv_ranges":
        assert plan["kv_ranges"].shape[-1] == 4 * SEGMENTS.get(name, 1)
    assert not torch.isnan(out["O"]).any()


def test_torch_block_mask_tables_drive_the_same_visits() -> None:
    from torch.nn.attention.flex_attention import create_block_mask

    bm = create_block_mask(MASKS["causal"], 1, 1, 256, 256, device="cpu", BLOCK_SIZE=128)
    plan = {"kv_num_blocks": bm.kv_num_blocks, "kv_indices": bm.kv_indices,
            "full_kv_num_blocks": bm.full_kv_num_blocks, "full_kv_indices": bm.full_kv_indices,
            "Q_BLOCK_SIZE": 128, "KV_BLOCK_SIZE": 128}
    _, _, stats, _ = _run_counting(MASKS["causal"], 256, 256, plan)
    # 2 query blocks x 4 programs each; row 0: 1 partial block, row 1: 1 full + 1 partial
    assert (int(stats[0]), int(stats[1])) == (4 * 4, 2 * 4 * 4)


def test_closed_form_block_mask_never_builds_tables() -> None:
    """attndsl.create_block_mask on a closed-form mask is O(1) in L; the kernel computes the
    key-tile ranges itself, and the tables appear only when read (equal to torch's)."""
    from torch.nn.attention.flex_attention import create_block_mask as torch_create

    bm = attndsl.create_block_mask(MASKS["sliding"], None, None, 300, 300, device="cpu")
    assert bm.closed_form and bm.tables is None
    assert "closed-form ranges" in repr(bm) and bm.tables is None  # sparsity from the bounds
    lazy_sparsity = bm.sparsity()
    q = torch.randn(1, 2, 300, 16)
    out = attndsl.flex_attention(q, q, q, block_mask=bm)
    assert bm.tables is None
    torch.testing.assert_close(out, attndsl.flex_attention(q, q, q, mask_mod=MASKS["sliding"]))
    ref = torch_create(MASKS["sliding"], None, None, 300, 300, device="cpu")
    assert abs(lazy_sparsity - torch_block_grid_sparsity(ref)) < 1e-9
    assert torch.equal(bm.kv_num_blocks, ref.kv_num_blocks)
    assert torch.equal(bm.full_kv_num_blocks, ref.full_kv_num_blocks)


def test_document_block_mask_keeps_only_ranges() -> None:
    """A data-dependent mask whose query tiles each see one interval of key tiles keeps four
    numbers per query tile; the kernel reads those, and torch's tables appear only when read."""
    from torch.nn.attention.flex_attention import create_block_mask as torch_create

    mask = MASKS["document"]
    bm = attndsl.create_block_mask(mask, None, None, L_DOC, L_DOC, device="cpu")
    assert bm.kv_ranges is not None and bm.tables is None
    assert bm.kv_ranges.shape == (1, 1, 3, 4)
    assert "range table" in repr(bm) and bm.tables is None
    lazy_sparsity = bm.sparsity()
    q = torch.randn(1, 2, L_DOC, 16)
    out = attndsl.flex_attention(q, q, q, block_mask=bm)
    assert bm.tables is None
    spec = lower_flex(None, mask)
    ref = attndsl.run_cascade(spec.cascade, {"Q": q, "K": q, "V": q, **spec.captured},
                              {"scale": 0.25, "G": 1})
    torch.testing.assert_close(out.double(), ref["O"], atol=1e-5, rtol=1e-5)
    theirs = torch_create(mask, None, None, L_DOC, L_DOC, device="cpu")
    assert abs(lazy_sparsity - torch_block_grid_sparsity(theirs)) < 1e-9
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices"):
        assert torch.equal(getattr(bm, name), getattr(theirs, name)), name


def test_range_table_rows_without_keys_give_zero_and_minus_inf() -> None:
    """Query tiles with no key segment (all (0, 0, 0, 0)) and fully masked rows inside
    partial tiles: out 0, lse -inf, no NaN."""
    def mask(b, h, q, kv):
        return (q < 200) & (doc[q] == doc[kv])

    bm = attndsl.create_block_mask(mask, None, None, L_DOC, L_DOC, device="cpu")
    assert bm.kv_ranges is not None and not bm.kv_ranges[0, 0, 2].any()
    q = torch.randn(1, 1, L_DOC, 16)
    out, lse = attndsl.flex_attention(q, q, q, block_mask=bm, return_lse=True)
    assert bm.tables is None
    assert not out.isnan().any() and bool((out[:, :, 200:] == 0).all())
    assert bool((lse[:, :, 200:] == float("-inf")).all()) and bool(lse[:, :, :200].isfinite().all())


def test_closed_form_kernels_skip_empty_tiles_without_tables() -> None:
    """A generated module whose mask has closed forms skips empty key tiles by itself: a
    standalone launch with no block tables visits exactly the non-empty tiles."""
    spec = lower_flex(None, MASKS["sliding"])
    _, module = _compiled(spec.cascade)
    assert module.BOUNDS_BLOCK == SPARSE_BLOCK and module.BOUNDS_SEGMENTS == 1
    q = torch.randn(1, 1, 384, 16)
    stats = torch.zeros(2, dtype=torch.int32)
    out = module.launch({"Q": q, "K": q, "V": q}, {"scale": 0.25}, {}, None,
                        {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1,
                         "stats": stats})
    ref = attndsl.run_cascade(spec.cascade, {"Q": q, "K": q, "V": q}, {"scale": 0.25, "G": 1})
    torch.testing.assert_close(out["O"].double(), ref["O"], atol=1e-5, rtol=1e-5)
    tiles = classify_tiles(spec.cascade.mask.expr, {}, 1, 1, 384, 384, SPARSE_BLOCK,
                           SPARSE_BLOCK).classes[0, 0]
    per_tile = (SPARSE_BLOCK // 32) ** 2
    assert (int(stats[0]) + int(stats[1]), int(stats[1])) == \
        (int((tiles > 0).sum()) * per_tile, int((tiles == 1).sum()) * per_tile)


def test_malformed_range_table_is_refused() -> None:
    spec = lower_flex(None, MASKS["document"])
    _, module = _compiled(spec.cascade)
    q = torch.randn(1, 1, L_DOC, 16)
    bad = {"kv_ranges": torch.zeros(1, 1, 3, 5, dtype=torch.int32), "Q_BLOCK_SIZE": 128,
           "KV_BLOCK_SIZE": 128}
    with pytest.raises(module.AttentionInputError, match=r"kv_ranges must be \[B, H, rows, 4"):
        module.launch({"Q": q, "K": q, "V": q}, {"scale": 0.25}, spec.captured, bad)


@pytest.mark.parametrize("length", [1, 100, 300, 1000])
@pytest.mark.parametrize("mask", ["causal", "sliding", "document"])
def test_sparsity_is_the_skipped_share_of_the_block_grid_at_any_length(mask: str,
                                                                       length: int) -> None:
    """Sparsity is a percentage in [0, 100] of the ceil(L / 128)^2 block grid, whatever the
    length (torch < 2.14 divides by L^2 instead and reports -27% here at L = 300)."""
    from torch.nn.attention.flex_attention import create_block_mask as torch_create

    fn = MASKS[mask] if mask != "document" else \
        (lambda b, h, q, kv: doc[q % L_DOC] == doc[kv % L_DOC])  # documents repeat past L_DOC
    bm = attndsl.create_block_mask(fn, 2, 3, length, length, device="cpu")
    theirs = torch_create(fn, 2, 3, length, length, device="cpu")
    value = bm.sparsity()
    assert 0.0 <= value <= 100.0
    assert abs(value - torch_block_grid_sparsity(theirs)) < 1e-9
    tiles = -(-length // 128)
    computed = int(theirs.kv_num_blocks.sum()) + int(theirs.full_kv_num_blocks.sum())
    assert abs(value - 100 * (1 - computed / (2 * 3 * tiles * tiles))) < 1e-9


def test_sliding_window_sparsity_at_300_is_three_skipped_tiles_of_nine() -> None:
    bm = attndsl.create_block_mask(MASKS["sliding"], None, None, 300, 300, device="cpu")
    assert bm.closed_form and bm.tables is None
    assert abs(bm.sparsity() - 100 * 3 / 9) < 1e-9  # key tiles 0, 0-1, 0-2 of 3 rows


def test_the_forward_refuses_a_key_block_listed_as_both_partial_and_full() -> None:
    """A block in both of torch's tables would be visited twice (counted twice in the sums)."""
    from torch.nn.attention.flex_attention import BlockMask

    q = torch.randn(1, 1, 100, 16)
    one = torch.ones(1, 1, 1, dtype=torch.int32)
    block0 = torch.zeros(1, 1, 1, 1, dtype=torch.int32)
    bm = BlockMask.from_kv_blocks(one, block0, one, block0.clone(), BLOCK_SIZE=128,
                                  mask_mod=MASKS["causal"], seq_lengths=(100, 100))
    with pytest.raises(attndsl.AttentionError, match="both partial and full"):
        attndsl.flex_attention(q, q, q, block_mask=bm)


def test_a_range_table_built_for_fewer_batches_than_the_inputs_is_refused() -> None:
    """The kernel would read rows past the table (batches 2 and 3) and return garbage."""
    docs = torch.stack([(torch.arange(300) >= 60 + 20 * b).long() for b in range(4)])
    mask = lambda b, h, q, kv: docs[b, q] == docs[b, kv]  # noqa: E731
    bm = attndsl.create_block_mask(mask, 2, 1, 300, 300, device="cpu")
    assert bm.kv_ranges is not None and bm.kv_ranges.shape[0] == 2
    q = torch.randn(4, 1, 300, 16)
    with pytest.raises(attndsl.AttentionError, match="kv_ranges dim 0 is 2; expected 1 or 4"):
        attndsl.flex_attention(q, q, q, block_mask=bm)


RANGE_FAULTS = {
    "a float table": (lambda r: r.float(), "integer tensor"),
    "too few rows": (lambda r: r[:, :, :2], "has 2 rows; the inputs need 3"),
    "a negative first block": (lambda r: _set_range(r, 0, -1), "outside 0 <= lo"),
    "a block past the keys": (lambda r: _set_range(r, 3, 4), "outside 0 <= lo"),
    "full blocks starting before the segment": (lambda r: _set_range(r, 1, 0, 2), "outside"),
    "two segments sharing a block": (lambda r: torch.cat([r, r], -1), "in two segments"),
}


def _set_range(r: torch.Tensor, part: int, value: int, row: int = 1) -> torch.Tensor:
    r = r.clone()
    r[0, 0, row, part] = value
    r[0, 0, row, 3] = max(int(r[0, 0, row, 3]), value)
    return r


@pytest.mark.parametrize("fault", sorted(RANGE_FAULTS))
def test_a_range_table_that_would_read_outside_the_keys_or_twice_is_refused(fault: str) -> None:
    spec = lower_flex(None, MASKS["document"])
    _, module = _compiled(spec.cascade)
    q = torch.randn(1, 1, L_DOC, 16)
    tables = mask_plan(spec.cascade.mask.expr, spec.captured, 1, 1, L_DOC, L_DOC,
                       q.device).launch_tables()
    change, match = RANGE_FAULTS[fault]
    bad = {**tables, "kv_ranges": change(tables["kv_ranges"])}
    module.launch({"Q": q, "K": q, "V": q}, {"scale": 0.25}, spec.captured, tables)
    with pytest.raises(module.AttentionInputError, match=match):
        module.launch({"Q": q, "K": q, "V": q}, {"scale": 0.25}, spec.captured, bad)


@pytest.mark.parametrize("name, single", [("sliding", True), ("sinks_window", True),
                                          ("causal", False), ("prefix", False)])
def test_windows_narrower_than_two_blocks_run_one_masked_loop(name: str, single: bool) -> None:
    """A closed-form segment without unmasked tiles (a 200- or 100-key window against
    128-key bound blocks) is one masked key-tile loop in the kernel, the others three."""
    source = attndsl.compile(mask_mod=MASKS[name]).source
    assert ("one masked loop" in source) is single
    assert ("for start_n in tl.range(lo, hi, BLOCK_N" in source) is single
    assert "for start_n in range(full_lo, full_hi, BLOCK_N):" in source  # the range table's
