"""The FlexAttention backward launcher refuses block tables its kernels would read past, or that
would give the gradient of another mask: each malformed kind is named in the error, and
well-formed tables (given in full, or kv-major only) still give the oracle's gradients."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.nn.attention import flex_attention as fa

import attndsl
from attndsl.autograd import load_backward_module, register_spec
from attndsl.block_tables import TABLE_NAMES
from attndsl.frontend.flex import lower_flex

Tensor = torch.Tensor
L, D, BLOCK = 64, 16, 16  # four query blocks and four key blocks


def causal(b, h, q, kv):
    return kv <= q


@pytest.fixture(scope="module")
def problem() -> dict:
    """A causal spec's backward module, the arguments of its launch_backward and torch's eight
    block tables of the causal mask (B = 1, H = 2; 16 x 16 blocks)."""
    spec = lower_flex(None, causal)
    register_spec(spec.cascade)
    module = load_backward_module(spec.cascade)
    gen = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, L, D, generator=gen) for _ in range(4))
    fwd = attndsl.api._compiled(spec.cascade)[1].launch({"Q": q, "K": k, "V": v},
                                                        {"scale": 0.25}, {})
    bm = fa.create_block_mask(causal, 1, 2, L, L, device="cpu", BLOCK_SIZE=BLOCK)
    tables = {name: getattr(bm, name) for name in TABLE_NAMES}
    args = ({"Q": q, "K": k, "V": v}, {"O": fwd["O"], "LSE": fwd["LSE"]},
            {"O": do, "LSE": None}, {"scale": 0.25}, {}, ())
    return {"module": module, "args": args, "tables": tables}


def _launch(problem: dict, deterministic: bool = False, drop: tuple = (), **changed) -> dict:
    tables = {k: v for k, v in problem["tables"].items() if k not in drop}
    tables.update(Q_BLOCK_SIZE=BLOCK, KV_BLOCK_SIZE=BLOCK)
    tables.update(changed)
    return problem["module"].launch_backward(*problem["args"], block_tables=tables,
                                             deterministic=deterministic)


def _edited(t: Tensor, edit: Callable[[Tensor], None]) -> Tensor:
    t = t.clone()
    edit(t)
    return t


@pytest.mark.parametrize("deterministic", [False, True])
def test_well_formed_tables_give_the_gradients_of_the_dense_causal_backward(
        problem: dict, deterministic: bool) -> None:
    dense = problem["module"].launch_backward(*problem["args"], deterministic=deterministic)
    for drop in ((), TABLE_NAMES[4:]):  # all eight, or kv-major only (q-major derived)
        got = _launch(problem, deterministic, drop)
        for name in ("Q", "K", "V"):
            torch.testing.assert_close(got[name], dense[name], rtol=1e-5, atol=1e-5)


def _set(t: Tensor, where: tuple, value) -> Tensor:
    return _edited(t, lambda x: x.__setitem__(where, value))


def _one(name: str, change: Callable[[Tensor], Tensor]) -> Callable[[dict], dict]:
    return lambda tables: {name: change(tables[name])}


def _four_heads(tables: dict) -> dict:
    return {n: tables[n].repeat(1, 2, *(1,) * (tables[n].dim() - 2))
            for n in ("kv_num_blocks", "kv_indices")}


MALFORMED = {
    # what is wrong: (tables -> the changed tables, the message)
    "counts of the wrong rank": (_one("kv_num_blocks", lambda t: t[0]),
                                 r"must be \[B, H, rows\]"),
    "indices of the wrong rank": (_one("q_indices", lambda t: t[..., 0]),
                                  r"must be \[B, H, rows\]"),
    "a head dim that neither broadcasts nor matches": (_four_heads, "dim 1 is 4"),
    "fewer rows than query blocks": (
        lambda t: {n: t[n][:, :, :3] for n in ("kv_num_blocks", "kv_indices")}, "has 3 rows"),
    "a count larger than the indices' columns": (
        _one("kv_num_blocks", lambda t: _set(t, (0, 0, 3), 5)), r"counts in \[.*, 5\]"),
    "a negative count": (_one("q_num_blocks", lambda t: _set(t, (0, 1, 0), -1)),
                         r"counts in \[-1"),
    "a key block past the keys": (
        _one("kv_indices", lambda t: _set(t, (0, 0, 1, 0), 4)), r"lists blocks in \[.*4\]"),
    "a negative query block": (
        _one("q_indices", lambda t: _set(t, (0, 0, 0, 0), -3)), r"lists blocks in \[-3"),
    "a float table": (_one("kv_indices", lambda t: t.float()), "expected an integer dtype"),
    "a bool table": (_one("q_num_blocks", lambda t: t.bool()), "expected an integer dtype"),
    "a table on another device": (_one("full_kv_indices", lambda t: t.to("meta")),
                                  "expected the inputs' device cpu"),
    "a block listed twice in a row": (
        _one("full_kv_indices", lambda t: _set(t, (0, 0, 3, 1), int(t[0, 0, 3, 0]))),
        "lists a block twice"),
    "q-major tables of another mask": (
        _one("full_q_num_blocks", lambda t: _set(t, (0, 0, 0), int(t[0, 0, 0]) - 1)),
        "list other blocks than the transpose"),
}


@pytest.mark.parametrize("change, match", MALFORMED.values(), ids=MALFORMED.keys())
@pytest.mark.parametrize("deterministic", [False, True])
def test_malformed_block_tables_are_refused_saying_what_was_expected(
        problem: dict, change: Callable, match: str, deterministic: bool) -> None:
    with pytest.raises(ValueError, match=match):
        _launch(problem, deterministic, **change(problem["tables"]))


def test_a_block_listed_as_both_partial_and_full_is_refused(problem: dict) -> None:
    t = problem["tables"]
    # query block 3 lists key block 3 as partial; add it to its full blocks too
    num = _set(t["full_kv_num_blocks"], (0, 0, 3), int(t["full_kv_num_blocks"][0, 0, 3]) + 1)
    idx = _set(t["full_kv_indices"], (0, 0, 3, int(t["full_kv_num_blocks"][0, 0, 3])), 3)
    with pytest.raises(ValueError, match="both partial and full"):
        _launch(problem, drop=TABLE_NAMES[4:], full_kv_num_blocks=num, full_kv_indices=idx)


def test_counts_without_indices_are_refused(problem: dict) -> None:
    with pytest.raises(ValueError, match="must be given together"):
        _launch(problem, drop=("q_indices",))
    with pytest.raises(ValueError, match="has no kv_num_blocks"):
        _launch(problem, drop=("kv_num_blocks", "kv_indices"))


@pytest.mark.parametrize("sizes, match", [
    ((0, BLOCK), "expected a positive int"),
    ((BLOCK, 2.5), "expected a positive int"),
    ((24, 24), "power-of-two tile >= 16"),
])
def test_block_sizes_that_no_tile_divides_are_refused(problem: dict, sizes: tuple,
                                                      match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _launch(problem, Q_BLOCK_SIZE=sizes[0], KV_BLOCK_SIZE=sizes[1])


@pytest.mark.parametrize("plan", [{"closed_form": True},
                                  {"kv_ranges": torch.zeros(1, 1, 4, 4, dtype=torch.int32)}])
def test_a_plan_without_tables_is_refused_rather_than_giving_zero_gradients(
        problem: dict, plan: dict) -> None:
    with pytest.raises(ValueError, match="must be passed as its tables"):
        problem["module"].launch_backward(*problem["args"],
                                          block_tables={**plan, "Q_BLOCK_SIZE": BLOCK,
                                                        "KV_BLOCK_SIZE": BLOCK})


def test_training_with_a_block_mask_whose_q_tables_disagree_is_an_error_not_a_gradient(
        ) -> None:
    """The forward reads only the kv-major tables; q-major ones of another mask used to give
    the backward of that other mask."""
    bm = fa.create_block_mask(causal, 1, 1, L, L, device="cpu", BLOCK_SIZE=BLOCK)
    other = fa.create_block_mask(lambda b, h, q, kv: kv <= q + BLOCK, 1, 1, L, L, device="cpu",
                                 BLOCK_SIZE=BLOCK)
    mixed = fa.BlockMask(bm.seq_lengths, bm.kv_num_blocks, bm.kv_indices,
                         bm.full_kv_num_blocks, bm.full_kv_indices, other.q_num_blocks,
                         other.q_indices, other.full_q_num_blocks, other.full_q_indices,
                         BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=causal)
    q, k, v = (torch.randn(1, 1, L, D, requires_grad=True) for _ in range(3))
    out = attndsl.flex_attention(q, k, v, block_mask=mixed)
    with pytest.raises(ValueError, match="list other blocks than the transpose"):
        out.sum().backward()
