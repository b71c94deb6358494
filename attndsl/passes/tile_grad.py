"""The backward of a streamed Tile IR kernel, derived from its running sums (any normaliser).

A one-pass tile kernel computes, per query row ``m``, running sums over the key tiles and then
its outputs from the finished rows::

    R_s[m]    = sum(n) b_s(qk[m, n], M[m])              (a row sum)
    A_s[m, f] = sum(n) b_s(qk[m, n], M[m]) V_s[n, f]    (a value sum)
    Y[m(, f)] = G(A[m, f], R[m], M[m])                  (a store)

where ``qk_d = Q_d K_d^T`` are the dot tiles and ``M`` the stabilising maxima.  The streamed
form is exact for *any* value of a stabiliser (``stream`` derives it as algebra), so its
derivative through ``M`` is zero and ``M`` is held at the forward's final value.  The chain
rule then gives, with ``dY`` the incoming gradient of each store::

    c_s[m, f] = sum(Y) dY[m, f] dG/dA_s                 (coefficient of a value sum)
    c_s[m]    = sum(Y) sum(f) dY[m(, f)] dG/dR_s        (coefficient of a row sum)
    W_s       = c_s V_s^T  (value sum)   or   c_s[m]    (row sum, broadcast over the keys)
    dqk_d     = sum(s) db_s/dqk_d * W_s                 (0 on masked or out-of-range keys)
    dQ_d += dqk_d K_d     dK_d += dqk_d^T Q_d     dV_s += b_s^T c_s
    dcap[site] += sum(s) db_s/dcap[site] W_s  (tile sites)  + dY dG/dcap[site] (store sites)

For softmax this is FlashAttention-2's ``dS = P (dP - delta)``; for sigmoid attention
(``b = sigmoid(s)``, ``G = A``) it is ``dS = dP * P (1 - P)`` with no delta; for sinks and
the off-by-one softmax ``dG/dR`` carries the extra denominator term.  Nothing here matches a
normaliser by name: every derivative comes from :func:`attndsl.passes.grad.diff` applied to
the kernel's own expressions.

Not derivable (the caller keeps the eager backward and says why): schedules of more than one
pass and reductions; stores that hold the value of a max reduction (``MAX = max(n) S``, whose
gradient flows to the arg max) are listed in ``max_stores`` and left to the eager backward
whenever their incoming gradient is nonzero.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from attndsl.ir import expr as E
from attndsl.ir.expr import FLOAT, Expr, Op
from attndsl.ir.tile import RunningMax, RunningSum, TileKernel
from attndsl.passes.affine import affine, invariant
from attndsl.passes.grad import GradError, diff, gather_grads
from attndsl.passes.rules import LOG2E, RULES, rewrite, simplify

_PLACEHOLDER = "%row:"  # a ROW value as a LOAD variable while differentiating


@dataclass(frozen=True)
class SiteGrad:
    """d(expression)/d(captured tensor at one gather site)."""

    tensor: str
    load: Expr
    deriv: Expr


@dataclass(frozen=True)
class SumGrad:
    """One running sum: its body, d body / d qk per dot, d body / d captured sites."""

    sum: RunningSum
    dots: tuple[tuple[str, Expr], ...]  # (dot var, d body / d qk_d), nonzero only
    sites: tuple[SiteGrad, ...]


@dataclass(frozen=True)
class StorePartial:
    """dG/d(finished row) of one store: the chain rule's coefficient terms."""

    store: str
    row: str
    deriv: Expr


@dataclass(frozen=True)
class UnaryForm:
    """A sigmoid or tanh of the tiles, evaluated once per step with one exp2 of ``scaled`` and
    shared by the sum bodies and their derivatives (sigmoid's s (1 - s) reuses s)::

        sigmoid(x) = 1 / (1 + exp2(-x log2e))      tanh(x) = 1 - 2 / (exp2(2 x log2e) + 1)

    (exact in real arithmetic; tl.sigmoid's exp and the forward's 2 sigmoid(2x) - 1 cost
    multiplies and a range check per element).  When ``scaled`` is ``dot * coef + offset``
    with tile-invariant coef and offset, those two are computed once before the tile loops
    (``dot`` names the dot tile; else it is None)."""

    var: str
    node: Expr
    scaled: Expr
    dot: str | None = None
    coef: Expr | None = None
    offset: Expr | None = None


@dataclass(frozen=True)
class TileBackward:
    """The backward IR of a one-pass tile kernel: what the backward printer prints."""

    kernel: TileKernel
    stabilizers: tuple[str, ...]  # maxes held at their final (safe) value
    sums: tuple[SumGrad, ...]
    partials: tuple[StorePartial, ...]
    store_sites: tuple[tuple[str, SiteGrad], ...]  # (store, site) of captured reads in stores
    # stores holding a max reduction's value: not differentiated here (a caller gives them a
    # nonzero gradient only through the eager backward)
    max_stores: tuple[str, ...] = ()
    # the lowering (:func:`lower`): each sigmoid and tanh of the tiles once, and per gradient
    # side ("k": dK's accumulators, "q": dQ's) the tile-invariant factor of d body / d qk
    # multiplied once into each accumulator after the loop
    unaries: tuple[UnaryForm, ...] = ()
    factors: dict[str, dict[str, Expr]] = field(default_factory=dict)

    def loop_deriv(self, dot: str, deriv: Expr, side: str) -> Expr:
        """d body / d qk as the loop multiplies it: without the accumulator's common factor,
        a factor ``1 - b`` multiplied out (:func:`multiplied_out`)."""
        d = next(x for x in self.kernel.dots if x.var == dot)
        if (d.k if side == "k" else d.q).var in self.factors.get(side, {}):
            deriv = split_factor(deriv, _tile(self.kernel))[1]
        return multiplied_out(deriv)

    def recomputed(self) -> frozenset[str]:
        """The rows the rows kernel recomputes: those its outputs read, and what they read.

        Its outputs are the coefficients ``c_s`` (the partials ``dG/dR``), the captured
        gradients of the stores and the stabilisers held for the other kernels.  A needed sum
        needs what its body reads (dot tiles, stabilisers), a needed max its argument's rows.
        Sigmoid's ``c = dY x 1`` reads no sum: its forward sum ``P V`` is never recomputed.
        Names are sum and max variables and dot tiles (``.safe`` reads name their max)."""
        p = self.kernel.passes[0]
        args = {s.var: s.body for s in p.sums} | {mx.var: mx.arg for mx in p.maxes}
        todo = [*self.stabilizers]
        for e in [x.deriv for x in self.partials] + [g.deriv for _, g in self.store_sites]:
            todo += rows_read(e)
        need: set[str] = set()
        while todo:
            row = todo.pop()
            if row not in need:
                need.add(row)
                todo += rows_read(args[row]) if row in args else []
        return frozenset(need)

    def __str__(self) -> str:
        lines = [f"backward of {self.kernel.name}: stabilisers {list(self.stabilizers)} held "
                 f"at their final values"]
        for p in self.partials:
            lines.append(f"  c_{p.row} += d{p.store} * {E.render(p.deriv)}")
        for s in self.sums:
            w = f"c_{s.sum.var} {s.sum.v.var}^T" if s.sum.v is not None else f"c_{s.sum.var}"
            lines.append(f"  W_{s.sum.var} = {w}")
            for d, e in s.dots:
                lines.append(f"  d{d} += W_{s.sum.var} * {E.render(e)}")
            if s.sum.v is not None:
                lines.append(f"  d{s.sum.v.var} += ({E.render(s.sum.body)})^T c_{s.sum.var}")
            for g in s.sites:
                lines.append(f"  d{E.render(g.load)} += W_{s.sum.var} * {E.render(g.deriv)}")
        for st, g in self.store_sites:
            lines.append(f"  d{E.render(g.load)} += d{st} * {E.render(g.deriv)}")
        for st in self.max_stores:
            lines.append(f"  {st}: the value of a max reduction, not differentiated (eager)")
        return "\n".join(lines)


def rows_read(e: Expr) -> list[str]:
    """The rows ``e`` reads, a stabiliser's ``.safe`` form as the stabiliser itself."""
    return [x.arg.removesuffix(".safe") for x in e.walk() if x.op is Op.ROW]


def _as_loads(e: Expr) -> Expr:
    """ROW values as rank-0 LOAD variables (``diff`` differentiates with respect to loads)."""
    return e.replace(lambda x: E.load(_PLACEHOLDER + x.arg, ()) if x.op is Op.ROW else None)


def _as_rows(e: Expr) -> Expr:
    return e.replace(lambda x: E.row(x.arg[len(_PLACEHOLDER):])
                     if x.op is Op.LOAD and x.arg.startswith(_PLACEHOLDER) else None)


def _d_row(e: Expr, row: str) -> Expr:
    """d e / d ROW(row), other rows held fixed."""
    return _as_rows(diff(_as_loads(e), E.load(_PLACEHOLDER + row, ())))


def _is_zero(e: Expr) -> bool:
    return e.op is Op.CONST and e.arg == 0


def _site_grads(e: Expr, k: TileKernel) -> tuple[SiteGrad, ...]:
    """One SiteGrad per gather site of a float captured tensor read by ``e``."""
    loaded = _as_loads(e)
    out = []
    for name, _, dtype in k.captured:
        if dtype != FLOAT:
            continue
        for load, d in gather_grads(loaded, name):
            out.append(SiteGrad(name, _as_rows(load), _as_rows(d)))
    return tuple(out)


def derive_tile_backward(k: TileKernel) -> TileBackward:
    """The backward IR of ``k``; raises GradError (with the reason) when it has none."""
    if len(k.passes) != 1:
        raise GradError(f"kernel {k.name!r} streams in {len(k.passes)} passes; the fused "
                        f"backward needs a one-pass schedule")
    (p,) = k.passes
    stabs = tuple(mx.var for mx in p.maxes if mx.stabilizer)
    max_stores = tuple(st.name for st in k.stores if _reads_max_value(st.expr, p.maxes))
    sums = []
    for s in p.sums:
        dots = tuple((d.var, de) for d in k.dots
                     if not _is_zero(de := _d_row(s.body, d.var)))
        sums.append(SumGrad(s, dots, _site_grads(s.body, k)))
    derived = [st for st in k.stores if st.name not in max_stores]
    partials = tuple(StorePartial(st.name, s.var, d) for st in derived for s in p.sums
                     if not _is_zero(d := _d_row(st.expr, s.var)))
    store_sites = tuple((st.name, g) for st in derived for g in _site_grads(st.expr, k))
    return lower(TileBackward(k, stabs, tuple(sums), partials, store_sites, max_stores))


def lower(b: TileBackward) -> TileBackward:
    """The lowering step the printer reads: the tile's sigmoids and tanhs as single exp2
    forms (:func:`unary_forms`) and the accumulators' common factors (:func:`common_factors`);
    the printer only prints them."""
    return replace(b, unaries=unary_forms(b),
                   factors={side: common_factors(b, side) for side in ("k", "q")})


def multiplied_out(e: Expr) -> Expr:
    """A product ``e`` with a factor ``1 - b`` as ``a - a * b``, ``a`` the other factors::

        a * (1 - b)  =  a - a * b

    Exact in real arithmetic, and the same value whenever ``a`` is finite (b = 1 gives an
    exact 0 either way, a NaN stays NaN); an infinite ``a`` gives NaN where the product may
    be +-inf.  ``a - a * b`` is one FFMA per element where ``a * (1 - b)`` is a subtract and
    a multiply, and the tile ``1 - b`` is not formed: sigmoid's ``s (1 - s)`` (s in [0, 1],
    so always the same value) is the case, tanh's ``1 - t^2`` another.  Anything else,
    ``1 - b`` alone included, is returned as it is."""
    factors = _factors(e)
    for i, f in enumerate(factors):
        one = f.src[0] if f.op is Op.SUB else None
        if len(factors) > 1 and one is not None and one.op is Op.CONST and \
                one.dtype == FLOAT and one.arg == 1.0:
            rest = factors[:i] + factors[i + 1:]
            a = rest[0]
            for g in rest[1:]:
                a = a * g
            return a - a * f.src[1]
    return e


def _factors(e: Expr) -> list[Expr]:
    """The factors of a product tree, left to right (``[e]`` for a non-product)."""
    if e.op is Op.MUL:
        return _factors(e.src[0]) + _factors(e.src[1])
    return [e]


def _tile(k: TileKernel) -> set[str]:
    """The indices that vary over a tile."""
    return {k.roles[r] for r in ("query", "key", "qk", "v") if r in k.roles}


_EXP2_FACTOR = {Op.SIGMOID: -LOG2E, Op.TANH: 2.0 * LOG2E}


def unary_forms(b: TileBackward) -> tuple[UnaryForm, ...]:
    """The distinct sigmoids and tanhs of the sum bodies and their derivatives, inner first;
    the exp2 argument as ``dot * coef + offset`` (:func:`attndsl.passes.affine.affine`) when
    it is affine in one dot tile."""
    k = b.kernel
    tile = _tile(k)
    exprs = [s.sum.body for s in b.sums] + [d for s in b.sums for _, d in s.dots] + \
        [g.deriv for s in b.sums for g in s.sites]
    dots = {d.var for d in k.dots}
    out: dict[Expr, UnaryForm] = {}
    for e in exprs:
        for node in e.walk():
            if node.op not in _EXP2_FACTOR or node in out:
                continue
            var = f"{'sg' if node.op is Op.SIGMOID else 'th'}{len(out)}"
            scaled = rewrite(node.src[0] * _EXP2_FACTOR[node.op], RULES)
            rows = {x.arg for x in scaled.walk() if x.op is Op.ROW}
            ab = affine(scaled, tile, {d: E.const(1.0) for d in rows}) \
                if len(rows) == 1 and rows <= dots else None
            if ab is None:
                out[node] = UnaryForm(var, node, scaled)
            else:
                out[node] = UnaryForm(var, node, scaled, next(iter(rows)), simplify(ab[0]),
                                      simplify(ab[1]))
    return tuple(out.values())


def split_factor(e: Expr, tile: set[str]) -> tuple[Expr | None, Expr]:
    """``e = c * rest`` with c tile-invariant (the scale of ``qk * scale``), or (None, e)."""
    if e.op is Op.MUL:
        for c, rest in (e.src, e.src[::-1]):
            if invariant(c, tile) and not invariant(rest, tile):
                return c, rest
    return None, e


def common_factors(b: TileBackward, side: str) -> dict[str, Expr]:
    """Per gradient accumulator (the dots' ``k`` operands for side "k", ``q`` for "q"): the
    tile-invariant factor every d body / d qk feeding it shares, multiplied once into the
    accumulator after the loop instead of into every tile element."""
    k = b.kernel
    tile = _tile(k)
    operand = {d.var: (d.k if side == "k" else d.q).var for d in k.dots}
    seen: dict[str, set] = {}
    for s in b.sums:
        for dot, deriv in s.dots:
            seen.setdefault(operand[dot], set()).add(split_factor(deriv, tile)[0])
    values = {s.sum.v.var for s in b.sums if s.sum.v is not None}  # dV sums into d_<v>
    return {var: next(iter(f)) for var, f in seen.items()
            if len(f) == 1 and None not in f and var not in values}


def _reads_max_value(e: Expr, maxes: tuple[RunningMax, ...]) -> bool:
    """Whether ``e`` reads the value of a max reduction itself: a raw running max (the
    streamed forms read a stabiliser as ``.safe``; a raw read is the cascade's own
    ``max(n)``) or any form of a non-stabilising max.  Its gradient flows to the arg max,
    which the held-stabiliser derivation does not give."""
    raw = {mx.var for mx in maxes}
    plain = {mx.var + ".safe" for mx in maxes if not mx.stabilizer}
    return any(x.op is Op.ROW and x.arg in raw | plain for x in e.walk())


__all__ = ["SiteGrad", "StorePartial", "SumGrad", "TileBackward", "UnaryForm",
           "common_factors", "derive_tile_backward", "lower", "rows_read", "split_factor",
           "unary_forms"]
