"""Integer parameters read only in the batch/head subscripts of the operands -- the GQA group
size G of ``K[b, h // G, n, e]`` -- are constexprs of the generated forward kernel: one
compile per value (as a launch already specialises on dtypes and the EVEN flags), a constant
divisor instead of a runtime integer division.  Every other parameter stays a runtime
argument.  Numbers are checked against the float64 oracle (``attndsl.run_cascade``)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import attndsl
from attndsl.frontend.text import parse_file, parse_text
from attndsl.ir.cascade import Cascade
from attndsl.ir.tile import head_params
from attndsl.passes.pipeline import compile_cascade
from attndsl.runtime.gpu_report import _spec, record_launches
from attndsl.runtime.modules import module_source

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

Tensor = torch.Tensor

WINDOW_GQA = """
spec window_gqa {
  index b: B batch, h: H head, m: M query, n: N key, e: E qk, f: F v
  input Q[B, H, M, E], K[B, HKV, N, E], V[B, HKV, N, F]
  param scale: float
  param G: int
  mask n <= m + G
  S[b,h,m,n] = Q[b,h,m,e] * K[b, h // G, n, e] * scale
  P[b,h,m,n] = softmax(n) S[b,h,m,n]
  O[b,h,m,f] = P[b,h,m,n] * V[b, h // G, n, f]
  output O
}
"""


def head_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """A score that differs per query head, so that a wrong head mapping shows."""
    return score - 0.125 * (h + 1) * (q_idx - kv_idx).abs()


def causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return q_idx >= kv_idx


def grouped(group: int, kv_heads: int = 2, length: int = 37, seed: int = 0
            ) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, kv_heads * group, length, 32, generator=gen)
    k = torch.randn(2, kv_heads, length, 32, generator=gen)
    v = torch.randn(2, kv_heads, length, 16, generator=gen)
    return q, k, v


def oracle(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    kernel = attndsl.compile(score_mod=head_mod, mask_mod=causal)
    return attndsl.run_cascade(kernel.compiled.cascade, {"Q": q, "K": k, "V": v,
                                                         **kernel.captured},
                               {"scale": 1.0 / math.sqrt(q.shape[-1]),
                                "G": q.shape[1] // k.shape[1]})["O"]


def cascade_of(text_or_path: str) -> Cascade:
    """The one spec of an .attn file (a path under examples/) or text."""
    specs = parse_file(ROOT / "examples" / text_or_path) if text_or_path.endswith(".attn") \
        else parse_text(text_or_path)
    (cascade,) = specs.values()
    return cascade


def source_of(text_or_path: str) -> str:
    return module_source(compile_cascade(cascade_of(text_or_path)).kernel)


def signature_of(source: str) -> str:
    start = source.index("\ndef attention_fwd_kernel(")
    return source[start:source.index("\n):\n", start)]


def test_the_group_size_is_a_constexpr_parameter_of_the_printed_kernel() -> None:
    source = source_of("gqa_causal.attn")
    signature = signature_of(source)
    assert "    param_G: tl.constexpr,  # G" in signature.split("\n")
    assert "    param_G,  # G" not in signature.split("\n")  # not a runtime argument too
    assert "CONSTEXPR_PARAMS = {'G': 'param_G'}" in source
    assert "'param_G'" not in source[source.index("ARG_TYPES = "):].split("\n")[0]
    # the value is never a literal of the kernel: the head mapping reads the constexpr
    assert "_floor_div(off_h, param_G)" in source


def test_a_parameter_read_outside_the_head_subscripts_stays_a_runtime_argument() -> None:
    """G also in the mask (a per-tile read) and W of the sliding window (only in the mask):
    specialising on them would compile once per user value."""
    for text in (WINDOW_GQA, "sliding_window.attn"):
        kernel = compile_cascade(cascade_of(text)).kernel
        assert head_params(kernel) == ()
        source = module_source(kernel)
        assert "CONSTEXPR_PARAMS = {}" in source
        assert ": tl.constexpr,  #" not in signature_of(source)
    assert "    param_G,  # G" in signature_of(source_of(WINDOW_GQA)).split("\n")


@pytest.mark.parametrize("group", [1, 2, 3, 4, 8])
def test_every_group_size_matches_the_oracle(group: int) -> None:
    q, k, v = grouped(group, seed=group)
    got = attndsl.flex_attention(q, k, v, score_mod=head_mod, mask_mod=causal, enable_gqa=True)
    torch.testing.assert_close(got.double(), oracle(q, k, v), atol=5e-5, rtol=5e-5)


def test_a_group_size_given_in_text_runs_as_the_constexpr_it_was_bound_to() -> None:
    """A mask that also reads G keeps it at runtime; the result still follows G."""
    q, k, v = grouped(3, length=20)
    cascade = cascade_of(WINDOW_GQA)
    got = attndsl.compile(cascade)({"Q": q, "K": k, "V": v})["O"]
    want = attndsl.run_cascade(cascade, {"Q": q, "K": k, "V": v},
                               {"scale": 1.0 / math.sqrt(32), "G": 3})["O"]
    torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=5e-5)


def test_two_group_sizes_are_two_compiled_kernels_each_with_its_own_result() -> None:
    """A GPU launch compiles one kernel per set of constexpr values: the recorded launches of
    G = 2 and G = 4 differ exactly in param_G, their static compiles take each its own value,
    and both results match the oracle."""
    inputs = {g: grouped(g, seed=10 + g) for g in (2, 4)}
    launches = {g: record_launches(lambda t=t: attndsl.flex_attention(
        *t, score_mod=head_mod, mask_mod=causal, enable_gqa=True)) for g, t in inputs.items()}
    (two,), (four,) = launches[2], launches[4]
    assert two.constexprs["param_G"] == 2 and four.constexprs["param_G"] == 4
    assert "param_G" not in two.signature and "param_G" not in four.signature
    assert {n: c for n, c in two.constexprs.items() if n != "param_G"} == \
        {n: c for n, c in four.constexprs.items() if n != "param_G"}
    path = two.fn.__globals__["__file__"]
    job = {"path": path, "target": "sm80", "dtype": "fp16", "e": 32, "f": 16, "sparsity": 3,
           "config": [64, 32, 4, 2]}
    assert _spec({**job, "params": {"G": 4}}).constexprs["param_G"] == 4
    assert _spec(job).constexprs["param_G"] == 1  # no launch: G = 1, no grouping
    for t in inputs.values():
        got = attndsl.flex_attention(*t, score_mod=head_mod, mask_mod=causal, enable_gqa=True)
        torch.testing.assert_close(got.double(), oracle(*t), atol=5e-5, rtol=5e-5)


SIGMOID_GQA = """
spec sigmoid_gqa {
  index b: B batch, h: H head, m: M query, n: N key, e: E qk, f: F v
  input Q[B, H, M, E], K[B, HKV, N, E], V[B, HKV, N, F]
  param scale: float
  param G: int
  S[b,h,m,n] = Q[b,h,m,e] * K[b, h // G, n, e] * scale
  P[b,h,m,n] = sigmoid(S[b,h,m,n] - 2.0)
  O[b,h,m,f] = P[b,h,m,n] * V[b, h // G, n, f]
  output O
}
"""


def test_the_backward_kernels_take_the_group_size_as_a_constexpr() -> None:
    """The flex backward (softmax, flex_attention) and the fused backward (a sigmoid spec):
    every launch that maps heads passes G = 3 as a constexpr by name, none as a runtime
    argument; the flex preprocess reads query-head rows only and takes no G (it had taken
    one it never read: a compile per group size)."""
    q, k, v = (t.requires_grad_() for t in grouped(3, length=20))
    fused = attndsl.compile(cascade_of(SIGMOID_GQA))

    def flex() -> None:
        out = attndsl.flex_attention(q, k, v, mask_mod=causal, enable_gqa=True,
                                     kernel_options={"deterministic": True})
        out.backward(torch.ones_like(out))

    def tile() -> None:
        out = fused({"Q": q, "K": k, "V": v})["O"]
        out.backward(torch.ones_like(out))

    found = {}
    for what, run in (("flex", flex), ("fused", tile)):
        for launch in record_launches(run):
            found[what, launch.name] = {a: launch.constexprs[a] for a in ("G", "param_G")
                                        if a in launch.constexprs}
            assert not {"G", "param_G"} & set(launch.signature), launch.name
    g, param_g = {"G": 3}, {"param_G": 3}
    assert found == {("flex", "attention_fwd_kernel"): param_g,
                     ("flex", "attention_bwd_preprocess"): {},
                     ("flex", "attention_bwd_dkdv_kernel"): g,
                     ("flex", "attention_bwd_dq_kernel"): g,
                     ("fused", "attention_fwd_kernel"): param_g,
                     ("fused", "tile_bwd_rows_kernel"): param_g,
                     ("fused", "tile_bwd_keys_kernel"): param_g,
                     ("fused", "tile_bwd_queries_kernel"): param_g}


def test_a_batch_side_parameter_of_decode_stays_a_runtime_argument() -> None:
    """Decode reads K/V at batch b // KVB (KVB = splits x batch for a page pool): a constexpr
    there would compile once per batch size, so only head subscripts make constexprs."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 1, 16, generator=gen)
    k, v = (torch.randn(3, 2, 40, 16, generator=gen) for _ in range(2))
    lengths = torch.tensor([40, 7, 23])
    launches = record_launches(lambda: attndsl.decode(q, k, v, lengths, splits=2))
    forward = [x for x in launches if x.name == "attention_fwd_kernel"]
    assert forward and all("param_KVB" in x.signature for x in forward)
    assert all("param_KVB" not in x.constexprs for x in forward)


SCALE_DEFAULT = """
spec scaled {
  index b: B batch, h: H head, m: M query, n: N key, e: E qk, f: F v
  input Q[B, H, M, E], K[B, H, N, E], V[B, H, N, F]
  param scale: float = 2.0
  mask n <= m
  S[b,h,m,n] = Q[b,h,m,e] * K[b,h,n,e] * scale
  O[b,h,m,f] = softmax(n) S[b,h,m,n] * V[b,h,n,f]
  output O
}
"""


def test_a_declared_default_of_scale_is_the_scale_of_every_executor() -> None:
    """1/sqrt(qk dim) stands in for a float ``scale`` declared without a default only: a
    declared default is what the kernel, its generated module and the oracle all use, and
    an int ``scale`` without one must be given."""
    (spec,) = parse_text(SCALE_DEFAULT).values()
    gen = torch.Generator().manual_seed(1)
    t = {n: torch.randn(1, 2, 9, 16, generator=gen) for n in ("Q", "K", "V")}
    want = attndsl.run_cascade(spec, t, {"scale": 2.0})["O"]
    kern = attndsl.compile(spec)
    assert torch.allclose(kern(t)["O"].double(), want, atol=1e-5)
    assert torch.allclose(kern.module.launch(t)["O"].double(), want, atol=1e-5)
    (as_int,) = parse_text(SCALE_DEFAULT.replace("float = 2.0", "int")).values()
    with pytest.raises(ValueError, match="parameter 'scale' is not bound"):
        attndsl.compile(as_int)(t)
