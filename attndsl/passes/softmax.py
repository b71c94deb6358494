"""Softmax expansion: the built-in normaliser becomes FuseMax's 3-pass cascade::

    softmax(n) x  ->  exp(x - max(n) x) / sum(n) exp(x - max(n) x)

after which pass analysis sees only sums and maxima (and the streaming derivation turns the
three passes into one, as for any other normaliser written out by hand).
"""

from __future__ import annotations

from dataclasses import replace

from attndsl.ir import expr as E
from attndsl.ir.expr import Expr, Op
from attndsl.passes.lower import Fused
from attndsl.passes.rules import Rule, named, rewrite

NOTE = "expand-softmax: softmax(n) x -> exp(x - max(n) x) / sum(n) exp(...)"


@named("expand-softmax")
def _expand(e: Expr) -> Expr | None:
    """softmax(n) x -> exp(x - max(n) x) / sum(n) exp(x - max(n) x)"""
    if e.op is not Op.SOFTMAX:
        return None
    x, n = e.src[0], e.arg
    num = E.exp(x - E.reduce_max(n, x))
    return num / E.reduce_sum(n, num)


EXPAND: list[Rule] = [_expand]


def expand_softmax(e: Expr) -> Expr:
    """``e`` with every softmax (inner ones first) written as max, exp, sum and divide."""
    return rewrite(e, EXPAND)


def expand_softmax_outputs(fused: Fused) -> Fused:
    """The fused cascade with every output's softmax expanded (noted in ``fired``)."""
    if not any(n.op is Op.SOFTMAX for _, _, e in fused.outputs for n in e.walk()):
        return fused
    outputs = tuple((n, idx, expand_softmax(e)) for n, idx, e in fused.outputs)
    return replace(fused, outputs=outputs, fired=fused.fired + (NOTE,))
