"""Fusion: inline equations into the outputs.

``inline`` substitutes every read of an intermediate tensor by its defining expression (with
the reader's index expressions put in for the definition's indices), so that each output and
the key mask become one closed expression: the whole score/mask chain is fused.
:func:`verify_fused` checks what fusion promises (run between passes when verification is on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from attndsl.ir import expr as E
from attndsl.ir.cascade import Cascade
from attndsl.ir.expr import BOOL, Expr, IRError, Op
from attndsl.passes.rules import simplify


@dataclass(frozen=True)
class Fused:
    """A cascade after fusion: one closed expression per output, plus the key mask."""

    cascade: Cascade
    outputs: tuple[tuple[str, tuple[str, ...], Expr], ...]
    mask: Expr | None
    fired: tuple[str, ...] = field(default=())  # the cascade-level rewrites applied, described
    # the linearise pass's decision (attndsl.passes.linear.LinearDecision), once it ran
    linear: Any = field(default=None, compare=False)

    def __str__(self) -> str:
        lines = [f"{n}[{', '.join(i)}] = {E.render(e)}" for n, i, e in self.outputs]
        if self.mask is not None:
            lines.append(f"mask: {E.render(self.mask)}")
        return "\n".join(lines)


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


def verify_fused(f: Fused) -> Fused:
    """Check a fused cascade: one closed expression per declared output, over that output's
    indices, reading only input and captured tensors; a boolean mask of the same kind."""
    c = f.cascade
    if tuple(n for n, _, _ in f.outputs) != c.outputs:
        raise IRError(f"fused cascade {c.name!r}: outputs {[n for n, _, _ in f.outputs]} are "
                      f"not the declared outputs {list(c.outputs)}")
    exprs = [(f"output {n}[{', '.join(i)}]", set(i), e) for n, i, e in f.outputs]
    if f.mask is not None:
        if f.mask.dtype != BOOL:
            raise IRError(f"fused cascade {c.name!r}: the mask must be boolean, got "
                          f"{f.mask.dtype}")
        exprs.append(("the mask", {i.name for i in c.indices}, f.mask))
    for what, allowed, e in exprs:
        extra = e.free_indices() - allowed
        if extra:
            raise IRError(f"fused cascade {c.name!r}: {what} depends on {sorted(extra)}")
        for node in e.walk():
            if node.op is Op.LOAD and c.tensor(node.arg) is None:
                raise IRError(f"fused cascade {c.name!r}: {what} still reads {node.arg}, which "
                              f"inlining should have replaced ({E.render(node)})")
            if node.op is Op.ROW:
                raise IRError(f"fused cascade {c.name!r}: {what} reads a schedule value "
                              f"{E.render(node)} before any schedule exists")
    return f
