"""Golden-text tests of the pass pipeline (in the style of filecheck tests): for each spec, the
IR after every pass, the named rewrite rules that fired in it, and the printed Tile IR, compared
with the checked-in text in ``tests/golden/<spec>.txt``.

When a change to the passes is intended, regenerate every golden file with::

    python -m pytest tests/test_golden.py --update-golden

and review the diff (``git diff tests/golden``) as part of the change.  The text holds no
hashes, addresses or paths, so it is the same on every machine.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from attndsl.frontend.load import load_spec
from attndsl.passes.pipeline import PIPELINE, Compiled, compile_cascade

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"

# spec file under examples/ -> what it covers
SPECS = {
    "softmax_3pass.attn": "FuseMax's 3-pass softmax written out: streamed to one pass",
    "alibi.py": "a causal ALiBi score_mod with a captured slope tensor",
    "sink.attn": "learned sinks: a normaliser with an extra term, no softmax",
    "sigmoid.attn": "sigmoid attention: no normaliser over the keys",
    "document_mask.attn": "a softmax under a document mask from a captured tensor",
    "document_mask.py": "the same document mask as a Python mask_mod",
}


def golden_text(spec: str, comp: Compiled) -> str:
    """The IR after each pass, then the rules that fired in it (name x count)."""
    lines = [f"# golden IR of examples/{spec}: {SPECS[spec]}",
             "# regenerate: python -m pytest tests/test_golden.py --update-golden"]
    for record in comp.trace:
        lines.append(f"== after {record.name} ==")
        lines.append(str(record.ir))
        fired = ", ".join(f"{rule} x{count}" for rule, count in record.rules)
        lines.append(f"-- rules fired: {fired or '(none)'}")
    return "\n".join(lines) + "\n"


def _compile(spec: str) -> Compiled:
    cascade, _ = load_spec(str(ROOT / "examples" / spec)).build()
    return compile_cascade(cascade)


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_ir_after_each_pass_matches_the_golden_text(spec: str, request) -> None:
    text = golden_text(spec, _compile(spec))
    path = GOLDEN / f"{Path(spec).stem}_{Path(spec).suffix[1:]}.txt"
    if request.config.getoption("--update-golden"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path.name} is missing: run pytest {__file__} --update-golden"
    expected = path.read_text()
    diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                        f"golden/{path.name}", "compiler output"))
    assert text == expected, f"the IR differs from golden/{path.name}:\n{diff}"


def test_golden_text_lists_every_pass_in_order() -> None:
    text = golden_text("sink.attn", _compile("sink.attn"))
    heads = [ln.removeprefix("== after ").removesuffix(" ==") for ln in text.splitlines()
             if ln.startswith("== after ")]
    assert heads == [p.name for p in PIPELINE]


def test_golden_text_is_the_same_on_a_second_compilation() -> None:
    """No hashes, addresses or counters that change between runs leak into the text."""
    assert golden_text("alibi.py", _compile("alibi.py")) == \
        golden_text("alibi.py", _compile("alibi.py"))
