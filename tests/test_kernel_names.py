"""Names in the generated forward kernel: arguments by role as in Triton's fused-attention
tutorial (``q_ptr``, ``stride_qm``, ``sm_scale``), captured tensors from their spec name when
that is a short ASCII identifier no other argument takes (else a role name), the launch by
keyword, and readers of the module (``gpu_report.signature``) that take the strides from the
``STRIDES`` table instead of guessing from the names."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch

from attndsl.eager import run_cascade
from attndsl.frontend.text import parse_text
from attndsl.ir.expr import FLOAT
from attndsl.passes.pipeline import compile_cascade
from attndsl.runtime.gpu_report import record_launches, signature
from attndsl.runtime.modules import load_kernel_module, module_source

# captured tensors whose names collide with an operand pointer ("q" -> q_ptr) or, lower-cased,
# with each other (slopes / SLOPES): only the first free one keeps its spec name
SPEC = """
spec names {
  index b: B batch, h: H head, m: M query, n: N key, e: E qk, f: F v
  input Q[B, H, M, E], K[B, H, N, E], V[B, H, N, F]
  tensor q[H]: float
  tensor slopes[H]: float
  tensor SLOPES[H]: float
  param scale: float
  mask n <= m
  S[b,h,m,n] = Q[b,h,m,e] * K[b,h,n,e] * scale - (slopes[h] + SLOPES[h] * q[h]) * (m - n)
  P[b,h,m,n] = softmax(n) S[b,h,m,n]
  O[b,h,m,f] = P[b,h,m,n] * V[b,h,n,f]
  output O
}
"""


def _kernel():
    (cascade,) = parse_text(SPEC).values()
    return cascade, compile_cascade(cascade).kernel


def test_captured_tensors_keep_their_spec_name_unless_another_argument_has_it() -> None:
    _, kernel = _kernel()
    module = load_kernel_module(kernel)
    ptrs = {name: ptr for name, (ptr, _) in module.CAPTURED.items()}
    assert ptrs["slopes"] == "slopes_ptr"
    assert ptrs["q"].startswith("captured") and ptrs["SLOPES"].startswith("captured")
    assert len(set(ptrs.values())) == 3
    assert module.OPERANDS["Q"][0] == "q_ptr" and module.PARAMS == {"scale": "sm_scale"}
    assert module.STRIDES["q_ptr"] == ("stride_qz", "stride_qh", "stride_qm", "stride_qk")
    source = module_source(kernel)
    for name, ptr in ptrs.items():  # the spec name in a comment next to its pointer
        assert f"    {ptr},  # {name}\n" in source


def test_a_kernel_with_renamed_captured_tensors_matches_the_eager_oracle() -> None:
    cascade, kernel = _kernel()
    module = load_kernel_module(kernel)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=g) for _ in range(3))
    captured = {n: torch.rand(2, generator=g) for n in ("q", "slopes", "SLOPES")}
    out = module.launch({"Q": q, "K": k, "V": v}, {"scale": 0.25}, captured)["O"]
    want = run_cascade(cascade, {"Q": q, "K": k, "V": v, **captured}, {"scale": 0.25})["O"]
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)


def test_names_that_are_not_short_ascii_identifiers_become_role_names() -> None:
    from attndsl.codegen.triton import _names

    _, kernel = _kernel()
    hostile = (("α", 1, FLOAT), ("x'); import os #", 1, FLOAT), ("_private", 1, FLOAT),
               ("a" * 40, 1, FLOAT), ("ok_name", 1, FLOAT))
    names = _names(dataclasses.replace(kernel, captured=hostile))
    got = {c: names.tensors[c] for c, _, _ in hostile}
    assert got["ok_name"] == "ok_name_ptr"
    assert all(got[c].startswith("captured") for c, _, _ in hostile[:4])
    assert len(set(got.values())) == len(got)


def test_the_signature_takes_unit_strides_from_the_strides_table_not_from_names() -> None:
    module = SimpleNamespace(
        ARG_TYPES={"a": "*{dtype}", "rows_of_a": "i32", "a_s0": "i32", "c": "*fp32",
                   "c_step": "i32", "E_len": "i32", "F_len": "i32", "n_heads": "i32"},
        STRIDES={"a": ("rows_of_a", "a_s0"), "c": ("c_step",)},
        OPERANDS={"A": ("a", "q", 0, 1)}, OUTPUTS={})
    sig, units = signature(module, "fp16", 64, 64)
    assert units == {"a_s0": 1, "c_step": 1}
    assert sig == {"a": "*fp16", "rows_of_a": "i32:16", "c": "*fp32", "E_len": "i32:16",
                   "F_len": "i32:16", "n_heads": "i32"}


def test_the_signature_of_every_stride_agrees_with_a_recorded_contiguous_launch() -> None:
    _, kernel = _kernel()
    module = load_kernel_module(kernel)
    q, k, v = (torch.randn(2, 2, 32, 64, dtype=torch.float16) for _ in range(3))
    captured = {n: torch.rand(2) for n in ("q", "slopes", "SLOPES")}
    (launch,) = record_launches(lambda: module.launch({"Q": q, "K": k, "V": v},
                                                      {"scale": 0.125}, captured))
    sig, units = signature(module, "fp16", 64, 64)
    for strides in module.STRIDES.values():
        for s in strides:
            if s in module.ROW_STRIDES["attention_fwd_kernel"]:  # a constexpr: a tile's D
                assert units[s] == launch.constexprs[s] == 64, s
                continue
            assert (s in units) == (launch.constexprs.get(s) == 1), s
            if s not in units:
                assert sig[s] == launch.signature[s], s
