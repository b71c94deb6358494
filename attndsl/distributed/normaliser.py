"""The softmax family a context-parallel merge is exact for, recognised in a cascade.

Ring attention merges per-shard states with their log-sum-exp (:mod:`.merge`), which is
exact when each output is a ratio of sums over the keys of ``exp(X)``::

    O[b,h,m,f] = sum(n) exp(X) V[b,h,n,f] / (R + sum(n) exp(X))        LSE = log sum(n) exp(X)

with ``R`` an extra normaliser term independent of the keys (absent for softmax, ``1`` for
off-by-one softmax, ``exp(sink[h])`` for learned sinks).  :func:`softmax_form` finds X and R
in the fused form of a cascade (``softmax(n) X`` counts as R absent) and rewrites it as the
FlexAttention cascade ``T = X`` over ``S = scale Q K^T``, whose generated forward and backward
kernels run the pairs; R is added once after the merge as the sink logit ``log R[h]``.
Cascades with no normaliser over the keys (sigmoid, ReLU^2) merge by a plain sum
(:mod:`.additive`); other normalisers (softpick: a sum of functions other than exp(X))
have no exact merge and are refused with an AttentionError naming the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attndsl.frontend.flex import attention_cascade
from attndsl.ir import expr as E
from attndsl.ir.cascade import Cascade
from attndsl.ir.evaluate import evaluate
from attndsl.ir.expr import INT, Expr, Op
from attndsl.passes.lower import inline
from attndsl.passes.terms import factors, terms
from attndsl.runtime.checks import AttentionError, check_params

Tensor = torch.Tensor
CANONICAL = {"batch": "b", "head": "h", "query": "m", "key": "n", "qk": "e", "v": "f"}
FLEX_NAMES = {"Q", "K", "V", "S", "T", "P", "O", "LSE", "MAX", "Keep"}


@dataclass
class SoftmaxForm:
    """A cascade as FlexAttention plus an extra normaliser term (see the module docstring)."""

    flex: Cascade  # the FlexAttention cascade of T = X (and the mask)
    captured: dict[str, Tensor]  # the tensors T and the mask read
    scaled: bool  # X multiplies Q K^T by the cascade's ``scale`` (else by 1)
    extra: Expr | None  # R over h (or a constant), None when absent
    extra_tensors: dict[str, Tensor]
    outputs: dict[str, str]  # the cascade's output names -> "O" | "LSE"

    def sink_logit(self, heads: int) -> Tensor | None:
        """log R[h] for h < heads (differentiable in the tensors R reads), or None."""
        if self.extra is None:
            return None
        r = evaluate(self.extra, ["h"], {"h": torch.arange(heads)}, self.extra_tensors,
                     dtype=torch.float32)
        # an h-free term evaluates to one broadcast value
        r = r.reshape(-1).expand(heads) if r.numel() == 1 else r.reshape(heads)
        if bool((r < 0).any()):
            raise AttentionError(f"the extra normaliser term {E.render(self.extra)} is "
                                 f"negative; a log-sum-exp merge needs it >= 0")
        return torch.log(r)


def softmax_form(c: Cascade, params: dict | None = None,
                 captured: dict[str, Tensor] | None = None,
                 extents: dict[str, int] | None = None) -> SoftmaxForm:
    """``c`` as a :class:`SoftmaxForm`; parameters other than ``scale`` are bound to
    ``params`` (or their defaults), reads of the query / key extents (an index size used
    as a value, ``n < N - 2``) to ``extents`` -- the whole sequence's lengths, which a shard's
    kernel would otherwise take from its own rows.  Raises AttentionError naming what does
    not fit (an extent read with no value in ``extents`` among it)."""
    params = check_params(c.name, {p.name: p.dtype for p in c.params}, params)
    captured = dict(captured or {})
    clash = sorted(FLEX_NAMES & {t.name for t in c.tensors if t.kind == "captured"})
    if clash:
        raise AttentionError(f"cascade {c.name!r}: captured tensor(s) {clash} share a name "
                             f"with the attention cascade's own; rename them")
    fused = inline(c)
    rename = {i.name: CANONICAL[i.role] for i in c.indices}
    bind = _bindings(c, params)
    sequence = {c.index(c.role(r)).extent: r for r in ("query", "key")}
    for name, value in (extents or {}).items():
        bind[name] = E.const(int(value))
    unbound = sorted({x.arg for _, _, e in fused.outputs for x in e.walk()
                      if x.op is Op.PARAM and x.arg in sequence and x.arg not in bind}
                     | {x.arg for x in (fused.mask.walk() if fused.mask is not None else ())
                        if x.op is Op.PARAM and x.arg in sequence and x.arg not in bind})
    if unbound:
        raise AttentionError(f"cascade {c.name!r} reads the {sequence[unbound[0]]} extent "
                             f"{unbound[0]} as a value; here the keys are split, so it has "
                             f"no single value: write the length as a param instead")
    prepared = {name: _prepare(e, rename, bind) for name, _, e in fused.outputs}
    mask = None if fused.mask is None else _prepare(fused.mask, rename, bind)
    roles = {t.name: _role(c, t.name) for t in c.tensors if t.kind == "input"}
    score = extra = None
    outputs = {}
    for name, e in prepared.items():
        lse = _lse_of(e)
        if lse is not None:
            x, r = lse, None
            outputs[name] = "LSE"
        else:
            x, r = _output_of(c.name, name, e, roles)
            outputs[name] = "O"
            if extra is not None and r != extra:
                raise AttentionError(f"cascade {c.name!r}: outputs normalise differently")
            extra = r
        if score is not None and x != score:
            raise AttentionError(f"cascade {c.name!r}: output {name} uses another score "
                                 f"than the other outputs; each output needs one exp(X)")
        score = x
    if "O" not in outputs.values():
        raise AttentionError(f"cascade {c.name!r} has no attention output sum(n) P V")
    t_expr, scaled = _score_over_s(c.name, score, roles)
    reads = {x.arg for e in (t_expr, mask) if e is not None for x in e.walk()
             if x.op is Op.LOAD}
    extra_reads = set() if extra is None else {x.arg for x in extra.walk() if x.op is Op.LOAD}
    missing = sorted((reads | extra_reads) - set(captured) - {"S"} - set(roles))
    if missing:
        raise AttentionError(f"cascade {c.name!r} reads {missing}; pass them in captured=")
    kept = {n: captured[n] for n in sorted(reads) if n in captured}
    flex = attention_cascade(t_expr, mask, c.name, kept)
    return SoftmaxForm(flex, kept, scaled, extra,
                       {n: captured[n] for n in sorted(extra_reads)}, outputs)


def _bindings(c: Cascade, params: dict) -> dict[str, Expr]:
    out = {}
    for p in c.params:
        if p.name == "scale":
            continue
        value = params.get(p.name, p.default)
        if value is None:
            raise AttentionError(f"cascade {c.name!r} needs a value for parameter {p.name!r} "
                                 f"(params={{{p.name!r}: ...}})")
        out[p.name] = E.const(int(value) if p.dtype == INT else float(value))
    return out


def _prepare(e: Expr, rename: dict[str, str], bind: dict[str, Expr]) -> Expr:
    """Indices renamed by role (b, h, m, n, e, f) and parameters other than scale bound."""
    def visit(node: Expr) -> Expr | None:
        if node.op is Op.INDEX:
            return E.index(rename[node.arg])
        if node.op in (Op.REDUCE_SUM, Op.REDUCE_MAX, Op.SOFTMAX):
            return Expr(node.op, node.src, rename[node.arg], node.dtype)
        if node.op is Op.PARAM and node.arg in bind:
            return bind[node.arg]
        return None
    return e.replace(visit)


def _role(c: Cascade, name: str) -> str:
    """'q', 'k' or 'v': which input an input tensor is, by the roles of its dimensions."""
    eq_uses = [x for eq in c.equations for x in eq.expr.walk()
               if x.op is Op.LOAD and x.arg == name]
    roles = {c.index(s.arg).role for x in eq_uses for s in x.src if s.op is Op.INDEX}
    if "query" in roles:
        return "q"
    return "v" if "v" in roles else "k"


def _lse_of(e: Expr) -> Expr | None:
    """X of ``log(sum(n) exp(X))``, else None."""
    if e.op is Op.LOG and e.src[0].op is Op.REDUCE_SUM and e.src[0].arg == "n" \
            and e.src[0].src[0].op is Op.EXP:
        return e.src[0].src[0].src[0]
    return None


def _output_of(cname: str, name: str, e: Expr, roles: dict[str, str]
               ) -> tuple[Expr, Expr | None]:
    """(X, R) of an attention output (see the module docstring)."""
    def refuse() -> AttentionError:
        return AttentionError(
            f"cascade {cname!r}: output {name} = {E.render(e)} is not of the softmax family "
            f"sum(n) exp(X) V / (R + sum(n) exp(X)); its normaliser has no exact "
            f"log-sum-exp merge across key shards, so it cannot run context-parallel")

    if e.op is Op.REDUCE_SUM and e.arg == "n":
        inner = factors(e.src[0])
        values = [f for f, p in inner if p > 0 and _is_value(f, roles)]
        rest = [(f, p) for f, p in inner if not (p > 0 and _is_value(f, roles))]
        if len(values) != 1:
            raise refuse()
        if len(rest) == 1 and rest[0][1] > 0 and rest[0][0].op is Op.SOFTMAX:
            return rest[0][0].src[0], None
        nums = [f for f, p in rest if p > 0]
        dens = [f for f, p in rest if p < 0]
        if len(nums) == 1 and nums[0].op is Op.EXP and len(dens) == 1:
            return nums[0].src[0], _extra(dens[0], nums[0], refuse)
        raise refuse()
    top = factors(e)
    nums = [f for f, p in top if p > 0]
    dens = [f for f, p in top if p < 0]
    if len(nums) == 1 and len(dens) == 1 and nums[0].op is Op.REDUCE_SUM and nums[0].arg == "n":
        inner = factors(nums[0].src[0])
        exps = [f for f, p in inner if p > 0 and f.op is Op.EXP]
        values = [f for f, p in inner if p > 0 and _is_value(f, roles)]
        if len(inner) == 2 and len(exps) == 1 and len(values) == 1:
            return exps[0].src[0], _extra(dens[0], exps[0], refuse)
    raise refuse()


def _is_value(f: Expr, roles: dict[str, str]) -> bool:
    return f.op is Op.LOAD and roles.get(f.arg) == "v"


def _extra(den: Expr, exp_x: Expr, refuse) -> Expr | None:  # noqa: ANN001
    """R of a denominator ``R + sum(n) exp(X)`` (None when it is the sum alone)."""
    total = E.reduce_sum("n", exp_x)
    signed = terms(den)
    if (total, 1) not in signed:
        raise refuse()
    rest = [t for t in signed if t != (total, 1)]
    if not rest:
        return None
    if any(s < 0 for _, s in rest) or any("n" in t.free_indices() for t, _ in rest):
        raise refuse()
    r = rest[0][0]
    for t, _ in rest[1:]:
        r = r + t
    if r.free_indices() - {"h"}:
        raise AttentionError(f"the extra normaliser term {E.render(r)} depends on "
                             f"{sorted(r.free_indices() - {'h'})}; context parallelism adds "
                             f"a per-head term only")
    return r


def _score_over_s(cname: str, x: Expr, roles: dict[str, str]) -> tuple[Expr, bool]:
    """X with ``scale * sum(e) Q K`` (or ``sum(e) Q K``) read as S; whether it was scaled."""
    s_read = E.load("S", tuple(E.index(i) for i in ("b", "h", "m", "n")))
    scaled = False

    def is_dot(node: Expr) -> bool:
        if node.op is not Op.REDUCE_SUM or node.arg != "e":
            return False
        parts = factors(node.src[0])
        return sorted(roles.get(f.arg, "") for f, _ in parts if f.op is Op.LOAD) == ["k", "q"] \
            and len(parts) == 2

    def visit(node: Expr) -> Expr | None:
        nonlocal scaled
        if node.op is Op.MUL:
            a, b = node.src
            for dot, other in ((a, b), (b, a)):
                if dot == s_read and other.op is Op.PARAM and other.arg == "scale":
                    scaled = True
                    return s_read
        return s_read if is_dot(node) else None

    t = x.replace(visit)
    stray = [n for n in t.walk() if n.op is Op.PARAM or
             (n.op is Op.LOAD and n.arg in roles)]
    if stray:
        raise AttentionError(f"cascade {cname!r}: the score {E.render(x)} must read Q and K "
                             f"only through scale * sum(e) Q K (got {E.render(stray[0])})")
    return t, scaled
