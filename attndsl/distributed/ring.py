"""Ring attention over a torch.distributed group, forward and backward.

Rank r holds Q, K, V rows at its layout's global positions.  Every rank computes the same
pair matrix (:func:`attndsl.distributed.pairs.pair_classes`) from the layout alone; at ring
step s (1 <= s < W) rank r sends its K/V to rank r + s and receives rank r - s's, *only*
where that pair is not EMPTY (so a sliding window or a document mask moves K/V only to the
ranks that need them; with no empty pair this is the plain ring's W - 1 transfers per rank).
The transfers of step s + 1 are posted (``batch_isend_irecv``) before step s computes, so
communication overlaps compute; at most two K/V shards are held at a time.

Backward: each rank recomputes its pairs with the global O, dO and lse (FA2's backward),
keeps dQ, and sends each pair's dK/dV back to the shard's owner over the same schedule in
reverse; gradients of captured tensors (replicated on every rank) are summed with one
all-reduce.  The same code runs on gloo (CPU) and NCCL (GPU).

A pair's launch may refuse its inputs on one rank only (a captured table read out of bounds
where that rank's queries meet another rank's keys).  Raising there would leave the other
ranks waiting for transfers that never come, so a refusal is held: the rank keeps its part of
every transfer (a refused backward pair returns zero gradients) and after the last one all
ranks agree in one small all-gather (:func:`attndsl.distributed.agree.settle`), each raising
the first refusing rank's error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from attndsl.distributed.additive import AdditivePairs
from attndsl.distributed.agree import settle
from attndsl.distributed.kernels import PairKernels
from attndsl.passes.mask import EMPTY

Tensor = torch.Tensor


def _nothing() -> None:
    """The fallback of a held forward pair: nothing merged."""


@dataclass
class Ring:
    """One context-parallel call: kernels, group, every rank's positions, the pair classes."""

    kernels: PairKernels | AdditivePairs  # the pairs' kernels and their merge
    group: Any
    rank: int
    world: int
    q_positions: list[Tensor]
    k_positions: list[Tensor]
    classes: list[list[int]]
    scale: float
    error: Exception | None = field(default=None, init=False)  # the first held refusal

    def _held(self, fallback: Callable[[], Any], work: Callable[..., Any], *args: Any) -> Any:
        """``work(*args)``, or after a refusal (this one or an earlier one) ``fallback()``: the
        refusal is held until :meth:`_agree`, so this rank still takes part in every
        transfer."""
        if self.error is None:
            try:
                return work(*args)
            except Exception as err:  # noqa: BLE001 - raised on every rank by _agree
                self.error = err
        return fallback()

    def _agree(self) -> None:
        """After the ring: every rank raises the first refusing rank's error, or none does."""
        error, self.error = self.error, None
        settle(self.group, error)

    def needs(self, q_rank: int, k_rank: int) -> bool:
        return self.classes[q_rank][k_rank] != EMPTY

    def _peer(self, rank: int) -> int:
        """The global rank of group rank ``rank`` (P2P ops take global ranks)."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _post(self, step: int, sends: list[Tensor], like: list[Tensor], sizes: list[int]
              ) -> tuple[list[Any], list[Tensor] | None]:
        """Step ``step``'s transfers: ``sends`` to rank r + step if it needs them, buffers
        shaped like ``like`` (sequence length ``sizes[src]``) from rank r - step if we need
        its shard.  Returns the requests and the receive buffers (None: nothing comes)."""
        dst, src = (self.rank + step) % self.world, (self.rank - step) % self.world
        ops, bufs = [], None
        if self.needs(dst, self.rank):
            ops += [dist.P2POp(dist.isend, t.contiguous(), self._peer(dst), self.group)
                    for t in sends]
        if self.needs(self.rank, src):
            bufs = [t.new_empty((*t.shape[:2], sizes[src], *t.shape[3:])) for t in like]
            ops += [dist.P2POp(dist.irecv, b, self._peer(src), self.group) for b in bufs]
        return (dist.batch_isend_irecv(ops) if ops else []), bufs

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's (O, lse) over every key shard (O in q's dtype, lse float32)."""
        state = self.kernels.empty_state((*q.shape[:3], v.shape[-1]), q.device)
        sizes = [p.numel() for p in self.k_positions]
        pending = self._post(1, [k, v], [k, v], sizes) if self.world > 1 else ([], None)
        self._held(_nothing, self._pair_forward, state, q, k, v, self.rank)
        for step in range(1, self.world):
            reqs, bufs = pending
            for r in reqs:
                r.wait()
            if step + 1 < self.world:
                pending = self._post(step + 1, [k, v], [k, v], sizes)
            if bufs is not None:
                self._held(_nothing, self._pair_forward, state, q, bufs[0], bufs[1],
                           (self.rank - step) % self.world)
        self._agree()
        return state.out.to(q.dtype), state.lse

    def _pair_forward(self, state: Any, q: Tensor, k: Tensor, v: Tensor, src: int) -> None:
        cls = self.classes[self.rank][src]
        if cls == EMPTY:
            return
        out, lse = self.kernels.forward(q, k, v, self.q_positions[self.rank],
                                        self.k_positions[src], cls, self.scale)
        state.add(out, lse)

    def backward(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 dout: Tensor, dlse: Tensor | None, need: tuple[str, ...]
                 ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """dQ, dK, dV of this rank's shards and the (all-reduced) captured gradients."""
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        caps = {n: torch.zeros(self.kernels.captured[n].shape, dtype=torch.float32,
                               device=q.device) for n in need}
        rows = (q, out, lse, dout, dlse)
        sizes = [p.numel() for p in self.k_positions]
        grads = self._pair_backward_held(rows, k, v, self.rank, need, dq, caps)
        if grads is not None:
            dk += grads[0]
            dv += grads[1]
        pending = self._post(1, [k, v], [k, v], sizes) if self.world > 1 else ([], None)
        returning: list[tuple[list[Any], list[Tensor] | None]] = []
        for step in range(1, self.world):
            reqs, bufs = pending
            for r in reqs:
                r.wait()
            if step + 1 < self.world:
                pending = self._post(step + 1, [k, v], [k, v], sizes)
            src = (self.rank - step) % self.world
            grads = None
            if bufs is not None:
                grads = self._pair_backward_held(rows, bufs[0], bufs[1], src, need, dq, caps)
            returning.append(self._return(step, grads, k, v))
        for reqs, bufs in returning:
            for r in reqs:
                r.wait()
            if bufs is not None:
                dk += bufs[0]
                dv += bufs[1]
        for g in caps.values():
            dist.all_reduce(g, group=self.group)
        self._agree()
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), caps

    def _return(self, step: int, grads: tuple[Tensor, Tensor] | None, k: Tensor, v: Tensor
                ) -> tuple[list[Any], list[Tensor] | None]:
        """Step ``step``'s gradients back: dK/dV of rank r - step's shard to it; ours from
        rank r + step (the reverse of the forward's transfers, the same pair predicate)."""
        owner, user = (self.rank - step) % self.world, (self.rank + step) % self.world
        ops, bufs = [], None
        if grads is not None:
            ops += [dist.P2POp(dist.isend, g.contiguous(), self._peer(owner), self.group)
                    for g in grads]
        if self.needs(user, self.rank):
            bufs = [torch.empty(t.shape, dtype=torch.float32, device=t.device) for t in (k, v)]
            ops += [dist.P2POp(dist.irecv, b, self._peer(user), self.group) for b in bufs]
        return (dist.batch_isend_irecv(ops) if ops else []), bufs

    def _pair_backward_held(self, rows: tuple, k: Tensor, v: Tensor, src: int,
                            need: tuple[str, ...], dq: Tensor, caps: dict[str, Tensor]
                            ) -> tuple[Tensor, Tensor] | None:
        """:meth:`_pair_backward`, or zero (dK, dV) once a refusal is held (the shard's
        owner still waits for them)."""
        def zeros() -> tuple[Tensor, Tensor] | None:
            if self.classes[self.rank][src] == EMPTY:
                return None
            return tuple(torch.zeros(t.shape, dtype=torch.float32, device=t.device)
                         for t in (k, v))
        return self._held(zeros, self._pair_backward, rows, k, v, src, need, dq, caps)

    def _pair_backward(self, rows: tuple, k: Tensor, v: Tensor, src: int, need: tuple[str, ...],
                       dq: Tensor, caps: dict[str, Tensor]) -> tuple[Tensor, Tensor] | None:
        """Adds the pair's dQ and captured gradients in place; returns its (dK, dV) in
        float32, or None for an EMPTY pair."""
        cls = self.classes[self.rank][src]
        if cls == EMPTY:
            return None
        q, out, lse, dout, dlse = rows
        g = self.kernels.backward(q, k, v, out, lse, dout, dlse, self.q_positions[self.rank],
                                  self.k_positions[src], cls, self.scale, need)
        dq += g["Q"].float()
        for n in need:
            caps[n] += g[n].float()
        return g["K"].float(), g["V"].float()


class RingFunction(torch.autograd.Function):
    """(O, lse) = ring attention; backward by the reverse ring (see the module docstring).
    Arguments: the :class:`Ring`, the names of the captured tensors, q, k, v, then the
    captured tensors (one gradient slot each)."""

    @staticmethod
    def forward(ctx: Any, ring: Ring, names: tuple[str, ...], q: Tensor, k: Tensor,
                v: Tensor, *captured: Tensor) -> tuple[Tensor, Tensor]:
        out, lse = ring.forward(q, k, v)
        ctx.ring, ctx.names = ring, names
        ctx.save_for_backward(q, k, v, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: Tensor, dlse: Tensor | None) -> tuple:
        q, k, v, out, lse = ctx.saved_tensors
        flags = ctx.needs_input_grad[5:]
        need = tuple(n for n, want in zip(ctx.names, flags)
                     if want and ctx.ring.kernels.captured[n].is_floating_point())
        dq, dk, dv, caps = ctx.ring.backward(q, k, v, out, lse, dout.contiguous(), dlse, need)
        cap_grads = [caps[n].to(ctx.ring.kernels.captured[n].dtype) if n in caps else None
                     for n in ctx.names]
        return (None, None, dq, dk, dv, *cap_grads)


class Replicated(torch.autograd.Function):
    """The identity on a tensor every rank holds the same copy of (a sink logit): its
    gradient is the sum of every rank's, as the single-process gradient is the sum over
    all rows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None
