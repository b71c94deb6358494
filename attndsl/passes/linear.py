"""``linearise``: decide per cascade between quadratic, chunked linear and recurrent forms.

After inlining, an output with no normaliser over the keys is

    O[m,f] = sum(n) P(m,n) v(n,f),     P(m,n) = sum(e) q(m,e) k(n,e) exp(g(m,e) - g(n,e))

when every factor of the summand uses at most one of the positions m, n, except decays
``exp(X)`` whose exponent splits into terms of m alone and of n alone with one function
g: X = g(m) - g(n).  Then the key contraction re-associates (FuseMax's view with the
normaliser gone): ``(Q K^T) V = Q (K^T V)``, and under the causal mask ``n <= m`` the sum over
keys is a prefix sum carried as a state per (batch, head)

    S(m) = sum_{n <= m} exp(g(m) - g(n)) k(n) (x) v(n)      (E x F),   o(m) = q(m) . S(m)

which factorises chunk-locally: exp(g(m) - g(n)) = exp(g(m) - g(s)) exp(g(s) - g(n)) for the
chunk boundary s, so a chunk needs the state at its start and its own intra-chunk products.
A normaliser that is itself a linear sum, ``O = (sum(n) P v) / (sum(n) P)``, is kept as a
second state ``z(m) = sum_{n <= m} exp(g(m) - g(n)) k(n)`` (E): the runtime appends a column
of ones to v, so the same kernel computes numerator and denominator.

Forms: (a) ``quadratic`` (the online rewrite of the stream pass; always valid), (b)
``chunked`` (O(L) work; the prefill), (c) ``recurrent`` (one key at a time, the decode step;
valid whenever (b) is).  The pass leaves the fused IR unchanged and records the decision,
with the reasons the other forms do not apply, on :attr:`Fused.linear`; the quadratic kernel
is still compiled (the checks compare the forms).

The feature expressions q, k, v and the gate g are per-position expressions over (b, h,
position, e|f); the runtime evaluates them element-wise before the kernel.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from attndsl.ir import expr as E
from attndsl.ir.expr import Expr, Op
from attndsl.passes.lower import Fused, substitute
from attndsl.passes.rules import simplify
from attndsl.passes.terms import factors, product, sum_terms, terms


class NotLinear(Exception):
    """Why a cascade has no chunked form (the message is shown by ``attndsl explain``)."""


@dataclass(frozen=True)
class LinearOutput:
    """One output in the linear form: features over (b, h, position, e|f) and the gate.

    ``query`` uses the query index, ``key``, ``value`` and ``gate`` the key index (the gate is
    g of the decay exp(g(m) - g(n)), ``None`` without one; ``vector_gate``: it depends on
    the qk index e, as GLA's).  ``normalised``: the output divides by the linear sum z."""

    name: str
    query: Expr
    key: Expr
    value: Expr
    gate: Expr | None
    vector_gate: bool
    normalised: bool

    def __str__(self) -> str:
        gate = "none" if self.gate is None else E.render(self.gate)
        lines = [f"{self.name}: q = {E.render(self.query)}", f"  k = {E.render(self.key)}",
                 f"  v = {E.render(self.value)}",
                 f"  decay exp(g(m) - g(n)), g = {gate}"
                 f"{' (per key-dim vector gate)' if self.vector_gate else ''}"]
        if self.normalised:
            lines.append("  normaliser: second state z = sum(n) decay * k (x) 1")
        return "\n".join(lines)


@dataclass(frozen=True)
class LinearDecision:
    """The form chosen, the state shape, the rewrites, and why other forms do not apply."""

    form: str  # "quadratic" or "chunked" (with "recurrent" for decode)
    outputs: tuple[LinearOutput, ...] = ()
    reasons: tuple[str, ...] = ()  # why the chunked/recurrent forms do not apply
    rewrites: tuple[str, ...] = field(default=())

    @property
    def state(self) -> str:
        """The state per (batch, head) of each output, in words."""
        return "; ".join(f"{o.name}: S = E x F" + (", z = E (the F+1-th column)"
                                                    if o.normalised else "")
                         for o in self.outputs)

    def __str__(self) -> str:
        if self.form == "quadratic":
            why = "\n".join(f"- {r}" for r in self.reasons)
            return f"form: quadratic (online rewrite)\nchunked / recurrent do not apply:\n{why}"
        lines = ["form: chunked linear (prefill; O(L) work) + recurrent step (decode)",
                 f"state per (batch, head): {self.state} (fp32)", "rewrites:"]
        lines += [f"- {r}" for r in self.rewrites]
        lines.append("features:")
        lines += [str(o) for o in self.outputs]
        lines.append("quadratic form (O(L^2) work): compiled too when the stream pass can "
                     "lower it (the reference)")
        return "\n".join(lines)


def linearise(f: Fused) -> Fused:
    """Decide quadratic vs chunked linear vs recurrent per cascade; record it on the IR."""
    return replace(f, linear=decide(f))


def decide(f: Fused) -> LinearDecision:
    """The linear form of every output of ``f``, or the reasons there is none."""
    c = f.cascade
    roles = {r: c.role(r) for r in ("batch", "head", "query", "key", "qk", "v")}
    reasons: list[str] = []
    outs: list[LinearOutput] = []
    checks = [lambda name=name, idx=idx, e=e: outs.append(_output(name, idx, e, roles))
              for name, idx, e in f.outputs]
    for check in [*checks, lambda: _check_mask(f, roles), lambda: _check_positions(f, roles)]:
        try:
            check()
        except NotLinear as why:  # every reason, the outputs' structure first
            reasons.append(str(why))
    if reasons:
        return LinearDecision("quadratic", reasons=tuple(reasons))
    rewrites = ["re-associate the key contraction: (Q K^T) V = Q (K^T V), a state "
                "S = sum_n k_n (x) v_n per (batch, head)",
                "causal mask n <= m: the sum over keys is a prefix sum (chunk by chunk: "
                "intra-chunk Q K^T and P V on tensor cores, inter-chunk state recurrence)"]
    if any(o.gate is not None for o in outs):
        rewrites.append("decay exp(g(m) - g(n)) = exp(g(m) - g(s)) * exp(g(s) - g(n)) at "
                        "each chunk boundary s (every exponent <= 0 under the mask)")
    if any(o.normalised for o in outs):
        rewrites.append("normaliser sum(n) P kept as a second state z = sum_n decay k_n "
                        "(v extended by a column of ones)")
    return LinearDecision("chunked", tuple(outs), (), tuple(rewrites))


def _check_positions(f: Fused, roles: dict[str, str | None]) -> None:
    """One sequence: the query and key indices share their extent (self-attention)."""
    c = f.cascade
    qe, ke = c.index(roles["query"]).extent, c.index(roles["key"]).extent
    if qe != ke:
        raise NotLinear(f"the query and key indices have different extents ({qe}, {ke}); the "
                        f"state runs over the positions of one sequence (declare both over "
                        f"one extent, e.g. m: L query, n: L key)")


def _check_mask(f: Fused, roles: dict[str, str | None]) -> None:
    m, n = roles["query"], roles["key"]
    causal = {E.binary(Op.LE, E.index(n), E.index(m)), E.binary(Op.GE, E.index(m), E.index(n))}
    if f.mask is None:
        raise NotLinear("no mask: the chunked form needs the causal mask n <= m (a prefix sum "
                        "over keys); without one every query sees the whole sequence")
    if f.mask not in causal:
        raise NotLinear(f"the mask {E.render(f.mask)} is not the causal mask {n} <= {m}; the "
                        f"state is a prefix sum over keys only under it")


def _output(name: str, indices: tuple[str, ...], e: Expr,
            roles: dict[str, str | None]) -> LinearOutput:
    m, fidx = roles["query"], roles["v"]
    layout = tuple(i for i in (roles["batch"], roles["head"], m, fidx) if i is not None)
    if indices != layout:
        raise NotLinear(f"output {name}[{', '.join(indices)}] is not laid out as "
                        f"[{', '.join(layout)}] (batch, head, query, value), the linear "
                        f"kernels' layout")
    normalised = e.op is Op.DIV
    num, den = (e.src[0], e.src[1]) if normalised else (e, None)
    split = _key_sum(num, roles, name)
    if den is not None:
        dsplit = _key_sum(den, roles, name)
        if dsplit[2] != [] or (dsplit[0], dsplit[1], dsplit[3]) != (split[0], split[1],
                                                                    split[3]):
            raise NotLinear(f"output {name}: the denominator {E.render(den)} is not the "
                            f"numerator's sum over keys without its value factor (a linear "
                            f"normaliser); a softmax-like normaliser is quadratic")
    q_side, k_side, v_side, gate = split
    vector = gate is not None and roles["qk"] in gate.free_indices()
    return LinearOutput(name, product(q_side), product(k_side), product(v_side),
                        gate, vector, normalised)


_Split = tuple[list[tuple[Expr, int]], list[tuple[Expr, int]], list[tuple[Expr, int]],
               "Expr | None"]


def _key_sum(e: Expr, roles: dict[str, str | None], name: str) -> _Split:
    """``sum(n) body`` -> (query factors, key factors, value factors, gate g)."""
    n, qk = roles["key"], roles["qk"]
    if e.op is not Op.REDUCE_SUM or e.arg != n:
        raise NotLinear(f"output {name}: {E.render(e)} is not a sum over the keys {n} (the "
                        f"linear form is sum(n) q(m) k(n) decay v(n))")
    outer, inner = [], []
    for fac, p in factors(e.src[0]):
        if fac.op is Op.REDUCE_SUM and fac.arg == qk and p == 1 and not inner:
            inner = factors(fac.src[0])
        else:
            outer.append((fac, p))
    outer += [(fac, p) for fac, p in inner if qk not in fac.free_indices()]
    inner = [(fac, p) for fac, p in inner if qk in fac.free_indices()]
    q_side, k_side, v_side, gates = [], [], [], []
    for fac, p in outer + inner:
        side = _classify(fac, p, roles, name)
        if side == "gate":
            gates.append(_gate(fac.src[0], roles, name))
        else:
            {"q": q_side, "k": k_side, "v": v_side}[side].append((fac, p))
    gate = simplify(sum_terms([(g, 1) for g in gates])) if gates else None
    return q_side, k_side, v_side, gate


def _classify(fac: Expr, p: int, roles: dict[str, str | None], name: str) -> str:
    m, n, fidx = roles["query"], roles["key"], roles["v"]
    free = fac.free_indices()
    if any(x.op in (Op.REDUCE_MAX, Op.SOFTMAX) or (x.op is Op.REDUCE_SUM and x.arg == n)
           for x in fac.walk()):
        raise NotLinear(f"output {name}: the factor {E.render(fac)} holds a reduction (a "
                        f"normaliser or running max: softmax-like attention is quadratic)")
    if p < 0 and free & {m, n}:
        raise NotLinear(f"output {name}: division by the position-dependent {E.render(fac)}")
    if m in free and n in free:
        if fac.op is Op.EXP and p == 1:
            return "gate"
        raise NotLinear(f"output {name}: the factor {E.render(fac)} couples the query and key "
                        f"positions and is not a decay exp(g(m) - g(n)) (an exponential or "
                        f"other kernel of q.k has no finite feature map)")
    if fidx in free:
        if m in free or roles["qk"] in free:
            raise NotLinear(f"output {name}: the value factor {E.render(fac)} depends on "
                            f"{sorted(free & {m, roles['qk']})}")
        return "v"
    return "k" if n in free else "q"


def _gate(x: Expr, roles: dict[str, str | None], name: str) -> Expr:
    """g with exp(x) = exp(g(m) - g(n)), as an expression of the key index n."""
    m, n = roles["query"], roles["key"]
    signed = _position_terms(x, m, n)
    if signed is None:
        raise NotLinear(f"output {name}: the exponent {E.render(x)} does not split into "
                        f"terms of {m} alone and of {n} alone")
    of_m = Counter((simplify(substitute(t, {m: E.index(n)})), s) for t, s in signed
                   if m in t.free_indices())
    of_n = Counter((simplify(t), -s) for t, s in signed if n in t.free_indices())
    rest = [t for t, s in signed if not t.free_indices() & {m, n}]
    if of_m != of_n or rest:
        raise NotLinear(f"output {name}: the exponent {E.render(x)} is not g({m}) - g({n}) "
                        f"for one function g (a relative decay)")
    return sum_terms([(t, s) for (t, s) in of_m.elements()])


def _position_terms(x: Expr, m: str, n: str) -> list[tuple[Expr, int]] | None:
    """x as signed terms each using at most one of m, n (coefficients free of both
    distributed), or None."""
    out: list[tuple[Expr, int]] = []
    for t, s in terms(x):
        if not {m, n} <= t.free_indices():
            out.append((t, s))
            continue
        facs = factors(t)
        pos = [k for k, (fac, _) in enumerate(facs) if fac.free_indices() & {m, n}]
        if len(pos) != 1 or facs[pos[0]][1] != 1 or facs[pos[0]][0].op not in (
                Op.ADD, Op.SUB, Op.NEG):
            return None
        coef = [fp for k, fp in enumerate(facs) if k != pos[0]]
        inner = _position_terms(facs[pos[0]][0], m, n)
        if inner is None:
            return None
        out += [(product([(u, 1)] + coef), s * s2) for u, s2 in inner]
    return out
