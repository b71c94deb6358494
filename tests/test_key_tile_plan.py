"""KeyTilePlan: one choice of how a kernel visits key tiles, read alike by the forward launch,
the backward's custom ops, BlockMask and the compiled kernels."""

import pytest
import torch

import attndsl
from attndsl.block_tables import TABLE_NAMES
from attndsl.frontend.flex import lower_flex
from attndsl.key_tile_plan import (
    CLOSED,
    DENSE,
    RANGES,
    SPARSE_BLOCK,
    TABLES,
    KeyTilePlan,
    plan_key_tiles,
)
from attndsl.runtime.kernels import compiled
from attndsl.runtime.plan import block_mask_plan

L = 384
DOC = torch.tensor([0] * 100 + [1] * 200 + [2] * 84)
MASKS = {
    "causal": (lambda b, h, q, kv: kv <= q, CLOSED),
    "sinks_window": (lambda b, h, q, kv: (kv < 16) | ((kv <= q) & (q - kv < 100)), CLOSED),
    "document": (lambda b, h, q, kv: DOC[q] == DOC[kv], RANGES),
    "striped": (lambda b, h, q, kv: (kv // 128) % 2 == 0, TABLES),
}


def _plan(name: str, lkv: int = L) -> KeyTilePlan:
    spec = lower_flex(None, MASKS[name][0])
    return plan_key_tiles(spec.cascade.mask.expr, spec.captured, 1, 1, L, lkv)


@pytest.mark.parametrize("name", sorted(MASKS))
def test_the_plan_is_the_cheapest_kind_the_mask_allows(name: str) -> None:
    lkv = 1152 if name == "striped" else L  # five runs of key tiles: more than ranges hold
    plan = _plan(name, lkv)
    assert plan.kind == MASKS[name][1]
    assert plan.block == (SPARSE_BLOCK, SPARSE_BLOCK)
    tables = plan.launch_tables()
    assert (tables["Q_BLOCK_SIZE"], tables["KV_BLOCK_SIZE"]) == (SPARSE_BLOCK, SPARSE_BLOCK)
    key = {CLOSED: "closed_form", RANGES: "kv_ranges", TABLES: "kv_indices"}[plan.kind]
    assert tables[key] is not None


@pytest.mark.parametrize("name", sorted(MASKS))
def test_a_kernel_has_closed_forms_exactly_when_its_launch_plan_does(name: str) -> None:
    """The tile pass and the launch plan ask the same question (closed_form_segments)."""
    spec = lower_flex(None, MASKS[name][0])
    _, module = compiled(spec.cascade)
    assert (module.BOUNDS_BLOCK is not None) == (_plan(name).kind == CLOSED)
    if module.BOUNDS_BLOCK is not None:
        assert module.BOUNDS_BLOCK == SPARSE_BLOCK
        assert module.BOUNDS_SEGMENTS == len(_plan(name).segments)


def test_closed_form_tables_are_built_only_when_read_and_match_the_tile_classes() -> None:
    plan = _plan("causal")
    assert plan.tables is None and "closed form" in str(plan)
    tables = plan.block_tables()
    assert set(tables) == set(TABLE_NAMES)
    assert plan.tile_map() is not None and plan.block_tables() is tables  # built once
    # causal over 3 x 3 tiles of 128: one partial (diagonal) tile per row, i full ones
    assert tables["kv_num_blocks"].flatten().tolist() == [1, 1, 1]
    assert tables["full_kv_num_blocks"].flatten().tolist() == [0, 1, 2]


def test_op_args_carry_a_block_masks_tables_through_the_custom_ops() -> None:
    """A range-table block mask: the op arguments are its eight tables (built on demand);
    read back, they are a tables plan whose launch dict holds them and the block sizes."""
    bm = attndsl.create_block_mask(MASKS["document"][0], None, None, L, L, device="cpu")
    plan = block_mask_plan(bm, L, L)
    assert plan.kind == RANGES and bm.tables is None
    tables, q_block, kv_block = plan.op_args()
    assert (q_block, kv_block) == (SPARSE_BLOCK, SPARSE_BLOCK) and len(tables) == 8
    for name, t in zip(TABLE_NAMES, tables):
        assert torch.equal(t, getattr(bm, name)), name
    back = KeyTilePlan.from_op_args(tables, q_block, kv_block)
    assert back.kind == TABLES
    launch = back.launch_tables()
    assert torch.equal(launch["kv_indices"], bm.kv_indices)
    assert (launch["Q_BLOCK_SIZE"], launch["KV_BLOCK_SIZE"]) == (q_block, kv_block)


def test_no_block_mask_is_a_dense_plan_with_no_tables() -> None:
    plan = block_mask_plan(None, L, L)
    assert plan.kind == DENSE and plan.launch_tables() is None
    assert plan.op_args() == ([], 0, 0)
    assert KeyTilePlan.from_op_args([], 0, 0).kind == DENSE


def test_a_block_mask_from_a_plan_keeps_what_the_plan_holds() -> None:
    bm = attndsl.create_block_mask(MASKS["sinks_window"][0], None, None, L, L, device="cpu")
    assert bm.closed_form and bm.tables is None
    assert bm.mechanism == _plan("sinks_window").mechanism
    assert block_mask_plan(bm, L, L).kind == CLOSED
    small = attndsl.create_block_mask(MASKS["sinks_window"][0], None, None, L, L,
                                      device="cpu", BLOCK_SIZE=64)
    assert block_mask_plan(small, L, L).kind == TABLES  # kernels' closed forms are at 128
