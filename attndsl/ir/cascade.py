"""The Cascade IR: an attention variant as a cascade of equations over named indices.

A cascade declares its indices (each with a role the kernel schedule relies on), its tensors
(inputs Q/K/V and captured tensors), scalar parameters, an optional key mask, and a list of
equations ``T[i, j, ...] = expr``.  Indices that appear in an equation's body but not on its
left-hand side must be reduced explicitly (``sum(n)``/``max(n)``); frontends insert the
implicit Einsum sums.  The key mask restricts every reduction over the key index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from attndsl.errors import located_message
from attndsl.ir import expr as E
from attndsl.ir.expr import BOOL, DTYPES, FLOAT, INT, REDUCE, Expr, IRError, Op, render

ROLES = ("batch", "head", "query", "key", "qk", "v")


@dataclass(frozen=True)
class SourceLoc:
    """Where a declaration came from, for error messages (file:line:col); ``text`` is the
    whole source line (for the caret under it), ``function`` the Python function that defined
    it (a score_mod / mask_mod), if any."""

    file: str
    line: int
    col: int
    text: str = field(default="", compare=False)
    function: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"

    def message(self, what: str) -> str:
        """``file:line:col: error: [in fn(): ]what`` with the source line and a caret."""
        prefix = f"in {self.function}(): " if self.function else ""
        return located_message(prefix + what, self.file, self.line, self.col, self.text)


@dataclass(frozen=True)
class IndexDecl:
    """A named index, its extent parameter and its role (batch/head/query/key/qk/v)."""

    name: str
    extent: str
    role: str


@dataclass(frozen=True)
class TensorDecl:
    """An input (``kind='input'``) or captured tensor (``kind='captured'``); ``dims`` names the
    extent of each dimension (``('B', 'HKV', 'N', 'E')``, or ``('cap0.0',)`` for a captured one).
    Equations read it with one index expression per dimension."""

    name: str
    dims: tuple[str, ...]
    dtype: str = FLOAT
    kind: str = "input"


@dataclass(frozen=True)
class ParamDecl:
    """A scalar kernel argument (``scale``, a group size, a window bound from a text spec)."""

    name: str
    dtype: str = FLOAT
    default: float | int | None = None


@dataclass(frozen=True)
class Equation:
    name: str
    indices: tuple[str, ...]
    expr: Expr
    loc: SourceLoc | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.name}[{', '.join(self.indices)}] = {render(self.expr)}"


@dataclass(frozen=True)
class Cascade:
    name: str
    indices: tuple[IndexDecl, ...]
    tensors: tuple[TensorDecl, ...]
    params: tuple[ParamDecl, ...]
    equations: tuple[Equation, ...]
    outputs: tuple[str, ...]
    mask: Equation | None = None

    # -- lookups ---------------------------------------------------------------------------
    def index(self, name: str) -> IndexDecl:
        for i in self.indices:
            if i.name == name:
                return i
        raise IRError(f"cascade {self.name!r} has no index {name!r}")

    def role(self, role: str) -> str | None:
        """Name of the index with this role, or None."""
        names = [i.name for i in self.indices if i.role == role]
        return names[0] if names else None

    def tensor(self, name: str) -> TensorDecl | None:
        return next((t for t in self.tensors if t.name == name), None)

    def equation(self, name: str) -> Equation | None:
        return next((e for e in self.equations if e.name == name), None)

    def replace_equations(self, equations: tuple[Equation, ...], mask: Equation | None = None,
                          keep_mask: bool = True) -> Cascade:
        return Cascade(self.name, self.indices, self.tensors, self.params, equations,
                       self.outputs, self.mask if keep_mask and mask is None else mask)

    def __str__(self) -> str:
        lines = [f"cascade {self.name}"]
        for i in self.indices:
            lines.append(f"  index {i.name}: {i.extent} ({i.role})")
        for t in self.tensors:
            lines.append(f"  {t.kind} {t.name}[{', '.join(t.dims)}]: {t.dtype}")
        for p in self.params:
            default = "" if p.default is None else f" = {p.default!r}"
            lines.append(f"  param {p.name}: {p.dtype}{default}")
        if self.mask is not None:
            lines.append(f"  mask {self.mask}")
        lines.extend(f"  {eq}" for eq in self.equations)
        lines.append(f"  outputs {', '.join(self.outputs)}")
        return "\n".join(lines)


def verify(c: Cascade) -> Cascade:
    """Check that a cascade is well formed; raise IRError naming the equation otherwise."""
    names = [i.name for i in c.indices]
    if len(set(names)) != len(names):
        raise IRError(f"cascade {c.name!r}: an index is declared twice: {names}")
    for i in c.indices:
        if i.role not in ROLES:
            raise IRError(f"index {i.name!r} has role {i.role!r}; expected one of {ROLES}")
    for role in ("query", "key"):
        if c.role(role) is None:
            raise IRError(f"cascade {c.name!r} has no {role} index")
    extents = {i.extent for i in c.indices}
    scalars = {p.name for p in c.params} | extents
    for t in c.tensors:
        if t.dtype not in DTYPES:
            raise IRError(f"tensor {t.name!r} has dtype {t.dtype!r}; expected one of {DTYPES}")
        if t.kind not in ("input", "captured"):
            raise IRError(f"tensor {t.name!r} has kind {t.kind!r}; expected input or captured")
        scalars |= set(t.dims)
    defined: dict[str, tuple[str, ...]] = {t.name: t.dims for t in c.tensors}
    eqs = list(c.equations) + ([c.mask] if c.mask is not None else [])
    for eq in c.equations:
        if eq.name in defined:
            raise IRError(f"{_where(eq)}{eq.name!r} is defined twice")
        defined[eq.name] = eq.indices
    for eq in eqs:
        _verify_equation(c, eq, defined, scalars, set(names))
        _verify_scan(c, eq)
        _verify_recurrence(c, eq)
    if c.mask is not None and c.mask.expr.dtype != BOOL:
        raise IRError(f"{_where(c.mask)}the mask must be boolean, got {c.mask.expr.dtype}")
    for out in c.outputs:
        eq = c.equation(out)
        if eq is None:
            raise IRError(f"cascade {c.name!r}: output {out!r} is not defined by any equation")
        if is_scan(eq):  # computed by the runtime as an input of the kernel, not stored by it
            raise IRError(f"{_where(eq)}output {out!r} is a prefix sum (cumsum): a cumsum feeds "
                          f"the cascade's other equations and cannot be one of its outputs")
    _check_acyclic(c)
    return c


def _where(eq: Equation) -> str:
    return f"{eq.loc}: " if eq.loc else f"equation {eq.name}: "


def _verify_equation(c: Cascade, eq: Equation, defined: dict[str, tuple[str, ...]],
                     scalars: set[str], names: set[str]) -> None:
    for i in eq.indices:
        if i not in names:
            raise IRError(f"{_where(eq)}unknown index {i!r} on the left-hand side")
    free = eq.expr.free_indices()
    extra = free - set(eq.indices)
    if extra:
        raise IRError(f"{_where(eq)}indices {sorted(extra)} appear on the right but not on the "
                      f"left; reduce them with sum(...) or max(...)")
    for node in eq.expr.walk():
        if node.op is Op.LOAD:
            if node.arg not in defined:
                raise IRError(f"{_where(eq)}unknown tensor {node.arg!r}")
            if len(node.src) != len(defined[node.arg]):
                raise IRError(f"{_where(eq)}{node.arg} has rank {len(defined[node.arg])} but is "
                              f"indexed with {len(node.src)} subscripts")
            for s in node.src:
                if s.dtype == FLOAT:
                    raise IRError(f"{_where(eq)}{node.arg} is indexed by a float expression {s}")
        elif node.op is Op.PARAM and node.arg not in scalars:
            raise IRError(f"{_where(eq)}unknown parameter {node.arg!r}")
        elif node.op is Op.INDEX and node.arg not in names:
            raise IRError(f"{_where(eq)}unknown index {node.arg!r}")
        elif node.op in REDUCE and node.arg not in node.src[0].free_indices():
            raise IRError(f"{_where(eq)}reduction over {node.arg!r}, which its body does not use")
        elif node.op is Op.CAST and node.arg not in (FLOAT, INT, BOOL):
            raise IRError(f"{_where(eq)}cast to unknown dtype {node.arg!r}")


def is_scan(eq: Equation) -> bool:
    """Whether ``eq`` is a per-position prefix sum ``G[..., n] = cumsum(n) body``."""
    return eq.expr.op is Op.CUMSUM


def _verify_scan(c: Cascade, eq: Equation) -> None:
    """A CUMSUM is the whole right-hand side of an equation over its (key) index whose body
    is element-wise, reads only declared tensors and does not depend on the query index."""
    for node in eq.expr.walk():
        if node.op is Op.CUMSUM and node is not eq.expr:
            raise IRError(f"{_where(eq)}cumsum({node.arg[0]}) must be the whole right-hand side "
                          f"of its equation")
    if not is_scan(eq):
        return
    idx, body = eq.expr.arg[0], eq.expr.src[0]
    if idx not in eq.indices or idx != c.role("key"):
        raise IRError(f"{_where(eq)}cumsum({idx}) must scan the key index {c.role('key')!r} "
                      f"and be indexed by it")
    if c.role("query") in body.free_indices():
        raise IRError(f"{_where(eq)}the body of cumsum({idx}) depends on the query index")
    for node in body.walk():
        if node.op in REDUCE or node.op is Op.SOFTMAX or (
                node.op is Op.LOAD and c.tensor(node.arg) is None):
            raise IRError(f"{_where(eq)}the body of cumsum({idx}) must be element-wise over "
                          f"declared tensors, got {render(node)}")


def is_recurrence(eq: Equation) -> bool:
    """Whether ``eq`` is a state recurrence ``S[..., n, ...] = recur(n) body``."""
    return eq.expr.op is Op.RECUR


def previous_position(idx: str) -> Expr:
    """The subscript of a recurrence's read of its previous state: ``idx - 1``."""
    return E.index(idx) - 1


def _verify_recurrence(c: Cascade, eq: Equation) -> None:
    """A RECUR is the whole right-hand side of an equation indexed by the key index; its body
    reads its own state only at the previous position (``n - 1``, plain indices of the same
    extents elsewhere), does not use the query index, and reduces only by sums over indices
    other than the key.  Every other equation reads the state at plain indices."""
    for node in eq.expr.walk():
        if node.op is Op.RECUR and node is not eq.expr:
            raise IRError(f"{_where(eq)}recur({node.arg}) must be the whole right-hand side of "
                          f"its equation")
    states = {e.name: e for e in c.equations if is_recurrence(e)}
    own = eq.name if is_recurrence(eq) else None
    for node in eq.expr.walk():
        if node.op is Op.LOAD and node.arg in states:
            _verify_state_read(c, eq, states[node.arg], node, node.arg == own)
    if own is None:
        return
    idx, body = eq.expr.arg, eq.expr.src[0]
    if idx != c.role("key") or idx not in eq.indices:
        raise IRError(f"{_where(eq)}recur({idx}) must run along the key index "
                      f"{c.role('key')!r} and be indexed by it")
    if c.role("query") in body.free_indices():
        raise IRError(f"{_where(eq)}the body of recur({idx}) depends on the query index")
    for node in body.walk():
        if node.op in (Op.REDUCE_MAX, Op.SOFTMAX, Op.CUMSUM) or (
                node.op is Op.REDUCE_SUM and node.arg == idx):
            raise IRError(f"{_where(eq)}the body of recur({idx}) may sum only over indices "
                          f"other than {idx!r}, got {render(node)}")


def _verify_state_read(c: Cascade, eq: Equation, state: Equation, node: Expr,
                       own: bool) -> None:
    """A read of a recurrence's state: plain indices of the state's extents; inside its own
    body the position slot is exactly the previous position."""
    idx = state.expr.arg
    for slot, (sub, lhs) in enumerate(zip(node.src, state.indices)):
        if own and lhs == idx:
            if sub != previous_position(idx):
                raise IRError(f"{_where(eq)}the recurrence of {state.name} reads its state at "
                              f"{render(sub)}; only the previous position {idx} - 1 is defined")
        elif sub.op is not Op.INDEX or c.index(sub.arg).extent != c.index(lhs).extent:
            raise IRError(f"{_where(eq)}{state.name} is read with subscript {slot + 1} = "
                          f"{render(sub)}; a state is read at indices of its extents")


def _check_acyclic(c: Cascade) -> None:
    deps = {eq.name: {n.arg for n in eq.expr.walk() if n.op is Op.LOAD} - (
        {eq.name} if is_recurrence(eq) else set()) for eq in c.equations}
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2 or name not in deps:
            return
        if state.get(name) == 1:
            raise IRError(f"cascade {c.name!r} has a cycle: {' -> '.join(path + [name])}")
        state[name] = 1
        for d in deps[name]:
            visit(d, path + [name])
        state[name] = 2

    for name in deps:
        visit(name, [])
