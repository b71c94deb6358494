"""The ``.attn`` syntax: the LALR parser of grammar/attn.lark and its syntax errors.

:func:`parser` builds the parser once (a post-lexer joins lines inside brackets and after a
comma, and bounds the nesting of brackets); :func:`syntax_error` turns lark's errors into a
:class:`~attndsl.frontend.source.SpecError` that says what was expected, with a caret;
:func:`check_tree` bounds the depth of the parse tree before it is transformed.
"""

from __future__ import annotations

import importlib.resources
import keyword
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import (
    LarkError,
    UnexpectedCharacters,
    UnexpectedInput,
    UnexpectedToken,
)

from attndsl.frontend.source import RESERVED, SourceText, SpecError, check_name
from attndsl.ir.expr import MAX_DEPTH

GRAMMAR_FILE = "attn.lark"
MAX_BRACKETS = 64  # open ( and [ at once
# MAX_DEPTH (attndsl.ir.expr): levels of an expression tree, checked on the parse tree (lark's
# transformer recurses once per level) and on the IR of each equation with the equations it
# reads inlined (chained comparisons and equation chains nest without nesting the parse tree)

class TooDeep(Exception):
    def __init__(self, token: Token) -> None:
        super().__init__()
        self.token = token


class _Layout:
    """Post-lexer: a newline inside ( ) or [ ], or right after ',', continues the statement."""

    always_accept = ("_NL",)

    def process(self, stream: Iterable[Token]) -> Iterable[Token]:
        depth, prev = 0, None
        for tok in stream:
            if tok.type in ("LPAR", "LSQB"):
                depth += 1
                if depth > MAX_BRACKETS:
                    raise TooDeep(tok)
            elif tok.type in ("RPAR", "RSQB"):
                depth = max(0, depth - 1)
            elif tok.type == "_NL" and tok.value != ";" and (depth or prev == "COMMA"):
                continue
            prev = tok.type
            yield tok


def grammar_text() -> str:
    """grammar/attn.lark: from the source tree (a checkout, an editable install) or else from
    the installed ``attndsl.grammar`` package."""
    local = Path(__file__).resolve().parents[2] / "grammar" / GRAMMAR_FILE
    if local.is_file():
        return local.read_text(encoding="utf-8")
    resource = importlib.resources.files("attndsl.grammar").joinpath(GRAMMAR_FILE)
    return resource.read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def parser() -> Lark:
    """The LALR parser of grammar/attn.lark (built once)."""
    return Lark(grammar_text(), parser="lalr", propagate_positions=True, postlex=_Layout(),
                maybe_placeholders=True)


# readable names of the terminals in syntax errors
_WORDS = {"NAME": "a name", "NUMBER": "a number", "CMP_OP": "a comparison", "_NL": "end of line",
          "$END": "end of input"}
_EXPR_START = {"NAME", "NUMBER", "(", "-", "!", "~", "sum", "max", "softmax", "cumsum", "recur",
               "inf", "True", "False"}
_OPERATORS = {"+", "-", "*", "/", "//", "%", "**", "&", "|", "^", "<<", ">>", "CMP_OP"}
_FIRST = {"]": 0, ")": 1, "}": 2, ",": 3}


def _expected(names: Iterable[str]) -> str:
    """'; expected one of: ...' for a set of terminal names, literals quoted, in plain words."""
    literal = {t.name: t.pattern.value for t in parser().terminals if t.pattern.type == "str"}
    items = {literal.get(n, n) for n in names}
    words: list[str] = []
    if {"NAME", "NUMBER", "("} <= items:
        items -= _EXPR_START
        words.append("an expression")
    if {"+", "*", "CMP_OP"} <= items:
        items -= _OPERATORS
        words.append("an operator")
    quoted = sorted((i for i in items if i not in _WORDS and i in literal.values()),
                    key=lambda q: (_FIRST.get(q, 9), q))
    words += sorted((_WORDS.get(i, i.lower()) for i in items if i not in quoted),
                    key=lambda w: (w.startswith("end of"), w))
    shown = [f"'{q}'" for q in quoted]
    if len(shown) + len(words) == 1:
        return f"; expected {(shown + words)[0]}"
    listed = ", ".join(([" ".join(shown)] if shown else []) + words)
    return f"; expected one of: {listed}" if listed else ""


def _found(tok: Token) -> str:
    if tok.type == "$END":
        return "end of input"
    if tok.type == "_NL":
        return "end of line" if tok.value != ";" else "';'"
    value = tok.value if len(tok.value) <= 24 else tok.value[:20] + "..."
    if tok.type == "NAME":
        return f"name {value!r}"
    if tok.type == "NUMBER":
        return f"number {value}"
    return repr(value)


def syntax_error(err: UnexpectedInput, text: str, src: SourceText) -> SpecError:
    if isinstance(err, UnexpectedToken):
        tok = err.token
        at = src.end() if tok.type == "$END" else src.of(tok)
        call = _call_before(text[: tok.start_pos]) if _starts_expression(tok) else None
        if call is not None:  # f(n) body: the mistake is f, not the body after it
            return src.of(call).error(
                f"{call.value}(...) is followed by an expression, but {call.value!r} is not an "
                f"operator with a body; the ones that take an index and then a body are "
                f"{', '.join(f'{w}(n)' for w in BIG_OPERATORS)}")
        what = f"unexpected {_found(tok)}{_expected(err.accepts or err.expected)}"
        if tok.type == "NAME" and tok.value in RESERVED:
            what += f" ('{tok.value}' is a reserved word)"
        opened = _open_bracket(text[: tok.start_pos] if tok.type != "$END" else text)
        if opened is not None and opened.line < at.line:
            what += f" (the '{opened.value}' on line {opened.line} is not closed)"
        return at.error(what)
    if isinstance(err, UnexpectedCharacters):
        ch = err.char
        what = f"unexpected character {ch!r}"
        if ch.isalpha() and not ch.isascii():
            what += " (names may use only ASCII letters, digits and _)"
        elif ch in "'\"":
            what += " (the .attn language has no strings)"
        else:
            what += _expected_before(text[: err.pos_in_stream])
        return src.at(err.line, err.column).error(what)
    return src.at(getattr(err, "line", 1) or 1, getattr(err, "column", 1) or 1).error(
        "syntax error")


BIG_OPERATORS = ("sum", "max", "softmax", "cumsum", "recur")  # word(index) body


def _starts_expression(tok: Token) -> bool:
    return tok.type in ("NAME", "NUMBER", "LPAR") or tok.value in _EXPR_START - {"-", "~", "!"}


def _call_before(prefix: str) -> Token | None:
    """The NAME of a call ``NAME(...)`` that ``prefix`` ends with, if it does."""
    try:
        toks = [t for t in parser().lex(prefix) if t.type != "_NL"]
    except (LarkError, TooDeep):
        return None
    if not toks or toks[-1].type != "RPAR":
        return None
    depth = 0
    for k in range(len(toks) - 1, -1, -1):
        depth += {"RPAR": 1, "LPAR": -1}.get(toks[k].type, 0)
        if depth == 0:
            return toks[k - 1] if k > 0 and toks[k - 1].type == "NAME" else None
    return None


def _open_bracket(prefix: str) -> Token | None:
    """The innermost ( or [ left open at the end of ``prefix``."""
    stack: list[Token] = []
    try:
        for tok in parser().lex(prefix):
            if tok.type in ("LPAR", "LSQB"):
                stack.append(tok)
            elif tok.type in ("RPAR", "RSQB") and stack:
                stack.pop()
    except (LarkError, TooDeep):
        return None
    return stack[-1] if stack else None


def _expected_before(prefix: str) -> str:
    """What the parser would accept after ``prefix`` (the text before a bad character)."""
    try:
        parser().parse(prefix)
    except UnexpectedToken as err:
        if err.token.type == "$END":
            return _expected((err.accepts or err.expected) - {"$END"})
    except (LarkError, TooDeep):
        pass
    return ""


def check_tree(tree: Tree, src: SourceText) -> None:
    """Depth limit (a deep tree would exhaust Python's recursion) and safe names, iteratively."""
    stack: list[tuple[Tree, int, Tree]] = [(tree, 0, tree)]
    names: list[Token] = []
    while stack:
        node, depth, top = stack.pop()
        if depth > MAX_DEPTH:
            raise src.of(top.meta).error(f"expression is nested too deeply (more than "
                                         f"{MAX_DEPTH} levels of operators)")
        for child in node.children:
            if isinstance(child, Tree):  # start > spec > statement > expression > ...
                stack.append((child, depth + 1, child if depth == 2 else top))
            elif isinstance(child, Token) and child.type == "NAME":
                names.append(child)
    for tok in sorted(names, key=lambda t: (t.line, t.column)):
        if keyword.iskeyword(tok.value) or tok.value.startswith("__"):
            check_name(tok.value, src.of(tok))

