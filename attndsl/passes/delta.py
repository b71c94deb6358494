"""``delta-rule``: recognise a state recurrence and choose its chunked or recurrent form.

A spec with a state equation ``S[b,h,n,e,f] = recur(n) body`` (the body reads the previous
state ``S[b,h,n-1,.,f]``) and outputs ``O[b,h,m,f] = sum(e) q(m,e) S[b,h,m,e,f]`` is, once the
other equations are inlined, checked term by term against the one family the kernels run,
the (gated) delta rule with a state of E x F per (batch, head):

    S_n = a_n S_{n-1} - c_n k_n (k_n^T S_{n-1}) + k_n u_n^T,        o_m = q_m^T S_m

    a_n S[n-1,e,f]                       decay term (a per-position scalar; 1 when absent)
    c_n k(e) sum(d) k(d) S[n-1,d,f]      erase term (one key k, read and written)
    k(e) u(f)                            write term (u = beta v for DeltaNet)

with every coefficient a function of (b, h, n) only.  DeltaNet is a = 1, c = u / v = beta;
Gated DeltaNet a = alpha, c = alpha beta.  Scalar factors of k (a normalisation 1 / |k|) are
coefficients, so the keys of all terms are compared without them.  Anything else (a state
read twice, a per-key-dim decay, a different read and write key, S multiplied on the right)
is a located error that says which term and what the forms are.

Chunked form (the UT transform, Yang et al. 2024), per chunk of C positions from a state S_0,
with gamma_t = a_1 ... a_t inside the chunk (``exp(G_t)``, G the cumulative log decay):

    S_t = gamma_t S_0 + sum_{i <= t} (gamma_t / gamma_i) k_i delta_i^T,
    delta_t = u_t - c_t S_{t-1}^T k_t
    => (I + A) Delta = U - W S_0,  A_ti = c_t (k_t . k_i) gamma_{t-1} / gamma_i  (i < t),
       W_t = c_t gamma_{t-1} k_t,  so with T = (I + A)^{-1}: Delta = T U - (T W) S_0
    O = diag(gamma) Q S_0 + tril(Q K^T . gamma_t / gamma_i) Delta
    S_C = gamma_C S_0 + (K . gamma_C / gamma_i)^T Delta

T is unit lower triangular (forward substitution).  Every ratio gamma_t / gamma_i has t >= i,
so with a <= 1 no exponent is positive.  The chunked form needs log a_n: the decay must be
provably positive (``exp(x)``, ``sigmoid(x)``, a positive constant, or products and quotients
of them); otherwise the recurrent form (one position at a time, exact for any a) is chosen and
explain says why.  Both forms take an initial state and return the final one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from attndsl.ir import expr as E
from attndsl.ir.cascade import Cascade, Equation, is_recurrence, previous_position
from attndsl.ir.expr import Expr, IRError, Op
from attndsl.passes.lower import substitute
from attndsl.passes.rules import simplify
from attndsl.passes.terms import factors, product, sum_terms, terms


class DeltaError(IRError):
    """A recurrence the delta pass cannot run: the message is located at its equation."""


@dataclass(frozen=True)
class DeltaRule:
    """The recognised recurrence: features over (b, h, position, e | f) in the cascade's
    indices (the state's qk index ``e``, its v index ``f``, the key index for k, u, c, a; the
    query index for the outputs' q)."""

    state: str
    indices: tuple[str, ...]  # the state's left-hand side, [b, h, n, e, f]
    key: Expr  # k(b, h, n, e)
    value: Expr  # u(b, h, n, f), the written value with its coefficient
    erase: Expr | None  # c(b, h, n); None: no erase term (a plain gated linear recurrence)
    decay: Expr | None  # a(b, h, n); None: 1
    outputs: tuple[tuple[str, Expr], ...]  # (output name, q(b, h, m, e))

    @property
    def log_decay(self) -> Expr | None:
        """log a(n), the exponent the chunked form accumulates (None without a decay)."""
        if self.decay is None:
            return None
        return simplify(self.decay.src[0]) if self.decay.op is Op.EXP else E.log(self.decay)


@dataclass(frozen=True)
class DeltaDecision:
    """The form chosen for a recurrence spec, with the rule and why."""

    form: str  # "chunked" (prefill, + recurrent decode) or "recurrent"
    rule: DeltaRule
    reasons: tuple[str, ...] = ()  # why the chunked form does not apply
    rewrites: tuple[str, ...] = ()

    @property
    def state(self) -> str:
        """The state per (batch, head), in words."""
        return f"{self.rule.state}: E x F (fp32)"

    def __str__(self) -> str:
        r = self.rule
        head = ("form: chunked delta rule (prefill, UT transform per chunk; O(L C) work) + "
                "recurrent step (decode)" if self.form == "chunked" else
                "form: recurrent delta rule (one position at a time)")
        lines = [head, f"state per (batch, head): {self.state}",
                 f"recurrence: {r.state}_n = a_n {r.state}_(n-1) - c_n k_n (k_n^T "
                 f"{r.state}_(n-1)) + k_n u_n^T"]
        if self.reasons:
            lines.append("chunked form does not apply:")
            lines += [f"- {x}" for x in self.reasons]
        if self.rewrites:
            lines.append("rewrites:")
            lines += [f"- {x}" for x in self.rewrites]
        lines += ["features:", f"  k = {E.render(r.key)}", f"  u = {E.render(r.value)}",
                  f"  c = {'0' if r.erase is None else E.render(r.erase)}",
                  f"  a = {'1' if r.decay is None else E.render(r.decay)}"]
        lines += [f"  {name}: q = {E.render(q)}" for name, q in r.outputs]
        lines.append("backward: autograd through the chunked form recomputed in torch "
                     "(attndsl.runtime.delta; no Triton backward)")
        lines.append("quadratic form: none (a recurrence is not a sum over keys)")
        return "\n".join(lines)


def has_recurrence(c: Cascade) -> bool:
    """Whether ``c`` holds a state recurrence (``recur``)."""
    return any(is_recurrence(eq) for eq in c.equations)


def decide_delta(c: Cascade) -> DeltaDecision:
    """Recognise the recurrence of ``c`` (scans materialised) and choose its form."""
    rule = recognise(c)
    reasons = []
    if rule.decay is not None and not _positive(rule.decay):
        reasons.append(f"the decay a(n) = {E.render(rule.decay)} is not provably positive "
                       f"(exp(x), sigmoid(x), a positive constant, or products of them); the "
                       f"chunked form needs log a(n)")
    if reasons:
        return DeltaDecision("recurrent", rule, tuple(reasons))
    rewrites = ["delta rule as a rank-one update per position: S_n = a_n S_(n-1) + k_n "
                "delta_n^T, delta_n = u_n - c_n S_(n-1)^T k_n",
                "UT transform per chunk: (I + A) Delta = U - W S_0, A strictly lower, "
                "T = (I + A)^-1 by forward substitution; W = T diag(c gamma_(t-1)) K, U = T U",
                "intra-chunk: O = diag(gamma) Q S_0 + tril(Q K^T . decay) Delta (tl.dot, "
                "fp32); inter-chunk: S_C = gamma_C S_0 + (decay K)^T Delta"]
    if rule.decay is not None:
        rewrites.append("decays as exp(G_t - G_i), G = cumsum(log a) inside the chunk")
    return DeltaDecision("chunked", rule, (), tuple(rewrites))


# -- recognition ------------------------------------------------------------------------------

def _fail(eq: Equation | None, what: str) -> DeltaError:
    if eq is not None and eq.loc is not None:
        return DeltaError(eq.loc.message(what))
    return DeltaError(f"equation {eq.name}: {what}" if eq is not None else what)


def recognise(c: Cascade) -> DeltaRule:
    """The delta rule of ``c``'s recurrence, or a located :class:`DeltaError`."""
    states = [eq for eq in c.equations if is_recurrence(eq)]
    eq = states[0]
    if len(states) > 1:
        raise _fail(states[1], f"a second state recurrence ({eq.name} is the first); the "
                               f"kernels run one state per spec")
    roles = {r: c.role(r) for r in ("batch", "head", "query", "key", "v")}
    if c.mask is not None:
        raise _fail(c.mask, "a recurrence spec takes no mask: the state at position m holds "
                            "exactly the positions n <= m")
    if c.index(roles["query"]).extent != c.index(roles["key"]).extent:
        raise _fail(eq, "the query and key indices must share one extent (one sequence: the "
                        "outputs read the state at each position)")
    qk = eq.indices[-2] if len(eq.indices) >= 2 else None
    layout = tuple(i for i in (roles["batch"], roles["head"], roles["key"]) if i is not None)
    if (roles["v"] is None or qk is None or c.index(qk).role != "qk"
            or eq.indices != layout + (qk, roles["v"])):
        raise _fail(eq, f"the state {eq.name}[{', '.join(eq.indices)}] must be laid out as "
                        f"[{', '.join(layout)}, e, f] (batch, head, position, a qk index, the "
                        f"v index)")
    eqs = {e.name: e for e in c.equations if not is_recurrence(e)}
    body = _inline(eq.expr.src[0], eqs)
    rule = _body(eq, body, qk, roles)
    outputs = tuple((o, _readout(c.equation(o), _inline(c.equation(o).expr, eqs), eq, qk,
                                 roles)) for o in c.outputs)
    return DeltaRule(eq.name, eq.indices, *rule, outputs)


def _inline(e: Expr, eqs: dict[str, Equation]) -> Expr:
    """Every read of an equation other than the state replaced by its definition."""
    def visit(node: Expr) -> Expr | None:
        if node.op is Op.LOAD and node.arg in eqs:
            d = eqs[node.arg]
            return substitute(_inline(d.expr, eqs), dict(zip(d.indices, node.src)))
        return None
    return e.replace(visit)


def _linear_terms(e: Expr, state: str) -> list[tuple[Expr, int]]:
    """Signed terms of ``e`` with products (and sums over an index) distributed over the
    additions that hold a state read (``a (S - c k k^T S)`` -> ``a S``, ``- a c k k^T S``):
    linearity, nothing else."""
    out: list[tuple[Expr, int]] = []
    for t, s in terms(e):
        inner = _linear_terms(t.src[0], state) if t.op is Op.REDUCE_SUM and _reads(
            t, state) else []
        if len(inner) > 1:  # sum(j) (x + y) -> sum(j) x + sum(j) y
            out += [(E.reduce_sum(t.arg, u), s * s2) for u, s2 in inner]
            continue
        facs = factors(t)
        k = next((i for i, (x, p) in enumerate(facs) if p == 1 and x.op in (
            Op.ADD, Op.SUB, Op.NEG) and _reads(x, state)), None)
        if k is None:
            out.append((t, s))
            continue
        rest = facs[:k] + facs[k + 1:]
        for u, s2 in terms(facs[k][0]):
            out += [(v, s * s2 * s3) for v, s3 in _linear_terms(product([(u, 1)] + rest),
                                                                state)]
    return out


def _reads(e: Expr, state: str) -> list[Expr]:
    """The reads of ``state`` in ``e``, each occurrence (``S * S`` is two)."""
    if e.op is Op.LOAD and e.arg == state:
        return [e]
    return [r for s in e.src for r in _reads(s, state)]


def _body(eq: Equation, body: Expr, qk: str, roles: dict[str, str | None]
          ) -> tuple[Expr, Expr, Expr | None, Expr | None]:
    """(k, u, c, a) of the recurrence's body, term by term."""
    n, f = roles["key"], roles["v"]
    here = {i for i in (roles["batch"], roles["head"], n) if i is not None}
    prev = tuple(previous_position(n) if i == n else E.index(i) for i in eq.indices)
    decay, erase, write, keys = [], [], [], []
    for term, sign in _linear_terms(body, eq.name):
        reads = _reads(term, eq.name)
        shown = E.render(term)
        if len(reads) > 1:
            raise _fail(eq, f"the term {shown} reads the state {len(reads)} times; the "
                            f"recurrence must be linear in the previous state")
        facs = factors(term)
        if not reads:  # write: k(e) u(f)
            kf = [(x, p) for x, p in facs if qk in x.free_indices()]
            uf = [(x, p) for x, p in facs if qk not in x.free_indices()]
            if not kf or not any(f in x.free_indices() for x, _ in uf) or any(
                    f in x.free_indices() for x, _ in kf):
                raise _fail(eq, f"the term {shown} is not a write k({qk}) u({f}): an outer "
                                f"product of a key over {qk!r} and a value over {f!r}")
            _only(eq, shown, uf, here | {f})
            _only(eq, shown, kf, here | {qk})
            keys.append((shown, kf))
            write.append((product(uf), sign))
        elif reads[0].src == prev and (reads[0], 1) in facs:  # decay: a S[n-1, e, f]
            coef = [(x, p) for x, p in facs if x != reads[0]]
            _only(eq, shown, coef, here, "a per-position decay a(n) (a per-key-dim decay "
                                         "is not a delta rule)")
            decay.append((product(coef), sign))
        else:
            coef, kdir, kread = _erase(eq, term, facs, reads[0], prev, qk, roles)
            keys += [(shown, kdir), (shown, kread)]
            erase.append((product(coef), -sign))
    if not decay:
        raise _fail(eq, f"the recurrence does not keep its previous state: expected a term "
                        f"a(n) * {eq.name}[{', '.join(E.render(s) for s in prev)}]")
    if not write:
        raise _fail(eq, f"the recurrence writes nothing: expected a term k({qk}) u({f})")
    first = Counter((simplify(x), p) for x, p in keys[0][1])
    for shown, kf in keys[1:]:
        if Counter((simplify(x), p) for x, p in kf) != first:
            raise _fail(eq, f"the key of {shown}, {E.render(product(kf))}, differs from "
                            f"{E.render(product(keys[0][1]))} (the key of {keys[0][0]}); the "
                            f"delta rule reads and writes one key k(n)")
    a = simplify(sum_terms(decay))
    return (product(keys[0][1]), simplify(sum_terms(write)),
            simplify(sum_terms(erase)) if erase else None,
            None if E.is_const(a, 1.0) or E.is_const(a, 1) else a)


def _erase(eq: Equation, term: Expr, facs: list[tuple[Expr, int]], read: Expr,
           prev: tuple[Expr, ...], qk: str, roles: dict[str, str | None]
           ) -> tuple[list, list, list]:
    """c(n) k(e) sum(d) k(d) S[n-1, d, f] -> (coefficient, k(e) factors, k(d) with d -> e)."""
    n, f = roles["key"], roles["v"]
    here = {i for i in (roles["batch"], roles["head"], n) if i is not None}
    shown = E.render(term)
    sums = [(x, p) for x, p in facs if x.op is Op.REDUCE_SUM and _reads(x, eq.name)]
    form = (f"an erase term c(n) k({qk}) sum(d) k(d) {eq.name}[..., {n} - 1, d, {f}] or a "
            f"decay term a(n) {eq.name}[..., {n} - 1, {qk}, {f}]")
    if len(sums) != 1 or sums[0][1] != 1:
        raise _fail(eq, f"the term {shown} is not {form}")
    j = sums[0][0].arg
    inner = factors(sums[0][0].src[0])
    want = prev[:-2] + (E.index(j), E.index(f))
    if j not in read.free_indices():
        raise _fail(eq, f"the term {shown} sums over {j!r} a state read that does not use "
                        f"it (the Einsum convention sums a whole top-level term over the "
                        f"indices it uses: write sum({j}) inside the parentheses)")
    if read.src != want or (read, 1) not in inner:
        raise _fail(eq, f"the term {shown} reads the state as {E.render(read)}; {form} "
                        f"(the state multiplied on the left by k k^T)")
    outer = [(x, p) for x, p in facs if x is not sums[0][0]] + [
        (x, p) for x, p in inner if j not in x.free_indices()]
    kread = [(substitute(x, {j: E.index(qk)}), p) for x, p in inner
             if j in x.free_indices() and x != read]
    kdir = [(x, p) for x, p in outer if qk in x.free_indices()]
    coef = [(x, p) for x, p in outer if qk not in x.free_indices()]
    if not kread or not kdir:
        raise _fail(eq, f"the term {shown} is not {form}")
    _only(eq, shown, coef, here, "a per-position coefficient c(n)")
    _only(eq, shown, kdir + kread, here | {qk})
    return coef, kdir, kread


def _only(eq: Equation, shown: str, facs: list[tuple[Expr, int]], allowed: set[str],
          what: str = "") -> None:
    for x, _ in facs:
        extra = x.free_indices() - allowed
        if extra:
            why = f" ({what})" if what else ""
            raise _fail(eq, f"in the term {shown}, the factor {E.render(x)} depends on "
                            f"{sorted(extra)}{why}")


def _readout(out: Equation, e: Expr, state: Equation, qk: str,
             roles: dict[str, str | None]) -> Expr:
    """q(b, h, m, e) of an output ``O[b,h,m,f] = sum(j) q(m,j) S[b,h,m,j,f]`` (times
    per-position scalars)."""
    m, f = roles["query"], roles["v"]
    layout = tuple(i for i in (roles["batch"], roles["head"], m, f) if i is not None)
    form = (f"a readout {out.name}[{', '.join(layout)}] = sum({qk}) q({m}, {qk}) "
            f"{state.name}[..., {m}, {qk}, {f}]")
    if out.indices != layout:
        raise _fail(out, f"output {out.name}[{', '.join(out.indices)}] must be {form}")
    facs = factors(e)
    sums = [(x, p) for x, p in facs if x.op is Op.REDUCE_SUM and _reads(x, state.name)]
    if len(sums) != 1 or sums[0][1] != 1 or len(_reads(e, state.name)) != 1:
        raise _fail(out, f"output {out.name} is not {form}")
    j = sums[0][0].arg
    inner = factors(sums[0][0].src[0])
    read = _reads(e, state.name)[0]
    here = tuple(E.index(i) for i in (roles["batch"], roles["head"]) if i is not None)
    if read.src != here + (E.index(m), E.index(j), E.index(f)) or (read, 1) not in inner:
        raise _fail(out, f"output {out.name} reads the state as {E.render(read)}; expected "
                         f"{form} (the state after position {m})")
    q = [(x, p) for x, p in facs if x is not sums[0][0]] + [
        (x, p) for x, p in inner if x != read]
    allowed = {i.arg for i in here} | {m, j}
    for x, _ in q:
        extra = x.free_indices() - allowed
        if extra:
            raise _fail(out, f"in output {out.name}, the factor {E.render(x)} depends on "
                             f"{sorted(extra)}; {form}")
    return substitute(product(q), {j: E.index(qk)}) if j != qk else product(q)


def _positive(a: Expr) -> bool:
    """Whether ``a`` is positive wherever it is defined, by its form."""
    if a.op in (Op.EXP, Op.EXP2, Op.SIGMOID):
        return True
    if a.op is Op.CONST:
        return a.arg > 0
    if a.op in (Op.MUL, Op.DIV):
        return _positive(a.src[0]) and _positive(a.src[1])
    return False
