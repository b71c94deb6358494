"""User errors: one base class, and every message says what was expected and where.

.attn text and builder specs are located at ``file:line:col`` with a caret; score_mod /
mask_mod programs and make() factories at their function, file and line.  The CLI turns every
such error into exit code 2 and the message, never a traceback.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch

import attndsl
from attndsl.api import AttentionError
from attndsl.checking import index_sizes, oracle, random_problem
from attndsl.cli import main
from attndsl.eager import EagerError
from attndsl.errors import AttnDSLError
from attndsl.frontend.flex import lower_flex
from attndsl.frontend.load import SpecLoadError, load_spec
from attndsl.frontend.text import SpecError, parse_text
from attndsl.frontend.trace import TraceError
from attndsl.ir import expr as E
from attndsl.ir.evaluate import evaluate
from attndsl.ir.expr import FLOAT, IRError, Op
from attndsl.passes.mask import MaskAnalysisError
from attndsl.passes.pipeline import compile_cascade
from attndsl.passes.rules import simplify
from attndsl.passes.stream import NotStreamable
from attndsl.passes.tiling import LoweringError
from attndsl.runtime.modules import load_kernel_module

ROOT = Path(__file__).resolve().parent.parent
CAUSAL = (ROOT / "examples" / "causal.attn").read_text()
POW_V = CAUSAL.replace("P[b,h,m,n] * V[b,h,n,f]", "P[b,h,m,n] ** V[b,h,n,f]")


def _line_of(text: str, fragment: str) -> int:
    return next(k for k, ln in enumerate(text.split("\n"), 1) if fragment in ln)


@pytest.mark.parametrize("cls, base", [
    (SpecError, ValueError), (TraceError, TypeError), (SpecLoadError, ValueError),
    (IRError, ValueError), (LoweringError, ValueError), (NotStreamable, ValueError),
    (EagerError, ValueError), (MaskAnalysisError, ValueError), (AttentionError, ValueError)])
def test_every_user_error_class_derives_from_attndslerror_and_keeps_its_builtin_base(
        cls: type, base: type) -> None:
    assert issubclass(cls, AttnDSLError) and issubclass(cls, base)
    assert attndsl.AttnDSLError is AttnDSLError


def test_a_lowering_error_of_a_text_spec_points_at_the_equation_with_a_caret() -> None:
    c = parse_text(POW_V, "pow.attn")["causal"]
    with pytest.raises(LoweringError) as info:
        compile_cascade(c)
    line = _line_of(POW_V, "**")
    head, source, caret = str(info.value).split("\n")
    assert head.startswith(f"pow.attn:{line}:3: error: cannot compile causal: ")
    assert "must come from one value tensor" in head
    assert source.strip() == "O[b,h,m,f] = P[b,h,m,n] ** V[b,h,n,f]"
    assert caret.index("^") == source.index("O")


def test_a_lowering_error_about_the_dot_product_blames_the_equation_reading_q_and_k() -> None:
    text = CAUSAL.replace("Q[b,h,m,e] * K[b,h,n,e] * scale", "(Q[b,h,m,e] + K[b,h,n,e]) * scale")
    c = parse_text(text, "qk.attn")["causal"]
    with pytest.raises(LoweringError) as info:
        compile_cascade(c)
    assert str(info.value).startswith(f"qk.attn:{_line_of(text, 'S[b,h,m,n] =')}:3: error:")


def test_lone_carriage_returns_end_lines_so_errors_have_the_right_line_and_column() -> None:
    text = CAUSAL.replace("param scale: float", "param scale: flot")
    for newline in ("\r", "\r\n"):
        with pytest.raises(SpecError) as info:
            parse_text(text.replace("\n", newline), "cr.attn")
        err = info.value
        assert (err.line, err.col) == (_line_of(text, "flot"), 16)
        assert err.source_line == "  param scale: flot"


def test_check_sizes_an_input_extent_that_no_index_names() -> None:
    text = (ROOT / "examples" / "softmax_3pass.attn").read_text().replace(
        "K[B, HKV, N, E]", "K[B, dHKV, N, E]")
    c = parse_text(text)["softmax_3pass"]
    sizes = index_sizes(c, 1, 4, 2, 3, 5, 16, 16)
    prob = random_problem(c, sizes, torch.float32, torch.Generator().manual_seed(0))
    assert prob.inputs["K"].shape == (1, 2, 5, 16)  # h // G with G = 4 // 2
    assert oracle(c, prob)["O"].shape == (1, 4, 3, 16)


def _score_wrong_arity(score, b, h):
    return score


def _mask_wrong_arity(b, h, q_idx, kv_idx, extra):
    return q_idx >= kv_idx


@pytest.mark.parametrize("kind, fn, expected", [
    ("score_mod", _score_wrong_arity, "score_mod(score, b, h, q_idx, kv_idx)"),
    ("mask_mod", _mask_wrong_arity, "mask_mod(b, h, q_idx, kv_idx)")])
def test_a_program_of_the_wrong_arity_names_its_function_file_line_and_the_signature(
        kind: str, fn, expected: str) -> None:
    with pytest.raises(TraceError) as info:
        lower_flex(**{kind: fn})
    msg = str(info.value)
    assert expected in msg and fn.__name__ in msg and "unknown location" not in msg
    assert f"{__file__}:{fn.__code__.co_firstlineno} in {fn.__name__}()" in msg


def _score_returns_none(score, b, h, q_idx, kv_idx):
    score + 1


def _score_returns_a_vector(score, b, h, q_idx, kv_idx):
    return torch.ones(3)


@pytest.mark.parametrize("fn, got", [(_score_returns_none, "got None"),
                                     (_score_returns_a_vector, "of shape (3,)")])
def test_a_score_mod_returning_no_scalar_is_located_at_its_return_line(fn, got: str) -> None:
    with pytest.raises(TraceError) as info:
        lower_flex(score_mod=fn)
    msg = str(info.value)
    line = fn.__code__.co_firstlineno + 1
    assert got in msg and f"{__file__}:{line} in {fn.__name__}()" in msg


def test_a_score_mod_returning_a_python_int_is_a_constant_score_that_runs() -> None:
    flex = lower_flex(score_mod=lambda score, b, h, q_idx, kv_idx: 3)
    compiled = compile_cascade(flex.cascade)
    q = torch.randn(1, 1, 4, 16)
    out = load_kernel_module(compiled.kernel).launch({"Q": q, "K": q, "V": q},
                                                     {"scale": 0.25, "G": 1}, {})
    torch.testing.assert_close(out["O"], q.mean(dim=2, keepdim=True).expand_as(q))


@pytest.mark.parametrize("value, dtype, folded", [
    (3, FLOAT, 3.0), (-2.7, "int", -2), (2.5, "bool", True), (0, "bool", False)])
def test_a_cast_of_a_constant_folds_as_torch_converts(value, dtype, folded) -> None:
    e = simplify(E.unary(Op.CAST, E.const(value), dtype))
    assert e.op is Op.CONST and e.arg == folded and type(e.arg) is type(folded)


def test_an_integer_beyond_int64_in_a_score_mod_is_refused_at_its_line() -> None:
    def big(score, b, h, q_idx, kv_idx):
        return score + (1 << 70)

    with pytest.raises(TraceError, match="does not fit in 64 bits") as info:
        lower_flex(score_mod=big)
    assert f"{__file__}:{big.__code__.co_firstlineno + 1}" in str(info.value)


def test_integer_division_by_zero_in_the_oracle_is_an_eager_error() -> None:
    # the frontends refuse a divisor that can be zero; the evaluator refuses one that is
    expr = E.binary(Op.MOD, E.index("m"), E.binary(Op.SUB, E.index("n"), E.const(1)))
    ranges = {"m": torch.arange(3), "n": torch.arange(3)}
    with pytest.raises(EagerError, match="by zero"):
        evaluate(expr, ["m", "n"], ranges, {})


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


BAD_SPECS = {
    "pow.attn": (POW_V, "pow.attn:"),
    "arity.py": ("def score_mod(score, b, h):\n    return score\n", "arity.py:1 in score_mod()"),
    "raises.py": ("def make(B, H, Lq, Lkv, device):\n    return {}['x']\n",
                  "raises.py:2 in make()"),
    "notdict.py": ("def make(B, H, Lq, Lkv, device):\n    return [1]\n", "must return a dict"),
    "rank.attn": (CAUSAL.replace("K[b,h,n,e]", "K[b,h,n,e,e]"), "rank.attn:"),
}


@pytest.mark.parametrize("command", ["compile", "check", "explain"])
@pytest.mark.parametrize("name", sorted(BAD_SPECS))
def test_the_cli_reports_a_bad_spec_with_exit_code_2_and_no_traceback(
        tmp_path: Path, capsys, command: str, name: str) -> None:
    text, where = BAD_SPECS[name]
    spec = _write(tmp_path, name, text)
    extra = {"compile": ["-o", str(tmp_path / "o.py")], "check": ["--trials", "1"],
             "explain": []}[command]
    assert main([command, spec, *extra]) == 2
    err = capsys.readouterr().err
    assert where in err and "Traceback" not in err


def test_a_make_factory_that_raises_is_reported_at_the_line_that_raised(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, "m.py", BAD_SPECS["raises.py"][0]))
    with pytest.raises(SpecLoadError, match=r"m\.py:2 in make\(\): .* raised KeyError"):
        spec.build()


@pytest.mark.parametrize("call, what", [
    (lambda b: b.idx(3), "idx() takes a name"), (lambda b: b.var(3), "var() takes a name"),
    (lambda b: b.read(3), "read() takes a name"), (lambda b: b.output(3), "output() takes a name"),
    (lambda b: b.eq("O", 5, 1.0), "eq() takes its left-hand side indices")])
def test_a_builder_call_with_a_non_name_is_a_located_spec_error(call, what: str) -> None:
    with pytest.raises(SpecError, match=re.escape(what)) as info:
        call(attndsl.CascadeBuilder("x"))
    assert info.value.file == __file__


def test_a_score_mod_that_is_not_a_function_says_what_was_expected() -> None:
    with pytest.raises(TraceError, match=r"score_mod must be a function score_mod\(score, b, h"):
        lower_flex(score_mod=5)
