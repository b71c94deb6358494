"""FlexAttention-style programs (``score_mod`` / ``mask_mod``) lowered to the Cascade IR.

The cascade every FlexAttention call denotes (G = H / HKV query heads per key/value head)::

    S[b,h,m,n]   = sum(e) Q[b,h,m,e] * K[b,h//G,n,e] * scale
    T[b,h,m,n]   = score_mod(S[b,h,m,n], b, h, m, n)
    mask Keep[b,h,m,n] = mask_mod(b, h, m, n)
    P[b,h,m,n]   = softmax(n) T[b,h,m,n]
    O[b,h,m,f]   = sum(n) P[b,h,m,n] * V[b,h//G,n,f]
    LSE[b,h,m]   = log(sum(n) exp(T[b,h,m,n]))
    MAX[b,h,m]   = max(n) T[b,h,m,n]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from attndsl.frontend.trace import TraceContext, trace
from attndsl.ir import expr as E
from attndsl.ir.cascade import (
    Cascade,
    Equation,
    IndexDecl,
    ParamDecl,
    SourceLoc,
    TensorDecl,
    verify,
)
from attndsl.ir.expr import BOOL, FLOAT, INT, Op

INDICES = (IndexDecl("b", "B", "batch"), IndexDecl("h", "H", "head"),
           IndexDecl("m", "M", "query"), IndexDecl("n", "N", "key"),
           IndexDecl("e", "E", "qk"), IndexDecl("f", "F", "v"))
BHMN = ("b", "h", "m", "n")


@dataclass(frozen=True)
class FlexSpec:
    """A cascade plus the tensors its score/mask programs captured (bound at call time)."""

    cascade: Cascade
    captured: dict[str, torch.Tensor]


def attention_cascade(score: E.Expr | None, mask: E.Expr | None, name: str = "flex",
                      captured: dict[str, torch.Tensor] | None = None,
                      score_loc: SourceLoc | None = None, mask_loc: SourceLoc | None = None,
                      ) -> Cascade:
    """The softmax-attention cascade with a score expression over S and a key mask;
    ``score_loc`` / ``mask_loc`` (the lines the programs returned from) locate errors about
    the score and mask equations."""
    b, h, m, n, e, f = (E.index(i) for i in ("b", "h", "m", "n", "e", "f"))
    hk = E.binary(Op.FLOORDIV, h, E.param("G", INT))
    s_def = E.reduce_sum("e", E.load("Q", (b, h, m, e)) * E.load("K", (b, hk, n, e))) \
        * E.param("scale")
    s_read = E.load("S", (b, h, m, n))
    t_expr = s_read if score is None else score
    equations = [Equation("S", BHMN, s_def), Equation("T", BHMN, t_expr, score_loc)]
    t_read = E.load("T", (b, h, m, n))
    equations += [
        Equation("P", BHMN, E.softmax("n", t_read)),
        Equation("O", ("b", "h", "m", "f"),
                 E.reduce_sum("n", E.load("P", (b, h, m, n)) * E.load("V", (b, hk, n, f)))),
        Equation("LSE", ("b", "h", "m"), E.log(E.reduce_sum("n", E.exp(t_read)))),
        Equation("MAX", ("b", "h", "m"), E.reduce_max("n", t_read)),
    ]
    tensors = [TensorDecl("Q", ("B", "H", "M", "E")), TensorDecl("K", ("B", "HKV", "N", "E")),
               TensorDecl("V", ("B", "HKV", "N", "F"))]
    for cname, t in (captured or {}).items():
        dtype = BOOL if t.dtype == torch.bool else FLOAT if t.dtype.is_floating_point else INT
        tensors.append(TensorDecl(cname, tuple(f"{cname}.{i}" for i in range(t.dim())), dtype,
                                  "captured"))
    mask_eq = None if mask is None else Equation("Keep", BHMN, mask, mask_loc)
    cascade = Cascade(name, INDICES, tuple(tensors),
                      (ParamDecl("scale", FLOAT), ParamDecl("G", INT)), tuple(equations),
                      ("O", "LSE", "MAX"), mask_eq)
    return verify(cascade)


def lower_flex(score_mod: Callable | None = None, mask_mod: Callable | None = None) -> FlexSpec:
    """Trace ``score_mod(score, b, h, q_idx, kv_idx)`` and ``mask_mod(b, h, q_idx, kv_idx)``."""
    b, h, m, n = (E.index(i) for i in BHMN)
    ctx = TraceContext(fn_name="score_mod")
    score = mask = score_loc = mask_loc = None
    if score_mod is not None:
        traced = trace(score_mod, (E.load("S", (b, h, m, n)), b, h, m, n), "score_mod", ctx)
        score = traced.expr
        if score.dtype == BOOL:
            raise ctx.fail_in(score_mod, "score_mod returned a boolean; did you mean to pass it "
                                         "as mask_mod?")
        if score.dtype == INT:
            score = E.unary(Op.CAST, score, FLOAT)
        score_loc = ctx.returned_at(score_mod)
    if mask_mod is not None:
        mask = _trace_mask(mask_mod, ctx)
        mask_loc = ctx.returned_at(mask_mod)
    captured = {name: t for name, t in ctx.captured.values()}
    parts = [getattr(fn, "__name__", "fn") for fn in (score_mod, mask_mod) if fn is not None]
    return FlexSpec(attention_cascade(score, mask, "_".join(parts) or "dense", captured,
                                      score_loc, mask_loc), captured)


def _trace_mask(mask_mod: Callable, ctx: TraceContext) -> E.Expr:
    mask = trace(mask_mod, tuple(E.index(i) for i in BHMN), "mask_mod", ctx).expr
    if mask.dtype != BOOL:
        raise ctx.fail_in(mask_mod, f"mask_mod must return a boolean (a comparison, &, |, ~), "
                                    f"got a {mask.dtype} expression: {mask}")
    return mask


def mask_expr(mask_mod: Callable) -> tuple[E.Expr, dict[str, torch.Tensor]]:
    """Trace a mask_mod alone: a boolean expression over b, h, m (query), n (key), and the
    tensors it captured (the same expression ``lower_flex`` puts in its cascade)."""
    ctx = TraceContext(fn_name="mask_mod")
    mask = _trace_mask(mask_mod, ctx)
    return mask, {name: t for name, t in ctx.captured.values()}


__all__ = ["FlexSpec", "attention_cascade", "lower_flex", "mask_expr"]
