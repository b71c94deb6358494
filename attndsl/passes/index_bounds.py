"""Index bounds of tensor subscripts: what is checked before a launch, and how negatives wrap.

A read ``t[i0, .., ik]`` of a captured or input tensor is a set of *sites* (one per
subscript).  A site is proven in range at compile time when its subscript is an index whose
extent is the dimension's own extent (``slopes[h]`` with ``slopes[H]``); every other site is
checked at launch from its interval (attndsl.index_check), which the launch knows:
extents, parameter values and [min, max] of the tensors a subscript reads.

Semantics (torch's, for captured tensors): ``-s <= i < s`` on a dimension of size ``s``, a
negative ``i`` reading ``i + s``; input tensors (the Q/K/V-side operands) take ``0 <= i < s``
only.  :func:`wrap_negative` makes the wrap explicit in the IR for the kernels,
``where(i < 0, i + s, i)``, on subscripts that are not provably non-negative.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

import attndsl.index_check as rt
from attndsl.errors import SubscriptError
from attndsl.ir import expr as E
from attndsl.ir.cascade import Cascade
from attndsl.ir.expr import BOOL, INT, Expr, Op


@dataclass(frozen=True)
class IndexSite:
    """Subscript ``dim`` of a read of ``tensor``; ``wraps``: negatives count from the end."""

    tensor: str
    dim: int
    index: Expr
    wraps: bool

    @property
    def text(self) -> str:
        return E.render(self.index)


def index_sites(exprs: Iterable[Expr], kind_of: Callable[[str], str | None],
                dims_of: Callable[[str], tuple[str, ...]],
                extent_of: Callable[[str], str | None]) -> tuple[IndexSite, ...]:
    """Every subscript of a read of a declared tensor (``kind_of`` gives "captured" or
    "input", None for anything else) that is not proven in range at compile time, once."""
    out: dict[tuple[str, int, Expr], IndexSite] = {}
    for e in exprs:
        for node in e.walk():
            kind = kind_of(node.arg) if node.op is Op.LOAD else None
            if kind not in ("captured", "input"):
                continue
            dims = dims_of(node.arg)
            for d, sub in enumerate(node.src):
                if sub.op is Op.INDEX and extent_of(sub.arg) == dims[d]:
                    continue  # an index of the dimension's own extent
                out.setdefault((node.arg, d, sub), IndexSite(node.arg, d, sub, kind == "captured"))
    return tuple(out.values())


def cascade_sites(c: Cascade, exprs: Iterable[Expr]) -> tuple[IndexSite, ...]:
    """:func:`index_sites` with the declarations of cascade ``c``."""
    extents = {i.name: i.extent for i in c.indices}

    def kind(name: str) -> str | None:
        t = c.tensor(name)
        return None if t is None else t.kind

    return index_sites(exprs, kind, lambda name: c.tensor(name).dims, extents.get)


# -- interval evaluation: one walk, two back ends (numbers here, source text in the printer) --

Leaf = Callable[[Expr], Any]
Apply = Callable[[str, list[Any]], Any]


def walk_intervals(e: Expr, leaf: Leaf, apply: Apply, memo: dict[Any, Any]) -> Any:
    """The interval of ``e``: ``leaf`` gives those of CONST/INDEX/PARAM/ROW nodes and of reads
    (a read's value is bounded by its tensor's [min, max]), ``apply(rule, args)`` applies the
    rule of attndsl.index_check for every other node.

    ``where(p, x, y)`` evaluates x knowing p and y knowing not p: an integer node compared in
    p (``d < 8``, conjunctions of comparisons) is narrowed in that branch (``_iv_narrow_*``),
    so ``where(d < 8, d, 15)`` over d in [0, 39] is [0, 15], not [0, 39].  Reads and every
    other node take their unconditional interval (a kernel evaluates both branches)."""
    return _Walker(leaf, apply, memo).value(e, {}, ())


_NEGATE = {Op.LT: Op.GE, Op.LE: Op.GT, Op.GT: Op.LE, Op.GE: Op.LT, Op.EQ: Op.NE, Op.NE: Op.EQ}
_FLIP = {Op.LT: Op.GT, Op.LE: Op.GE, Op.GT: Op.LT, Op.GE: Op.LE, Op.EQ: Op.EQ, Op.NE: Op.NE}


def _constraints(c: Expr, truth: bool) -> list[tuple[Expr, Op, Expr]]:
    """(x, op, y) with x an integer node such that ``x op y`` holds where ``c`` is ``truth``."""
    if c.op in _NEGATE:
        op = c.op if truth else _NEGATE[c.op]
        a, b = c.src
        out = [(a, op, b)] if a.dtype == INT else []
        return out + ([(b, _FLIP[op], a)] if b.dtype == INT else [])
    if c.op is Op.NOT:
        return _constraints(c.src[0], not truth)
    if c.dtype == BOOL and (c.op is Op.AND and truth or c.op is Op.OR and not truth):
        return _constraints(c.src[0], truth) + _constraints(c.src[1], truth)
    return []


class _Walker:
    """Evaluates nodes under environments of narrowed nodes (``env``, identified by ``key``);
    a node that no narrowed node lies under is evaluated once for all environments."""

    def __init__(self, leaf: Leaf, apply: Apply, memo: dict[Any, Any]) -> None:
        self.leaf, self.apply, self.memo = leaf, apply, memo

    def value(self, node: Expr, env: dict[Expr, Any], key: tuple) -> Any:
        if node in env:
            return env[node]
        k = (node, key) if env and any(x in env for x in node.walk()) else node
        if k not in self.memo:
            self.memo[k] = self._compute(node, env, key)
        return self.memo[k]

    def _compute(self, node: Expr, env: dict[Expr, Any], key: tuple) -> Any:
        if node.op in E.LEAVES or node.op is Op.LOAD:
            return self.leaf(node)
        if node.op in E.REDUCE or node.op is Op.SOFTMAX:
            return self.apply("_iv_row", [])
        if node.op is Op.WHERE:
            c = self.value(node.src[0], env, key)
            yes = self.value(node.src[1], *self._narrowed(node.src[0], True, env, key))
            no = self.value(node.src[2], *self._narrowed(node.src[0], False, env, key))
            return self.apply("_iv_where", [c, yes, no])
        args = [self.value(s, env, key) for s in node.src]
        return self.apply(rt.rule_name(node.op.name, node.dtype, node.arg), args)

    def _narrowed(self, cond: Expr, truth: bool, env: dict[Expr, Any], key: tuple
                  ) -> tuple[dict[Expr, Any], tuple]:
        found = _constraints(cond, truth)
        if not found:
            return env, key
        out = dict(env)
        for x, op, y in found:
            if op is Op.NE:
                continue
            bound = self.apply(f"_iv_narrow_{op.name.lower()}",
                               [self.value(x, env, key), self.value(y, env, key)])
            out[x] = bound if x not in out else self.apply("_iv_meet", [out[x], bound])
        return out, key + ((cond, truth),)  # an environment is named by its narrowings


def site_intervals(sites: Iterable[IndexSite], sizes: Mapping[str, int | None],
                   params: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                   index_extent: Mapping[str, str]) -> list[tuple[str, int, Any, str]]:
    """(tensor, dim, interval, subscript text) of each site, evaluated on numbers."""
    def leaf(node: Expr) -> Any:
        if node.op is Op.CONST:
            return rt._iv_param(node.arg)
        if node.op is Op.INDEX:
            ext = index_extent.get(node.arg)
            return rt._iv_index(sizes.get(ext) if ext is not None else None)
        if node.op is Op.PARAM:
            return rt._iv_param(params.get(node.arg, sizes.get(node.arg)))
        if node.op is Op.LOAD and node.arg in tensors:
            return rt._iv_tensor(tensors[node.arg])
        return rt._iv_row()

    def apply(name: str, args: list[Any]) -> Any:
        return getattr(rt, name)(*args)

    memo: dict[Expr, Any] = {}
    return [(s.tensor, s.dim, walk_intervals(s.index, leaf, apply, memo), s.text)
            for s in sites]


def check_sites(sites: Iterable[IndexSite], sizes: Mapping[str, int | None],
                params: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                index_extent: Mapping[str, str]) -> None:
    """Raise the SubscriptError (an IndexError) of the first site whose range does not fit
    its dimension."""
    sites = list(sites)
    ranges = site_intervals(sites, sizes, params, tensors, index_extent)
    try:
        rt.check_index_ranges([(n, d, iv, text, s.wraps) for (n, d, iv, text), s
                               in zip(ranges, sites)], tensors)
    except IndexError as err:
        raise SubscriptError(str(err)) from None


# -- the wrap of negative subscripts -----------------------------------------------------------

def nonneg(e: Expr, extent_of: Mapping[str, str] | None = None) -> bool:
    """A structural proof that an integer expression is >= 0 (indices, non-negative constants,
    booleans, and + * // max min abs % of such; x % y >= 0 for y >= 0), or a linear one
    (``m - n + N - 1`` >= 0 as m >= 0 and n <= N - 1; see :func:`_linear_bound`);
    ``extent_of`` maps index names to their extents."""
    op, ext = e.op, extent_of or {}
    if op is Op.INDEX or e.dtype == BOOL or op is Op.ABS:
        return True
    if op is Op.CONST:
        return e.arg >= 0
    if op in (Op.ADD, Op.MUL, Op.FLOORDIV, Op.MIN) and all(nonneg(s, ext) for s in e.src):
        return True
    if op is Op.MAX:
        return any(nonneg(s, ext) for s in e.src)
    if op is Op.MOD:
        return nonneg(e.src[1], ext)
    if op is Op.WHERE:
        return nonneg(e.src[1], ext) and nonneg(e.src[2], ext)
    if op is Op.CAST and e.arg == INT:
        return nonneg(e.src[0], ext)
    low = _linear_bound(e, 1, ext)
    return low is not None and all(v >= 0 for v in low.values())


def _linear_bound(e: Expr, sign: int, extent_of: Mapping[str, str]
                  ) -> dict[str | None, int] | None:
    """A lower (sign = 1) or upper (sign = -1) bound of an integer expression as a linear form
    over extents, each >= 0 (key None: the constant), or None when there is none of this
    shape.  An index of extent X lies in [0, X - 1]; a parameter named like an extent is
    that extent; a constant factor scales (and flips for a negative one)."""
    op = e.op
    if op is Op.CONST and isinstance(e.arg, int) and not isinstance(e.arg, bool):
        return {None: e.arg}
    if op is Op.INDEX:
        ext = extent_of.get(e.arg)
        return {None: 0} if sign > 0 else None if ext is None else {ext: 1, None: -1}
    if op is Op.PARAM and e.arg in set(extent_of.values()):
        return {e.arg: 1}
    if op in (Op.ADD, Op.SUB):
        a = _linear_bound(e.src[0], sign, extent_of)
        b = _linear_bound(e.src[1], sign if op is Op.ADD else -sign, extent_of)
        if a is None or b is None:
            return None
        k = 1 if op is Op.ADD else -1
        return {x: a.get(x, 0) + k * b.get(x, 0) for x in set(a) | set(b)}
    if op is Op.MUL:
        for x, k in (e.src, e.src[::-1]):
            if k.op is Op.CONST and isinstance(k.arg, int) and not isinstance(k.arg, bool):
                inner = _linear_bound(x, sign if k.arg >= 0 else -sign, extent_of)
                return None if inner is None else {v: c * k.arg for v, c in inner.items()}
    return None


def wrap_negative(e: Expr, size_of: Callable[[str, int], Expr | None],
                  extent_of: Mapping[str, str] | None = None) -> Expr:
    """Reads of tensors with a size (``size_of(tensor, dim)``) take ``where(i < 0, i + s, i)``
    for each subscript ``i`` not provably >= 0 (:func:`nonneg`): torch's wrap of negative
    indices."""
    def visit(node: Expr) -> Expr | None:
        if node.op is not Op.LOAD or not node.src:
            return None
        subs = list(node.src)
        for d, sub in enumerate(subs):
            size = size_of(node.arg, d)
            if size is not None and not nonneg(sub, extent_of):
                subs[d] = E.where(E.binary(Op.LT, sub, 0), E.binary(Op.ADD, sub, size), sub)
        return None if subs == list(node.src) else Expr(node.op, tuple(subs), node.arg,
                                                         node.dtype)
    return e.replace(visit)


def wrap_captured(e: Expr, c: Cascade) -> Expr:
    """:func:`wrap_negative` for the captured tensors of ``c``, sizes as extent parameters."""
    def size_of(name: str, d: int) -> Expr | None:
        t = c.tensor(name)
        return E.param(t.dims[d], INT) if t is not None and t.kind == "captured" else None
    return wrap_negative(e, size_of, {i.name: i.extent for i in c.indices})
