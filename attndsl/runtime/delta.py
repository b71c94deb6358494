"""Running a state recurrence in its delta-rule form (the ``delta-rule`` pass's decision).

1. :func:`delta_features`: the features the pass extracted (q per output, k, u, the erase
   coefficient c and the log decay log a), evaluated over (b, h, position, e | f) in torch
   (fp32; float64 for float64 inputs), differentiably, after the prefix sums.
2. The kernels (:mod:`attndsl.runtime.delta_kernels`): chunked (UT transform) for prefill,
   recurrent for decode, with initial and final states and per-sequence lengths, so
   segments chain: ``run_delta(..., initial_state=final)`` continues a sequence.
3. Gradients: the forward runs the Triton kernel; the backward recomputes the same chunked
   form in torch (:func:`chunked_reference`: ``solve_triangular`` for T, one chunk at a time;
   :func:`recurrent_reference` for a recurrence without a chunked form) and differentiates
   it with autograd.  Not a Triton backward: exact, O(L C) work, but it
   keeps each chunk's intermediates for autograd.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import triton

from attndsl.ir.cascade import Cascade
from attndsl.ir.evaluate import Env, apply
from attndsl.ir.expr import Expr, Op
from attndsl.passes.delta import DeltaDecision, DeltaRule
from attndsl.runtime.checks import AttentionError, check_initial_states, check_state
from attndsl.runtime.delta_kernels import (
    BF,
    WARPS,
    delta_chunked_kernel,
    delta_recurrent_kernel,
)

Tensor = torch.Tensor
AUTO = "auto"  # the default chunk (DEFAULT_CHUNK)
DEFAULT_CHUNK = 16  # sm90 without spills at E = 64 (runtime/delta_kernels.py); any is exact


# -- features ---------------------------------------------------------------------------------

def _sizes(c: Cascade, tensors: Mapping[str, Tensor], params: Mapping[str, Any]
           ) -> dict[str, int]:
    sizes = {k: int(v) for k, v in params.items() if isinstance(v, int)}
    for decl in c.tensors:
        if decl.name in tensors:
            sizes.update(zip(decl.dims, (int(s) for s in tensors[decl.name].shape)))
    return sizes


def _evaluate(e: Expr, c: Cascade, tensors: Mapping[str, Tensor], params: Mapping[str, Any],
              keep: tuple[str | None, ...], dtype: torch.dtype) -> Tensor:
    """``e`` over the indices ``keep`` (None: a size-1 axis the cascade lacks), each over
    its whole extent; sums over an index by torch (element-wise otherwise)."""
    sizes = _sizes(c, tensors, params)
    axes = [i.name for i in c.indices]
    full = set(keep) | {x.arg for x in e.walk() if x.op is Op.REDUCE_SUM}
    device = next((t.device for t in tensors.values()), torch.device("cpu"))
    ranges = {i.name: torch.arange(sizes.get(i.extent, 1) if i.name in full else 1,
                                   device=device)
              for i in c.indices}  # an index e does not use: one value
    env = Env(axes, ranges, tensors, {**sizes, **params}, dtype)
    memo: dict[Expr, Tensor] = {}
    for node in e.walk():
        if node.op is Op.REDUCE_SUM:
            axis = axes.index(node.arg)
            body = memo[node.src[0]]
            full = list(body.shape)
            full[axis] = ranges[node.arg].numel()
            memo[node] = body.to(dtype).expand(full).sum(axis, keepdim=True)
        else:
            memo[node] = apply(node, [memo[s] for s in node.src], env)
    named = [i for i in keep if i is not None]
    value = memo[e].to(dtype).expand([ranges[a].numel() if a in named else 1 for a in axes])
    value = value.permute([axes.index(i) for i in named] +
                          [k for k, a in enumerate(axes) if a not in named])
    value = value.reshape([ranges[i].numel() for i in named])
    for k, i in enumerate(keep):
        if i is None:
            value = value.unsqueeze(k)
    return value.contiguous()


def _dtype_of(tensors: Mapping[str, Tensor]) -> torch.dtype:
    floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
    return torch.float64 if torch.float64 in floats else torch.float32


def delta_features(rule: DeltaRule, c: Cascade, tensors: Mapping[str, Tensor],
                   params: Mapping[str, Any], log_form: bool) -> dict[str, Any]:
    """q per output [B, H, L, E], k [B, H, L, E], u [B, H, L, F], c [B, H, L] and the
    decay [B, H, L] (None without one): log a when ``log_form`` (the chunked kernels), else
    a; in the cascade's batch and head (size 1 where it has none)."""
    dtype = _dtype_of(tensors)
    b, h, n, m = c.role("batch"), c.role("head"), c.role("key"), c.role("query")
    e, f = rule.indices[-2], rule.indices[-1]

    def at(x: Expr, *inner: str | None, pos: str = n) -> Tensor:
        return _evaluate(x, c, tensors, params, (b, h, pos, *inner), dtype)

    key = at(rule.key, e)
    return {"q": {name: at(q, e, pos=m) for name, q in rule.outputs}, "k": key,
            "u": at(rule.value, f),
            "c": at(rule.erase) if rule.erase is not None else key.new_zeros(key.shape[:3]),
            "decay": None if rule.decay is None else at(rule.log_decay if log_form
                                                         else rule.decay)}


# -- the kernels ------------------------------------------------------------------------------

def check_chunk(chunk: int | str | None) -> None:
    """``chunk``: ``"auto"``, None (the recurrent kernel) or a power of two >= 16."""
    if chunk in (AUTO, None):
        return
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 16 or \
            chunk & (chunk - 1):
        raise AttentionError(f"chunk must be 'auto', None (recurrent) or a power of two >= 16 "
                             f"(tl.dot's smallest tile), got {chunk!r}")


def _lengths(lengths: Tensor | None, B: int, H: int, L: int, device: torch.device) -> Tensor:
    """Per (batch * head) row lengths, int32, from per-batch ``lengths`` [B] (default L)."""
    if lengths is None:
        return torch.full((B * H,), L, dtype=torch.int32, device=device)
    if not isinstance(lengths, torch.Tensor):
        raise AttentionError(f"lengths must be an integer tensor of shape ({B},) (one per "
                             f"sequence), got {type(lengths).__name__}")
    if lengths.shape != (B,) or lengths.dtype.is_floating_point or lengths.is_complex() or \
            lengths.dtype == torch.bool:
        raise AttentionError(f"lengths must be an integer tensor of shape ({B},) (one per "
                             f"sequence), got {lengths.dtype} of shape {tuple(lengths.shape)}")
    if B and (int(lengths.min()) < 0 or int(lengths.max()) > L):
        raise AttentionError(f"lengths must lie in [0, {L}], got [{int(lengths.min())}, "
                             f"{int(lengths.max())}]")
    return lengths.to(device, torch.int32).repeat_interleave(H)


def launch(q: Tensor, k: Tensor, u: Tensor, ce: Tensor, decay: Tensor | None,
           s0: Tensor | None, lengths: Tensor | None, chunk: int | None, log_form: bool
           ) -> tuple[Tensor, Tensor]:
    """(o [B, H, L, F], final state [B, H, E, F]) by the chunked kernel (``chunk``; the decay
    as log a, ``log_form``) or the recurrent one (None); fp32 (inputs are cast)."""
    if decay is not None and chunk is None and log_form:
        decay = decay.exp()  # the recurrent kernel takes a
    if chunk is not None and decay is not None and not log_form:
        raise AttentionError("the chunked delta kernel needs the decay as log a")
    la = decay
    B, H, L, E = k.shape
    F = u.shape[-1]
    dev = k.device
    f32 = [x.detach().to(torch.float32).contiguous() for x in (q, k, u, ce)]
    la32 = f32[3] if la is None else la.detach().to(torch.float32).contiguous()
    s = f32[3] if s0 is None else s0.detach().to(torch.float32).contiguous()
    out = torch.zeros(B, H, L, F, dtype=torch.float32, device=dev)
    state = torch.zeros(B, H, E, F, dtype=torch.float32, device=dev)
    rows = _lengths(lengths, B, H, L, dev)
    if B * H == 0 or E == 0 or F == 0:  # nothing to compute (an empty state or batch)
        return out, state
    be, bf = max(16, triton.next_power_of_2(E)), BF
    grid = (B * H, triton.cdiv(F, bf))
    args = dict(HAS_DECAY=la is not None, HAS_S0=s0 is not None, BE=be, BF=bf,
                num_warps=WARPS)
    if chunk is None:
        delta_recurrent_kernel[grid](*f32, la32, s, rows, out, state, L, E, F, **args)
    else:
        delta_chunked_kernel[grid](*f32, la32, s, rows, out, state, L, E, F, C=chunk, **args)
    return out, state


def recurrent_reference(q: Tensor, k: Tensor, u: Tensor, ce: Tensor, a: Tensor | None,
                        s0: Tensor | None, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
    """The recurrence one position at a time in torch (differentiable; the backward of a
    recurrence without a chunked form): S = a S + k (u - c S^T k)^T, o = S^T q."""
    B, H, L, E = k.shape
    n = torch.full((B,), L) if lengths is None else lengths.to("cpu")
    S = k.new_zeros(B, H, E, u.shape[-1]) if s0 is None else s0.to(k.dtype)
    outs = []
    for t in range(L):
        live = (t < n).to(k.device)[:, None, None, None]
        ks = torch.einsum("bhe,bhef->bhf", k[:, :, t], S)
        new = S if a is None else S * a[:, :, t, None, None]
        new = new + k[:, :, t, :, None] * (u[:, :, t] - ce[:, :, t, None] * ks)[..., None, :]
        S = torch.where(live, new, S)
        outs.append(torch.einsum("bhe,bhef->bhf", q[:, :, t], S) * live[..., 0])
    return (torch.stack(outs, 2) if outs else u.new_zeros(u.shape)), S


def chunked_reference(q: Tensor, k: Tensor, u: Tensor, ce: Tensor, la: Tensor | None,
                      s0: Tensor | None, lengths: Tensor | None, chunk: int
                      ) -> tuple[Tensor, Tensor]:
    """The chunked form of the kernels in torch (differentiable; the backward's
    recomputation): per chunk T = (I + A)^-1 by ``solve_triangular``, then Delta, O and
    the state as in :mod:`attndsl.runtime.delta_kernels`."""
    B, H, L, E = k.shape
    valid = torch.arange(L, device=k.device)[None, :] < (
        torch.full((B,), L, device=k.device) if lengths is None else lengths.to(k.device)
    )[:, None]
    mask = valid[:, None, :].to(k.dtype)  # [B, 1, L]
    k, u, ce = k * mask[..., None], u * mask[..., None], ce * mask
    la = None if la is None else la * mask
    S = k.new_zeros(B, H, E, u.shape[-1]) if s0 is None else s0.to(k.dtype)
    eye = torch.eye(chunk, dtype=k.dtype, device=k.device)
    strict = torch.tril(torch.ones(chunk, chunk, dtype=torch.bool, device=k.device), -1)
    lower = torch.tril(torch.ones(chunk, chunk, dtype=torch.bool, device=k.device))
    outs = []
    for s in range(0, L, chunk):
        w = min(chunk, L - s)
        pad = (0, 0, 0, chunk - w)
        qc, kc, uc = (torch.nn.functional.pad(x[:, :, s:s + w], pad) for x in (q, k, u))
        cc = torch.nn.functional.pad(ce[:, :, s:s + w], (0, chunk - w))
        lc = (torch.zeros_like(cc) if la is None else
              torch.nn.functional.pad(la[:, :, s:s + w], (0, chunk - w)))
        g = torch.cumsum(lc, -1)
        gx = g - lc
        zero = torch.zeros((), dtype=k.dtype, device=k.device)
        a = torch.where(strict, cc[..., None] * (kc @ kc.transpose(-1, -2)) *
                        torch.exp(torch.where(strict, gx[..., None] - g[..., None, :], zero)),
                        zero)
        tinv = torch.linalg.solve_triangular(eye + a, eye.expand_as(a), upper=False,
                                             unitriangular=True)
        delta = tinv @ (uc - (kc * (cc * torch.exp(gx))[..., None]) @ S)
        p = torch.where(lower, (qc @ kc.transpose(-1, -2)) *
                        torch.exp(torch.where(lower, g[..., None] - g[..., None, :], zero)), zero)
        outs.append(((qc * torch.exp(g)[..., None]) @ S + p @ delta)[:, :, :w])
        g_last = g[..., -1:]
        S = S * torch.exp(g_last)[..., None] + \
            (kc * torch.exp(g_last - g)[..., None]).transpose(-1, -2) @ delta
    o = torch.cat(outs, 2) if outs else u.new_zeros(u.shape)
    return o * mask[..., None], S


class _DeltaFunction(torch.autograd.Function):
    """Forward: the Triton kernel.  Backward: autograd through :func:`chunked_reference`."""

    @staticmethod
    def forward(ctx: Any, chunk: int | None, lengths: Tensor | None, log_form: bool,
                q: Tensor, k: Tensor, u: Tensor, ce: Tensor, decay: Tensor | None,
                s0: Tensor | None) -> tuple[Tensor, Tensor]:
        ctx.chunk, ctx.lengths, ctx.log_form = chunk, lengths, log_form
        ctx.save_for_backward(q, k, u, ce, decay, s0)
        return launch(q, k, u, ce, decay, s0, lengths, chunk, log_form)

    @staticmethod
    def backward(ctx: Any, do: Tensor, dstate: Tensor) -> tuple:
        saved = ctx.saved_tensors
        leaves = [None if x is None else x.detach().to(torch.float32).requires_grad_()
                  for x in saved]
        with torch.enable_grad():
            if ctx.log_form:
                o, st = chunked_reference(*leaves, ctx.lengths, ctx.chunk or DEFAULT_CHUNK)
            else:
                o, st = recurrent_reference(*leaves, ctx.lengths)
            wanted = [x for x in leaves if x is not None]
            got = iter(torch.autograd.grad((o, st), wanted, (do, dstate), allow_unused=True))
        grads = [None if x is None else next(got) for x in leaves]
        grads = [None if g is None or x is None else g.to(x.dtype)
                 for g, x in zip(grads, saved)]
        return (None, None, None, *grads)


def _zero_decay(log_decay: Tensor | None) -> bool:
    """Whether some position's decay is exactly 0 (log a = -inf): the chunked form, which
    sums log a over a chunk, cannot represent it."""
    if log_decay is None or log_decay.device.type == "meta":
        return False
    return bool((log_decay == -math.inf).any())


def run_delta(decision: DeltaDecision, c: Cascade, tensors: Mapping[str, Tensor],
              params: Mapping[str, Any], initial_state: Mapping[str, Tensor] | None = None,
              chunk: int | str | None = AUTO, lengths: Tensor | None = None
              ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Every output by name (in its own layout) and the final state ({state name:
    [B, H, E, F]}, fp32; size 1 for a batch or head index the cascade lacks).  ``c`` is the
    cascade with its prefix sums materialised (``tensors`` holds them)."""
    check_chunk(chunk)
    if decision.form != "chunked" and chunk not in (None, AUTO):
        raise AttentionError(f"{c.name} has no chunked form ({'; '.join(decision.reasons)}); "
                             f"run it with chunk=None (recurrent)")
    step = None if chunk is None or decision.form != "chunked" else (
        DEFAULT_CHUNK if chunk == AUTO else chunk)
    rule = decision.rule
    log_form = decision.form == "chunked"
    feats = delta_features(rule, c, tensors, params, log_form)
    if log_form and _zero_decay(feats["decay"]):
        # the chunked form reads log a; a decay of exactly 0 (log a = -inf, the state forgotten
        # there) makes its cumulative decays -inf - (-inf) = NaN.  The recurrent form applies
        # a itself, token by token as the oracle does: exact, and so is its backward.
        step, log_form = None, False
        feats = delta_features(rule, c, tensors, params, log_form)
    s0 = check_initial_states(initial_state, (rule.state,)).get(rule.state)
    k = feats["k"]
    if s0 is not None:
        s0 = check_state(rule.state, s0, (*k.shape[:2], k.shape[3], feats["u"].shape[3]),
                         k.device)
    first = next(t.name for t in c.tensors if t.kind == "input")
    dtype = tensors[first].dtype if tensors[first].is_floating_point() else torch.float32
    outputs, final = {}, None
    for name, q in feats["q"].items():
        o, final = _DeltaFunction.apply(step, lengths, log_form, q, k, feats["u"],
                                        feats["c"], feats["decay"], s0)
        present = [o.shape[i] for i, r in enumerate(("batch", "head", "query", "v"))
                   if c.role(r) is not None]  # the output's own layout
        outputs[name] = o.to(dtype).reshape(present)
    return outputs, {rule.state: final}
