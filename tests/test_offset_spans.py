"""What the kernels' addressing accepts and what it still refuses.

Every generated kernel computes each program's (batch, head) base offset in int64 (unless every
tensor spans < 2**31 elements: I32_BASES), and its
in-tile offsets (tile indices times strides) in int32 unless some (batch, head) slice of a
tensor may reach element offset 2**31 (then the launch leaves I32_TILES off):
so no Q/K/V/output tensor is refused for its size (tests/test_big_offsets.py runs them).  What
is still refused: a sequence or head dim of 2**31 - 256 or more (positions are counted in
int32), and a block table spanning 2**31 entries (indexed in int32)
(codegen/launch_common.py ``_check_spans``, ``_check_lengths``, ``_offset_flags``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from attndsl.autograd import backward_source, tile_backward_source
from attndsl.frontend.load import load_spec
from attndsl.passes.pipeline import compile_cascade
from attndsl.runtime.modules import load_source, module_source

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def causal():
    cascade, _ = load_spec(str(ROOT / "examples" / "causal.py")).build()
    return cascade, compile_cascade(cascade).kernel


def test_a_table_reaching_element_offset_2_31_is_refused_naming_it(causal) -> None:
    mod = load_source(module_source(causal[1]))
    why = "the kernels index block tables in 32 bits"
    fits = torch.empty(2, 1024, 1024, 1024, device="meta").as_strided(
        (2, 1024, 1024, 1024), (2**30, 1024 * 1024, 1024, 1))  # last offset 2**31 - 1
    mod._check_spans({"kv_idx": fits}, why)
    mod._check_spans({"kv_idx": torch.empty(1, device="meta").expand(2**20, 2**20)}, why)
    big = torch.empty(2, 1024, 1024, 1024, device="meta")
    big = big.as_strided(big.shape, (2**30 + 1, 1024 * 1024, 1024, 1))  # last offset 2**31
    with pytest.raises(mod.AttentionInputError, match=r"kv_idx of shape \(2, 1024, 1024, 1024\)"
                                                      r".*2147483648; the kernels index block "
                                                      r"tables in 32 bits.*2\*\*31"):
        mod._check_spans({"kv_idx": big}, why)
    mod._check_spans({"kv_idx": torch.empty(0, 2**31, device="meta")}, why)  # nothing is read


def test_int32_offsets_are_kept_exactly_where_they_fit(causal) -> None:
    """I32_TILES: the rows and columns of each (batch, head) slice, with the masked lanes a
    tile runs past the end (256 rows, a head dim to its power-of-two block), stay below
    2**31; I32_BASES: besides, the whole tensor does."""
    mod = load_source(module_source(causal[1]))
    rows = (2**31 - 1 - 319) // (4096 + 256 - 1)  # the largest row stride that fits
    fits = torch.empty(8, 32, 4096, 64, device="meta").as_strided(
        (8, 32, 4096, 64), (2**40, 2**35, rows, 1))
    assert mod._offset_flags({"K": (fits, (2, 3))}) == {"I32_BASES": False, "I32_TILES": True}
    wide = fits.as_strided(fits.shape, (2**40, 2**35, rows + 1, 1))
    assert mod._offset_flags({"K": (wide, (2, 3))}) == {"I32_BASES": False, "I32_TILES": False}
    empty = {"K": (wide[:, :, :0], (2, 3))}  # nothing is read
    assert mod._offset_flags(empty) == {"I32_BASES": True, "I32_TILES": True}
    big = torch.empty(8, 32, 128 * 1024 + 1, 64, device="meta")  # past 2**31 elements
    assert mod._offset_flags({"K": (big, (2, 3))}) == {"I32_BASES": False, "I32_TILES": True}
    most = torch.empty(8, 32, 128 * 1024, 64, device="meta")  # 2**31 elements, the last at 2**31-1
    assert mod._offset_flags({"K": (most, (2, 3))}) == {"I32_BASES": True, "I32_TILES": True}


def test_a_length_of_2_31_positions_is_refused_naming_it(causal) -> None:
    mod = load_source(module_source(causal[1]))
    mod._check_lengths({"the key length": 2**31 - 257})
    with pytest.raises(mod.AttentionInputError, match=r"the key length is 2147483392; the "
                                                      r"kernels count positions in 32 bits"):
        mod._check_lengths({"the key length": 2**31 - 256})


def test_the_forward_launch_weighs_every_operand_and_output_and_checks_its_tables(
        causal, monkeypatch) -> None:
    mod = load_source(module_source(causal[1]))
    weighed: list[str] = []
    checked: list[str] = []
    real = mod._offset_flags
    monkeypatch.setattr(mod, "_offset_flags", lambda tiles: weighed.extend(tiles) or real(tiles))
    monkeypatch.setattr(mod, "_check_spans", lambda tensors, why: checked.extend(tensors))
    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    mod.launch({"Q": q, "K": k, "V": v})
    assert set(mod.OPERANDS) | set(mod.OUTPUTS) <= set(weighed)
    assert {f"block table argument {a}" for a in ("kv_num", "kv_idx")} <= set(checked)


@pytest.mark.parametrize("kind", ["flex", "fused"])
def test_each_backward_launch_weighs_its_offsets_before_its_first_kernel(causal, kind) -> None:
    """The backward launchers check the lengths and choose I32_BASES / I32_TILES before any
    kernel runs, and pass the flags to every kernel."""
    source = backward_source(causal[0]) if kind == "flex" else tile_backward_source(causal[1])
    launch = next(node for node in ast.walk(ast.parse(source))
                  if isinstance(node, ast.FunctionDef) and node.name == "launch_backward")
    calls = [node for node in ast.walk(launch) if isinstance(node, ast.Call)]
    first = {name: min(node.lineno for node in calls if isinstance(node.func, ast.Name)
                       and node.func.id == name)
             for name in ("_check_lengths", "_offset_flags", "_kernel")}
    assert first["_check_lengths"] < first["_kernel"] and first["_offset_flags"] < first["_kernel"]
    launches = [node for node in calls if isinstance(node.func, ast.Subscript)]
    assert launches and all(any(k.arg is None and ast.unparse(k.value) in ("offsets", "consts")
                                for k in node.keywords) for node in launches)
