"""Pass analysis (FuseMax) and the derivation of streaming (online) schedules.

A *pass* is a read-read dependency over the key fiber: a reduction over the key index ``n``
whose body uses the result of another reduction over ``n`` cannot start before that one has
read every key.  The direct schedule needs as many passes as the longest such chain
(3 for the textbook softmax: max, then sum, then the value product; a built-in softmax has
been written out so by the ``expand-softmax`` pass, :mod:`attndsl.passes.softmax`).

The rewrites that shorten the chain are algebra, named rules applied to every ``sum(n)``:

* ``split-exp``:       exp(a + r) -> exp(a) * exp(r)            (r independent of n)
* ``split-sum``:       sum(n) (a + b) -> sum(n) a + sum(n) b     (a term holds a reduction)
* ``defer-division``:  sum(n) x * y / r -> (sum(n) x * y) / r    (r independent of n;
                       more generally every n-invariant factor leaves the sum)

after which no sum depends on another reduction of its own pass.  Computing such sums directly
would overflow, so *iterative construction* keeps each sum relative to a running maximum
``mx`` of the exponents it contains (base 2, ``y2 = y * log2(e)``)::

    exp(y)  ==  exp2(y2 - mx) * 2^mx         (a value with one "unit" of 2^mx)

A sum's body is evaluated in this scaled arithmetic (units add under *, subtract under /,
align under +/-, pass through relu/abs/max/where); the accumulator then only needs the
correction ``2^(k * (mx_old - mx_new))`` at each key tile.  Finalising the outputs in the same
arithmetic cancels the units: ``acc * 2^mx * exp(-GM) / (l * 2^mx * exp(-GM)) = acc / l``,
``log(l * 2^mx) = log(l) + mx * ln 2``.  Nothing here matches "softmax": off-by-one softmax,
sinks, softpick and sigmoid attention fall out of the same rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from attndsl.ir import expr as E
from attndsl.ir.cascade import Cascade
from attndsl.ir.expr import FLOAT, Expr, IRError, Op, is_const
from attndsl.passes import terms as T
from attndsl.passes.lower import Fused
from attndsl.passes.rules import LN2, LOG2E, MERGE_EXP, RULES, Rule, named, rewrite

Units = tuple[tuple[str, int], ...]


class NotStreamable(IRError):
    """The cascade cannot be scheduled over key tiles; the message says why."""


@dataclass(frozen=True)
class Reduction:
    """A running reduction over the key index, computed in one pass over the key tiles.

    ``body`` is an expression over the cascade's indices in which ``ROW(name)`` reads a
    finished reduction of an earlier pass or, for a stabiliser of this pass, its current value.
    A sum with ``units`` holds ``sum(n) body`` scaled by ``2^(-k * mx)`` for each ``(mx, k)``.
    """

    name: str
    kind: str  # "sum" | "max"
    body: Expr
    units: Units = ()
    stabilizer: bool = False
    floor0: bool = False  # a stabiliser kept >= 0 (bodies mixing exp(y) with constants)


@dataclass(frozen=True)
class Schedule:
    """The streaming form of a cascade: passes of running reductions, then the outputs."""

    key: str
    passes: tuple[tuple[Reduction, ...], ...]
    outputs: tuple[tuple[str, tuple[str, ...], Expr], ...]
    mask: Expr | None
    direct_passes: int
    cascade: Cascade = field(repr=False, compare=False)  # the source, for lowering to tiles
    fired: tuple[str, ...] = field(default=())

    def reduction(self, name: str) -> Reduction:
        for p in self.passes:
            for r in p:
                if r.name == name:
                    return r
        raise KeyError(name)

    def __str__(self) -> str:
        head = (f"schedule over key index {self.key}: {self.direct_passes}-pass direct, "
                f"{len(self.passes)}-pass streamed")
        lines = [head]
        if self.mask is not None:
            lines.append(f"  mask {E.render(self.mask)}")
        for i, p in enumerate(self.passes):
            lines.append(f"  pass {i + 1} over key tiles:")
            for r in p:
                tag = "running max" + (" (>= 0)" if r.floor0 else "") if r.kind == "max" \
                    else "running sum"
                units = "".join(f" * 2^({k}*{s})" for s, k in r.units)
                lines.append(f"    %{r.name} = {tag}{units} of {E.render(r.body)}")
        for name, idx, e in self.outputs:
            lines.append(f"  {name}[{', '.join(idx)}] = {E.render(e)}")
        return "\n".join(lines)


# -- helpers -----------------------------------------------------------------------------------

def _key_reductions(e: Expr, key: str) -> list[Expr]:
    return [n for n in e.walk() if n.op in (Op.REDUCE_SUM, Op.REDUCE_MAX) and n.arg == key]


def _depth(e: Expr, key: str, memo: dict[Expr, int]) -> int:
    """Passes over the key needed to evaluate e directly (longest reduction chain)."""
    best = 0
    for r in _key_reductions(e, key):
        if r not in memo:
            inner = [x for x in _key_reductions(r.src[0], key) if x != r]
            memo[r] = 1 + max((_depth(x, key, memo) for x in inner), default=0)
        best = max(best, memo[r])
    return best


def passes_needed(exprs: list[Expr], key: str) -> int:
    memo: dict[Expr, int] = {}
    return max((_depth(e, key, memo) for e in exprs), default=0)


def _short(e: Expr, limit: int = 72) -> str:
    text = E.render(e)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _invariant(e: Expr, key: str) -> bool:
    return key not in e.free_indices()


# -- rewrites -------------------------------------------------------------------------------

def _split_exp(key: str, fired: list[str]) -> Rule:
    def rule(e: Expr) -> Expr | None:
        """exp(a + r) -> exp(a) * exp(r), r n-invariant and holding a reduction over n"""
        if e.op is not Op.EXP or _invariant(e.src[0], key):
            return None
        terms = T.terms(e.src[0])
        out = [(t, s) for t, s in terms if _invariant(t, key) and _key_reductions(t, key)]
        if not out:
            return None
        keep = [ts for ts in terms if ts not in out]
        fired.append(f"split-exp: exp(a + r) -> exp(a) * exp(r), r = "
                     f"{_short(T.sum_terms(out))}")
        return E.exp(T.sum_terms(keep)) * E.exp(T.sum_terms(out))
    return Rule("split-exp", rule)


def _defer(key: str, fired: list[str]) -> Rule:
    def rule(e: Expr) -> Expr | None:
        """sum(n) x * r -> r * sum(n) x, r n-invariant (deferred division when r = 1/d)"""
        if e.op is not Op.REDUCE_SUM or e.arg != key:
            return None
        factors = T.factors(e.src[0])
        out = [fp for fp in factors if _invariant(fp[0], key)]
        if not out:
            return None
        keep = [fp for fp in factors if not _invariant(fp[0], key)]
        if not keep:  # sum(n) c -> c * sum(n) 1: the count of unmasked keys
            if len(factors) == 1 and is_const(factors[0][0], 1.0):
                return None
            keep = [(E.const(1.0), 1)]
        new_sum = E.reduce_sum(key, T.product(keep))
        fired.append(f"defer-division: {_short(T.product(out))} leaves sum({key}) "
                     f"{_short(T.product(keep))}")
        return T.product([(new_sum, 1)] + out)
    return Rule("defer-division", rule)


def _linear(key: str, fired: list[str]) -> Rule:
    def rule(e: Expr) -> Expr | None:
        """sum(n) (a +- b) -> sum(n) a +- sum(n) b, and (a +- b) * c -> a*c +- b*c inside it,
        when a term holds a reduction over n (so that it can leave the sum afterwards)"""
        if e.op is not Op.REDUCE_SUM or e.arg != key:
            return None
        body = _distribute(e.src[0], key)
        if body.op not in (Op.ADD, Op.SUB) or not _key_reductions(body, key):
            return None
        a, c = body.src
        fired.append(f"split-sum: sum({key}) (a {'+' if body.op is Op.ADD else '-'} b) -> "
                     f"sum({key}) a {'+' if body.op is Op.ADD else '-'} sum({key}) b")
        return E.binary(body.op, E.reduce_sum(key, a), E.reduce_sum(key, c))
    return Rule("split-sum", rule)


def _distribute(e: Expr, key: str) -> Expr:
    """(a +- b) * c -> a*c +- b*c (either side) when a or b holds a reduction over n."""
    if e.op in (Op.MUL, Op.DIV):
        x, y = _distribute(e.src[0], key), e.src[1]
        if x.op in (Op.ADD, Op.SUB) and _key_reductions(x, key):
            return E.binary(x.op, _distribute(E.binary(e.op, x.src[0], y), key),
                            _distribute(E.binary(e.op, x.src[1], y), key))
        if e.op is Op.MUL:
            y2 = _distribute(y, key)
            if y2.op in (Op.ADD, Op.SUB) and _key_reductions(y2, key):
                return E.binary(y2.op, _distribute(x * y2.src[0], key),
                                _distribute(x * y2.src[1], key))
        return E.binary(e.op, x, y)
    return e


# -- scaled arithmetic ------------------------------------------------------------------------

@dataclass
class _Stabilizers:
    """Stabilisers of one pass: one running max per distinct exponent y (base 2)."""

    key: str
    prefix: str
    by_arg: dict[Expr, str] = field(default_factory=dict)
    floor0: set[str] = field(default_factory=set)

    def get(self, y: Expr) -> str:
        if y not in self.by_arg:
            self.by_arg[y] = f"{self.prefix}{len(self.by_arg)}"
        return self.by_arg[y]


def _add_units(a: Units, b: Units, sign: int = 1) -> Units:
    d = dict(a)
    for s, k in b:
        d[s] = d.get(s, 0) + sign * k
    return tuple(sorted((s, k) for s, k in d.items() if k))


Suffix = Callable[[str], str]


def _unscale(x: Expr, u: Units, sfx: Suffix) -> Expr:
    for s, k in u:
        x = x * E.unary(Op.EXP2, E.row(s + sfx(s)) * float(k))
    return x


def _align(a: tuple[Expr, Units], b: tuple[Expr, Units], stabs: _Stabilizers | None,
           safe: Suffix) -> tuple[Expr, Expr, Units]:
    """Bring two scaled values to the same units (the larger), or unscale both."""
    (xa, ua), (xb, ub) = a, b
    if ua == ub:
        return xa, xb, ua
    for (hi, lo, xh, xl) in ((ua, ub, xa, xb), (ub, ua, xb, xa)):
        diff = _add_units(hi, lo, -1)
        if all(k > 0 for _, k in diff):
            xl = _unscale(xl, tuple((s, -k) for s, k in diff), safe)
            if stabs is not None:
                stabs.floor0.update(s for s, _ in diff)
            return (xh, xl, hi) if hi is ua else (xl, xh, hi)
    return _unscale(xa, ua, safe), _unscale(xb, ub, safe), ()


_HOMOGENEOUS = {Op.NEG, Op.ABS}


def _scaled(e: Expr, units_of_row: dict[str, Units], stabs: _Stabilizers | None, key: str,
            exp_units: dict[str, str]) -> tuple[Expr, Units]:
    """Value of ``e`` as (x, units): e == x * prod 2^(k * mx).

    In a sum body (``stabs`` given) each exp(y) with y depending on the key gets a stabiliser.
    In outputs, ``exp(c * G + r)`` for a stabiliser-backed max G becomes ``(exp(r), c units)``.
    """
    memo: dict[Expr, tuple[Expr, Units]] = {}

    def safe(s: str) -> str:
        """this pass's stabilisers are read as they run; finished ones in their safe form"""
        return "" if stabs is not None and s in stabs.by_arg.values() else ".safe"

    def go(n: Expr) -> tuple[Expr, Units]:
        if n in memo:
            return memo[n]
        out = visit(n)
        memo[n] = out
        return out

    def visit(n: Expr) -> tuple[Expr, Units]:
        op = n.op
        if op is Op.ROW and n.arg in units_of_row:
            if stabs is not None:  # a finished row read inside a running sum: a plain value
                return _unscale(n, units_of_row[n.arg], safe), ()
            return n, units_of_row[n.arg]
        if op is Op.EXP:
            if stabs is not None and not _invariant(n.src[0], key):
                arg = _plain_rows(n.src[0], units_of_row)
                s = stabs.get(arg)
                y2 = arg * LOG2E
                return E.unary(Op.EXP2, y2 - E.row(s)), ((s, 1),)
            lin = _linear_in_rows(n.src[0], exp_units)
            if lin is not None:
                rest, coeffs = lin
                return E.exp(rest), coeffs
        if op in (Op.MUL, Op.DIV):
            (xa, ua), (xb, ub) = go(n.src[0]), go(n.src[1])
            sign = 1 if op is Op.MUL else -1
            return E.binary(op, xa, xb), _add_units(ua, ub, sign)
        if op in (Op.ADD, Op.SUB, Op.MAX, Op.MIN):
            a, b = go(n.src[0]), go(n.src[1])
            if not a[1] and not b[1]:
                return E.binary(op, a[0], b[0]), ()
            xa, xb, u = _align(a, b, stabs, safe)
            return E.binary(op, xa, xb), u
        if op in _HOMOGENEOUS:
            x, u = go(n.src[0])
            return E.unary(op, x), u
        if op is Op.WHERE:
            c, cu = go(n.src[0])
            a, b = go(n.src[1]), go(n.src[2])
            xa, xb, u = _align(a, b, stabs, safe)
            return E.where(_unscale(c, cu, safe), xa, xb), u
        if op is Op.LOG:
            x, u = go(n.src[0])
            return E.log(x) + _units_value(u, safe), ()
        if not n.src:
            return n, ()
        parts = [go(s) for s in n.src]
        src = tuple(_unscale(x, u, safe) for x, u in parts)
        return Expr(op, src, n.arg, n.dtype), ()

    return go(e)


def _plain_rows(e: Expr, units_of_row: dict[str, Units]) -> Expr:
    """``e`` with each finished sum of an earlier pass read at its true value: a streamed sum
    is kept as x with sum == x * prod 2^(k * mx), so a read of it in an exponent or a max
    body (where no units are carried) is x * prod 2^(k * mx.safe), as the outputs read it."""
    return e.replace(lambda n: _unscale(n, units_of_row[n.arg], lambda _: ".safe")
                     if n.op is Op.ROW and n.arg in units_of_row else None)


def _units_value(u: Units, sfx: Suffix) -> Expr:
    """ln of prod 2^(k * mx) = sum k * mx * ln 2"""
    out: Expr = E.const(0.0)
    for s, k in u:
        out = out + E.row(s + sfx(s)) * (float(k) * LN2)
    return out


def _linear_in_rows(e: Expr, exp_units: dict[str, str]) -> tuple[Expr, Units] | None:
    """Split e = sum_i c_i * G_i + r for maxes G_i that equal a stabiliser (G = mx * ln 2)."""
    coeffs: dict[str, float] = {}
    rest: list[tuple[Expr, int]] = []
    for t, s in T.terms(e):
        c, atom = float(s), t
        if t.op is Op.MUL and t.src[0].op is Op.CONST:
            c, atom = c * float(t.src[0].arg), t.src[1]
        elif t.op is Op.MUL and t.src[1].op is Op.CONST:
            c, atom = c * float(t.src[1].arg), t.src[0]
        if atom.op is Op.ROW and atom.arg in exp_units and c == int(c):
            stab = exp_units[atom.arg]
            coeffs[stab] = coeffs.get(stab, 0) + int(c)
        else:
            rest.append((t, s))
    if not coeffs:
        return None
    return T.sum_terms(rest), tuple(sorted((s, k) for s, k in coeffs.items() if k))


# -- the pass ---------------------------------------------------------------------------------

def _tile_invariant(e: Expr, tile_indices: set[str]) -> bool:
    return not (e.free_indices() & tile_indices) and not any(
        n.op in (Op.ROW, Op.LOAD) for n in e.walk())


def fold_scales(tile_indices: set[str]) -> Rule:
    def rule(e: Expr) -> Expr | None:
        """(x * a) * b -> x * (a * b) and (a * x) * b -> x * (a * b), a and b the same for
        every element of a tile (hoisted out of the kernel's loop)"""
        if e.op is not Op.MUL or e.src[0].op is not Op.MUL:
            return None
        b = e.src[1]
        if not _tile_invariant(b, tile_indices):
            return None
        for x, a in (e.src[0].src, e.src[0].src[::-1]):
            if _tile_invariant(a, tile_indices) and not _tile_invariant(x, tile_indices):
                return x * E.binary(Op.MUL, a, b)
        return None
    return Rule("fold-scales", rule)


def _never_zero(f: Expr) -> bool:
    """A factor that is nonzero for every value of its operands: an exponential (the units
    of the streamed sums), a finite nonzero constant.  Any other factor (a parameter, a
    captured tensor, an index) may be 0, where (a * x) / (b * x) is 0 / 0 = 0, not a / b."""
    if f.op in (Op.EXP, Op.EXP2):
        return True
    return f.op is Op.CONST and isinstance(f.arg, (int, float)) and f.arg != 0 and \
        math.isfinite(f.arg)


@named("cancel-factors")
def cancel_factors(e: Expr) -> Expr | None:
    """(a * x) / (b * x) -> a / b for a factor x that is never zero (:func:`_never_zero`)
    common to a quotient's numerator and denominator (so an exp(-max) that overflows on a
    fully masked row never meets a zero)"""
    if e.op is not Op.DIV:
        return None
    factors = T.factors(e)
    power: dict[Expr, int] = {}
    for f, p in factors:
        power[f] = power.get(f, 0) + p
    if all(abs(power[f]) == sum(abs(p) for g, p in factors if g == f) or not _never_zero(f)
           for f in power):
        return None
    kept: list[tuple[Expr, int]] = []
    for f, p in power.items():
        if not _never_zero(f):  # both sides keep it as written
            kept.extend((g, q) for g, q in factors if g == f)
            continue
        kept.extend([(f, 1 if p > 0 else -1)] * abs(p))
    return T.product(kept) if kept else E.const(1.0)


@named("distribute-const")
def distribute_const(e: Expr) -> Expr | None:
    """(a - b) * c -> a * c - b * c and (a + b) * c -> a*c + b*c for a constant c, where a
    and b are floats.  An integer a - b (index arithmetic, ``(q + k) - (kv + k)``) stays one
    exact integer: its float products would cancel, losing ulp(|a| c) -- at positions near
    2^20 the score of a distance was off by 0.03."""
    if e.op is Op.MUL and e.src[0].op in (Op.ADD, Op.SUB) and e.src[1].op is Op.CONST \
            and e.src[0].dtype == FLOAT:
        a, b = e.src[0].src
        return E.binary(e.src[0].op, a * e.src[1], b * e.src[1])
    return None


def derive_schedule(fused: Fused, stream: bool = True) -> Schedule:
    """Pass analysis and online derivation for a fused cascade (see the module docstring)."""
    c = fused.cascade
    key = c.role("key")
    assert key is not None
    tile_indices = {i.name for i in c.indices if i.role in ("query", "key", "qk", "v")}
    outs = list(fused.outputs)
    for name, _, e in outs:
        if any(n.op is Op.SOFTMAX for n in e.walk()):
            raise IRError(f"output {name} of cascade {c.name!r} still holds a softmax: run the "
                          f"expand-softmax pass before pass analysis")
    fired = list(fused.fired)
    direct = passes_needed([e for _, _, e in outs], key)
    if direct == 0:
        raise NotStreamable(f"cascade {c.name!r} has no reduction over the key index {key!r}")
    if stream:
        rules = [_split_exp(key, fired), _linear(key, fired), _defer(key, fired)] + RULES
        outs = [(n, idx, rewrite(e, rules)) for n, idx, e in outs]
    rules_fired = list(dict.fromkeys(fired))

    # assign every key reduction to a pass (its chain depth) and name it
    memo: dict[Expr, int] = {}
    all_reds: list[Expr] = []
    for _, _, e in outs:
        for r in _key_reductions(e, key):
            if r not in all_reds:
                all_reds.append(r)
    for _, _, e in outs:
        _depth(e, key, memo)
    npass = max(memo[r] for r in all_reds)
    names = {r: f"{'l' if r.op is Op.REDUCE_SUM else 'g'}{i}" for i, r in enumerate(all_reds)}

    def as_rows(e: Expr, top: bool = False) -> Expr:
        """Replace (outermost first) each reduction by a read of its row value."""
        if e in names and not top:
            return E.row(names[e])
        src = tuple(as_rows(s) for s in e.src)
        return e if src == e.src else Expr(e.op, src, e.arg, e.dtype)

    passes: list[list[Reduction]] = [[] for _ in range(npass)]
    units_of_row: dict[str, Units] = {}
    exp_units: dict[str, str] = {}
    twins: dict[str, str] = {}  # a max reduction that doubles as a stabiliser -> stabiliser
    simple = RULES + MERGE_EXP + [fold_scales(tile_indices), distribute_const, cancel_factors]
    for level in range(1, npass + 1):
        stabs = _Stabilizers(key, prefix=f"mx{level - 1}_" if npass > 1 else "mx")
        reds = [r for r in all_reds if memo[r] == level]
        built: list[Reduction] = []
        for r in reds:
            body = as_rows(r.src[0])
            if r.op is Op.REDUCE_SUM:
                x, u = _scaled(body, units_of_row, stabs, key, {})
                built.append(Reduction(names[r], "sum", rewrite(x, simple), u))
            else:
                built.append(Reduction(names[r], "max",
                                       rewrite(_plain_rows(body, units_of_row), simple)))
        # stabilisers: reuse a max reduction of the same exponent when it needs no floor
        maxes = {rewrite(b.body, simple): b for b in built if b.kind == "max"}
        stab_reds: list[Reduction] = []
        rename: dict[str, str] = {}
        for y, s in stabs.by_arg.items():
            y2 = rewrite(y * LOG2E, simple)
            floor = s in stabs.floor0
            twin = maxes.get(rewrite(y, simple))
            if twin is not None and not floor:
                rename[twin.name] = s
                exp_units[twin.name] = s
                built.remove(twin)
            stab_reds.append(Reduction(s, "max", y2, stabilizer=True, floor0=floor))
            units_of_row[s] = ()
        for b in built:
            if b.kind == "sum":
                units_of_row[b.name] = b.units
        passes[level - 1] = stab_reds + built
        twins.update(rename)

    finals = []
    for name, idx, e in outs:
        e = as_rows(e)
        # a max that doubles as a stabiliser: G == mx * ln 2 (raw value, -inf when all masked)
        x, u = _scaled(e, units_of_row, None, key, exp_units)
        x = _unscale(x, u, lambda s: ".safe")
        x = x.replace(lambda n: E.row(twins[n.arg]) * LN2 if n.op is Op.ROW and n.arg in twins
                      else None)
        finals.append((name, idx, rewrite(x, simple)))
    # later passes read finished rows of earlier ones: same renaming
    fixed = []
    for p in passes:
        fixed.append(tuple(replace(r, body=rewrite(r.body.replace(
            lambda n: E.row(twins[n.arg]) * LN2 if n.op is Op.ROW and n.arg in twins else None),
            simple)) for r in p))
    return Schedule(key, tuple(fixed), tuple(finals), fused.mask, direct, c,
                    tuple(rules_fired) + (f"passes: {direct}-pass -> {npass}-pass",))


def verify_schedule(s: Schedule) -> Schedule:
    """Check a schedule: reduction names unique; a body of pass ``i`` reads (``ROW``) only
    reductions of earlier passes (maxima also as ``.safe``) or, in a sum, a stabiliser of pass
    ``i``; a sum's units name stabilisers of its pass; outputs read only finished reductions;
    no reduction over the key index is left in a body or an output."""
    finished: set[str] = set()
    for i, p in enumerate(s.passes):
        stabs = {r.name for r in p if r.stabilizer}
        for r in p:
            what = f"schedule of {s.cascade.name!r}, pass {i + 1}, %{r.name}"
            if r.name in finished or sum(1 for x in p if x.name == r.name) > 1:
                raise IRError(f"{what}: the name is defined twice")
            _check_reads(what, r.body, finished | (stabs if r.kind == "sum" else set()), s.key)
            bad = [u for u, _ in r.units if u not in stabs]
            if bad:
                raise IRError(f"{what}: scaled by {bad}, not stabilisers of this pass "
                              f"({sorted(stabs)})")
        finished |= {r.name for r in p} | {f"{r.name}.safe" for r in p if r.kind == "max"}
    for name, idx, e in s.outputs:
        _check_reads(f"schedule of {s.cascade.name!r}, output {name}[{', '.join(idx)}]", e,
                     finished, s.key)
    return s


def _check_reads(what: str, e: Expr, visible: set[str], key: str) -> None:
    for node in e.walk():
        if node.op is Op.ROW and node.arg not in visible:
            raise IRError(f"{what}: reads %{node.arg} before it is defined (visible: "
                          f"{sorted(visible) or 'none'})")
        if node.op in (Op.REDUCE_SUM, Op.REDUCE_MAX, Op.SOFTMAX) and node.arg == key:
            raise IRError(f"{what}: still holds a reduction over the key index "
                          f"({_short(node)})")


__all__ = ["NotStreamable", "Reduction", "Schedule", "derive_schedule", "passes_needed",
           "verify_schedule"]
