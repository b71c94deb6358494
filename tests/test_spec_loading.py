"""Hostile Python spec files through the command line: every fault is exit 2 with the user's
file and line, never another exit code, a traceback, or a location inside attndsl."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from attndsl.checking import compare
from attndsl.cli import main

SPECS = {
    "sys.exit while importing": ("import sys\nsys.exit(3)\n",
                                 r"bad\.py:2 in <module>\(\): importing .*bad\.py raised "
                                 r"SystemExit: 3"),
    "an error while importing": ("x = 1\nraise RuntimeError('boom')\n",
                                 r"bad\.py:2 in <module>\(\): importing .* raised RuntimeError: "
                                 r"boom"),
    "sys.exit in make()": ("def make(B, H, Lq, Lkv, device):\n    import sys\n    sys.exit(0)\n",
                           r"bad\.py:3 in make\(\): make\(B, H, Lq, Lkv, device\) raised "
                           r"SystemExit: 0"),
    "sys.exit in a score_mod": ("import sys\ndef score_mod(s, b, h, q, kv):\n    sys.exit(4)\n",
                                r"raised SystemExit: 4\n  at .*bad\.py:3 in score_mod\(\)"),
    "a score_mod that is not a function": ("import torch\n\nscore_mod = 5\n",
                                           r"bad\.py:3: score_mod is int 5; expected a function "
                                           r"or None"),
}


@pytest.mark.parametrize("fault", sorted(SPECS))
def test_a_hostile_python_spec_exits_2_naming_its_own_file_and_line(
        fault: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text, match = SPECS[fault]
    spec = tmp_path / "bad.py"
    spec.write_text(text)
    assert main(["compile", str(spec), "-o", str(tmp_path / "k.py")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "attndsl/frontend" not in err, err
    assert re.search(match, err), err


def test_an_unknown_check_dtype_is_refused_by_the_check_command_naming_the_option(
        capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["check", "causal.attn", "--dtypes", "fp32,fp64"])
    assert exit_.value.code == 2
    assert "attndsl check: error: argument --dtypes: unknown dtype(s) ['fp64']" in \
        capsys.readouterr().err


def test_a_nan_where_the_oracle_is_nan_agrees_and_anywhere_else_is_flagged() -> None:
    """A score program giving NaN on some rows made ``attndsl check`` report the kernel as
    wrong (exit 1) although it agreed with the oracle there."""
    ref = {"O": torch.tensor([[float("nan"), 1.0]], dtype=torch.float64)}
    agree = compare({"O": torch.tensor([[float("nan"), 1.0]])}, ref)
    assert not agree.nan and agree.worst() == 0.0
    stray = compare({"O": torch.tensor([[float("nan"), float("nan")]])}, ref)
    assert stray.nan and stray.worst() == float("inf")


def test_a_text_spec_saved_with_a_byte_order_mark_and_crlf_compiles(tmp_path: Path) -> None:
    """Editors that write UTF-8 with a BOM made every such file fail at 1:1 (unexpected
    character '\\ufeff')."""
    from attndsl.frontend.text import parse_file

    example = Path(__file__).resolve().parents[1] / "examples" / "alibi.attn"
    spec = tmp_path / "alibi.attn"
    spec.write_bytes(b"\xef\xbb\xbf" + example.read_bytes().replace(b"\n", b"\r\n"))
    assert str(parse_file(spec)["alibi"]) == str(parse_file(example)["alibi"])


def test_bytes_that_are_not_utf8_are_located_at_their_column_with_the_line_shown(
        tmp_path: Path) -> None:
    from attndsl.frontend.source import SpecError
    from attndsl.frontend.text import parse_file

    bad = tmp_path / "bad.attn"
    bad.write_bytes(b"spec s {\r\n  index b: B batch \xff\xfe\r\n}\r\n")
    with pytest.raises(SpecError) as info:
        parse_file(bad)
    assert str(info.value).splitlines() == [
        f"{bad}:2:20: error: the file is not valid UTF-8 (byte 0xff)",
        "    index b: B batch \ufffd\ufffd", "                     ^"]
