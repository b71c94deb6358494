"""The assembler: one spec's declarations and equations, checked, into a verified Cascade.

Both frontends drive :class:`Assembler`: the text frontend (:mod:`attndsl.frontend.text`)
with positions of tokens, the builder (:mod:`attndsl.frontend.builder`) with the Python lines
that called it.  The semantic checks (names declared once, roles, extents, what a mask and
a reduction may read, expression depth with equations inlined) live here; every one raises
:class:`~attndsl.frontend.source.SpecError` at such a position.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from attndsl.frontend.ops import REDUCE_WORD, DependencyCycle, implicit_sums, stable_order
from attndsl.frontend.source import INT_LIMIT, UnlocatedError, Where, article, check_name, suggest
from attndsl.ir import expr as E
from attndsl.ir.cascade import (
    ROLES,
    Cascade,
    Equation,
    IndexDecl,
    ParamDecl,
    TensorDecl,
    verify,
)
from attndsl.ir.expr import (
    BOOL,
    FLOAT,
    INT,
    MAX_DEPTH,
    Expr,
    IRError,
    Op,
    render,
    render_const,
)

# role of an index whose declaration names none, by the conventional index names
ROLE_BY_NAME = {"b": "batch", "h": "head", "m": "query", "p": "query", "q": "query",
                "n": "key", "k": "key", "e": "qk", "f": "v"}
UNIQUE_ROLES = ("batch", "head", "query", "key")  # at most one index each
TENSOR_DTYPES = (FLOAT, INT, BOOL)
PARAM_DTYPES = (FLOAT, INT)

Locate = Callable[[Expr, Any], Where]  # (node, slot) -> where to point an error about it


@dataclass
class PendingEquation:
    name: str
    indices: tuple[str, ...]
    where: Where
    expr: Expr | None = None
    locate: Locate | None = None
    depth: int | None = None  # levels of expr with the equations it reads inlined
    state: bool = False  # a state recurrence S[..., n, ...] = recur(n) body


class Assembler:
    """Collects one spec's declarations and equations, checks them, builds the Cascade.

    Both frontends drive it: the text frontend with positions of tokens, the builder with the
    Python lines that called it.  Every check raises :class:`SpecError` at such a position.
    """

    def __init__(self, name: str, where: Where) -> None:
        check_name(name, where, "spec name")
        self.name, self.where = name, where
        self.kinds: dict[str, tuple[str, Where]] = {}  # every name -> (what it is, where)
        self.indices: dict[str, IndexDecl] = {}
        self.by_role: dict[str, str] = {}
        self.tensors: dict[str, TensorDecl] = {}
        self.params: dict[str, ParamDecl] = {}
        self.equations: dict[str, PendingEquation] = {}
        self.mask: tuple[Expr, Where] | None = None
        self.outputs: dict[str, Where] = {}
        self._building: str | None = None  # the equation whose body is being checked

    # -- declarations (each checks everything before it records anything) --------------------
    def _check_new(self, name: str, kind: str, where: Where) -> None:
        check_name(name, where, kind)
        if name in self.kinds:
            old, at = self.kinds[name]
            raise where.error(f"{name!r} is already declared as {article(old)} on "
                              f"{at.describe(where)}")

    def _check_extent(self, name: str, where: Where, owner: str, owner_kind: str) -> None:
        check_name(name, where, "extent")
        kind = owner_kind if name == owner else self.kinds.get(name, ("extent",))[0]
        if kind != "extent":
            raise where.error(f"{name!r} is {article(kind)}; an extent needs a name of its own")

    def _record(self, name: str, kind: str, where: Where) -> None:
        self.kinds.setdefault(name, (kind, where))

    def index(self, name: str, extent: str, role: str | None, w_name: Where,
              w_extent: Where | None = None, w_role: Where | None = None) -> None:
        self._check_new(name, "index", w_name)
        self._check_extent(extent, w_extent or w_name, name, "index")
        if role is None:
            if name not in ROLE_BY_NAME:
                raise w_name.error(f"cannot infer the role of index {name!r}; write it after the "
                                   f"extent, one of: {', '.join(ROLES)}")
            role = ROLE_BY_NAME[name]
        elif role not in ROLES:
            raise (w_role or w_name).error(f"unknown role {role!r}; expected one of: "
                                           f"{', '.join(ROLES)}")
        if role in UNIQUE_ROLES and role in self.by_role:
            raise w_name.error(f"index {name!r} is a second {role} index ({self.by_role[role]!r} "
                               f"is the first); a spec has at most one")
        self._record(name, "index", w_name)
        self._record(extent, "extent", w_extent or w_name)
        self.by_role.setdefault(role, name)
        self.indices[name] = IndexDecl(name, extent, role)

    def tensor(self, name: str, dims: Sequence[str], dtype: str | None, kind: str,
               w_name: Where, w_dims: Sequence[Where] = (), w_dtype: Where | None = None) -> None:
        what = "input tensor" if kind == "input" else "captured tensor"
        self._check_new(name, what, w_name)
        if not dims:
            raise w_name.error(f"tensor {name!r} needs at least one dimension")
        w_dims = [w_dims[i] if i < len(w_dims) else w_name for i in range(len(dims))]
        for d, w in zip(dims, w_dims, strict=True):
            self._check_extent(d, w, name, what)
        dtype = FLOAT if dtype is None else dtype
        if dtype not in TENSOR_DTYPES:
            raise (w_dtype or w_name).error(f"unknown type {dtype!r}; expected one of: "
                                            f"{', '.join(TENSOR_DTYPES)}")
        self._record(name, what, w_name)
        for d, w in zip(dims, w_dims, strict=True):
            self._record(d, "extent", w)
        self.tensors[name] = TensorDecl(name, tuple(dims), dtype, kind)

    def param(self, name: str, dtype: str, default: Any, w_name: Where,
              w_dtype: Where | None = None, w_default: Where | None = None) -> None:
        self._check_new(name, "parameter", w_name)
        if dtype not in PARAM_DTYPES:
            raise (w_dtype or w_name).error(f"unknown parameter type {dtype!r}; expected one of: "
                                            f"{', '.join(PARAM_DTYPES)}")
        if default is not None:
            wd = w_default or w_name
            if isinstance(default, bool) or not isinstance(default, (int, float)):
                raise wd.error(f"the default of {name!r} must be a number, got {default!r}")
            if dtype == INT and not isinstance(default, int):
                raise wd.error(f"the default of int parameter {name!r} must be an integer, got "
                               f"{render_const(default)}")
            if math.isnan(default) or (dtype == INT and abs(default) >= INT_LIMIT):
                raise wd.error(f"the default of {name!r} is out of range: {default!r}")
            default = float(default) if dtype == FLOAT else default
        self._record(name, "parameter", w_name)
        self.params[name] = ParamDecl(name, dtype, default)

    def header(self, name: str, indices: Sequence[str], w_name: Where,
               w_indices: Sequence[Where] = ()) -> None:
        """Declare an equation ``name[indices]`` (its body comes later)."""
        self._check_new(name, "equation", w_name)
        if not indices:
            raise w_name.error(f"equation {name!r} needs at least one index")
        seen: set[str] = set()
        for i, idx in enumerate(indices):
            w = w_indices[i] if i < len(w_indices) else w_name
            if idx not in self.indices:
                raise w.error(self._not_an_index(idx, f"the left-hand side of {name}"))
            if idx in seen:
                raise w.error(f"index {idx!r} appears twice on the left-hand side of {name}")
            seen.add(idx)
        self._record(name, "equation", w_name)
        self.equations[name] = PendingEquation(name, tuple(indices), w_name)

    def define(self, name: str, indices: Sequence[str], expr: Expr, where: Where) -> None:
        """Header and body at once (the builder); nothing is recorded if a check fails."""
        self.header(name, indices, where)
        try:
            self.body(name, expr, lambda node, slot: where)
        except BaseException:
            del self.equations[name], self.kinds[name]
            raise

    def recurrence(self, name: str) -> None:
        """Mark the equation ``name`` (declared by :meth:`header`) as a state recurrence: its
        body may read its own previous state ``name[..., n - 1, ...]``."""
        self.equations[name].state = True

    def output(self, name: str, where: Where) -> None:
        _expect_name(name, where, "output()")
        if name in self.outputs:
            raise where.error(f"{name!r} is already an output (line {self.outputs[name].line})")
        self.outputs[name] = where

    def check_roles(self) -> None:
        for role in ("query", "key"):
            if role not in self.by_role:
                raise self.where.error(f"spec {self.name!r} has no {role} index; declare one, "
                                       f"e.g. `index {'m: M' if role == 'query' else 'n: N'} "
                                       f"{role}`")

    # -- names in expressions ----------------------------------------------------------------
    def _not_an_index(self, name: str, place: str) -> str:
        if name in self.kinds:
            return f"{name!r} in {place} is {article(self.kinds[name][0])}, not an index"
        return f"unknown index {name!r} in {place}{suggest(name, self.indices)}"

    def scalar(self, name: str, where: Where) -> Expr:
        """What a bare name denotes: an index, a parameter or an extent."""
        _expect_name(name, where, "var()")
        kind = self.kinds.get(name, (None,))[0]
        if kind == "index":
            return E.index(name)
        if kind == "parameter":
            return E.param(name, self.params[name].dtype)
        if kind == "extent":
            return E.param(name, INT)
        if kind is not None:
            raise where.error(f"{name!r} is {article(kind)}; read it with subscripts, e.g. "
                              f"{name}[{', '.join(self._dims_of(name))}]")
        raise where.error(f"unknown name {name!r}{suggest(name, self.kinds)}")

    def index_name(self, name: str, where: Where, place: str) -> str:
        _expect_name(name, where, place)
        if name not in self.indices:
            raise where.error(self._not_an_index(name, place))
        return name

    def _scan_dims(self, name: str) -> tuple[str, ...]:
        """The extents of a prefix-sum equation's dimensions (its indices' extents)."""
        return tuple(self.indices[i].extent for i in self.equations[name].indices)

    def _dims_of(self, name: str) -> tuple[str, ...]:
        if name in self.tensors:
            return self.tensors[name].dims
        return self.equations[name].indices

    def read(self, name: str, subs: Sequence[Expr], where: Where) -> Expr:
        """``name[subs]``: a tensor, or an equation whose body is already built."""
        _expect_name(name, where, "read()")
        if name in self.tensors:
            return E.load(name, tuple(subs), self.tensors[name].dtype)
        eq = self.equations.get(name)
        if eq is not None and eq.expr is not None:
            return E.load(name, tuple(subs), eq.expr.dtype)
        if eq is not None and eq.state:  # its own previous state, inside its recurrence
            return E.load(name, tuple(subs), FLOAT)
        if eq is not None:
            raise where.error(f"{name!r} is read before it is defined")
        kind = self.kinds.get(name, (None,))[0]
        if kind is not None:
            raise where.error(f"{name!r} is {article(kind)}, not a tensor")
        names = list(self.tensors) + list(self.equations)
        raise where.error(f"unknown tensor {name!r}{suggest(name, names)}")

    # -- equations ---------------------------------------------------------------------------
    def body(self, name: str, expr: Expr, locate: Locate) -> None:
        """Check an equation's right-hand side and store it with its implicit sums."""
        eq = self.equations[name]
        self._building = name
        try:
            self._check_expr(expr, locate, f"{name}[{', '.join(eq.indices)}]")
        finally:
            self._building = None
        self._check_scan_equation(name, expr, locate)
        self._check_recurrence(name, expr, locate)
        if expr.op is Op.RECUR:  # the Einsum convention applies to the recurrence's body
            eq.expr = E.recur(expr.arg, implicit_sums(expr.src[0], eq.indices))
        else:
            eq.expr = implicit_sums(expr, eq.indices)
        eq.locate = locate
        try:
            eq.depth = self._inlined_depth(eq.expr)
        except UnlocatedError as bad:
            eq.expr = eq.locate = None
            raise eq.where.error(f"equation {name}: {bad.what}") from None

    def _inlined_depth(self, expr: Expr) -> int:
        """Levels of ``expr`` once the equations it reads are substituted (as fusion does):
        a read of an equation counts that equation's own inlined depth."""
        memo: dict[Expr, int] = {}
        for node in expr.walk():
            eq = self.equations.get(node.arg) if node.op is Op.LOAD else None
            below = max((memo[s] for s in node.src), default=0)
            memo[node] = 1 + below if eq is None or eq.depth is None else \
                max(eq.depth, 1 + below)
        if memo[expr] > MAX_DEPTH:
            raise UnlocatedError(f"the expression is nested too deeply once the equations it "
                                 f"reads are substituted ({memo[expr]} levels of operators, "
                                 f"more than {MAX_DEPTH})")
        return memo[expr]

    def set_mask(self, expr: Expr, locate: Locate, where: Where) -> None:
        if self.mask is not None:
            raise where.error(f"a second mask (the first is on {self.mask[1].describe(where)}); "
                              f"combine the conditions with &")
        self._check_expr(expr, locate, "the mask", mask=True)
        if expr.dtype != BOOL:
            raise locate(expr, None).error(f"the mask must be a boolean condition (a comparison, "
                                           f"&, |, !), got {article(expr.dtype)} expression")
        allowed = {self.by_role[r] for r in UNIQUE_ROLES if r in self.by_role}
        for node in expr.walk():
            if node.op is Op.INDEX and node.arg not in allowed:
                raise locate(node, None).error(
                    f"the mask may use only the batch, head, query and key indices; "
                    f"{node.arg!r} is the {self.indices[node.arg].role} index")
        self.mask = (expr, where)

    def _check_expr(self, expr: Expr, locate: Locate, what: str, mask: bool = False) -> None:
        for node in expr.walk():
            op = node.op
            try:
                if op is Op.LOAD:
                    self._check_load(node, mask)
                elif op is Op.INDEX and node.arg not in self.indices:
                    raise UnlocatedError(self._not_an_index(node.arg, what))
                elif op is Op.PARAM and self.kinds.get(node.arg, ("",))[0] not in (
                        "parameter", "extent"):
                    raise UnlocatedError(f"unknown parameter {node.arg!r}")
                elif op is Op.CONST and isinstance(node.arg, float) and math.isnan(node.arg):
                    raise UnlocatedError("a constant is not a number (NaN)")
                elif op is Op.ROW:
                    raise UnlocatedError("row values belong to schedules, not to specs")
                elif op is Op.CUMSUM:
                    self._check_scan(node, mask)
                elif op in REDUCE_WORD:
                    self._check_reduction(node, mask)
            except UnlocatedError as bad:
                slot = "arg" if op in REDUCE_WORD and bad.slot is None else bad.slot
                raise locate(node, slot).error(bad.what) from None

    def _check_scan(self, node: Expr, mask: bool) -> None:
        """A prefix sum: over the key index, of per-position values (no query index, no
        equation results, no reductions inside); where it may stand is checked by
        :meth:`_check_scan_equation`."""
        i, body = node.arg[0], node.src[0]
        if mask:
            raise UnlocatedError("the mask cannot contain cumsum(); it is a condition on "
                                 "single elements")
        if i not in self.indices:
            raise UnlocatedError(self._not_an_index(i, f"cumsum({i})"))
        if self.indices[i].role != "key":
            raise UnlocatedError(f"cumsum({i}) scans {i!r}, the {self.indices[i].role} index; a "
                                 f"prefix sum runs along the key index (positions)")
        if i not in body.free_indices():
            raise UnlocatedError(f"cumsum({i}) scans over {i!r}, which its body does not use")
        query = self.by_role.get("query")
        if query in body.free_indices():
            raise UnlocatedError(f"the body of cumsum({i}) depends on the query index "
                                 f"{query!r}; a prefix sum is of per-position values "
                                 f"(such as log(A[b,h,{i}]))")
        for x in body.walk():
            if x.op in REDUCE_WORD:
                raise UnlocatedError(f"the body of cumsum({i}) contains "
                                     f"{REDUCE_WORD[x.op]}(); it must be element-wise")
            if x.op is Op.LOAD and x.arg in self.equations:
                raise UnlocatedError(f"the body of cumsum({i}) reads the equation {x.arg!r}; "
                                     f"it may read only input and captured tensors")

    def _check_scan_equation(self, name: str, expr: Expr, locate: Locate) -> None:
        """``cumsum`` stands alone: ``G[b,h,n] = cumsum(n) body``, with n on the left and every
        index of the body there too (the runtime materialises G before the kernel)."""
        lhs = self.equations[name].indices
        for node in expr.walk():
            if node.op is not Op.CUMSUM:
                continue
            i = node.arg[0]
            if node is not expr:
                raise locate(node, "arg").error(
                    f"cumsum({i}) must be the whole right-hand side of its equation (a "
                    f"per-position prefix sum, e.g. G[b,h,{i}] = cumsum({i}) log(A[b,h,{i}])); "
                    f"define it as its own equation and read that")
            if i not in lhs:
                raise locate(node, "arg").error(
                    f"cumsum({i}) is indexed by {i!r}: put {i!r} on the left-hand side of "
                    f"{name}")
            extra = sorted(node.src[0].free_indices() - set(lhs))
            if extra:
                raise locate(node, "arg").error(
                    f"the body of cumsum({i}) uses {extra} which the left-hand side of {name} "
                    f"lacks; a prefix sum is not also summed over other indices")

    def _check_recurrence(self, name: str, expr: Expr, locate: Locate) -> None:
        """``recur`` stands alone, ``S[b,h,n,e,f] = recur(n) body``, along the key index
        (which is on the left), with a body of per-position values and the previous state;
        an equation that is not a recurrence does not read itself."""
        eq = self.equations[name]
        for node in expr.walk():
            if node.op is Op.RECUR and node is not expr:
                raise locate(node, "arg").error(
                    f"recur({node.arg}) must be the whole right-hand side of a state equation")
        if expr.op is not Op.RECUR:
            return
        i, body = expr.arg, expr.src[0]
        if i not in self.indices or self.indices[i].role != "key":
            role = self.indices[i].role if i in self.indices else "unknown"
            raise locate(expr, "arg").error(
                f"recur({i}) runs along {i!r} ({role}); a recurrence runs along the key "
                f"index (the positions), e.g. S[b,h,n,e,f] = recur(n) ...")
        if i not in eq.indices:
            raise locate(expr, "arg").error(
                f"recur({i}) is indexed by {i!r}: put {i!r} on the left-hand side of {name} "
                f"(the state after each position)")
        if not eq.state:
            raise locate(expr, "arg").error(f"recur({i}) must begin the right-hand side of "
                                            f"{name}")
        query = self.by_role.get("query")
        if query in body.free_indices():
            raise locate(expr, "arg").error(
                f"the body of recur({i}) depends on the query index {query!r}; a state is "
                f"updated from per-position values (the outputs read it at {query!r})")
        for x in body.walk():
            if x.op in (Op.REDUCE_MAX, Op.SOFTMAX, Op.CUMSUM) or (
                    x.op is Op.REDUCE_SUM and x.arg == i):
                raise locate(x, "arg").error(
                    f"the body of recur({i}) contains {REDUCE_WORD[x.op]}({x.arg}); it may "
                    f"only sum over indices other than {i!r}")

    def _check_state_read(self, name: str, subs: Sequence[Expr]) -> None:
        """A read of a state: plain indices of its extents; inside its own recurrence the
        position is exactly the previous one (``n - 1``: the initial state at n = 0)."""
        eq = self.equations[name]
        own = name == self._building
        for k, (s, lhs) in enumerate(zip(subs, eq.indices)):
            if own and self.indices[lhs].role == "key":
                if s != E.index(lhs) - 1:
                    raise UnlocatedError(f"the recurrence of {name} reads its state at "
                                         f"{render(s)}; it may read only the previous "
                                         f"position, {name}[..., {lhs} - 1, ...]", k)
            elif s.op is not Op.INDEX or s.arg not in self.indices or \
                    self.indices[s.arg].extent != self.indices[lhs].extent:
                raise UnlocatedError(f"subscript {k + 1} of the state {name} must be an index of "
                                     f"extent {self.indices[lhs].extent}, got {render(s)}", k)

    def _check_reduction(self, node: Expr, mask: bool) -> None:
        word, i = REDUCE_WORD[node.op], node.arg
        if mask:
            raise UnlocatedError(f"the mask cannot contain {word}(); it is a condition on "
                                 f"single elements")
        if i not in self.indices:
            raise UnlocatedError(self._not_an_index(i, f"{word}({i})"))
        if i not in node.src[0].free_indices():
            raise UnlocatedError(f"{word}({i}) reduces over {i!r}, which its body does not use")

    def _check_load(self, node: Expr, mask: bool) -> None:
        name, subs = node.arg, node.src
        if name in self.tensors:
            dims, t = self.tensors[name].dims, self.tensors[name]
            if mask and t.kind != "captured":
                raise UnlocatedError(f"the mask may read only captured tensors (declared with "
                                     f"`tensor`); {name!r} is an input")
        elif name in self.equations:
            dims, t = self.equations[name].indices, None
            if _is_scan(self.equations[name].expr):  # a per-position tensor: any subscripts
                dims, t = self._scan_dims(name), _SCAN
            if mask:
                raise UnlocatedError(f"the mask cannot read equation results ({name!r})")
            if self.equations[name].state:
                if len(subs) == len(dims):
                    self._check_state_read(name, subs)
                    return
        else:
            raise UnlocatedError(f"unknown tensor {name!r}")
        if len(subs) != len(dims):
            raise UnlocatedError(f"{name} has {len(dims)} dimension{'s' * (len(dims) != 1)} "
                                 f"({name}[{', '.join(dims)}]) but is read with {len(subs)} "
                                 f"subscript{'s' * (len(subs) != 1)}")
        for k, s in enumerate(subs):
            if t is None:
                if s.op is not Op.INDEX or s.arg != dims[k]:
                    raise UnlocatedError(f"{name} must be read at the indices it is defined "
                                         f"over, {name}[{', '.join(dims)}]; only input and "
                                         f"captured tensors accept other subscripts", k)
            elif s.dtype == FLOAT:
                raise UnlocatedError(f"subscript {k + 1} of {name} is a float expression; "
                                     f"subscripts must be integers", k)
            elif s.op is Op.INDEX and s.arg in self.indices and \
                    self.indices[s.arg].extent != dims[k]:
                raise UnlocatedError(f"index {s.arg!r} has extent {self.indices[s.arg].extent} but "
                                     f"dimension {k + 1} of {name} has extent {dims[k]}", k)

    # -- the cascade -------------------------------------------------------------------------
    def finish(self) -> Cascade:
        self.check_roles()
        if not self.outputs:
            raise self.where.error(f"spec {self.name!r} has no output; add `output O`")
        for name, w in self.outputs.items():
            if name not in self.equations:
                kind = self.kinds.get(name, (None,))[0]
                if kind is not None:
                    raise w.error(f"output {name!r} is {article(kind)}; outputs are defined by "
                                  f"equations")
                raise w.error(f"output {name!r} is not defined by any equation"
                              f"{suggest(name, self.equations)}")
        eqs = self.equations
        reads = {n: [x for x in e.expr.walk() if x.op is Op.LOAD and x.arg in eqs and
                     not (e.state and x.arg == n)]  # a recurrence reads its previous state
                 for n, e in eqs.items() if e.expr is not None}
        try:
            order = stable_order(list(reads), {n: [x.arg for x in r] for n, r in reads.items()})
        except DependencyCycle as cyc:
            src, dst = cyc.path[0], cyc.path[1]
            load = next(x for x in reads[src] if x.arg == dst)
            raise eqs[src].locate(load, None).error(f"equations depend on each other in a "
                                                    f"cycle: {cyc}") from None
        used = {x.arg for n, r in reads.items() for x in r if x.arg != n}
        for name, eq in eqs.items():
            if name not in used and name not in self.outputs:
                raise eq.where.error(f"equation {name} is never used")
        mask = None
        if self.mask is not None:
            keep = tuple(self.by_role[r] for r in UNIQUE_ROLES if r in self.by_role)
            mask = Equation("Keep", keep, self.mask[0], self.mask[1].loc())
        cascade = Cascade(self.name, tuple(self.indices.values()), tuple(self.tensors.values()),
                          tuple(self.params.values()),
                          tuple(Equation(n, eqs[n].indices, eqs[n].expr, eqs[n].where.loc())
                                for n in order),
                          tuple(self.outputs), mask)
        try:
            return verify(cascade)
        except IRError as err:
            msg, at = str(err), self.where
            for eq in list(eqs.values()) + ([] if self.mask is None else [self.mask]):
                w = eq.where if isinstance(eq, PendingEquation) else eq[1]
                if msg.startswith(f"{w.loc()}: "):
                    msg, at = msg[len(f"{w.loc()}: "):], w
                    break
            raise at.error(msg) from None


_SCAN = TensorDecl("(scan)", ())  # the reads of a prefix sum are checked as a tensor's


def _is_scan(expr: Expr | None) -> bool:
    return expr is not None and expr.op is Op.CUMSUM


def _expect_name(name: Any, where: Where, place: str) -> None:
    """Lookups take names (the builder passes whatever its caller gave)."""
    if not isinstance(name, str):
        raise where.error(f"{place} takes a name (a str), got {type(name).__name__} {name!r}")

