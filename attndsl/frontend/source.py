"""Where a spec's text is, and the errors that point into it.

:class:`SpecError` is every error of the two spec frontends (the ``.attn`` text and the Python
builder): ``file:line:col: error: what``, the source line and a caret.  :class:`Where` is a
position (a token of a .attn file, or the Python line that called a builder method);
:func:`check_name` and :func:`parse_number` check the names and literals both frontends take.
"""

from __future__ import annotations

import difflib
import keyword
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from attndsl.errors import AttnDSLError, located_message
from attndsl.ir.cascade import SourceLoc

INT_LIMIT = 2**63  # integer literals must fit in int64
# Keep names the mask equation in the IR
RESERVED = frozenset({"spec", "index", "input", "tensor", "param", "mask", "output", "sum", "max",
                      "softmax", "cumsum", "recur", "inf", "Keep"})
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

class SpecError(AttnDSLError, ValueError):
    """A spec that does not parse or check.

    ``file``, ``line`` and ``col`` (1-based) locate the offending token; the message is
    ``{file}:{line}:{col}: error: {what}`` followed by the source line and a caret under it.
    """

    def __init__(self, what: str, file: str = "<string>", line: int = 1, col: int = 1,
                 source_line: str = "") -> None:
        self.what, self.file, self.line, self.col = what, file, line, col
        self.source_line = source_line
        super().__init__(located_message(what, file, line, col, source_line))


@dataclass(frozen=True)
class Where:
    """A position in a spec's source (a .attn file, or the Python line that called a builder)."""

    file: str
    line: int
    col: int
    text: str = ""  # the whole source line

    def error(self, what: str) -> SpecError:
        return SpecError(what, self.file, self.line, self.col, self.text)

    def loc(self) -> SourceLoc:
        return SourceLoc(self.file, self.line, self.col, self.text)

    def describe(self, other: Where) -> str:
        """'line 3', or 'file:3' when ``other`` is in another file."""
        return f"line {self.line}" if self.file == other.file else f"{self.file}:{self.line}"


class SourceText:
    """The text being parsed, to turn lark positions into :class:`Where` values."""

    def __init__(self, text: str, file: str) -> None:
        self.file = file
        self.lines = text.split("\n")

    def at(self, line: int, col: int) -> Where:
        text = self.lines[line - 1].rstrip("\r") if 0 < line <= len(self.lines) else ""
        return Where(self.file, line, col, text)

    def of(self, item: Any) -> Where:
        """Where a token or a tree's meta starts."""
        return self.at(item.line, item.column)

    def end(self) -> Where:
        return self.at(len(self.lines), len(self.lines[-1].rstrip("\r")) + 1)


class UnlocatedError(Exception):
    """A problem found by a shared check; ``slot`` says which operand (None: the node itself)."""

    def __init__(self, what: str, slot: int | None = None) -> None:
        super().__init__(what)
        self.what, self.slot = what, slot


def check_name(name: str, where: Where, what: str = "name") -> None:
    """Names end up in generated Python: plain ASCII identifiers, no keywords, no dunders."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise where.error(f"{what} {name!r} is not a valid name (use ASCII letters, digits and _, "
                          f"not starting with a digit)")
    if keyword.iskeyword(name):
        raise where.error(f"{name!r} is a Python keyword and cannot be used as {article(what)}")
    if name.startswith("__"):
        raise where.error(f"{name!r}: names starting with '__' are reserved")
    if name in RESERVED:
        raise where.error(f"{name!r} is a reserved word of the .attn language and cannot be "
                          f"used as {article(what)}")


def parse_number(text: str) -> int | float:
    """An integer (int64) or a finite float64 from a NUMBER token."""
    shown = text if len(text) <= 24 else text[:20] + "..."
    if any(ch in text for ch in ".eE"):
        value = float(text)
        if math.isinf(value):
            raise UnlocatedError(f"number {shown} overflows float64 (write inf for infinity)")
        return value
    if len(text) > 19 or int(text) >= INT_LIMIT:
        raise UnlocatedError(f"integer {shown} does not fit in 64 bits")
    return int(text)


def suggest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def article(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"

