"""The ``.attn`` text frontend: cascades of Einsum-style equations parsed into the Cascade IR.

A spec declares its indices, tensors and parameters, then equations over named indices::

    spec causal_softmax3 {
      index b: B batch, h: H head, m: M query, n: N key, e: E qk, f: F v
      input Q[B, H, M, E], K[B, HKV, N, E], V[B, HKV, N, F]
      param scale: float
      param G: int
      mask n <= m
      QK[b,h,m,n] = Q[b,h,m,e] * K[b,h//G,n,e] * scale   # e is summed (Einsum convention)
      GM[b,h,m]   = max(n) QK[b,h,m,n]
      ...
      output O
    }

The syntax lives in ``grammar/attn.lark`` (explained in ``grammar/REFERENCE.md``).  Parsing is
LALR(1) (:mod:`attndsl.frontend.syntax`: the parser and its syntax errors); the
:class:`_Exprs` transformer here turns expression trees into IR nodes (the operations of
:mod:`attndsl.frontend.ops`), one method per grammar alias;
:class:`~attndsl.frontend.assembler.Assembler` checks declarations and equations and builds
the verified :class:`~attndsl.ir.cascade.Cascade`.  The Python builder
(:mod:`attndsl.frontend.builder`) goes through the same assembler, so both forms of a spec
give equal cascades.

Every problem is a :class:`SpecError` located at the offending token::

    spec.attn:5:15: error: max(e) reduces over 'e', which its body does not use
        GM[m] = max(e) S[m, n]
                    ^
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lark import Token, Transformer, Tree, v_args
from lark.exceptions import (
    LarkError,
    UnexpectedInput,
    VisitError,
)

from attndsl.frontend.assembler import Assembler, PendingEquation
from attndsl.frontend.ops import (
    BINARY_OPS,
    FUNCTIONS,
    REDUCTIONS,
    SCAN_FORMS,
    DependencyCycle,
    bitwise_not,
    combine,
    implicit_sums,
    logical_not,
    negate,
    stable_order,
)
from attndsl.frontend.source import (
    SourceText,
    SpecError,
    UnlocatedError,
    Where,
    parse_number,
    suggest,
)
from attndsl.frontend.syntax import (
    MAX_BRACKETS,
    TooDeep,
    check_tree,
    grammar_text,
    parser,
    syntax_error,
)
from attndsl.ir import expr as E
from attndsl.ir.cascade import Cascade
from attndsl.ir.expr import (
    MAX_DEPTH,
    Expr,
    IRError,
    Op,
    render,
    render_const,
)


@v_args(inline=True, meta=True)
class _Exprs(Transformer):
    """Expression parse tree -> IR expression; one method per alias of grammar/attn.lark.

    ``first`` maps (node, slot) to where the node first appears, for errors found later;
    ``latest`` to where it appeared last (the operands of the node being built)."""

    def __init__(self, asm: Assembler, src: SourceText) -> None:
        super().__init__(visit_tokens=False)
        self.asm, self.src = asm, src
        self.first: dict[tuple[Expr, Any], Where] = {}
        self.latest: dict[Expr, Where] = {}

    def _locate(self, node: Expr, slot: Any) -> Where:
        return self.first.get((node, slot)) or self.first[(node, None)]

    def _where(self, item: Any) -> Where:
        return item if isinstance(item, Where) else self.src.of(item)

    def _at(self, item: Any, e: Expr, slot: Any = None) -> Expr:
        w = self._where(item)
        self.first.setdefault((e, slot), w)
        if slot is None:
            self.latest[e] = w
        return e

    def _op(self, meta: Any, fn: Callable[..., Expr], *args: Expr) -> Expr:
        try:
            e = fn(*args)
        except UnlocatedError as bad:
            w = self.latest[args[bad.slot]] if bad.slot is not None else self._where(meta)
            raise w.error(bad.what) from None
        except IRError as err:
            raise self._where(meta).error(str(err)) from None
        if e.depth > MAX_DEPTH:  # a chain a < b < c < ... nests without nesting the tree
            raise self._where(meta).error(f"expression is nested too deeply (more than "
                                          f"{MAX_DEPTH} levels of operators)")
        return self._at(meta, e)

    # leaves
    def number(self, meta: Any, tok: Token) -> Expr:
        try:
            return self._at(tok, E.const(parse_number(tok.value)))
        except UnlocatedError as bad:
            raise self.src.of(tok).error(bad.what) from None

    def inf(self, meta: Any) -> Expr:
        return self._at(meta, E.const(math.inf))

    def true(self, meta: Any) -> Expr:
        return self._at(meta, E.const(True))

    def false(self, meta: Any) -> Expr:
        return self._at(meta, E.const(False))

    def name(self, meta: Any, tok: Token) -> Expr:
        return self._at(tok, self.asm.scalar(tok.value, self.src.of(tok)))

    def load(self, meta: Any, tok: Token, *subs: Expr) -> Expr:
        e = self._at(tok, self.asm.read(tok.value, subs, self.src.of(tok)))
        for k, s in enumerate(subs):
            self._at(self.latest[s], e, k)
        return e

    def call(self, meta: Any, tok: Token, *args: Expr) -> Expr:
        fn = FUNCTIONS.get(tok.value)
        if fn is None:
            raise self.src.of(tok).error(f"unknown function {tok.value!r}"
                                         f"{suggest(tok.value, FUNCTIONS)}; the functions are: "
                                         f"{', '.join(sorted(FUNCTIONS))}")
        if len(args) != fn[0]:
            raise self.src.of(tok).error(f"{tok.value}() takes {fn[0]} argument"
                                         f"{'s' * (fn[0] != 1)}, got {len(args)}")
        return self._op(meta, fn[1], *args)

    def maximum(self, meta: Any, a: Expr, b: Expr) -> Expr:
        return self._op(meta, combine, Op.MAX, a, b)

    # operators
    def _binary(op: Op) -> Callable[..., Expr]:
        def method(self: _Exprs, meta: Any, a: Expr, b: Expr) -> Expr:
            return self._op(meta, lambda x, y: combine(op, x, y), a, b)
        return method

    add, sub, mul, div = _binary(Op.ADD), _binary(Op.SUB), _binary(Op.MUL), _binary(Op.DIV)
    floordiv, mod, pow = _binary(Op.FLOORDIV), _binary(Op.MOD), _binary(Op.POW)
    and_, or_, xor = _binary(Op.AND), _binary(Op.OR), _binary(Op.XOR)
    lshift, rshift = _binary(Op.LSHIFT), _binary(Op.RSHIFT)

    def neg(self, meta: Any, x: Expr) -> Expr:
        return self._op(meta, negate, x)

    def invert(self, meta: Any, x: Expr) -> Expr:
        return self._op(meta, bitwise_not, x)

    def not_(self, meta: Any, x: Expr) -> Expr:
        return self._op(meta, logical_not, x)

    def comparison(self, meta: Any, *items: Any) -> Expr:
        """a < b <= c is (a < b) & (b <= c)."""
        result = None
        for k in range(1, len(items), 2):
            a, op, b = items[k - 1], items[k], items[k + 1]
            at = self.latest[a]  # a comparison is located at its left operand
            cmp = self._op(at, lambda x, y, o=BINARY_OPS[op.value]: combine(o, x, y), a, b)
            result = cmp if result is None else self._op(meta, combine, Op.AND, result, cmp)
        assert result is not None
        return result

    def _reduction(word: str) -> Callable[..., Expr]:
        def method(self: _Exprs, meta: Any, tok: Token, body: Expr) -> Expr:
            w = self.src.of(tok)
            idx = self.asm.index_name(tok.value, w, f"{word}({tok.value})")
            return self._at(w, self._at(meta, REDUCTIONS[word](idx, body)), "arg")
        return method

    reduce_sum, reduce_max, softmax = _reduction("sum"), _reduction("max"), _reduction("softmax")

    def cumsum(self, meta: Any, tok: Token, form: Token | None, body: Expr) -> Expr:
        """``cumsum(n) x`` (inclusive) or ``cumsum(n, exclusive) x``."""
        w = self.src.of(tok)
        idx = self.asm.index_name(tok.value, w, f"cumsum({tok.value})")
        if form is not None and form.value not in SCAN_FORMS:
            raise self.src.of(form).error(f"cumsum({tok.value}, {form.value}): expected "
                                          f"{' or '.join(SCAN_FORMS)} after the index")
        e = E.cumsum(idx, body, exclusive=form is not None and form.value == "exclusive")
        return self._at(w, self._at(meta, e), "arg")

    def recur(self, meta: Any, tok: Token, body: Expr) -> Expr:
        """``recur(n) x``: the state recurrence along n (x reads the previous state)."""
        w = self.src.of(tok)
        idx = self.asm.index_name(tok.value, w, f"recur({tok.value})")
        return self._at(w, self._at(meta, E.recur(idx, body)), "arg")


def _transform(ex: _Exprs, tree: Any) -> Expr:
    try:
        return ex.transform(tree) if isinstance(tree, Tree) else tree
    except VisitError as err:
        if isinstance(err.orig_exc, SpecError):
            raise err.orig_exc from None
        raise


def _eq_reads(tree: Tree, equations: dict[str, PendingEquation]) -> list[Token]:
    """The NAME tokens of the equation results an expression tree reads, in source order."""
    found: list[Token] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if node.data == "load" and node.children[0].value in equations:
            found.append(node.children[0])
        stack.extend(c for c in node.children if isinstance(c, Tree))
    return sorted(found, key=lambda t: (t.line, t.column))


def _read_spec(tree: Tree, src: SourceText) -> Cascade:
    name_tok, *stmts = tree.children
    asm = Assembler(name_tok.value, src.of(name_tok))
    bodies: dict[str, Tree] = {}
    masks: list[Tree] = []
    for st in stmts:
        kids = st.children
        if st.data == "index_stmt":
            for d in kids:
                n, ext, role = d.children
                asm.index(n.value, ext.value, role and role.value, src.of(n), src.of(ext),
                          role and src.of(role))
        elif st.data in ("input_stmt", "tensor_stmt"):
            kind = "input" if st.data == "input_stmt" else "captured"
            for d in kids:
                n, *dims, dtype = d.children
                asm.tensor(n.value, [t.value for t in dims], dtype and dtype.value, kind,
                           src.of(n), [src.of(t) for t in dims], dtype and src.of(dtype))
        elif st.data == "param_stmt":
            n, dtype, default = kids
            value = None if default is None else _transform(_Exprs(asm, src), default).arg
            asm.param(n.value, dtype.value, value, src.of(n), src.of(dtype),
                      None if default is None else src.of(default.meta))
        elif st.data == "output_stmt":
            for t in kids:
                asm.output(t.value, src.of(t))
        elif st.data == "mask_stmt":
            masks.append(st)
        else:  # equation
            n, *idx, body = kids
            asm.header(n.value, [t.value for t in idx], src.of(n), [src.of(t) for t in idx])
            if isinstance(body, Tree) and body.data == "recur":
                asm.recurrence(n.value)
            bodies[n.value] = body
    asm.check_roles()
    reads = {n: [t for t in _eq_reads(b, asm.equations)  # a recurrence reads its own state
                 if not (t.value == n and asm.equations[n].state)]
             for n, b in bodies.items()}
    try:
        order = stable_order(list(bodies), {n: [t.value for t in r] for n, r in reads.items()})
    except DependencyCycle as cyc:
        tok = next(t for t in reads[cyc.path[0]] if t.value == cyc.path[1])
        raise src.of(tok).error(f"equations depend on each other in a cycle: {cyc}") from None
    for name in order:
        ex = _Exprs(asm, src)
        asm.body(name, _transform(ex, bodies[name]), ex._locate)
    for st in masks:
        ex = _Exprs(asm, src)
        asm.set_mask(_transform(ex, st.children[0]), ex._locate, src.of(st.meta))
    return asm.finish()


def normalize_newlines(text: str) -> str:
    """Windows (\\r\\n) and classic Mac (lone \\r) line ends as \\n: lark counts lines by \\n
    only, so a file with lone carriage returns would otherwise be one long line."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_text(text: str, filename: str = "<string>") -> dict[str, Cascade]:
    """Parse .attn text holding one or more specs into verified cascades, by spec name.

    Raises :class:`SpecError` (a ValueError) at the first problem."""
    if not isinstance(text, str):
        raise TypeError(f"parse_text() takes a str, got {type(text).__name__}")
    text = normalize_newlines(text)
    src = SourceText(text, filename)
    try:
        tree = parser().parse(text)
    except TooDeep as deep:
        raise src.of(deep.token).error(f"brackets are nested too deeply (more than "
                                       f"{MAX_BRACKETS} open at once)") from None
    except UnexpectedInput as err:
        raise syntax_error(err, text, src) from None
    except LarkError as err:
        raise src.at(1, 1).error(f"cannot parse: {type(err).__name__}") from None
    specs: dict[str, Cascade] = {}
    try:
        check_tree(tree, src)
        for spec in tree.children:
            c = _read_spec(spec, src)
            if c.name in specs:
                raise src.of(spec.children[0]).error(f"a second spec named {c.name!r}")
            specs[c.name] = c
    except RecursionError:
        raise src.at(1, 1).error("the spec is nested too deeply to process") from None
    if not specs:
        raise src.end().error("no spec found; a file holds `spec NAME { ... }` blocks")
    return specs


def parse_file(path: str | Path) -> dict[str, Cascade]:
    """Parse a .attn file (see :func:`parse_text`); errors name the file.  A leading UTF-8
    byte-order mark (as some editors write) is not part of the text; bytes that are not
    UTF-8 are located at their line and column, the line shown with them replaced."""
    path = Path(path)
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        before = data[: err.start].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        line = before.count(b"\n") + 1
        col = len(before.rsplit(b"\n", 1)[-1].decode("utf-8", errors="replace")) + 1
        lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        shown = lines[line - 1].decode("utf-8", errors="replace")
        raise SpecError(f"the file is not valid UTF-8 (byte 0x{data[err.start]:02x})",
                        str(path), line, col, shown) from None
    return parse_text(text, str(path))


def format_cascade(c: Cascade) -> str:
    """A cascade as .attn text (explicit roles, types and sums); parse_text reads it back."""
    lines = [f"spec {c.name} {{"]
    lines.append("  index " + ", ".join(f"{i.name}: {i.extent} {i.role}" for i in c.indices))
    for t in c.tensors:
        kind = "input" if t.kind == "input" else "tensor"
        lines.append(f"  {kind} {t.name}[{', '.join(t.dims)}]: {t.dtype}")
    for p in c.params:
        default = "" if p.default is None else f" = {render_const(p.default)}"
        lines.append(f"  param {p.name}: {p.dtype}{default}")
    if c.mask is not None:
        lines.append(f"  mask {render(c.mask.expr)}")
    lines.extend(f"  {eq}" for eq in c.equations)
    lines.append(f"  output {', '.join(c.outputs)}")
    lines.append("}")
    return "\n".join(lines) + "\n"


__all__ = ["FUNCTIONS", "Assembler", "SpecError", "Where", "format_cascade", "grammar_text",
           "implicit_sums", "parse_file", "parse_text", "parser"]
