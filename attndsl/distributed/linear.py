"""Linear attention across ranks (LASP-2, Sun et al. 2025): one all-gather of chunk states.

Rank r holds the r-th consecutive piece of the sequence (the contiguous layout only: the
state recurrence runs along positions, so a rank's initial state is the state at the end of
the ranks before it; other layouts would interleave the recurrence across ranks).  With
g the gate of the linear form (positions counted from 0 in each shard, as Kernel.linear's
segments: decays are relative) and, per rank j,

    S_j = sum_{n in shard j} exp(g(last_j) - g(n)) k(n) (x) v(n)   (the state from zero)
    d_j = g(last_j) - g(-1)                                          (its total log decay)

(d_j is a scalar per (batch, head) for scalar gates -- the sum of the per-position log
decays over the shard -- a vector over the key dims for GLA's gates, 0 without a gate), the
state entering rank r is

    S0_r = sum_{j < r} exp(sum_{j < i < r} d_i) S_j

(row-wise per key dim for a vector gate; a normaliser z rides along as the state's last
column).  Each rank computes (S_j, d_j) and its outputs from a zero state with one kernel
pass over its shard, ONE all-gather of both packed together gives every rank all of them,
and since the state is linear in its initial value the rank adds S0_r's share of each row,
(q(m) exp(g(m) - g(-1))) . S0_r, a dense product: no second kernel pass.

Backward: autograd through the combination and the all-gather, whose adjoint sums every
rank's gradient of the gathered states and hands rank j the part for its own (S_j, d_j)
(an all-reduce then a slice: gloo has no reduce-scatter); the linear kernels' backward
carries it on to q, k, v and the gate, so gradients equal the single-process ones.
Captured tensors without a position dimension (retention's per-head decay logit) are the
same on every rank; their gradients are summed over the ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from attndsl.distributed.agree import dtype_code, refuse_unequal, settle
from attndsl.distributed.api import process_group
from attndsl.distributed.ring import Replicated
from attndsl.ir.cascade import Cascade
from attndsl.ir.expr import Expr, Op
from attndsl.passes.linear import LinearOutput
from attndsl.runtime.checks import AttentionError
from attndsl.runtime.linear import AUTO, Flat, check_chunk, finish, flat_features, run_chunked

Tensor = torch.Tensor


class _AllGather(torch.autograd.Function):
    """[W, N] from every rank's [N]; backward: the sum over ranks of the gradient, row
    ``rank`` (the gathered copy of rank j's tensor feeds every rank's graph)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any, rank: int, world: int) -> Tensor:
        ctx.group, ctx.rank = group, rank
        every = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(every, x.contiguous(), group=group)
        return torch.stack(every)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None, None, None


def combine_states(states: Tensor, log_decays: Tensor, rank: int) -> Tensor:
    """S0_r = sum_{j < r} exp(sum_{j < i < r} d_i) S_j from every rank's states
    [W, BH, E, F] and total log decays [W, BH] (scalar gates) or [W, BH, E] (vector gates).

    Every rank's entry is used (with weight 0 for j >= r), so the all-gather's backward runs
    on every rank; the exponents are summed in float64 (a difference of prefix sums over
    ranks would otherwise cancel for long shards)."""
    world = states.shape[0]
    d = log_decays.double()
    suffix = d.flip(0).cumsum(0).flip(0)  # suffix[j] = sum_{i >= j} d_i
    exponent = suffix - d - suffix[rank]  # sum_{j < i < r} d_i for j < r
    before = (torch.arange(world, device=d.device) < rank).view(-1, *[1] * (d.dim() - 1))
    weights = torch.exp(torch.where(before, exponent, float("-inf"))).to(states.dtype)
    weights = weights.view(*weights.shape, *[1] * (states.dim() - weights.dim()))
    return (weights * states).sum(0)


def _position_uses(e: Expr, p: str) -> list[Expr]:
    """The uses of index ``p`` in ``e`` other than a plain subscript of a tensor read."""
    uses = []
    if e.op is Op.INDEX and e.arg == p:
        return [e]
    for s in e.src:
        if not (e.op is Op.LOAD and s.op is Op.INDEX):
            uses += _position_uses(s, p)
    return uses


def _affine(e: Expr, p: str) -> bool:
    """``e`` is a + b p with a, b free of the position value (a shift of every position by a
    constant then moves g by a constant, which the decay's difference cancels)."""
    if not _position_uses(e, p) or (e.op is Op.INDEX and e.arg == p):
        return True
    if e.op in (Op.ADD, Op.SUB) or e.op is Op.NEG:
        return all(_affine(s, p) for s in e.src)
    if e.op in (Op.MUL, Op.DIV):
        varying = [s for s in e.src if _position_uses(s, p)]
        return len(varying) == 1 and _affine(varying[0], p) and \
            (e.op is Op.MUL or varying[0] is e.src[0])
    return False


def _check_shardable(c: Cascade, out: LinearOutput) -> None:
    """Shards count positions from 0: the features must not read the position as a value
    and the gate may be affine in it; a shifted read (``K[b, h, n - 1, e]``) would cross
    into another rank's shard."""
    for what, e, p in (("query feature", out.query, c.role("query")),
                       ("key feature", out.key, c.role("key")),
                       ("value feature", out.value, c.role("key"))):
        if p is not None and _position_uses(e, p):
            raise AttentionError(f"{c.name}: output {out.name}'s {what} uses the position "
                                 f"{p} as a value or a shifted subscript; context-parallel "
                                 f"linear attention counts positions from 0 in each shard")
    p = c.role("key")
    if out.gate is not None and p is not None and not _affine(out.gate, p):
        raise AttentionError(f"{c.name}: output {out.name}'s gate is not a prefix sum or "
                             f"affine in the position {p}; context-parallel linear attention "
                             f"counts positions from 0 in each shard")


def _log_decay(f: Flat) -> Tensor:
    """g(last) - g(-1) per row ([BH] or [BH, E]); 0 without a gate."""
    if f.g is None:
        return f.q.new_zeros(f.q.shape[0])
    return f.g[:, -1] - f.g[:, 0]


def _from_initial(f: Flat, s0: Tensor) -> Tensor:
    """The initial state's share of every output row, (q(m) exp(g(m) - g(-1))) . S0: the
    kernel's state S(m) is linear in its initial state, so this added to the shard's run
    from zero equals its run from S0 (one kernel pass, as LASP-2's inter-rank term)."""
    q = f.q
    if f.g is not None:
        decay = torch.exp(f.g[:, 1:] - f.g[:, :1])  # [BH, L] or [BH, L, E]
        q = q * (decay if decay.dim() == 3 else decay.unsqueeze(-1))
    return q @ s0.to(q.dtype)


def _replicated(c: Cascade, captured: dict[str, Tensor], group: Any) -> dict[str, Tensor]:
    """Captured tensors without the position extent: gradients summed over the ranks."""
    extent = c.index(c.role("key")).extent
    out = dict(captured)
    for decl in c.tensors:
        t = captured.get(decl.name)
        if t is not None and extent not in decl.dims and t.is_floating_point():
            out[decl.name] = Replicated.apply(t, group)
    return out


def context_parallel_linear(kernel: Any, inputs: dict[str, Tensor],
                            params: dict | None = None,
                            captured: dict[str, Tensor] | None = None, *, group: Any = None,
                            layout: str = "contiguous", chunk: int | str = AUTO
                            ) -> dict[str, Tensor]:
    """The chunked linear form of ``kernel`` (an :class:`attndsl.Kernel`) over a sequence
    sharded across ``group`` in the contiguous layout: ``inputs`` and the per-position
    captured tensors (gate logits) are this rank's consecutive piece (any lengths, even
    none); other captured tensors are the same on every rank.  Returns this rank's rows of
    every output by name.  Differentiable (see the module docstring)."""
    group = process_group(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    try:  # every rank-local refusal before any communication, then agreed by every rank
        c, runs = _local_runs(kernel, inputs, params, captured, group, layout, chunk)
        packed = torch.cat([t.flatten() for *_, st, d in runs for t in (st, d)])
        error = None
    except Exception as err:  # noqa: BLE001 - re-raised on every rank by settle
        packed, error = None, err
    facts = [0, -1] if packed is None else [packed.numel(), dtype_code(packed.dtype)]
    refuse_unequal(settle(group, error, facts), ("state size", "dtype"),
                   "every rank must hold the same batch, heads and feature dims (and dtype)")
    every = _AllGather.apply(packed, group, rank, world)  # one collective for every output
    results, at = {}, 0
    for out, f, o, local, decay in runs:
        states = every[:, at:at + local.numel()].view(world, *local.shape)
        at += local.numel()
        decays = every[:, at:at + decay.numel()].view(world, *decay.shape)
        at += decay.numel()
        o = o + _from_initial(f, combine_states(states, decays, rank))
        results[out.name] = finish(out, c, f, o)
    return results


def _local_runs(kernel: Any, inputs: dict[str, Tensor], params: dict | None,
                captured: dict[str, Tensor] | None, group: Any, layout: str,
                chunk: int | str) -> tuple[Cascade, list[tuple]]:
    """This rank's checks and its kernel pass from a zero state: the cascade the kernels
    read and, per output, (output, features, O from zero, state S_j, log decay d_j)."""
    if layout != "contiguous":
        raise AttentionError(f"context-parallel linear attention needs the contiguous layout "
                             f"(the state runs along positions, rank r after rank r - 1), "
                             f"got {layout!r}")
    check_chunk(chunk)
    shared = _replicated(kernel.compiled.cascade, {**kernel.captured, **(captured or {})},
                         group)
    setup = kernel.linear_setup(inputs, params, shared)
    c, tensors = setup.cascade, setup.tensors
    for out in setup.outputs:
        _check_shardable(c, out)
    runs = []
    for out in setup.outputs:
        f = flat_features(out, c, tensors, setup.params, setup.scans)
        o, local = run_chunked(chunk, f, None)
        runs.append((out, f, o, local, _log_decay(f).to(local.dtype)))
    return c, runs
