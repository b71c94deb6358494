"""Eager executor of the Cascade IR in plain torch: the oracle every kernel is tested against.

It shares nothing with the kernel path but the IR and the IR's element-wise evaluator
(:mod:`attndsl.ir.evaluate`), which it extends with reductions, softmax and the mask.  Every
node evaluates to a tensor laid out over all of the cascade's indices (size 1 along the
indices it does not depend on), so broadcasting does the index bookkeeping.  Work is chunked
over the query index, so an 8k-token problem needs O(chunk * Lkv) memory per (batch, head).
Floats are computed in ``dtype`` (float64 by default).  Semantics (see attndsl.ir.expr):
reductions over the key index skip masked keys (empty sum 0, empty max -inf); ``0 / 0 = 0``
(``DIV``; ``TRUEDIV`` is IEEE); ``//`` and ``%`` floor like Python and refuse a zero integer
divisor; integers are int64 and their bitwise operators are torch's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from attndsl.errors import SubscriptError
from attndsl.index_check import index_error
from attndsl.ir.cascade import Cascade, Equation, is_recurrence, is_scan
from attndsl.ir.evaluate import Env, EvaluationError, apply, as_float, safe_div
from attndsl.ir.expr import INT, Expr, Op, render

Tensor = torch.Tensor


EagerError = EvaluationError  # one class: every failure of an evaluation, element-wise or not


class _Ctx(Env):
    """Everything one evaluation needs: the element-wise environment, the key index, the mask,
    the intermediates computed so far."""

    def __init__(self, axes: list[str], ranges: dict[str, Tensor], tensors: Mapping[str, Tensor],
                 params: Mapping[str, float | int], key: str | None, dtype: torch.dtype,
                 intermediates: dict[str, tuple[tuple[str, ...], Tensor]]) -> None:
        super().__init__(axes, ranges, tensors, params, dtype)
        self.key, self.intermediates = key, intermediates
        self.mask: Tensor | None = None
        self.memo: dict[Expr, Tensor] = {}
        self.captured: frozenset[str] | None = None  # tensors whose negative subscripts wrap

    def check_subscripts(self, node: Expr, idx: list[Tensor], t: Tensor) -> None:
        """torch's rule for the subscripts of a read: -size <= i < size along each dimension
        of a captured tensor (negatives wrap), 0 <= i < size for an input; else the
        IndexError the kernels raise (attndsl.index_check), with the range seen."""
        for d, i in enumerate(idx):
            if not i.numel():
                continue
            lo, hi = (int(v) for v in torch.aminmax(i.long()))
            wraps = self.captured is None or node.arg in self.captured
            err = index_error(node.arg, d, tuple(t.shape), (lo, hi), render(node.src[d]), wraps)
            if err is not None:
                raise SubscriptError(str(err)) from None


def _eval(e: Expr, ctx: _Ctx) -> Tensor:
    """The value of e; nodes that are not element-wise (reductions over the key index skip
    masked keys, softmax, intermediates) are evaluated here, the rest by attndsl.ir.evaluate."""
    if e not in ctx.memo:
        ctx.memo[e] = _eval_node(e, ctx)
    return ctx.memo[e]


def _eval_node(node: Expr, ctx: _Ctx) -> Tensor:
    op = node.op
    if op is Op.LOAD and node.arg in ctx.intermediates:
        return _intermediate(node, ctx)
    if op is Op.LOG and node.src[0].op is Op.REDUCE_SUM and node.src[0].src[0].op is Op.EXP:
        return _logsumexp(node.src[0], ctx)  # log(sum exp x), without overflow
    if op in (Op.REDUCE_SUM, Op.REDUCE_MAX):
        return _reduce(node, ctx)
    if op is Op.SOFTMAX:
        return _softmax(node, ctx)
    if op is Op.ROW:
        raise EagerError("ROW values belong to schedules, not to cascades")
    return apply(node, [_eval(s, ctx) for s in node.src], ctx)


def _intermediate(node: Expr, ctx: _Ctx) -> Tensor:
    """An equation's value, read at its own indices (shifted reads are not defined)."""
    lhs, value = ctx.intermediates[node.arg]
    if not all(s.op is Op.INDEX and s.arg == i for s, i in zip(node.src, lhs)):
        raise EagerError(f"{node.arg} is read at shifted indices; only inputs and captured "
                         f"tensors can be gathered")
    return value


def _contract(body: Expr, idx: str, ctx: _Ctx) -> Tensor | None:
    """sum over ``idx`` of a product, by einsum, without materialising the product; over the
    key index the mask is applied to the factor that spans it.  None if neither does."""
    a, b = _eval(body.src[0], ctx), _eval(body.src[1], ctx)
    a, b = as_float(a, ctx.dtype), as_float(b, ctx.dtype)
    if idx == ctx.key and ctx.mask is not None:
        spans = [all(t.shape[i] != 1 or ctx.mask.shape[i] == 1 for i in range(t.dim()))
                 for t in (a, b)]
        if spans[0]:
            a = torch.where(ctx.mask, a, torch.zeros((), dtype=a.dtype))
        elif spans[1]:
            b = torch.where(ctx.mask, b, torch.zeros((), dtype=b.dtype))
        else:
            return None
    letters = "abcdefghijklmnopqrstuvwxyz"[: len(ctx.axes)]

    def sub(t: Tensor) -> tuple[Tensor, str]:
        keep = [i for i in range(t.dim()) if t.shape[i] != 1]
        return t.reshape([t.shape[i] for i in keep]), "".join(letters[i] for i in keep)

    (ta, sa), (tb, sb) = sub(a), sub(b)
    r = ctx.axes.index(idx)
    out = "".join(ch for ch in letters if (ch in sa or ch in sb) and ch != letters[r])
    res = torch.einsum(f"{sa},{sb}->{out}", ta, tb)
    shape = [a.shape[i] if letters[i] in sa else b.shape[i] if letters[i] in sb else 1
             for i in range(len(ctx.axes))]
    shape[r] = 1
    return res.reshape(shape)


def _reduce(node: Expr, ctx: _Ctx) -> Tensor:
    axis = ctx.axes.index(node.arg)
    if node.op is Op.REDUCE_SUM and node.src[0].op is Op.MUL:
        contracted = _contract(node.src[0], node.arg, ctx)
        if contracted is not None:
            return contracted
    body = _eval(node.src[0], ctx)
    full = list(body.shape)
    full[axis] = ctx.ranges[node.arg].numel()
    body = body.expand(torch.broadcast_shapes(body.shape, tuple(full)))
    mask = ctx.mask if node.arg == ctx.key else None
    if node.op is Op.REDUCE_SUM:
        if body.dtype == torch.bool:
            body = body.long()
        if mask is not None:
            body = torch.where(mask, body, torch.zeros((), dtype=body.dtype))
        return body.sum(axis, keepdim=True)
    if mask is not None:
        low = -math.inf if body.dtype.is_floating_point else torch.iinfo(body.dtype).min
        body = torch.where(mask, body, torch.tensor(low, dtype=body.dtype))
    return _amax(body, axis)


def _amax(x: Tensor, axis: int) -> Tensor:
    """Max over an axis; -inf (or the dtype's minimum) over an empty one."""
    if x.shape[axis] == 0:
        shape = list(x.shape)
        shape[axis] = 1
        low = -math.inf if x.dtype.is_floating_point else torch.iinfo(x.dtype).min
        return torch.full(shape, low, dtype=x.dtype)
    return x.amax(axis, keepdim=True)


def _logsumexp(node: Expr, ctx: _Ctx) -> Tensor:
    """log(sum(n) exp(x)) = mx + log(sum(n) exp(x - mx)) over unmasked keys."""
    x = as_float(_eval(node.src[0].src[0], ctx), ctx.dtype)
    axis = ctx.axes.index(node.arg)
    full = list(x.shape)
    full[axis] = ctx.ranges[node.arg].numel()
    x = x.expand(torch.broadcast_shapes(x.shape, tuple(full)))
    if node.arg == ctx.key and ctx.mask is not None:
        x = torch.where(ctx.mask, x, torch.tensor(-math.inf, dtype=x.dtype))
    mx = _amax(x, axis)
    safe = torch.where(torch.isinf(mx), torch.zeros((), dtype=x.dtype), mx)
    return safe + torch.log(torch.exp(x - safe).sum(axis, keepdim=True))


def _softmax(node: Expr, ctx: _Ctx) -> Tensor:
    x = as_float(_eval(node.src[0], ctx), ctx.dtype)
    axis = ctx.axes.index(node.arg)
    full = list(x.shape)
    full[axis] = ctx.ranges[node.arg].numel()
    x = x.expand(torch.broadcast_shapes(x.shape, tuple(full)))
    mask = ctx.mask if node.arg == ctx.key else None
    if mask is not None:
        x = torch.where(mask, x, torch.tensor(-math.inf, dtype=x.dtype))
    mx = _amax(x, axis)
    mx = torch.where(torch.isneginf(mx), torch.zeros((), dtype=x.dtype), mx)
    ex = torch.exp(x - mx)
    return safe_div(ex, ex.sum(axis, keepdim=True))


def bind_extents(c: Cascade, tensors: Mapping[str, Tensor]) -> dict[str, int]:
    """Sizes of every extent name, read off the shapes of the bound tensors."""
    sizes: dict[str, int] = {}
    seen: dict[str, tuple[int, str]] = {}  # extent -> (axis, tensor) that set its size
    for decl in c.tensors:
        if decl.name not in tensors:
            raise EagerError(f"cascade {c.name!r} needs tensor {decl.name!r}")
        t = tensors[decl.name]
        if t.dim() != len(decl.dims):
            raise EagerError(f"{decl.name} must have {len(decl.dims)} dims "
                             f"[{', '.join(decl.dims)}], got shape {tuple(t.shape)}")
        for axis, (dim, size) in enumerate(zip(decl.dims, t.shape)):
            first_axis, first = seen.setdefault(dim, (axis, decl.name))
            if sizes.setdefault(dim, int(size)) != int(size):
                raise EagerError(f"cascade {c.name!r}: extent {dim} is {sizes[dim]} (dim "
                                 f"{first_axis} of {first}, shape {tuple(tensors[first].shape)})"
                                 f" but dim {axis} of {decl.name} (shape {tuple(t.shape)}) is "
                                 f"{int(size)}; tensors sharing an extent must agree")
    return sizes


def _check_int_params(c: Cascade, params: Mapping[str, float | int]) -> None:
    """An int parameter must be an int64 (torch's integers; 2**63 failed inside torch with
    'Overflow when unpacking long long')."""
    for p in c.params:
        value = params.get(p.name)
        if p.dtype == INT and isinstance(value, int) and not -2**63 <= value < 2**63:
            raise EagerError(f"parameter {p.name!r} of {c.name} is {value}; expected an int in "
                             f"[-2**63, 2**63) (torch's int64)")


def run_cascade(c: Cascade, tensors: Mapping[str, Tensor],
                params: Mapping[str, float | int] | None = None, *,
                dtype: torch.dtype = torch.float64, max_elements: int = 1 << 24,
                initial_state: Mapping[str, Tensor] | None = None,
                ) -> dict[str, Tensor]:
    """Evaluate every output of ``c``; returns tensors shaped by each output's indices.

    ``initial_state`` maps a recurrence's state name to its value before the first position
    (its dimensions without the position; zero when absent)."""
    sizes = bind_extents(c, tensors)
    params = dict(params or {})
    _check_int_params(c, params)
    for p in c.params:
        if p.name not in params and p.default is not None:
            params[p.name] = p.default
    for ext, size in sizes.items():
        params.setdefault(ext, size)
    axes = [i.name for i in c.indices]
    extent = {}
    for i in c.indices:
        if i.extent not in sizes and i.extent not in params:
            raise EagerError(f"extent {i.extent} of index {i.name} is not bound")
        extent[i.name] = int(sizes.get(i.extent, params.get(i.extent)))
    query, key = c.role("query"), c.role("key")
    qk = c.role("qk")  # contracted by einsum, never materialised with the query rows
    per_query = max(1, math.prod(v for k, v in extent.items() if k not in (query, qk)))
    chunk = max(1, min(extent[query], max_elements // per_query))
    cpu = {k: v.cpu() for k, v in tensors.items()}  # differentiable: autograd flows through
    scans = [eq for eq in c.equations if is_scan(eq)]
    for eq in scans:  # per-position prefix sums: tensors over their indices, read like inputs
        cpu[eq.name] = _prefix_sum(eq, axes, extent, cpu, params, dtype)
    states = [eq for eq in c.equations if is_recurrence(eq)]
    for eq in states:  # state recurrences, token by token: tensors over their indices
        start = (initial_state or {}).get(eq.name)
        cpu[eq.name] = _recurrence(c, eq, axes, extent, cpu, params, dtype,
                                   None if start is None else start.cpu())
    outs: dict[str, list[Tensor]] = {o: [] for o in c.outputs}
    for start in range(0, extent[query], chunk):
        ranges = {k: torch.arange(v) for k, v in extent.items()}
        ranges[query] = torch.arange(start, min(start + chunk, extent[query]))
        inter: dict[str, tuple[tuple[str, ...], Tensor]] = {}
        ctx = _Ctx(axes, ranges, cpu, params, key, dtype, inter)
        ctx.captured = frozenset([t.name for t in c.tensors if t.kind == "captured"] +
                                 [eq.name for eq in scans + states])
        if c.mask is not None:
            ctx.mask = _eval(c.mask.expr, ctx)
        for eq in c.equations:
            if is_scan(eq) or is_recurrence(eq):
                continue
            inter[eq.name] = (eq.indices, _eval_equation(eq, ctx))
        for o in c.outputs:
            lhs, value = inter[o]
            outs[o].append(_compact(value, lhs, axes, ranges))
    qpos = {o: c.equation(o).indices.index(query) if query in c.equation(o).indices else None
            for o in c.outputs}
    if extent[query] == 0:  # no query rows: empty outputs of the right shapes
        return {o: torch.zeros([extent[i] for i in c.equation(o).indices], dtype=dtype)
                for o in c.outputs}
    return {o: torch.cat(v, dim=qpos[o]) if qpos[o] is not None else v[0]
            for o, v in outs.items()}


def _prefix_sum(eq: Equation, axes: list[str], extent: dict[str, int],
                tensors: Mapping[str, Tensor], params: Mapping[str, float | int],
                dtype: torch.dtype) -> Tensor:
    """``G[..., n] = cumsum(n) body``: the body over its indices, then torch.cumsum along n
    (exclusive: shifted by one position, G[0] = 0).  No mask applies: a prefix sum is of
    per-position values, the mask restricts (query, key) pairs."""
    idx, exclusive = eq.expr.arg
    ranges = {k: torch.arange(v) for k, v in extent.items()}
    ctx = _Ctx(axes, ranges, tensors, params, None, dtype, {})
    value = _eval_equation(Equation(eq.name, eq.indices, eq.expr.src[0]), ctx)
    axis = axes.index(idx)
    total = torch.cumsum(value, dim=axis)
    if exclusive and total.shape[axis]:
        total = torch.cat([torch.zeros_like(total.narrow(axis, 0, 1)),
                           total.narrow(axis, 0, max(total.shape[axis] - 1, 0))], dim=axis)
    return _compact(total, eq.indices, axes, ranges)


PREVIOUS = "__previous"  # the previous state inside a recurrence (no user name starts with __)


def _recurrence(c: Cascade, eq: Equation, axes: list[str], extent: dict[str, int],
                tensors: Mapping[str, Tensor], params: Mapping[str, float | int],
                dtype: torch.dtype, start: Tensor | None) -> Tensor:
    """``S[..., n, ...] = recur(n) body``, exactly as written: for n = 0, 1, ... the body
    with its reads ``S[..., n - 1, ...]`` bound to the previous state (``start``, else 0,
    before the first position), laid out over the state's indices.  The equations the body
    reads are evaluated at each position.  Differentiable (autograd through the steps)."""
    idx = eq.expr.arg
    slot = eq.indices.index(idx)
    body = eq.expr.src[0].replace(
        lambda node: Expr(Op.LOAD, node.src[:slot] + node.src[slot + 1:], PREVIOUS,
                          node.dtype) if node.op is Op.LOAD and node.arg == eq.name else None)
    dims = [extent[i] for i in eq.indices if i != idx]
    prev = torch.zeros(dims, dtype=dtype) if start is None else start.to(dtype)
    if tuple(prev.shape) != tuple(dims):
        raise EagerError(f"the initial state of {eq.name} must have shape {tuple(dims)} (its "
                         f"indices without {idx!r}), got {tuple(prev.shape)}")
    needed = [e for e in c.equations if e.name in _reads(c, eq) and not is_scan(e)]
    steps = []
    for t in range(extent[idx]):
        ranges = {k: torch.arange(v) for k, v in extent.items()}
        ranges[idx] = torch.arange(t, t + 1)
        inter: dict[str, tuple[tuple[str, ...], Tensor]] = {}
        ctx = _Ctx(axes, ranges, {**tensors, PREVIOUS: prev}, params, None, dtype, inter)
        for dep in needed:
            inter[dep.name] = (dep.indices, _eval_equation(dep, ctx))
        value = _eval_equation(Equation(eq.name, eq.indices, body), ctx)
        prev = _compact(value, eq.indices, axes, ranges).squeeze(slot)
        steps.append(prev)
    if not steps:
        return torch.zeros(dims[:slot] + [0] + dims[slot:], dtype=dtype)
    return torch.stack(steps, dim=slot)


def _reads(c: Cascade, eq: Equation) -> set[str]:
    """The equations ``eq`` reads, directly or through others (itself excluded)."""
    eqs = {e.name: e for e in c.equations}
    seen: set[str] = set()
    stack = [x.arg for x in eq.expr.walk() if x.op is Op.LOAD and x.arg != eq.name]
    while stack:
        name = stack.pop()
        if name in eqs and name not in seen:
            seen.add(name)
            stack.extend(x.arg for x in eqs[name].expr.walk() if x.op is Op.LOAD)
    return seen


def _eval_equation(eq: Equation, ctx: _Ctx) -> Tensor:
    value = _eval(eq.expr, ctx)
    shape = [ctx.ranges[a].numel() if a in eq.indices else 1 for a in ctx.axes]
    return value.expand(torch.broadcast_shapes(value.shape, tuple(shape)))


def _compact(value: Tensor, lhs: tuple[str, ...], axes: list[str],
             ranges: dict[str, Tensor]) -> Tensor:
    full = [ranges[a].numel() if a in lhs else 1 for a in axes]
    v = value.expand(full).reshape([ranges[a].numel() for a in axes if a in lhs])
    present = [a for a in axes if a in lhs]
    return v.permute([present.index(name) for name in lhs]).contiguous()


def eval_expr(e: Expr, axes: list[str], ranges: Mapping[str, Tensor],
              tensors: Mapping[str, Tensor], params: Mapping[str, float | int] | None = None,
              dtype: torch.dtype = torch.float64) -> Tensor:
    """Evaluate one expression over given index ranges (a broadcast tensor over ``axes``)."""
    ctx = _Ctx(list(axes), dict(ranges), tensors, dict(params or {}), None, dtype, {})
    return _eval(e, ctx)
