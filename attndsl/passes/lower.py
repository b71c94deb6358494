"""Cascade-level passes: inline equations into the outputs (fusion) and expand built-ins.

``inline`` substitutes every read of an intermediate tensor by its defining expression (with
the reader's index expressions put in for the definition's indices), so that each output and
the key mask become one closed expression: the whole score/mask chain is fused.
``expand_softmax`` rewrites ``softmax(n) x`` into the 3-pass form of FuseMax's cascade::

    softmax(n) x  ->  exp(x - max(n) x) / sum(n) exp(x - max(n) x)
"""

from __future__ import annotations

from dataclasses import dataclass

from attndsl.ir import expr as E
from attndsl.ir.cascade import Cascade
from attndsl.ir.expr import Expr, IRError, Op
from attndsl.passes.rules import simplify


@dataclass(frozen=True)
class Fused:
    """A cascade after fusion: one closed expression per output, plus the key mask."""

    cascade: Cascade
    outputs: tuple[tuple[str, tuple[str, ...], Expr], ...]
    mask: Expr | None


def substitute(e: Expr, mapping: dict[str, Expr]) -> Expr:
    """Replace free INDEX nodes by expressions (a reduction's bound index is left alone)."""
    if not mapping:
        return e
    if e.op is Op.INDEX:
        return mapping.get(e.arg, e)
    if e.op in (Op.REDUCE_SUM, Op.REDUCE_MAX, Op.SOFTMAX):
        inner = {k: v for k, v in mapping.items() if k != e.arg}
        clash = [k for k, v in inner.items() if e.arg in v.free_indices()]
        if clash:
            raise IRError(f"substituting into {E.render(e)} would capture index {e.arg!r}")
        return Expr(e.op, (substitute(e.src[0], inner),), e.arg, e.dtype)
    if not e.src:
        return e
    src = tuple(substitute(s, mapping) for s in e.src)
    return e if src == e.src else Expr(e.op, src, e.arg, e.dtype)


def inline(c: Cascade) -> Fused:
    """Fuse each output and the mask into a single expression over the cascade's indices."""
    done: dict[str, Expr] = {}
    eqs = {eq.name: eq for eq in c.equations}

    def expand(e: Expr) -> Expr:
        def visit(node: Expr) -> Expr | None:
            if node.op is Op.LOAD and node.arg in eqs:
                eq = eqs[node.arg]
                if eq.name not in done:
                    done[eq.name] = expand(eq.expr)
                return substitute(done[eq.name], dict(zip(eq.indices, node.src)))
            return None
        return e.replace(visit)

    outputs = tuple((o, c.equation(o).indices, simplify(expand(c.equation(o).expr)))
                    for o in c.outputs)
    mask = None if c.mask is None else simplify(expand(c.mask.expr))
    return Fused(c, outputs, mask)


def expand_softmax(e: Expr) -> Expr:
    """softmax(n) x -> exp(x - max(n) x) / sum(n) exp(x - max(n) x)"""
    def visit(node: Expr) -> Expr | None:
        if node.op is not Op.SOFTMAX:
            return None
        x, n = node.src[0], node.arg
        num = E.exp(x - E.reduce_max(n, x))
        return num / E.reduce_sum(n, num)
    return e.replace(visit)
