"""Fuzzing the frontends: mutated examples may be refused, but only with attndsl's own errors.

Every ``examples/*.attn`` text and every score/mask program of ``examples/*.py`` is mutated
(token deletions, duplications and swaps, number and name substitutions, operator swaps, deep
nesting, odd unicode, CR line ends) and fed through parsing (or tracing), compilation up to
the generated source (which must parse as Python), and the float64 eager oracle.  A mutant
that gets through is a valid spec; one that does not must raise an
:class:`attndsl.AttnDSLError` -- a ``KeyError``, ``AttributeError``, ``RecursionError`` or a
bare ``TypeError`` escaping is a bug.  A few tiny survivors also run their kernel.

The corpus is seeded (the same mutants every run); hypothesis adds more under the "ci"
profile of ``tests/conftest.py`` (deterministic there too).
"""

from __future__ import annotations

import ast
import inspect
import random
import re
import textwrap
import tokenize
from collections.abc import Callable
from io import StringIO
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attndsl.checking import index_sizes, oracle, random_problem
from attndsl.errors import AttnDSLError
from attndsl.frontend.flex import lower_flex
from attndsl.frontend.load import import_spec_file
from attndsl.frontend.text import parse_text
from attndsl.ir.cascade import Cascade
from attndsl.passes.pipeline import compile_cascade
from attndsl.runtime.modules import load_kernel_module, module_source

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ATTN = {p.name: p.read_text() for p in sorted(EXAMPLES.glob("*.attn"))}

_TOKEN = re.compile(r"\s+|#[^\n]*|\d+\.?\d*(?:[eE][+-]?\d+)?|[A-Za-z_]\w*|//|\*\*|[<>=!]=|.",
                    re.S)
NUMBERS = ["0", "1", "-1", "2", "0.5", "1e308", "1e400", "9223372036854775807",
           "99999999999999999999", ".5", "1e-320", "inf", "3"]
NAMES = ["b", "h", "m", "n", "e", "f", "B", "H", "M", "N", "E", "F", "HKV", "dHKV", "Q", "K",
         "V", "S", "P", "O", "LSE", "scale", "G", "x", "sum", "max", "softmax", "exp", "where",
         "float", "int", "bool", "True", "False", "Keep", "__class__", "lambda", "spec",
         "index", "mask", "output", "tensor", "param", "input", "batch", "head", "query", "key",
         "qk", "v", "relu", "sqrt", "log"]
OPERATORS = ["+", "-", "*", "/", "//", "%", "**", "&", "|", "<", "<=", ">", ">=", "==", "!=",
             "!", "~", "=", ",", ":", ";", "(", ")", "[", "]", "{", "}"]
UNICODE = ["\u00e9", "\u200b", "\U0001f600", "\u0301", "\uff11", "\u00a0", "\ufeff", "\u2028",
           "\x00", "\x0c", "\u212a", "\u0430"]


# -- mutations --------------------------------------------------------------------------------

def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def _significant(tokens: list[str]) -> list[int]:
    return [i for i, t in enumerate(tokens) if t.strip() and not t.startswith("#")]


def mutate_text(text: str, rng: random.Random) -> str:
    """One to three random edits of an .attn text."""
    for _ in range(rng.randint(1, 3)):
        text = rng.choice(_TEXT_EDITS)(text, rng)
    return text


def _edit_token(text: str, rng: random.Random, how: Callable[[list[str], int], None]) -> str:
    tokens = _tokens(text)
    where = _significant(tokens)
    if where:
        how(tokens, rng.choice(where))
    return "".join(tokens)


def _delete(text: str, rng: random.Random) -> str:
    return _edit_token(text, rng, lambda t, i: t.__setitem__(i, ""))


def _duplicate(text: str, rng: random.Random) -> str:
    return _edit_token(text, rng, lambda t, i: t.__setitem__(i, t[i] + " " + t[i]))


def _swap(text: str, rng: random.Random) -> str:
    tokens = _tokens(text)
    where = _significant(tokens)
    if len(where) > 1:
        i, j = rng.sample(where, 2)
        tokens[i], tokens[j] = tokens[j], tokens[i]
    return "".join(tokens)


def _substitute(pool: list[str], kind: Callable[[str], bool]) -> Callable[..., str]:
    def edit(text: str, rng: random.Random) -> str:
        tokens = _tokens(text)
        where = [i for i in _significant(tokens) if kind(tokens[i])] or _significant(tokens)
        if where:
            tokens[rng.choice(where)] = rng.choice(pool)
        return "".join(tokens)
    return edit


def _is_number(t: str) -> bool:
    return t[0].isdigit()


def _is_name(t: str) -> bool:
    return t[0].isalpha() or t[0] == "_"


def _is_operator(t: str) -> bool:
    return not (_is_number(t) or _is_name(t))


def _nest(text: str, rng: random.Random) -> str:
    """Wrap an expression after '=' (or a mask) in deep brackets, minus signs or calls."""
    lines = text.split("\n")
    spots = [k for k, ln in enumerate(lines) if re.search(r"\]\s*=|^\s*mask ", ln)]
    if not spots:
        return text
    k = rng.choice(spots)
    depth = rng.choice([30, 70, 150, 250, 400, 1200])
    head, sep, body = lines[k].partition("=") if "=" in lines[k] else lines[k].partition("mask")
    wrap = rng.choice([("(", ")"), ("-", ""), ("exp(", ")"), ("!", ""), ("-(", ")"),
                       ("x + ", ""), ("[", "]")])
    if wrap == ("x + ", ""):
        body = " + ".join(["1"] * depth) + " + " + body
    else:
        body = wrap[0] * depth + body + wrap[1] * depth
    lines[k] = head + sep + body
    return "\n".join(lines)


def _unicode(text: str, rng: random.Random) -> str:
    i = rng.randrange(len(text) + 1)
    return text[:i] + rng.choice(UNICODE) + text[i:]


def _line_ends(text: str, rng: random.Random) -> str:
    return text.replace("\n", rng.choice(["\r", "\r\n", "\n\r", ";", "\r\r\n"]))


_TEXT_EDITS: list[Callable[[str, random.Random], str]] = [
    _delete, _duplicate, _swap, _substitute(NUMBERS, _is_number), _substitute(NAMES, _is_name),
    _substitute(OPERATORS, _is_operator), _nest, _unicode, _line_ends,
]


# -- the pipeline a mutant goes through ------------------------------------------------------

def exercise(c: Cascade, captured: dict[str, torch.Tensor] | None = None,
             run_kernel: bool = False, located: str = "") -> None:
    """Compile ``c`` to source (which must be Python) and evaluate it with the oracle; every
    failure must be one of attndsl's errors (compile errors starting with ``located``)."""
    try:
        compiled = compile_cascade(c)
        # a cascade whose only form is the chunked linear one has no generated module
        source = None if compiled.kernel is None else module_source(compiled.kernel)
    except AttnDSLError as err:
        assert str(err).startswith(located), f"an unlocated compile error: {err}"
        compiled = source = None
    if source is not None:
        ast.parse(source)
    gen = torch.Generator().manual_seed(0)
    sizes = index_sizes(c, 1, 2, 2, 3, 5, 16, 16)
    try:
        prob = random_problem(c, sizes, torch.float32, gen, "cpu", captured)
        ref = oracle(c, prob)
    except AttnDSLError:
        return
    assert set(ref) == set(c.outputs)
    if run_kernel and compiled is not None and compiled.kernel is not None:
        out = load_kernel_module(compiled.kernel).launch(prob.inputs, prob.params, prob.captured)
        assert set(out) >= set(c.outputs)


def check_text(text: str, run_kernel: bool = False) -> None:
    try:
        specs = parse_text(text, "fuzz.attn")
    except AttnDSLError as err:
        assert str(err).startswith("fuzz.attn:"), f"an unlocated error: {err}"
        return
    for c in specs.values():
        exercise(c, run_kernel=run_kernel, located="fuzz.attn:")


CORPUS = [(name, seed) for name in ATTN for seed in range(12)]


@pytest.mark.parametrize("name, seed", CORPUS, ids=[f"{n}-{s}" for n, s in CORPUS])
def test_mutated_attn_texts_raise_only_located_attndsl_errors(name: str, seed: int) -> None:
    rng = random.Random(f"{name}:{seed}")
    check_text(mutate_text(ATTN[name], rng))


@given(st.sampled_from(sorted(ATTN)), st.integers(0, 2**32 - 1))
def test_hypothesis_mutated_attn_texts_raise_only_attndsl_errors(name: str, seed: int) -> None:
    check_text(mutate_text(ATTN[name], random.Random(seed)))


@pytest.mark.parametrize("name", ["causal.attn", "softcap.attn"])
def test_a_mutated_text_that_compiles_runs_its_kernel(name: str) -> None:
    """Survivors of CR line ends and harmless edits run end to end (tiny shapes)."""
    text = _line_ends(ATTN[name], random.Random(name))
    check_text(text, run_kernel=True)


# -- Python score/mask programs ----------------------------------------------------------------

def _programs() -> list[tuple[str, str, Callable]]:
    """(example, 'score_mod' or 'mask_mod', function) of every examples/*.py spec."""
    out = []
    for path in sorted(EXAMPLES.glob("*.py")):
        if path.name.startswith("_"):
            continue
        module = import_spec_file(path)
        fns = module.make(1, 2, 8, 8, "cpu") if hasattr(module, "make") else \
            {k: getattr(module, k, None) for k in ("score_mod", "mask_mod")}
        out += [(path.name, kind, fn) for kind, fn in fns.items() if fn is not None]
    return out


PROGRAMS = _programs()


PY_VALUES = ["0", "1", "-1", "2.5", "1e308", "True", "None", "10**30", "(1 << 70)",
             "float('nan')", "score", "torch.tensor(2.0)", "torch.ones(3)", "b.float()"]
PY_NAMES = ["score", "b", "h", "q_idx", "kv_idx", "torch", "len", "None", "print", "abs",
            "torch.tanh", "torch.clamp", "torch.sigmoid", "torch.zeros_like", "int", "float"]
PY_OPERATORS = ["+", "-", "*", "/", "//", "%", "**", "&", "|", "^", "<", "<=", ">", ">=", "==",
                "!=", "and", "or", "@", "<<", ">>"]


def mutate_python(fn: Callable, rng: random.Random) -> Callable | None:
    """``fn`` with a random token edit in its source, rebuilt over its globals and closure;
    None when the edit is not valid Python (Python's own error, not attndsl's)."""
    source = textwrap.dedent(inspect.getsource(fn))
    toks = list(tokenize.generate_tokens(StringIO(source).readline))
    body = [i for i, t in enumerate(toks) if t.type in (tokenize.NAME, tokenize.NUMBER,
                                                       tokenize.OP) and t.start[0] > 1]
    edits = [list(t) for t in toks]
    for _ in range(rng.randint(1, 2)):
        i = rng.choice(body)
        tok, kind = edits[i][1], rng.randrange(6)
        if kind == 0:
            edits[i][1] = ""
        elif kind == 1 or (kind < 4 and toks[i].type == tokenize.NUMBER):
            edits[i][1] = rng.choice(PY_VALUES)
        elif kind == 2 or (kind < 4 and toks[i].type == tokenize.NAME):
            edits[i][1] = rng.choice(PY_NAMES)
        elif kind == 3:
            edits[i][1] = rng.choice(PY_OPERATORS if tok in PY_OPERATORS else OPERATORS)
        elif kind == 4:
            edits[i][1] = f"{tok} {tok}"
        else:
            edits[i][1] = rng.choice(["torch.exp(", "torch.where(", "-", "~", "(1 +"]) + tok
    try:
        new = tokenize.untokenize(tuple(t[:2]) for t in edits)
        code = compile(new, "<fuzz>", "exec")
    except (SyntaxError, ValueError, tokenize.TokenError, IndentationError):
        return None
    namespace = dict(fn.__globals__)
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        namespace[name] = cell.cell_contents
    try:
        exec(code, namespace)
    except Exception:  # a decorator or default argument evaluated on definition
        return None
    return namespace.get(fn.__name__)


def check_program(kind: str, fn: Callable) -> None:
    try:
        flex = lower_flex(**{kind: fn})
    except AttnDSLError:
        return
    exercise(flex.cascade, flex.captured)


PY_CORPUS = [(i, seed) for i in range(len(PROGRAMS)) for seed in range(6)]


@pytest.mark.parametrize("i, seed", PY_CORPUS,
                         ids=[f"{PROGRAMS[i][0]}-{PROGRAMS[i][1]}-{s}" for i, s in PY_CORPUS])
def test_mutated_score_and_mask_programs_raise_only_attndsl_errors(i: int, seed: int) -> None:
    example, kind, fn = PROGRAMS[i]
    mutant = mutate_python(fn, random.Random(f"{example}:{kind}:{seed}"))
    if mutant is not None:
        check_program(kind, mutant)


@given(st.integers(0, len(PROGRAMS) - 1), st.integers(0, 2**32 - 1))
def test_hypothesis_mutated_programs_raise_only_attndsl_errors(i: int, seed: int) -> None:
    example, kind, fn = PROGRAMS[i]
    mutant = mutate_python(fn, random.Random(seed))
    if mutant is not None:
        check_program(kind, mutant)
