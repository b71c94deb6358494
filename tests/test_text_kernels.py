"""Every .attn example compiles to a kernel that matches the float64 oracle; a variant written as
text and as FlexAttention functions compiles to the same schedule and tile plan."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attndsl
from attndsl.checking import (
    TOLERANCE,
    compare,
    index_sizes,
    kernel_outputs,
    oracle,
    random_problem,
)
from attndsl.eager import run_cascade
from attndsl.frontend.flex import lower_flex
from attndsl.frontend.text import parse_file
from attndsl.passes.pipeline import compile_cascade

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.attn"))


def _one(path: Path):
    (cascade,) = parse_file(path).values()
    return cascade


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
@given(lq=st.integers(1, 48), lkv=st.integers(1, 48), e=st.sampled_from([16, 32, 80]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 9))
def test_attn_example_matches_oracle(path: Path, lq: int, lkv: int, e: int, dtype, seed) -> None:
    """Each form the example compiles to: the quadratic kernel and, for a cascade the
    linearise pass chunks, the chunked linear form (the only one of some)."""
    c = _one(path)
    gen = torch.Generator().manual_seed(seed)
    hkv = 1 if "HKV" in {d for t in c.tensors for d in t.dims} else 2
    prob = random_problem(c, index_sizes(c, 1, 2, hkv, lq, lkv, e, 16), dtype, gen)
    for out in kernel_outputs(compile_cascade(c), prob):
        res = compare(out, oracle(c, prob))
        assert not res.nan, res
        assert res.worst() <= TOLERANCE[dtype], res


def test_fusemax_cascade_becomes_one_pass() -> None:
    comp = compile_cascade(_one(next(p for p in EXAMPLES if p.stem == "softmax_3pass")))
    assert comp.schedule.direct_passes == 3 and len(comp.schedule.passes) == 1


SOFTCAP_GQA = """
spec softcap_gqa {
  index b: B batch, h: H head, m: M query, n: N key, e: E qk, f: F v
  input Q[B, H, M, E], K[B, HKV, N, E], V[B, HKV, N, F]
  param scale: float
  param G: int
  S[b,h,m,n] = Q[b,h,m,e] * K[b, h // G, n, e] * scale
  T[b,h,m,n] = 30.0 * tanh(S[b,h,m,n] / 30.0)
  O[b,h,m,f] = softmax(n) T[b,h,m,n] * V[b, h // G, n, f]
  output O
}
"""


@pytest.mark.parametrize("source, score_mod, mask_mod", [
    ("gqa_causal", None, lambda b, h, q, kv: kv <= q),
    (SOFTCAP_GQA, lambda s, b, h, q, kv: 30.0 * torch.tanh(s / 30.0), None),
])
def test_text_and_flex_give_the_same_kernel(source, score_mod, mask_mod) -> None:
    cascade = _one(next(p for p in EXAMPLES if p.stem == source)) if "\n" not in source \
        else attndsl.cascade(source)
    text = compile_cascade(cascade)
    flex_cascade = lower_flex(score_mod, mask_mod).cascade
    flex = compile_cascade(replace(flex_cascade, outputs=text.cascade.outputs))
    assert str(text.schedule).splitlines()[1:] == str(flex.schedule).splitlines()[1:]
    assert str(text.kernel).splitlines()[1:] == str(flex.kernel).splitlines()[1:]


@pytest.mark.parametrize("name,params", [("document_mask", {}), ("prefix_lm", {"P": 100}),
                                         ("sliding_window", {})])
def test_compiled_text_specs_skip_key_tiles_from_the_mask_analysis(name: str,
                                                                   params: dict) -> None:
    """A compiled spec whose mask reads data or parameters (no closed form in the kernel)
    gets a range table from the mask analysis at launch, with the launch's parameter values;
    the result still matches the oracle."""
    c = _one(Path(__file__).resolve().parent.parent / "examples" / f"{name}.attn")
    kernel = attndsl.compile(c)
    assert kernel.module.BOUNDS_BLOCK is None
    gen = torch.Generator().manual_seed(0)
    prob = random_problem(c, index_sizes(c, 1, 2, 2, 300, 300, 32, 16), torch.float32, gen)
    if name == "document_mask":  # sorted document ids, as packed sequences have
        prob.captured["doc"] = torch.sort(prob.captured["doc"]).values
    params = {**prob.params, **params}
    plan = kernel._mask_plan({**prob.inputs, **prob.captured}, params, torch.device("cpu"))
    assert plan is not None and plan.get("kv_ranges") is not None
    out = kernel(prob.inputs, params, prob.captured)
    res = compare(out, oracle(c, replace(prob, params=params)))
    assert not res.nan and res.worst() <= TOLERANCE[torch.float32], res


SINK_CALL_FAULTS = {
    "a misspelt parameter": ({"params": {"sclae": 0.1}},
                             r"params names 'sclae', which is not a parameter.*\['scale'\]"),
    "a parameter that is not a number": ({"params": {"scale": "0.1"}}, "must be a number"),
    "a captured list": ({"captured": {"sink": [0.0, 0.0]}}, "'sink' must be a torch.Tensor"),
    "no inputs at all": ({"inputs": {}}, r"inputs is empty; expected the input tensors"),
    "an input that is not a tensor": ({"inputs": {"Q": [1.0]}}, "'Q' must be a torch.Tensor"),
}


@pytest.mark.parametrize("fault", sorted(SINK_CALL_FAULTS))
def test_a_kernel_call_with_misnamed_or_mistyped_arguments_is_refused(fault: str) -> None:
    """A misspelt parameter used to leave the parameter at its default, silently."""
    sink = parse_file(Path(__file__).resolve().parents[1] / "examples" / "sink.attn")["sink"]
    kernel = attndsl.compile(sink)
    q = torch.randn(1, 2, 20, 16)
    call = {"inputs": {"Q": q, "K": q, "V": q}, "captured": {"sink": torch.zeros(2)},
            "params": None}
    change, match = SINK_CALL_FAULTS[fault]
    call.update(change)
    with pytest.raises(attndsl.AttentionError, match=match):
        kernel(call["inputs"], call["params"], call["captured"])


CLAMPED = """spec clamped {
  index b: B batch, h: H head, m: M query, n: N key, e: E qk, f: F v
  input Q[B, H, M, E], K[B, H, N, E], V[B, H, N, F]
  param lo: float = -inf
  param hi: float = inf
  R[b,h,m,n] = Q[b,h,m,e] * K[b,h,n,e] * 0.25
  S[b,h,m,n] = min(max(R[b,h,m,n], lo), hi)
  O[b,h,m,f] = (sum(n) exp(S[b,h,m,n]) * V[b,h,n,f]) / (sum(n) exp(S[b,h,m,n]))
  output O
}"""


def test_infinite_float_defaults_reach_the_kernel_and_the_oracle_exactly() -> None:
    """-inf / inf defaults (no clamp) were refused as out of range; they are exact floats,
    printed into the module as float("-inf") (a repr would read the name inf)."""
    c = attndsl.cascade(CLAMPED)
    assert [p.default for p in c.params] == [float("-inf"), float("inf")]
    kernel = attndsl.compile(c)
    assert "PARAM_DEFAULTS = {'lo': float(\"-inf\"), 'hi': float(\"inf\")}" in kernel.source
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)
    s = q @ k.transpose(-1, -2) * 0.25
    for params, scores in ((None, s), ({"lo": 0.0}, s.clamp_min(0.0))):
        got = kernel({"Q": q, "K": k, "V": v}, params)["O"]
        torch.testing.assert_close(got, torch.softmax(scores, -1) @ v, atol=1e-5, rtol=1e-5)
    want = run_cascade(c, {"Q": q.double(), "K": k.double(), "V": v.double()})["O"]
    torch.testing.assert_close(want.float(), torch.softmax(s, -1) @ v, atol=1e-5, rtol=1e-5)


NESTED_NORMALISERS = {
    "a sum of exponentials inside an exponential": (
        "D[b,h,m] = sum(n) exp(S[b,h,m,n])\n"
        "  O[b,h,m,f] = sum(n) exp(S[b,h,m,n] / D[b,h,m]) * V[b,h,n,f]"),
    "a softmax of a softmax": "O[b,h,m,f] = (softmax(n) softmax(n) S[b,h,m,n]) * V[b,h,n,f]",
    "a running max of scores over a finished sum": (
        "D[b,h,m] = sum(n) exp(S[b,h,m,n])\n"
        "  G[b,h,m] = max(n) (S[b,h,m,n] * D[b,h,m])\n"
        "  O[b,h,m,f] = sum(n) exp(S[b,h,m,n] - G[b,h,m]) * V[b,h,n,f]"),
}


@pytest.mark.parametrize("name", NESTED_NORMALISERS)
def test_a_later_pass_reads_a_finished_sum_at_its_true_value(name: str) -> None:
    """A streamed sum is kept divided by 2^(its running max); a later pass that reads it
    inside an exponential or a max must apply that factor, as the outputs do."""
    text = ("spec nested {\n  index b: B batch, h: H head, m: M query, n: N key, e: E qk, "
            "f: F v\n  input Q[B, H, M, E], K[B, H, N, E], V[B, H, N, F]\n"
            "  param scale: float\n  S[b,h,m,n] = Q[b,h,m,e] * K[b,h,n,e] * scale\n  "
            + NESTED_NORMALISERS[name] + "\n  output O\n}\n")
    (spec,) = attndsl.frontend.text.parse_text(text).values()
    gen = torch.Generator().manual_seed(2)
    t = {"Q": torch.randn(1, 2, 37, 16, generator=gen) * 2,
         "K": torch.randn(1, 2, 45, 16, generator=gen) * 2,
         "V": torch.randn(1, 2, 45, 16, generator=gen)}
    want = attndsl.run_cascade(spec, t, {"scale": 0.5})["O"]
    got = attndsl.compile(spec)(t, {"scale": 0.5})["O"]
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
