"""The pipeline as data: named passes with options, verifiers between passes, the Tile IR
verifier, and the named rewrite rules counted per pass."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from attndsl.explain import explain
from attndsl.frontend.load import load_spec
from attndsl.ir import expr as E
from attndsl.ir import tile as tile_ir
from attndsl.ir.cascade import Cascade
from attndsl.ir.expr import IRError
from attndsl.passes.grad import _GRAD_RULES
from attndsl.passes.lower import Fused, inline, verify_fused
from attndsl.passes.pipeline import (
    PIPELINE,
    Pass,
    StreamOptions,
    compile_cascade,
    run_pipeline,
    verification_on,
)
from attndsl.passes.rules import MERGE_EXP, RULES, Rule, recording, simplify
from attndsl.passes.softmax import EXPAND
from attndsl.passes.stream import derive_schedule, verify_schedule

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _cascade(name: str) -> Cascade:
    cascade, _ = load_spec(str(EXAMPLES / name)).build()
    return cascade


# -- the pass list -----------------------------------------------------------------------------

def test_the_pipeline_is_a_list_of_named_documented_passes() -> None:
    assert [p.name for p in PIPELINE] == ["verify", "materialise-scans", "inline", "expand-softmax",
                                          "linearise", "stream", "tile"]
    assert all(p.doc for p in PIPELINE)


def test_compile_cascade_records_each_pass_in_order() -> None:
    comp = compile_cascade(_cascade("sink.attn"))
    assert [r.name for r in comp.trace] == [p.name for p in PIPELINE]
    assert comp.stage("inline") is comp.fused and comp.stage("tile") is comp.kernel


def test_stream_option_reaches_the_stream_pass() -> None:
    trace = run_pipeline(_cascade("softmax_3pass.attn"),
                         options={"stream": StreamOptions(stream=False)})
    assert len(trace[-2].ir.passes) == 3
    assert len(compile_cascade(_cascade("softmax_3pass.attn")).schedule.passes) == 1


def test_options_for_an_unknown_pass_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown pass\(es\) \['streaming'\]"):
        run_pipeline(_cascade("sink.attn"), options={"streaming": StreamOptions()})


def test_options_of_the_wrong_type_are_refused() -> None:
    with pytest.raises(TypeError, match="pass 'stream' takes StreamOptions"):
        run_pipeline(_cascade("sink.attn"), options={"stream": True})


def test_the_test_suite_verifies_between_passes(monkeypatch) -> None:
    assert verification_on()
    monkeypatch.setenv("ATTNDSL_VERIFY", "0")
    assert not verification_on()


def _breaks_the_kernel(s, _):
    """Lower, then drop the scalar arguments (a broken lowering)."""
    return replace(PIPELINE[-1].run(s, _), params=())


def test_a_pass_producing_an_ill_formed_kernel_is_caught_between_passes() -> None:
    passes = PIPELINE[:-1] + (Pass("tile", _breaks_the_kernel),)
    c = _cascade("softmax_3pass.attn")
    run_pipeline(c, passes=passes, verify=False)  # unnoticed without verification
    with pytest.raises(IRError, match=r"operand k0 = K\[b, h // G, n, e\], subscript 1: "
                                      r"parameter 'G' is not"):
        run_pipeline(c, passes=passes, verify=True)


# -- the Tile IR verifier -----------------------------------------------------------------------

@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("spec", sorted(p.name for p in EXAMPLES.iterdir()
                                        if p.suffix in (".attn", ".py")
                                        and not p.name.startswith("_")))
def test_every_example_kernel_passes_the_tile_verifier(spec: str, stream: bool) -> None:
    comp = compile_cascade(_cascade(spec), stream=stream)
    if comp.kernel is None:  # only the chunked linear form: no Tile IR, and it says why
        assert comp.linear.form == "chunked" and comp.quadratic_error
        return
    assert tile_ir.verify(comp.kernel) is comp.kernel


def _direct_kernel() -> tile_ir.TileKernel:
    return compile_cascade(_cascade("softmax_3pass.attn"), stream=False).kernel


def test_a_row_read_before_its_pass_is_refused() -> None:
    k = _direct_kernel()
    with pytest.raises(IRError, match=r"pass 1, max mx1_0: reads %g0 before it is defined"):
        tile_ir.verify(replace(k, passes=k.passes[1:]))


def test_a_rescaling_unit_must_be_a_stabiliser_of_its_pass() -> None:
    k = compile_cascade(_cascade("sink.attn")).kernel
    (p,) = k.passes
    bad = replace(p.sums[0], units=(("l9", 1),))
    with pytest.raises(IRError, match="rescaled by 'l9', which is not a stabilising max"):
        tile_ir.verify(replace(k, passes=(replace(p, sums=(bad,) + p.sums[1:]),)))


def test_a_row_store_of_a_value_product_is_refused() -> None:
    k = compile_cascade(_cascade("sink.attn")).kernel
    st = k.stores[0]
    bad = replace(st, indices=tuple(i for i in st.indices if i != "f"), tile=False)
    with pytest.raises(IRError, match=r"store O\[b, h, m\]: reads the value product"):
        tile_ir.verify(replace(k, stores=(bad,)))


def test_a_store_must_be_indexed_by_the_query() -> None:
    k = compile_cascade(_cascade("sink.attn")).kernel
    bad = replace(k.stores[0], indices=("b", "h", "f"))
    with pytest.raises(IRError, match="must be indexed by the query index 'm'"):
        tile_ir.verify(replace(k, stores=(bad,)))


def test_a_dot_of_an_operand_the_kernel_does_not_load_is_refused() -> None:
    k = compile_cascade(_cascade("sink.attn")).kernel
    with pytest.raises(IRError, match="dot qk0 reads an operand the kernel does not load"):
        tile_ir.verify(replace(k, operands=tuple(o for o in k.operands if o.side != "k")))


def test_an_operand_with_the_wrong_tile_row_is_refused() -> None:
    k = compile_cascade(_cascade("sink.attn")).kernel
    q = k.operands[0]
    bad = replace(q, row_dim=q.col_dim, col_dim=q.row_dim)
    with pytest.raises(IRError, match="operand q0 = Q.*subscript 3 must be the query index"):
        tile_ir.verify(replace(k, operands=(bad,) + k.operands[1:]))


def test_a_mask_reading_a_kernel_value_is_refused() -> None:
    k = compile_cascade(_cascade("sink.attn")).kernel
    with pytest.raises(IRError, match=r"mask: reads %l0 before it is defined"):
        tile_ir.verify(replace(k, mask=E.binary(E.Op.GT, E.row("l0"), 0.0)))


# -- the fused-cascade verifier and the softmax precondition -----------------------------------

def test_a_fused_output_still_reading_an_equation_is_refused() -> None:
    f = inline(_cascade("sink.attn"))
    name, idx, _ = f.outputs[0]
    s_read = E.reduce_sum("n", E.load("S", tuple(E.index(i) for i in "bhmn")))
    bad = Fused(f.cascade, ((name, idx, s_read),), f.mask)
    with pytest.raises(IRError, match="output O.*still reads S, which inlining should have"):
        verify_fused(bad)


def test_pass_analysis_needs_softmax_expanded_first() -> None:
    with pytest.raises(IRError, match="still holds a softmax: run the expand-softmax pass"):
        derive_schedule(inline(_cascade("document_mask.attn")))


def test_a_schedule_reading_a_later_pass_is_refused() -> None:
    s = compile_cascade(_cascade("softmax_3pass.attn"), stream=False).schedule
    with pytest.raises(IRError, match=r"pass 1, %mx1_0: reads %g0 before it is defined"):
        verify_schedule(replace(s, passes=s.passes[1:]))


def test_a_schedule_output_with_a_key_reduction_left_is_refused() -> None:
    s = compile_cascade(_cascade("sink.attn")).schedule
    name, idx, _ = s.outputs[0]
    left = E.reduce_sum("n", E.exp(E.index("n") * 1.0))
    with pytest.raises(IRError, match=r"output O\[b, h, m, f\]: still holds a reduction over "
                                      r"the key index"):
        verify_schedule(replace(s, outputs=((name, idx, left),)))


# -- named rules --------------------------------------------------------------------------------

def test_every_rewrite_rule_has_a_distinct_name() -> None:
    tables = [RULES, MERGE_EXP, EXPAND, _GRAD_RULES]
    names = [r.name for t in tables for r in t]
    assert all(isinstance(r, Rule) for t in tables for r in t)
    assert len(names) == len(set(names)), sorted(names)


def test_rewrite_counts_each_named_rule_that_fires() -> None:
    x = E.param("x")
    with recording() as counts:
        assert simplify((x * 1.0 + 0.0) * 1.0) == x
    assert dict(counts) == {"mul-one": 2, "add-zero": 1}


def test_nested_recordings_also_count_in_the_enclosing_one() -> None:
    x = E.param("x")
    with recording() as outer:
        simplify(x * 1.0)
        with recording() as inner:
            simplify(E.unary(E.Op.NEG, -x))
    assert dict(inner) == {"neg-neg": 1}
    assert dict(outer) == {"mul-one": 1, "neg-neg": 1}


def test_the_stream_pass_records_the_derivation_rules() -> None:
    comp = compile_cascade(_cascade("softmax_3pass.attn"))
    rules = dict(next(r for r in comp.trace if r.name == "stream").rules)
    assert rules["split-exp"] >= 1 and rules["defer-division"] >= 1


def test_explain_lists_the_passes_in_order_with_rule_counts() -> None:
    out = explain(_cascade("document_mask.attn"), lq=128, lkv=128)
    section = out.split("== passes, with the rewrite rules that fired in each ==\n")[1]
    section = section.split("\n== ")[0]
    heads = [ln.split(":")[0] for ln in section.splitlines() if not ln.startswith("   ")]
    assert heads == [f"{i + 1}. {p.name}" for i, p in enumerate(PIPELINE)]
    assert "   - expand-softmax x1" in section and "   - split-exp x1" in section
