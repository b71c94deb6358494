"""Running a cascade in its linear form (the ``linearise`` pass's decision).

1. :func:`scan_inputs`: the per-position prefix sums (``cumsum``) the ``materialise-scans``
   pass turned into captured tensors, computed in torch (float32; float64 for float64 inputs):
   O(L) work before the kernel.
2. :func:`features`: per output, the query / key / value features and the gate, evaluated
   element-wise over (b, h, position, e|f) from the expressions the pass extracted (GQA reads
   such as ``K[b, h // G, n, e]`` come out per query head).  The gate is evaluated at
   positions -1..L-1: g(-1) is the reference point of an initial state (a prefix sum is 0
   before the sequence, its empty sum).
3. The kernels (:mod:`attndsl.runtime.linear_kernels`): chunked for prefill, recurrent for
   decode, with initial and final states, so segments chain.

Gradients: the chunked Triton backward (:func:`chunked_backward`: dq, dk, dv and the initial
state's gradient by kernel, the gate's from them) gives the features' gradients; torch's
autograd carries them through the feature evaluation and the prefix sums to Q, K, V and the
captured gates.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from attndsl.ir.cascade import Cascade, Equation
from attndsl.ir.evaluate import Env, EvaluationError, apply, safe_div
from attndsl.ir.expr import Expr, render
from attndsl.passes.linear import LinearOutput
from attndsl.passes.scans import scan_equations
from attndsl.runtime.checks import AttentionError, check_initial_states, check_state

Tensor = torch.Tensor
AUTO = "auto"  # chunk size chosen by qk dim (linear_kernels.default_chunk)
BACKWARD_CHUNK = 64  # the backward's chunk (its kernels split E and F: any size is exact)
HALF = (torch.float16, torch.bfloat16)  # operand dtypes of the tensor-core products besides fp32


def _dtype_of(tensors: Mapping[str, Tensor]) -> torch.dtype:
    floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
    return torch.float64 if torch.float64 in floats else torch.float32


def operand_dtype(c: Cascade, tensors: Mapping[str, Tensor]) -> torch.dtype:
    """The dtype the kernels' tensor-core products take their operands in: the cascade's
    inputs' when they are all fp16 or all bf16 (the features, evaluated in fp32, are rounded
    to it, as a hand-written kernel reads its inputs), else fp32."""
    dtypes = {tensors[d.name].dtype for d in c.tensors
              if d.kind == "input" and d.name in tensors and tensors[d.name].is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 and dtypes <= set(HALF) else torch.float32


def _sizes(c: Cascade, tensors: Mapping[str, Tensor], params: Mapping[str, Any]
           ) -> dict[str, int]:
    """Every extent's size: from the bound tensors' shapes, else an integer parameter."""
    sizes = {k: int(v) for k, v in params.items() if isinstance(v, int)}
    for decl in c.tensors:
        if decl.name in tensors:
            sizes.update(zip(decl.dims, (int(s) for s in tensors[decl.name].shape)))
    return sizes


def _extents(c: Cascade, tensors: Mapping[str, Tensor], params: Mapping[str, Any]
             ) -> dict[str, int]:
    """The size of each index (1 for an extent nothing binds)."""
    sizes = _sizes(c, tensors, params)
    return {i.name: sizes.get(i.extent, 1) for i in c.indices}


def _with_extents(c: Cascade, tensors: Mapping[str, Tensor], params: Mapping[str, Any]
                  ) -> dict[str, Any]:
    """The parameters plus the extents (an extent is a value in expressions, ``/ H``)."""
    return {**_sizes(c, tensors, params), **params}


class _Wrapping(Env):
    """torch's rule for captured tensors (as the kernels and the oracle): a subscript in
    [-size, size), negatives wrap."""

    def check_subscripts(self, node: Expr, idx: list[Tensor], t: Tensor) -> None:
        for d, i in enumerate(idx):
            if i.numel() and (int(i.min()) < -t.shape[d] or int(i.max()) >= t.shape[d]):
                raise EvaluationError(f"{node.arg}: index {d} ranges over [{int(i.min())}, "
                                      f"{int(i.max())}], outside its size {t.shape[d]}")


def _over(e: Expr, c: Cascade, tensors: Mapping[str, Tensor], params: Mapping[str, Any],
          keep: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
    """``e`` evaluated with the indices in ``keep`` ranging over their given values (the
    others at 0), laid out in the order of ``keep``."""
    axes = [i.name for i in c.indices]
    ranges = {a: keep.get(a, torch.zeros(1, dtype=torch.long)) for a in axes}
    env = _Wrapping(axes, ranges, tensors, dict(params), dtype)
    memo: dict[Expr, Tensor] = {}
    for node in e.walk():
        memo[node] = apply(node, [memo[s] for s in node.src], env)
    value = memo[e]
    value = value.to(dtype).expand([ranges[a].numel() for a in axes])
    order = [a for a in axes if a in keep]
    value = value.reshape([ranges[a].numel() for a in axes if a in keep]) if order else value
    return value.permute([order.index(a) for a in keep]).contiguous()


def scan_inputs(c: Cascade, tensors: Mapping[str, Tensor],
                params: Mapping[str, Any]) -> dict[str, Tensor]:
    """The prefix sums of ``c`` (its original form, with scan equations) as tensors."""
    out: dict[str, Tensor] = {}
    dtype = _dtype_of(tensors)
    extent = _extents(c, tensors, params)
    params = _with_extents(c, tensors, params)
    for eq in scan_equations(c):
        out[eq.name] = _prefix_sum(eq, c, tensors, params, extent, dtype)
    return out


def _prefix_sum(eq: Equation, c: Cascade, tensors: Mapping[str, Tensor],
                params: Mapping[str, Any], extent: dict[str, int], dtype: torch.dtype) -> Tensor:
    idx, exclusive = eq.expr.arg
    keep = {i: torch.arange(extent[i]) for i in eq.indices}
    body = _over(eq.expr.src[0], c, tensors, params, keep, dtype)
    axis = eq.indices.index(idx)
    total = torch.cumsum(body, dim=axis)
    if exclusive and total.shape[axis]:  # shifted by one position: the first is the empty sum 0
        total = torch.cat([torch.zeros_like(total.narrow(axis, 0, 1)),
                           total.narrow(axis, 0, max(total.shape[axis] - 1, 0))], dim=axis)
    return total


def features(out: LinearOutput, c: Cascade, tensors: Mapping[str, Tensor],
             params: Mapping[str, Any], scans: tuple[str, ...] = ()
             ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(q [B, H, L, E], k [B, H, L, E], v [B, H, L, F], g [B, H, L + 1(, E)] or None) of one
    output; L is the query length (the state runs over positions of one sequence).  ``c``
    is the cascade the kernels see; ``scans`` names its tensors that are prefix sums."""
    dtype = _dtype_of(tensors)
    roles = {r: c.role(r) for r in ("batch", "head", "query", "key", "qk", "v")}
    extent = _extents(c, tensors, params)
    params = _with_extents(c, tensors, params)
    length = extent[roles["query"]]

    def grid(pos: str, inner: str | None, start: int = 0) -> dict[str, Tensor]:
        axes = {}
        for r in ("batch", "head"):
            if roles[r] is not None:
                axes[roles[r]] = torch.arange(extent[roles[r]])
        axes[pos] = torch.arange(start, length)
        if inner is not None:
            axes[inner] = torch.arange(extent[inner])
        return axes

    def shaped(t: Tensor, inner: bool) -> Tensor:
        """[B, H, L, X] from the evaluated layout (batch, head where declared)."""
        for axis, r in enumerate(("batch", "head")):
            if roles[r] is None:
                t = t.unsqueeze(axis)
        return t if inner else t.unsqueeze(-1)

    qk, fv = roles["qk"], roles["v"]
    q = shaped(_over(out.query, c, tensors, params, grid(roles["query"], qk), dtype), bool(qk))
    k = shaped(_over(out.key, c, tensors, params, grid(roles["key"], qk), dtype), bool(qk))
    v = shaped(_over(out.value, c, tensors, params, grid(roles["key"], fv), dtype), True)
    if out.normalised:
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    g = None
    if out.gate is not None:
        inner = qk if out.vector_gate else None
        padded = {**tensors, **_before_start(c, tensors, scans)}
        g = shaped(_over(out.gate, c, padded, params, grid(roles["key"], inner, -1), dtype),
                   out.vector_gate)
        g = g if out.vector_gate else g.squeeze(-1)
        _check_gate(out, g)
    return q, k, v, g


def _check_gate(out: LinearOutput, g: Tensor) -> None:
    """Refuse a gate g [B, H, L + 1(, E)] (positions -1..L-1) that is not finite: the
    kernels read the decay as exp(g(m) - g(n)), and once g is -inf (a decay of exactly 0,
    e.g. a gate logit of -inf under log(sigmoid(.))) every later pair is exp(-inf + inf) =
    NaN -- as the cascade itself is (the oracle evaluates it so); the zero decay's meaning,
    the state forgotten there, is not in a cumulative g.  O(B H L), one check per run."""
    bad = ~torch.isfinite(g)
    if g.device.type == "meta" or not bool(bad.any()):
        return
    at = [int(i) for i in bad.nonzero()[0]]
    at[2] -= 1  # g's first column is position -1
    raise AttentionError(
        f"output {out.name}: the gate g = {render(out.gate)} of its decay exp(g(m) - g(n)) is "
        f"{float(g[tuple(bad.nonzero()[0])])} at (batch, head, position"
        f"{', qk' if out.vector_gate else ''}) = {tuple(at)}; it must be finite (a decay of "
        f"exactly 0 makes exp(g(m) - g(n)) NaN for every later pair).  Clamp the gate logits "
        f"(log(sigmoid(-80)) = -80 forgets as well), or end the sequence there and start "
        f"the next segment with initial_state zeros")


def _before_start(c: Cascade, tensors: Mapping[str, Tensor],
                  scans: tuple[str, ...]) -> dict[str, Tensor]:
    """Prefix sums read at position -1: a negative subscript of a captured tensor wraps, so
    each scan gets a trailing 0 (its empty sum) along its position dimension (the one of the
    key extent), which position -1 then reads."""
    extent = c.index(c.role("key")).extent
    out = {}
    for name in scans:
        axis = c.tensor(name).dims.index(extent)
        t = tensors[name]
        pad = list(t.shape)
        pad[axis] = 1
        out[name] = torch.cat([t, t.new_zeros(pad)], dim=axis)
    return out


def _interpreting() -> bool:
    """True when Triton kernels run in its interpreter (TRITON_INTERPRET, as attndsl sets it
    on a machine without CUDA)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")


class _Linear(torch.autograd.Function):
    """Forward and backward: the Triton kernels (:func:`chunked_backward`)."""

    @staticmethod
    def forward(ctx: Any, chunk: int | None, operand: torch.dtype, q: Tensor, k: Tensor,
                v: Tensor, g: Tensor | None, s0: Tensor | None) -> tuple[Tensor, Tensor]:
        from attndsl.runtime.linear_kernels import default_chunk, launch

        chunk = default_chunk(q.shape[-1]) if chunk == AUTO else chunk
        ctx.operand = operand
        ctx.save_for_backward(q, k, v, g, s0)
        o, st, _ = launch(*_kernel_inputs(operand, q, k, v, g, s0), chunk=chunk,
                          vector=g is not None and g.dim() == 3)
        return o.to(q.dtype), st.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, do: Tensor, dst: Tensor) -> tuple:
        q, k, v, g, s0 = ctx.saved_tensors
        grads = chunked_backward(q, k, v, g, s0, do, dst, operand=ctx.operand)
        return (None, None, *(None if x is None else dx.to(x.dtype)
                              for x, dx in zip((q, k, v, g, s0), grads)))


def _kernel_inputs(operand: torch.dtype, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None,
                   s0: Tensor | None) -> list[Tensor | None]:
    """Contiguous features in the operand dtype; the gate and the initial state in fp32.

    Under Triton's interpreter bf16 features go in as their exact fp32 values: the
    interpreter (3.9) keeps bf16 as raw uint16 bits and multiplies the bits in ``tl.dot`` and
    arithmetic, so only the rounding of the features is seen on the CPU (fp16 runs as fp16
    there, casts inside the kernels included)."""
    feats = [t.detach().to(operand) for t in (q, k, v)]
    if operand == torch.bfloat16 and _interpreting():
        feats = [t.float() for t in feats]
    feats = [t.contiguous() for t in feats]
    return feats + [None if t is None else t.detach().float().contiguous() for t in (g, s0)]


def chunked_backward(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, s0: Tensor | None,
                     do: Tensor, dst: Tensor, chunk: int = BACKWARD_CHUNK,
                     operand: torch.dtype = torch.float32) -> tuple[Tensor | None, ...]:
    """dq, dk, dv, dg, ds0 of the linear form (fp32), by the chunked Triton backward.

    The gate's gradient needs no kernel of its own: every term of o(m) carries
    exp(g(m) - .) and every term holding k(n) carries exp(. - g(n)), so per position p (and
    key dim e) dg(p) = q(p) dq(p) - k(p) dk(p); the final state adds dS_T . S_T at p = L - 1
    (its terms all carry exp(g(L-1) - .)) and the initial state's terms give
    dg(-1) = -S0 . dS0 (summed over e and f for a scalar gate, over f for a vector one).
    ``operand``: the dtype of the kernels' tensor-core operands (the features are rounded to
    it, and the gate's gradient is formed from the rounded features the kernels saw)."""
    from attndsl.runtime.linear_kernels import launch, launch_backward

    vector = g is not None and g.dim() == 3
    ins = _kernel_inputs(operand, q, k, v, g, s0)
    _, st, states = launch(*ins, chunk=chunk, vector=vector, save_states=True)
    dq, dk, dv, ds0 = launch_backward(ins[0], ins[1], ins[2], ins[3], states, do, dst, chunk,
                                      vector)
    f32 = [t.float() for t in ins[:3]] + ins[3:]
    dg = None
    if g is not None:
        per_e = f32[0] * dq - f32[1] * dk                                  # [BH, L, E]
        final = (dst.float() * st).sum(-1)                                 # [BH, E]
        start = -(f32[4] * ds0).sum(-1) if s0 is not None else torch.zeros_like(final)
        dg = torch.cat([start[:, None], per_e], 1)
        dg[:, -1] += final
        if not vector:
            dg = dg.sum(-1)
    return dq, dk, dv, dg, (ds0 if s0 is not None else None)


def check_chunk(chunk: int | str | None) -> None:
    """A chunk is a power of two >= 16, ``AUTO`` or None (the recurrent kernel)."""
    if chunk not in (None, AUTO) and (not isinstance(chunk, int) or isinstance(chunk, bool)
                                      or chunk < 16 or chunk & (chunk - 1)):
        raise AttentionError(f"chunk must be a power of two >= 16, 'auto' (by qk dim) or "
                             f"None (the recurrent kernel), got {chunk!r}")


class Flat(NamedTuple):
    """One output's features as the kernels take them: q, k [BH, L, E], v [BH, L, F(+1)],
    g [BH, L + 1(, E)] or None (positions -1..L-1), the (B, H) to restore and the operand
    dtype of the kernels' products (:func:`operand_dtype`)."""

    q: Tensor
    k: Tensor
    v: Tensor
    g: Tensor | None
    batch: int
    heads: int
    operand: torch.dtype = torch.float32


def flat_features(out: LinearOutput, c: Cascade, tensors: Mapping[str, Tensor],
                  params: Mapping[str, Any], scans: tuple[str, ...] = ()) -> Flat:
    """:func:`features` with (batch, head) flattened into the kernels' rows."""
    q, k, v, g = features(out, c, tensors, params, scans)
    b, h = q.shape[:2]
    flat = [t.reshape(b * h, *t.shape[2:]) for t in (q, k, v)]
    return Flat(*flat, None if g is None else g.reshape(b * h, *g.shape[2:]), b, h,
                operand_dtype(c, tensors))


def run_chunked(chunk: int | str | None, f: Flat, s0: Tensor | None
                ) -> tuple[Tensor, Tensor]:
    """(o [BH, L, F(+1)], final state [BH, E, F(+1)]) from the initial state ``s0``
    [BH, E, F(+1)] or None (zeros); differentiable (the Triton backward)."""
    return _Linear.apply(chunk, f.operand, f.q, f.k, f.v, f.g, s0)


def finish(out: LinearOutput, c: Cascade, f: Flat, o: Tensor) -> Tensor:
    """The output in the cascade's own layout from the kernel's rows (divided by the
    normaliser's column when there is one)."""
    o = o.reshape(f.batch, f.heads, o.shape[1], o.shape[-1])
    if out.normalised:
        o = safe_div(o[..., :-1], o[..., -1:])
    for axis, r in ((1, "head"), (0, "batch")):  # the output's own layout
        if c.role(r) is None:
            o = o.squeeze(axis)
    return o


def run_linear(outputs: tuple[LinearOutput, ...], c: Cascade, tensors: Mapping[str, Tensor],
               params: Mapping[str, Any], initial: Mapping[str, Tensor] | None = None,
               chunk: int | str | None = AUTO, scans: tuple[str, ...] = ()
               ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Every output and its final state ([B, H, E, F(+1)]) by name; ``initial`` gives the
    states to start from (a previous segment's final states); ``chunk=None`` runs the
    recurrent kernel (decode)."""
    results, states = {}, {}
    initial = check_initial_states(initial, tuple(out.name for out in outputs))
    for out in outputs:
        f = flat_features(out, c, tensors, params, scans)
        e, width = f.q.shape[-1], f.v.shape[-1]
        s0 = None if out.name not in initial else check_state(
            out.name, initial[out.name], (f.batch, f.heads, e, width),
            f.q.device).reshape(f.q.shape[0], e, width)
        o, st = run_chunked(chunk, f, s0)
        results[out.name] = finish(out, c, f, o)
        states[out.name] = st.reshape(f.batch, f.heads, e, width)
    return results, states
