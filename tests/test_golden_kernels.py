"""Golden-text tests of the Triton printers: the printed forward kernel (its metadata tables and
the ``attention_fwd_kernel`` function) of two examples, compared with the checked-in text in
``tests/golden/kernel_<spec>.txt``, and the printed backward of causal FlexAttention
(``tests/golden/backward_causal_flex.txt``).

When a change to the printer is intended, regenerate with::

    python -m pytest tests/test_golden_kernels.py --update-golden

and review the diff (``git diff tests/golden``): it shows what every generated kernel now
does per key tile.  The text holds no hashes, versions or paths.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path

import pytest
import torch
from attndsl.codegen.triton import _read_as_own_weights

from attndsl.autograd import backward_source
from attndsl.frontend.flex import lower_flex
from attndsl.frontend.load import load_spec
from attndsl.ir import expr as E
from attndsl.ir.expr import Op
from attndsl.passes.pipeline import compile_cascade
from attndsl.runtime.modules import module_source

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"

# spec file under examples/ -> what it covers
SPECS = {
    "causal.attn": "causal softmax with a log-sum-exp output: masked and unmasked key tiles",
    "alibi.attn": "ALiBi + causal: a captured per-head slope hoisted out of the key loop",
}


def kernel_text(spec: str) -> str:
    """From the first metadata table to the end of the kernel function."""
    cascade, _ = load_spec(str(ROOT / "examples" / spec)).build()
    source = module_source(compile_cascade(cascade).kernel)
    start = source.index("# tensor name -> (kernel pointer")
    kernel = source.index("\ndef attention_fwd_kernel(")
    end = re.compile(r"^\S", re.M).search(source, source.index("\n):\n", kernel) + 4).start()
    return (f"# golden kernel of examples/{spec}: {SPECS[spec]}\n"
            f"# regenerate: python -m pytest tests/test_golden_kernels.py --update-golden\n"
            + source[start:end].rstrip() + "\n")


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_printed_kernel_matches_the_golden_text(spec: str, request) -> None:
    text = kernel_text(spec)
    path = GOLDEN / f"kernel_{Path(spec).stem}_{Path(spec).suffix[1:]}.txt"
    if request.config.getoption("--update-golden"):
        path.write_text(text)
    assert path.exists(), f"{path.name} is missing: run pytest {__file__} --update-golden"
    expected = path.read_text()
    diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                        f"golden/{path.name}", "printer output"))
    assert text == expected, f"the kernel differs from golden/{path.name}:\n{diff}"


def _causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def backward_text() -> str:
    """The printed backward of causal FlexAttention: its two step functions and the dK/dV
    and dQ kernels that call them."""
    source = backward_source(lower_flex(None, _causal).cascade)
    start = source.index("@triton.jit\ndef _dkdv_step(")
    end = source.index("\n# kernel -> its runtime arguments")
    return ("# golden backward of FlexAttention causal (mask_mod kv_idx <= q_idx): the dK/dV and "
            "dQ kernels\n# regenerate: python -m pytest tests/test_golden_kernels.py "
            "--update-golden\n" + source[start:end].rstrip() + "\n")


def test_printed_backward_matches_the_golden_text(request) -> None:
    text = backward_text()
    path = GOLDEN / "backward_causal_flex.txt"
    if request.config.getoption("--update-golden"):
        path.write_text(text)
    assert path.exists(), f"{path.name} is missing: run pytest {__file__} --update-golden"
    expected = path.read_text()
    diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                        f"golden/{path.name}", "printer output"))
    assert text == expected, f"the backward differs from golden/{path.name}:\n{diff}"


def test_each_backward_kernel_prints_its_step_once_and_every_loop_calls_it() -> None:
    """One @triton.jit step function per backward kernel, called with MASKED from each
    sparsity branch (partial and full block-table tiles, each in its unrolled and its
    one-tile-per-trip loop; every tile masked; none masked); the unmasked calls evaluate no
    mask."""
    source = backward_source(lower_flex(None, _causal).cascade)
    for step in ("_dkdv_step", "_dq_step"):
        assert source.count(f"def {step}(") == 1
        calls = re.findall(rf"= {step}\(.*MASKED=(True|False)\)", source)
        assert sorted(calls) == ["False"] * 3 + ["True"] * 3
    assert source.count("if MASKED:") == 2 and source.count("qk = tl.dot(") == 2


def test_printed_kernel_is_the_same_on_a_second_compilation() -> None:
    """No hashes, counters or addresses that change between compilations leak into it."""
    assert kernel_text("alibi.attn") == kernel_text("alibi.attn")


def test_the_score_is_printed_once_per_key_tile_step() -> None:
    """The score expression (here qk * scale * log2 e - slope * (m - n) * log2 e) is
    evaluated once per step: the running sums read y_m_i instead of re-evaluating it.  Its
    distance m - n is read on the rows relative to the key tile against constant columns."""
    text = kernel_text("alibi.attn")
    steps = text.count("qk = tl.dot(")
    distance = "((offs_m - start_n)[:, None] - tl.arange(0, BLOCK_N)[None, :])"
    assert steps > 0 and text.count(distance) == steps
    assert "offs_n[None, :])" not in text.split("y_m_i = ", 1)[1].split("\n", 1)[0]


def test_each_pass_prints_its_key_tile_step_once_and_every_loop_calls_it() -> None:
    """One @triton.jit step function per pass, called with MASKED from each sparsity branch
    (two block-table loops, each unrolled or one tile per trip; three closed-form /
    range-table segments; dense and masked)."""
    cascade, _ = load_spec(str(ROOT / "examples" / "softmax_3pass.attn")).build()
    kernel = compile_cascade(cascade).kernel
    source = module_source(kernel)
    for i in range(1, len(kernel.passes) + 1):
        assert source.count(f"def _key_tile_step_{i}(") == 1
        assert source.count(f"= _key_tile_step_{i}(") == 9
    assert source.count("tl.dot(") == len(kernel.passes) * 2


def _step_source(cascade) -> str:
    """The printed key-tile step function of pass 1 of ``cascade``."""
    source = module_source(compile_cascade(cascade).kernel)
    start = source.index("def _key_tile_step_1(")
    return source[start:source.index("\ndef ", start + 1)], source


def test_softcap_prints_tanh_as_one_exp2_and_one_division_with_the_cap_folded() -> None:
    """cap * tanh(qk * scale / cap) in log2 units is printed as A - B / (2^(qk * c) + 1) with
    A = cap log2 e, B = 2 A and c = 2 scale log2 e / cap hoisted: no sigmoid, no division by
    the cap, no multiply after the division."""
    def softcap(score, b, h, q_idx, kv_idx):
        return 30 * torch.tanh(score / 30)

    step, source = _step_source(lower_flex(softcap).cascade)
    assert "sigmoid" not in step and "/ 30" not in step
    score = re.search(r"^\s*y_m_i = (.*)$", step, re.M).group(1)
    # the division is the fast one, which the constant A absorbs (test_absorbed_quotient.py)
    a, b, c = re.fullmatch(r"\(([\d.]+) - _absorbed_div\(([\d.]+), \(tl\.exp2\(\(qk \* (c\d+)\)\) "
                           r"\+ 1\.0\)\)\)", score).groups()
    assert float(a) == pytest.approx(30 * 1.4426950408889634, rel=1e-15)
    assert float(b) == pytest.approx(2 * float(a), rel=1e-15)
    hoisted = re.search(rf"^\s*{c} = \(sm_scale \* ([\d.e-]+)\)", source, re.M).group(1)
    assert float(hoisted) == pytest.approx(2 * 1.4426950408889634 / 30, rel=1e-15)


def test_a_parameter_cap_is_folded_into_the_multiply_add_after_the_division() -> None:
    """softcap.attn's cap is a parameter: cap log2 e and 2 cap log2 e are hoisted scalars and
    the score is one subtraction of a quotient."""
    cascade, _ = load_spec(str(ROOT / "examples" / "softcap.attn")).build()
    step, _ = _step_source(cascade)
    score = re.search(r"^\s*y_m_i = (.*)$", step, re.M).group(1)
    assert "sigmoid" not in score
    assert re.fullmatch(r"\(c\d+ - \(c\d+ / \(tl\.exp2\(.*\) \+ 1\.0\)\)\)", score), score


def _causal_kernel():
    cascade, _ = load_spec(str(ROOT / "examples" / "causal.attn")).build()
    return compile_cascade(cascade).kernel


def test_a_stabiliser_read_only_in_its_own_weights_is_floored_at_minus_flt_max() -> None:
    """exp2(s - m) and the rescale 2^(m_old - m) are 0 for any finite m when the row has no
    finite score yet, so -inf becomes -FLT_MAX, not by a compare and a select: the running
    max starts there, so it is its own stabiliser and no key tile floors it."""
    source = module_source(_causal_kernel())
    assert "m_i = tl.full([BLOCK_M], -3.4028234663852886e+38, tl.float32)" in source
    assert 'm_i_new == float("-inf")' not in source
    assert "tl.maximum(m_i_new, -3.4028234663852886e+38)" not in source
    assert "m_i_use =" not in source  # one running max is carried, not two



def test_a_stabiliser_read_outside_its_own_weights_keeps_zero_for_an_empty_row() -> None:
    """A sum reading exp(-m) would see the replacement itself (exp(FLT_MAX) = inf): there the
    stabiliser of an empty row stays 0."""
    kernel = _causal_kernel()
    p = kernel.passes[0]
    mx = next(x for x in p.maxes if x.stabilizer)
    assert _read_as_own_weights(p, mx)
    other = E.unary(Op.EXP2, E.binary(Op.SUB, E.const(0.0), E.row(mx.var)))
    odd = dataclasses.replace(p, sums=(dataclasses.replace(p.sums[0], body=other),))
    assert not _read_as_own_weights(odd, mx)
    shifted = E.unary(Op.EXP2, E.binary(Op.SUB, E.binary(Op.ADD, mx.arg, E.const(1.0)),
                                        E.row(mx.var)))
    plus_one = dataclasses.replace(p, sums=(dataclasses.replace(p.sums[0], body=shifted),))
    assert not _read_as_own_weights(plus_one, mx)
