"""Tensors the kernels cannot address are refused, not read out of bounds: every generated
kernel computes element offsets (program ids times strides, tile indices times strides) in
32-bit integers, so a tensor whose largest element offset reaches 2**31 would wrap
(codegen/launch_common.py ``_check_spans``)."""

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


def test_a_tensor_reaching_element_offset_2_31_is_refused_naming_it(causal) -> None:
    mod = load_source(module_source(causal[1]))
    fits = torch.empty(2, 1024, 1024, 1024, device="meta").as_strided(
        (2, 1024, 1024, 1024), (2**30, 1024 * 1024, 1024, 1))  # last offset 2**31 - 1
    mod._check_spans({"K": fits})
    mod._check_spans({"K": torch.empty(1, device="meta").expand(2**20, 2**20)})  # stride 0
    big = torch.empty(2, 1024, 1024, 1024, device="meta")
    big = big.as_strided(big.shape, (2**30 + 1, 1024 * 1024, 1024, 1))  # last offset 2**31
    with pytest.raises(mod.AttentionInputError, match=r"K of shape \(2, 1024, 1024, 1024\).*"
                                                      r"2147483648.*2\*\*31"):
        mod._check_spans({"K": big})
    mod._check_spans({"K": torch.empty(0, 2**31, device="meta")})  # empty: nothing is read


def test_the_forward_launch_checks_every_operand_and_output(causal, monkeypatch) -> None:
    mod = load_source(module_source(causal[1]))
    seen: list[str] = []
    monkeypatch.setattr(mod, "_check_spans", lambda tensors: seen.extend(tensors))
    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    mod.launch({"Q": q, "K": k, "V": v})
    assert set(mod.OPERANDS) | set(mod.OUTPUTS) <= set(seen)


@pytest.mark.parametrize("kind", ["flex", "fused"])
def test_each_backward_launch_checks_its_tensors_before_its_first_kernel(causal, kind) -> None:
    source = backward_source(causal[0]) if kind == "flex" else tile_backward_source(causal[1])
    launch = next(node for node in ast.walk(ast.parse(source))
                  if isinstance(node, ast.FunctionDef) and node.name == "launch_backward")
    calls = [node.func.id for node in ast.walk(launch)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
             and node.func.id in ("_check_spans", "_kernel")]
    lines = {name: min(node.lineno for node in ast.walk(launch) if isinstance(node, ast.Call)
                       and isinstance(node.func, ast.Name) and node.func.id == name)
             for name in set(calls)}
    assert "_check_spans" in lines and lines["_check_spans"] < lines["_kernel"]
