"""The .attn text frontend and the Python cascade builder.

Golden cascades, every example, exact error messages (location and caret), the Einsum implicit
sums, text == builder == FlexAttention as IR, and hostile input (never anything but a Cascade
or a SpecError).
"""

from __future__ import annotations

import importlib.resources
import io
import logging
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lark import Lark
from lark import logger as lark_logger

from attndsl.eager import run_cascade
from attndsl.frontend import builder as bld
from attndsl.frontend.builder import CascadeBuilder, cascade, exp, log, max_over, sum_over
from attndsl.frontend.flex import lower_flex
from attndsl.frontend.text import (
    SpecError,
    format_cascade,
    grammar_text,
    implicit_sums,
    parse_file,
    parse_text,
)
from attndsl.ir import expr as E
from attndsl.ir.cascade import Cascade, verify
from attndsl.ir.expr import INT, Op

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.attn"))
EXPECTED_EXAMPLES = {"softmax_3pass", "causal", "sliding_window", "prefix_lm", "document_mask",
                     "alibi", "softcap", "relative_bias", "gqa_causal", "cross_attention",
                     "sigmoid", "relu2", "off_by_one", "sink", "softpick", "differential"}


def one(text: str) -> Cascade:
    specs = parse_text(text, "t.attn")
    assert len(specs) == 1
    return next(iter(specs.values()))


# -- golden cascades ---------------------------------------------------------------------------

TINY = """\
# a tiny spec: comments, inferred roles, a default, a mask, the builtin softmax
spec tiny {
  index m: M, n: N, e: E, f: F
  input Q[M, E], K[N, E], V[N, F]
  param scale: float = 0.125
  mask n <= m
  S[m, n] = Q[m, e] * K[n, e] * scale
  O[m, f] = softmax(n) S[m, n] * V[n, f]
  output O
}
"""

TINY_IR = """\
cascade tiny
  index m: M (query)
  index n: N (key)
  index e: E (qk)
  index f: F (v)
  input Q[M, E]: float
  input K[N, E]: float
  input V[N, F]: float
  param scale: float = 0.125
  mask Keep[m, n] = n <= m
  S[m, n] = (sum(e) (Q[m, e] * K[n, e])) * scale
  O[m, f] = sum(n) ((softmax(n) S[m, n]) * V[n, f])
  outputs O"""


def test_golden_tiny() -> None:
    assert str(one(TINY)) == TINY_IR


def test_golden_every_statement() -> None:
    text = """\
spec all_of_it {
  index b: B batch, h: H head, q: Lq query, k: Lkv key, d: D qk, v: Dv v
  input Q[B, H, Lq, D]; input K[B, HKV, Lkv, D], V[B, HKV, Lkv, Dv]
  tensor table[H, T]: float, doc[Lkv]: int
  param G: int
  param lam: float = -0.5
  mask (doc[k] == 1 | k <= q) & !(q - k >= 64)
  S[b, h, q, k] = Q[b, h, q, d] * K[b, h // G, k, d] + table[h, q - k + Lkv - 1]
  M[b, h, q] = max(k) S[b, h, q, k]
  O[b, h, q, v] = exp(S[b, h, q, k] - M[b, h, q]) * V[b, h // G, k, v] / sum(k) exp(
      S[b, h, q, k] - M[b, h, q])
  L[b, h, q] = M[b, h, q] + log(sum(k) exp(S[b, h, q, k] - M[b, h, q])) * lam ** 2
  output O,
         L
}
"""
    assert str(one(text)) == """\
cascade all_of_it
  index b: B (batch)
  index h: H (head)
  index q: Lq (query)
  index k: Lkv (key)
  index d: D (qk)
  index v: Dv (v)
  input Q[B, H, Lq, D]: float
  input K[B, HKV, Lkv, D]: float
  input V[B, HKV, Lkv, Dv]: float
  captured table[H, T]: float
  captured doc[Lkv]: int
  param G: int
  param lam: float = -0.5
  mask Keep[b, h, q, k] = ((doc[k] == 1) | (k <= q)) & !(q - k >= 64)
  S[b, h, q, k] = (sum(d) (Q[b, h, q, d] * K[b, h // G, k, d])) + table[h, q - k + Lkv - 1]
  M[b, h, q] = max(k) S[b, h, q, k]
  O[b, h, q, v] = (sum(k) (exp(S[b, h, q, k] - M[b, h, q]) * V[b, h // G, k, v])) / \
(sum(k) exp(S[b, h, q, k] - M[b, h, q]))
  L[b, h, q] = M[b, h, q] + log(sum(k) exp(S[b, h, q, k] - M[b, h, q])) * lam ** 2
  outputs O, L"""


def test_equations_in_dependency_order_and_several_specs(tmp_path: Path) -> None:
    path = tmp_path / "two.attn"
    path.write_text(TINY + """
spec later_first {
  index m: M, n: N, e: E, f: F
  input Q[M, E], K[N, E], V[N, F]
  O[m, f] = P[m, n] * V[n, f]
  P[m, n] = softmax(n) S[m, n]
  S[m, n] = Q[m, e] * K[n, e]
  output O
}
""")
    specs = parse_file(path)
    assert list(specs) == ["tiny", "later_first"]
    assert [eq.name for eq in specs["later_first"].equations] == ["S", "P", "O"]
    assert specs["later_first"].equation("O").loc.line == 15


def test_precedence() -> None:
    def rhs(expr: str) -> E.Expr:
        c = one(f"spec p {{\n  index m: M, n: N\n  param a: float\n  param W2: int\n"
                f"  X[m, n] = {expr}\n  output X\n}}\n")
        return c.equation("X").expr

    m, n, a = E.index("m"), E.index("n"), E.param("a")
    W = E.param("W2", INT)
    assert rhs("m - n - 1") == (m - n) - 1
    assert rhs("m - (n - 1)") == m - (n - 1)
    assert rhs("-a ** 2") == -E.binary(Op.POW, a, 2)
    assert rhs("a ** 2 ** 3") == E.binary(Op.POW, a, E.binary(Op.POW, 2, 3))
    assert rhs("-2.5 * a") == E.const(-2.5) * a
    assert rhs("m // 64 * 64 + n % 3") == E.binary(Op.MUL, E.binary(Op.FLOORDIV, m, 64), 64) + \
        E.binary(Op.MOD, n, 3)
    lt, le, eq = (lambda x, y, o=o: E.binary(o, x, y) for o in (Op.LT, Op.LE, Op.EQ))
    and_, or_ = (lambda x, y, o=o: E.binary(o, x, y) for o in (Op.AND, Op.OR))
    assert rhs("0 <= m - n < W2") == and_(le(0, m - n), lt(m - n, W))
    assert rhs("n < W2 | n <= m & m == n") == or_(lt(n, W), and_(le(n, m), eq(m, n)))
    assert rhs("!(m == n) & m < n") == and_(E.unary(Op.NOT, eq(m, n)), lt(m, n))
    assert rhs("max(m, n) + min(a, 1.0) + relu(a)") == \
        E.binary(Op.MAX, m, n) + E.binary(Op.MIN, a, 1.0) + E.binary(Op.MAX, a, 0.0)
    assert rhs("where(m < n, a, -inf)") == E.where(lt(m, n), a, -math.inf)
    # sum/max take a whole product; softmax is a prefix like unary minus
    assert rhs("sum(m) a * m + 1") == E.reduce_sum("m", a * m) + 1
    assert rhs("a * sum(m) m * a") == a * E.reduce_sum("m", m * a)
    assert rhs("-max(m) m * a") == -E.reduce_max("m", m * a)
    assert rhs("softmax(m) m * n * 2") == E.softmax("m", m) * n * 2


# -- the examples ------------------------------------------------------------------------------

def test_example_files_are_all_there() -> None:
    assert EXPECTED_EXAMPLES <= {p.stem for p in EXAMPLES}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_parses_verifies_and_round_trips(path: Path) -> None:
    specs = parse_file(path)
    assert list(specs) == [path.stem]  # one spec per file, named after it
    c = specs[path.stem]
    verify(c)
    assert "O" in c.outputs and c.role("query") and c.role("key")
    assert path.read_text().startswith("# ")  # the header comment names the paper/idea
    assert parse_text(format_cascade(c))[c.name] == c


def test_examples_compute_what_their_papers_say() -> None:
    """A few examples against torch formulas, through the float64 eager oracle."""
    g = torch.Generator().manual_seed(0)
    B, H, L, Ed, Fd = 1, 2, 6, 4, 3
    q, k, v = (torch.randn(B, H, L, d, generator=g, dtype=torch.float64)
               for d in (Ed, Ed, Fd))
    s = q @ k.transpose(-1, -2) * 0.5
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    z = torch.randn(H, generator=g, dtype=torch.float64)

    def run(name: str, **extra: torch.Tensor) -> torch.Tensor:
        c = parse_file(ROOT / "examples" / f"{name}.attn")[name]
        return run_cascade(c, {"Q": q, "K": k, "V": v, **extra}, {"scale": 0.5, "G": 1})["O"]

    soft = torch.softmax(s.masked_fill(~causal, -math.inf), -1) @ v
    p = s.exp().masked_fill(~causal, 0)
    torch.testing.assert_close(run("softmax_3pass"), soft)
    torch.testing.assert_close(run("causal"), soft)
    torch.testing.assert_close(run("off_by_one"), p @ v / (1 + p.sum(-1, keepdim=True)))
    torch.testing.assert_close(run("sink", sink=z),
                               p @ v / (z.exp()[:, None, None] + p.sum(-1, keepdim=True)))
    r = (s.exp() - 1).masked_fill(~causal, 0)
    torch.testing.assert_close(run("softpick"), r.clamp(min=0) / r.abs().sum(-1, True) @ v)


# -- error messages ----------------------------------------------------------------------------

BASE = """\
spec s {
  index m: M, n: N, e: E, f: F
  input Q[M, E], K[N, E], V[N, F]
  S[m, n] = Q[m, e] * K[n, e]
  O[m, f] = softmax(n) S[m, n] * V[n, f]
  output O
}
"""


def error_of(old: str, new: str) -> SpecError:
    assert old in BASE
    with pytest.raises(SpecError) as info:
        parse_text(BASE.replace(old, new, 1), "t.attn")
    err = info.value  # no lark or Python exception chained to it
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    return err


def test_base_spec_is_valid() -> None:
    assert one(BASE).outputs == ("O",)


EXACT = [
    ("unclosed bracket", "K[n, e]", "K[n, e",
     "t.attn:5:3: error: unexpected name 'O'; expected one of: ']' ',' '(' '[', an operator "
     "(the '[' on line 4 is not closed)\n"
     "    O[m, f] = softmax(n) S[m, n] * V[n, f]\n"
     "    ^"),
    ("missing operand", "* K[n, e]", "*",
     "t.attn:4:22: error: unexpected end of line; expected an expression\n"
     "    S[m, n] = Q[m, e] *\n"
     "                       ^"),
    ("missing operator", "Q[m, e] * K", "Q[m, e] K",
     "t.attn:4:21: error: unexpected name 'K'; expected one of: '}', an operator, end of line\n"
     "    S[m, n] = Q[m, e] K[n, e]\n"
     "                      ^"),
    ("unicode name", "Q[m, e] *", "Q[m, é] *",
     "t.attn:4:18: error: unexpected character 'é' (names may use only ASCII letters, digits "
     "and _)\n"
     "    S[m, n] = Q[m, é] * K[n, e]\n"
     "                   ^"),
    ("unknown tensor", "K[n, e]", "X[n, e]",
     "t.attn:4:23: error: unknown tensor 'X'\n"
     "    S[m, n] = Q[m, e] * X[n, e]\n"
     "                        ^"),
    ("extent mismatch", "K[n, e]", "K[m, e]",
     "t.attn:4:25: error: index 'm' has extent M but dimension 1 of K has extent N\n"
     "    S[m, n] = Q[m, e] * K[m, e]\n"
     "                          ^"),
    ("rank mismatch", "K[n, e]", "K[n]",
     "t.attn:4:23: error: K has 2 dimensions (K[N, E]) but is read with 1 subscript\n"
     "    S[m, n] = Q[m, e] * K[n]\n"
     "                        ^"),
    ("reduction over an absent index", "* V[n, f]", "* sum(e) V[n, f]",
     "t.attn:5:38: error: sum(e) reduces over 'e', which its body does not use\n"
     "    O[m, f] = softmax(n) S[m, n] * sum(e) V[n, f]\n"
     "                                       ^"),
    ("cycle", "= Q[m, e] * K[n, e]", "= O[m, f] * Q[m, e] * K[n, e]",
     "t.attn:4:13: error: equations depend on each other in a cycle: S -> O -> S\n"
     "    S[m, n] = O[m, f] * Q[m, e] * K[n, e]\n"
     "              ^"),
    ("unused equation", "  output O", "  T[m] = max(n) S[m, n]\n  output O",
     "t.attn:6:3: error: equation T is never used\n"
     "    T[m] = max(n) S[m, n]\n"
     "    ^"),
    ("python code in a name", "* K[n, e]", "* __import__(m)",
     "t.attn:4:23: error: '__import__': names starting with '__' are reserved\n"
     "    S[m, n] = Q[m, e] * __import__(m)\n"
     "                        ^"),
    ("float overflow", "* K[n, e]", "* K[n, e] * 1e999",
     "t.attn:4:33: error: number 1e999 overflows float64 (write inf for infinity)\n"
     "    S[m, n] = Q[m, e] * K[n, e] * 1e999\n"
     "                                  ^"),
]


@pytest.mark.parametrize("what, old, new, message", EXACT, ids=[c[0] for c in EXACT])
def test_exact_error_message(what: str, old: str, new: str, message: str) -> None:
    err = error_of(old, new)
    assert str(err) == message
    line, col = (int(x) for x in message.split(":")[1:3])
    assert (err.file, err.line, err.col) == ("t.attn", line, col)


# (case, old, new, line, col, what)
LOCATED = [
    ("string", "Q[m, e] *", "Q[m, 'e'] *", 4, 18,
     "unexpected character \"'\" (the .attn language has no strings)"),
    ("unknown name", "* V[n, f]", "* V[x, f]", 5, 36, "unknown name 'x'"),
    ("unknown index in a reduction", "softmax(n)", "softmax(x)", 5, 21,
     "unknown index 'x' in softmax(x)"),
    ("unknown index on the left", "O[m, f] =", "O[m, g] =", 5, 8,
     "unknown index 'g' in the left-hand side of O"),
    ("duplicate equation", "  output O", "  S[m, n] = 1.0\n  output O", 6, 3,
     "'S' is already declared as an equation on line 4"),
    ("python keyword", "S[m, n] = Q", "S[m, n] = lambda + Q", 4, 13,
     "'lambda' is a Python keyword and cannot be used as a name"),
    ("reserved word", "index m: M,", "index m: M, input: I,", 2, 15,
     "'input' is a reserved word of the .attn language and cannot be used as an index"),
    ("undefined output", "output O", "output O, Z", 6, 13,
     "output 'Z' is not defined by any equation"),
    ("output is an input", "output O", "output Q", 6, 10,
     "output 'Q' is an input tensor; outputs are defined by equations"),
    ("integer overflow", "* K[n, e]", "* K[n, e] * 123456789012345678901234567890", 4, 33,
     "integer 12345678901234567890... does not fit in 64 bits"),
    ("mask not boolean", "  S[m, n] =", "  mask m - n\n  S[m, n] =", 4, 8,
     "the mask must be a boolean condition (a comparison, &, |, !), got an int expression"),
    ("mask reads an input", "  S[m, n] =", "  mask Q[m, 0] > 0\n  S[m, n] =", 4, 8,
     "the mask may read only captured tensors (declared with `tensor`); 'Q' is an input"),
    ("mask uses qk", "  S[m, n] =", "  mask n <= m & e > 0\n  S[m, n] =", 4, 17,
     "the mask may use only the batch, head, query and key indices; 'e' is the qk index"),
    ("nested brackets", "Q[m, e] *", "(" * 5000 + "Q[m, e]" + ")" * 5000 + " *", 4, 77,
     "brackets are nested too deeply (more than 64 open at once)"),
    ("deep expression", "Q[m, e] *", "-" * 5000 + "Q[m, e] *", 4, 13,
     "expression is nested too deeply (more than 200 levels of operators)"),
    ("long sum", "Q[m, e] *", "m + " * 3000 + "Q[m, e] *", 4, 13,
     "expression is nested too deeply (more than 200 levels of operators)"),
    ("no query index", "index m: M,", "index m: M batch,", 1, 6,
     "spec 's' has no query index; declare one, e.g. `index m: M query`"),
    ("two key indices", "index m: M,", "index m: M, k: N2,", 2, 22,
     "index 'n' is a second key index ('k' is the first); a spec has at most one"),
    ("unknown role", "e: E,", "e: E qkv,", 2, 26,
     "unknown role 'qkv'; expected one of: batch, head, query, key, qk, v"),
    ("role not inferable", "f: F", "f: F, x: X", 2, 33,
     "cannot infer the role of index 'x'; write it after the extent, one of: batch, head, "
     "query, key, qk, v"),
    ("equation read at other indices", "S[m, n] * V", "S[m, n - 1] * V", 5, 29,
     "S must be read at the indices it is defined over, S[m, n]; only input and captured "
     "tensors accept other subscripts"),
    ("where without a condition", "* K[n, e]", "* where(m, 1.0, 2.0)", 4, 29,
     "where() needs a boolean condition (a comparison), got an int expression"),
    ("unknown function", "* K[n, e]", "* K[n, e] * cosh(m)", 4, 33,
     "unknown function 'cosh'; the functions are: abs, bool, exp, exp2, float, int, log, log2, "
     "max, min, relu, sigmoid, sqrt, tanh, where"),
    ("arity", "* K[n, e]", "* K[n, e] * exp(m, n)", 4, 33, "exp() takes 1 argument, got 2"),
    ("float subscript", "K[n, e]", "K[n, e * 0.5]", 4, 28,
     "subscript 2 of K is a float expression; subscripts must be integers"),
    ("extent reused as a param", "  S[m, n]", "  param N: int\n  S[m, n]", 4, 9,
     "'N' is already declared as an extent on line 2"),
    ("int param with a float default", "  S[m, n]", "  param W: int = 2.5\n  S[m, n]", 4, 18,
     "the default of int parameter 'W' must be an integer, got 2.5"),
    ("end of input", "  output O\n}\n", "  output O\n", 7, 1,
     "unexpected end of input; expected one of: '}' 'index' 'input' 'mask' 'output' 'param' "
     "'tensor', a name, end of line"),
    ("two masks", "  S[m, n] =", "  mask n <= m\n  mask n < m\n  S[m, n] =", 5, 3,
     "a second mask (the first is on line 4); combine the conditions with &"),
    ("negated boolean", "* K[n, e]", "* K[n, e] * -(m < n)", 4, 33,
     "cannot negate a boolean; use ! (not)"),
    ("float operand of &", "  S[m, n] =", "  mask n <= m & 1.5\n  S[m, n] =", 4, 17,
     "& needs boolean (or integer) operands, got a float expression"),
]


@pytest.mark.parametrize("case, old, new, line, col, what", LOCATED, ids=[c[0] for c in LOCATED])
def test_located_error(case: str, old: str, new: str, line: int, col: int, what: str) -> None:
    err = error_of(old, new)
    assert (err.line, err.col, err.what) == (line, col, what)
    head, source, caret = str(err).split("\n")
    assert head == f"t.attn:{line}:{col}: error: {what}"
    assert source == "  " + BASE.replace(old, new, 1).split("\n")[line - 1]
    assert caret == " " * (col + 1) + "^"


def test_caret_under_tabs_and_crlf() -> None:
    text = BASE.replace("\n", "\r\n").replace("  S[m, n] = Q", "\tS[m, n] =\tQ").replace(
        "K[n, e]", "X[n, e]")
    with pytest.raises(SpecError) as info:
        parse_text(text, "t.attn")
    assert str(info.value) == ("t.attn:4:22: error: unknown tensor 'X'\n"
                               "  \tS[m, n] =\tQ[m, e] * X[n, e]\n"
                               "  \t         \t          ^")


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.attn"
    bad.write_bytes(b"spec s {\n  \xff\n}\n")
    with pytest.raises(SpecError, match="bad.attn:2:3: error: the file is not valid UTF-8"):
        parse_file(bad)
    (tmp_path / "empty.attn").write_text("# nothing here\n")
    with pytest.raises(SpecError, match="no spec found"):
        parse_file(tmp_path / "empty.attn")
    (tmp_path / "twice.attn").write_text(TINY + TINY)
    with pytest.raises(SpecError, match=r"twice.attn:12:6: error: a second spec named 'tiny'"):
        parse_file(tmp_path / "twice.attn")


# -- the Einsum convention ---------------------------------------------------------------------

def test_implicit_sums_per_additive_term() -> None:
    m, n, e, f = (E.index(i) for i in "mnef")
    a, k, v = E.load("A", (m, n)), E.load("K", (n, e)), E.load("V", (n, f))
    q = E.load("Q", (m, e))
    # the term using e is summed over e; the other term is left alone
    assert implicit_sums(q * k + a, ("m", "n")) == E.reduce_sum("e", q * k) + a
    # one product term, two indices: the first to appear is innermost
    assert implicit_sums(q * k * v, ("m", "f")) == \
        E.reduce_sum("n", E.reduce_sum("e", q * k * v))
    # trailing factors that do not use the summed index stay outside the sum
    scale, d = E.param("scale"), E.load("D", (m,))
    assert implicit_sums(q * k * scale, ("m", "n")) == E.reduce_sum("e", q * k) * scale
    assert implicit_sums(a * v / d * 2, ("m", "f")) == E.reduce_sum("n", a * v) / d * 2
    assert implicit_sums(scale * q * k, ("m", "n")) == E.reduce_sum("e", scale * q * k)
    # nothing to sum, or sums already explicit: unchanged
    assert implicit_sums(a, ("m", "n")) == a
    explicit = E.reduce_sum("n", a * v)
    assert implicit_sums(explicit, ("m", "f")) == explicit
    # a negated term is summed whole
    assert implicit_sums(-a - E.load("B", (m,)), ("m",)) == \
        E.reduce_sum("n", -a) - E.load("B", (m,))


def test_implicit_sums_in_text() -> None:
    c = one(BASE.replace("  output O", "  Z[m] = S[m, n] - 1.0 * max(n) S[m, n]\n  output O, Z"))
    assert str(c.equation("S")) == "S[m, n] = sum(e) (Q[m, e] * K[n, e])"
    assert str(c.equation("O")) == "O[m, f] = sum(n) ((softmax(n) S[m, n]) * V[n, f])"
    assert str(c.equation("Z")) == "Z[m] = (sum(n) S[m, n]) - 1.0 * (max(n) S[m, n])"


# -- text == builder == FlexAttention ----------------------------------------------------------

def test_builder_equals_text_softmax_3pass() -> None:
    b = CascadeBuilder("softmax_3pass")
    roles = ("batch", "head", "query", "key", "qk", "v")
    for name, extent, role in zip("bhmnef", "BHMNEF", roles, strict=True):
        b.index(name, extent, role)
    b.input("Q", "B", "H", "M", "E").input("K", "B", "HKV", "N", "E")
    b.input("V", "B", "HKV", "N", "F")
    b.param("scale", "float").param("G", "int")
    bb, h, m, n, e, f = (b.idx(i) for i in "bhmnef")
    G = b.var("G")
    b.mask(n <= m)
    b.eq("QK", "b h m n", b.read("Q", bb, h, m, e) * b.read("K", bb, h // G, n, e) *
         b.var("scale"))
    qk = b.read("QK", bb, h, m, n)
    b.eq("GM", "b h m", max_over(n, qk))
    b.eq("SN", ["b", "h", "m", "n"], exp(qk - b.read("GM", "b", "h", "m")))
    b.eq("SD", (bb, h, m), sum_over("n", b.read("SN", bb, h, m, n)))
    b.eq("A", "b,h,m,n", b.read("SN", bb, h, m, n) / b.read("SD", bb, h, m))
    b.eq("O", "b h m f", b.read("A", bb, h, m, n) * b.read("V", bb, h // G, n, f))
    b.eq("LSE", "b h m", b.read("GM", bb, h, m) + log(b.read("SD", bb, h, m)))
    b.output("O", "LSE")
    assert b.build() == parse_file(ROOT / "examples" / "softmax_3pass.attn")["softmax_3pass"]


def test_builder_equals_text_with_captured_tensors() -> None:
    b = CascadeBuilder("doc_alibi")
    b.index("m", "N").index("n", "N").index("e", "E").index("f", "F")
    b.input("Q", "N", "E").input("K", "N", "E").input("V", "N", "F")
    b.tensor("doc", "N", dtype="int").tensor("slope", "F")
    b.param("scale", default=0.5)
    m, n, e, f = (b.idx(i) for i in "mnef")
    doc = lambda i: b.read("doc", i)  # noqa: E731
    b.mask((doc(m) == doc(n)) & (n <= m) & ~(m - n > 100))
    b.eq("S", "m n", b.read("Q", m, e) * b.read("K", n, e) * b.var("scale") - 2.0 * (m - n))
    b.eq("O", "m f", bld.softmax_over(n, b.read("S", m, n)) * b.read("V", n, f) *
         bld.sigmoid(b.read("slope", f)))
    b.output("O")
    text = one("""\
spec doc_alibi {
  index m: N, n: N, e: E, f: F
  input Q[N, E], K[N, E], V[N, F]
  tensor doc[N]: int, slope[F]
  param scale: float = 0.5
  mask doc[m] == doc[n] & n <= m & !(m - n > 100)
  S[m, n] = Q[m, e] * K[n, e] * scale - 2.0 * (m - n)
  O[m, f] = softmax(n) S[m, n] * V[n, f] * sigmoid(slope[f])
  output O
}
""")
    assert b.build() == text


def test_cascade_inline_text() -> None:
    assert cascade(TINY) == one(TINY)
    with pytest.raises(SpecError, match="exactly one spec, got 2: tiny, t2"):
        cascade(TINY + TINY.replace("spec tiny", "spec t2"))


FLEX_TEXT = """\
spec {name} {{
  index b: B batch, h: H head, m: M query, n: N key, e: E qk, f: F v
  input Q[B, H, M, E], K[B, HKV, N, E], V[B, HKV, N, F]
  param scale: float
  param G: int
  {mask}
  S[b,h,m,n] = Q[b,h,m,e] * K[b,h//G,n,e] * scale
  T[b,h,m,n] = {score}
  P[b,h,m,n] = softmax(n) T[b,h,m,n]
  O[b,h,m,f] = P[b,h,m,n] * V[b,h//G,n,f]
  LSE[b,h,m] = log(sum(n) exp(T[b,h,m,n]))
  MAX[b,h,m] = max(n) T[b,h,m,n]
  output O, LSE, MAX
}}
"""


def softcap(score, b, h, q_idx, kv_idx):
    return 30.0 * torch.tanh(score / 30.0)


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def test_three_frontends_one_ir() -> None:
    """The FlexAttention cascade written as text is the traced one, node for node."""
    assert one(FLEX_TEXT.format(name="dense", mask="", score="S[b,h,m,n]")) == \
        lower_flex().cascade
    text = FLEX_TEXT.format(name="softcap_causal", mask="mask m >= n",
                            score="30.0 * tanh(S[b,h,m,n] / 30.0)")
    assert one(text) == lower_flex(softcap, causal).cascade


def test_text_reproduces_the_flex_cascades() -> None:
    for spec in (lower_flex(), lower_flex(softcap, causal), lower_flex(None, causal)):
        c = spec.cascade
        assert parse_text(format_cascade(c))[c.name] == c


def test_builder_errors_point_at_the_python_call() -> None:
    b = CascadeBuilder("s")
    b.index("m", "M").index("n", "N").index("e", "E").input("Q", "M", "E")
    m, n = b.idx("m"), b.idx("n")
    with pytest.raises(SpecError) as info:
        b.eq("S", "m n", b.read("Q", m, n))  # n has extent N, Q's dimension 2 has E
    err = info.value
    assert err.file == __file__ and err.source_line.strip().startswith('b.eq("S"')
    assert err.what == "index 'n' has extent N but dimension 2 of Q has extent E"
    b.eq("S", "m n", b.read("Q", m, "e") * n)  # the failed eq left nothing behind
    with pytest.raises(SpecError, match="no truth value"):
        if 0 <= m - n < 3:
            pass
    with pytest.raises(SpecError, match="unknown index 'x' in idx"):
        b.idx("x")
    with pytest.raises(SpecError, match="Python keyword"):
        b.param("class", "float")
    with pytest.raises(SpecError, match="spec 's' has no output"):
        b.build()
    b.output("S")
    assert b.build().equation("S") is not None


def test_identical_text_gives_identical_cascades_and_loader_reads_text() -> None:
    from attndsl.frontend.load import load_spec

    spec = load_spec(str(ROOT / "examples" / "causal.attn"))
    c, captured = spec.build()
    assert c == parse_file(ROOT / "examples" / "causal.attn")["causal"] and captured == {}


# -- the grammar -------------------------------------------------------------------------------

def test_grammar_is_lalr_without_conflicts() -> None:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    old = lark_logger.level
    lark_logger.addHandler(handler)
    lark_logger.setLevel(logging.DEBUG)
    try:
        Lark(grammar_text(), parser="lalr", debug=True)
    finally:
        lark_logger.removeHandler(handler)
        lark_logger.setLevel(old)
    assert "conflict" not in buf.getvalue().lower()


def test_grammar_falls_back_to_the_installed_package(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []

    def files(package: str) -> Path:
        asked.append(package)
        return ROOT / "grammar"

    monkeypatch.setattr(Path, "is_file", lambda self: False)
    monkeypatch.setattr(importlib.resources, "files", files)
    assert grammar_text() == (ROOT / "grammar" / "attn.lark").read_text()
    assert asked == ["attndsl.grammar"]


# -- hostile input -----------------------------------------------------------------------------

HOSTILE = ["spec", "s", "{", "}", "\n", ";", "index", "m", "n", ":", "M", "N", ",", "query",
           "key", "input", "tensor", "Q", "K", "[", "]", "param", "float", "int", "=", "mask",
           "<=", "==", "!", "&", "|", "output", "O", "sum", "max", "softmax", "(", ")", "+", "-",
           "*", "/", "//", "%", "**", "exp", "where", "relu", "0", "1.5", "-2", "1e999",
           "1e-999", "99999999999999999999999999", "inf", "nan", "True", "__import__",
           "__import__('os')", "'", '"', "\\", "\\n", "é", "λ", "π", "\t", "#", "lambda",
           "import", "\x00", "\r", " ", "Keep", "class", "1" * 5000, "(" * 80, ")" * 80,
           "-" * 300]
OK_HEAD = "spec s {\n  index m: M, n: N, e: E, f: F\n  input Q[M, E], K[N, E], V[N, F]\n"


def _assert_cascade_or_spec_error(text: str) -> None:
    try:
        specs = parse_text(text, "fuzz.attn")
    except SpecError as err:
        assert str(err).startswith("fuzz.attn:") and len(str(err).split("\n")) == 3
        assert err.line >= 1 and err.col >= 1
        return
    for c in specs.values():
        assert isinstance(c, Cascade)
        verify(c)
        str(c)


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(st.lists(st.sampled_from(HOSTILE), max_size=40).map(" ".join))
def test_token_soup(text: str) -> None:
    _assert_cascade_or_spec_error(text)


@FUZZ
@given(st.lists(st.sampled_from(HOSTILE), max_size=12).map(" ".join),
       st.sampled_from(["S[m, n] = ", "O[m, f] = S[m, n] * V[n, f] * ", "mask ", "param p: "]))
def test_hostile_statements(expr: str, prefix: str) -> None:
    body = "  S[m, n] = Q[m, e] * K[n, e]\n" if not prefix.startswith("S") else ""
    _assert_cascade_or_spec_error(OK_HEAD + body + "  " + prefix + expr + "\n  output O\n}\n")


@FUZZ
@given(st.sampled_from(EXAMPLES), st.integers(0, 10_000), st.integers(0, 8),
       st.text(max_size=6))
def test_mutated_examples(path: Path, at: int, cut: int, insert: str) -> None:
    text = path.read_text()
    at %= len(text) + 1
    _assert_cascade_or_spec_error(text[:at] + insert + text[at + cut:])


@FUZZ
@given(st.text(max_size=200))
def test_arbitrary_text(text: str) -> None:
    _assert_cascade_or_spec_error(text)
