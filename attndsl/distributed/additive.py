"""Cascades whose output is a plain sum over the keys, run context-parallel.

Sigmoid attention, ReLU^2 attention and any cascade without a normaliser over the keys::

    O[b,h,m,f] = sum_j c_j(b,h,m) * sum(n) g_j(X) V[b,h,n,f]        (no max, no divide by a sum)

is linear in its sums over n, so over disjoint key shards K_i it is the sum of the shards'
outputs, exactly: ``O = sum_i O_i``.  Its gradient splits the same way: dO flows unchanged
to every O_i, so each (query shard, key shard) pair's dQ, dK, dV and captured-tensor
gradients are those of the pair's own kernel under the same dO -- no lse, no global state.

Extents are global: a cascade that reads the key or query extent (ReLU^2's ``/ N``) sees the
whole sequence's length, bound as a constant before compiling, not the shard's.  The pairs
run attndsl's generated kernels for the positioned cascade (:mod:`.positions`), masked or not
by the pair's class; the backward is the kernel's fused backward (a recomputed forward, then
the generated backward kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attndsl.api import Kernel
from attndsl.api import compile as compile_kernel
from attndsl.distributed.positions import KPOS, QPOS, positioned
from attndsl.ir import expr as E
from attndsl.ir.cascade import Cascade, Equation
from attndsl.ir.expr import Expr, Op
from attndsl.passes.lower import inline
from attndsl.passes.mask import FULL
from attndsl.passes.terms import factors, terms
from attndsl.runtime.checks import AttentionError

Tensor = torch.Tensor
REDUCES = (Op.REDUCE_SUM, Op.REDUCE_MAX, Op.SOFTMAX)


def is_additive(c: Cascade) -> bool:
    """Whether every output of ``c`` is a sum of terms ``c_j * sum(n) body_j`` with no other
    reduction over the key index anywhere (see the module docstring)."""
    key = c.role("key")
    fused = inline(c)

    def reduces_keys(e: Expr) -> bool:
        return any(x.op in REDUCES and x.arg == key for x in e.walk())

    for _, _, e in fused.outputs:
        for term, _ in terms(e):
            sums = [(f, p) for f, p in factors(term) if reduces_keys(f)]
            if len(sums) != 1:
                return False
            f, p = sums[0]
            if p != 1 or f.op is not Op.REDUCE_SUM or f.arg != key or reduces_keys(f.src[0]):
                return False
    return True


def _bind_extents(c: Cascade, extents: dict[str, int]) -> Cascade:
    """``c`` with reads of the named extents (index sizes used as values) made constants."""
    def visit(node: Expr) -> Expr | None:
        if node.op is Op.PARAM and node.arg in extents:
            return E.const(extents[node.arg])
        return None

    equations = tuple(Equation(eq.name, eq.indices, eq.expr.replace(visit), eq.loc)
                      for eq in c.equations)
    mask = None if c.mask is None else Equation(c.mask.name, c.mask.indices,
                                                c.mask.expr.replace(visit), c.mask.loc)
    return Cascade(c.name, c.indices, c.tensors, c.params, equations, c.outputs, mask)


def _input_roles(c: Cascade) -> dict[str, str]:
    """{'q': name, 'k': name, 'v': name} of the cascade's three inputs, by their indices."""
    roles: dict[str, str] = {}
    by_index = {i.name: i.role for i in c.indices}
    for t in c.tensors:
        if t.kind != "input":
            continue
        dims = {by_index.get(d) for eq in c.equations for x in eq.expr.walk()
                if x.op is Op.LOAD and x.arg == t.name
                for d in (s.arg for s in x.src if s.op is Op.INDEX)}
        role = "q" if "query" in dims else "v" if "v" in dims else "k"
        if role in roles:
            raise AttentionError(f"cascade {c.name!r}: inputs {roles[role]!r} and {t.name!r} "
                                 f"are both {role}; context parallelism shards one query, "
                                 f"one key and one value tensor")
        roles[role] = t.name
    if sorted(roles) != ["k", "q", "v"]:
        raise AttentionError(f"cascade {c.name!r} needs a query, a key and a value input "
                             f"(found {sorted(roles.values())})")
    return roles


@dataclass
class SumState:
    """The merged state of the additive family: the running sum of the pairs' outputs
    (float32).  ``lse`` is an all-zero placeholder: the family has no log-sum-exp."""

    out: Tensor
    lse: Tensor

    def add(self, out: Tensor, lse: Tensor | None) -> None:
        self.out.add_(out.float())


@dataclass
class AdditivePairs:
    """One (query shard, key shard) pair of an additive cascade through attndsl's kernels;
    the same protocol as :class:`attndsl.distributed.kernels.PairKernels`."""

    masked: Kernel
    unmasked: Kernel
    output: str
    names: dict[str, str]  # role -> the cascade's input name
    params: dict
    captured: dict[str, Tensor]  # the user's captured tensors (replicated on every rank)
    mask: Expr | None  # the positioned mask

    @classmethod
    def of(cls, c: Cascade, captured: dict[str, Tensor] | None, params: dict | None,
           total_q: int, total_k: int) -> AdditivePairs:
        """The pairs of ``c`` over sequences of ``total_q`` queries and ``total_k`` keys."""
        if len(c.outputs) != 1:
            raise AttentionError(f"cascade {c.name!r} has outputs {list(c.outputs)}; the "
                                 f"context-parallel sum runs one output")
        extents = {c.index(c.role("query")).extent: total_q,
                   c.index(c.role("key")).extent: total_k}
        pc = positioned(_bind_extents(c, extents))
        bare = pc.replace_equations(pc.equations, None, keep_mask=False)
        return cls(compile_kernel(pc), compile_kernel(bare), c.outputs[0], _input_roles(c),
                   dict(params or {}), dict(captured or {}),
                   None if pc.mask is None else pc.mask.expr)

    def empty_state(self, out_shape: tuple[int, ...], device: torch.device) -> SumState:
        return SumState(torch.zeros(out_shape, dtype=torch.float32, device=device),
                        torch.zeros(out_shape[:-1], dtype=torch.float32, device=device))

    def _run(self, q: Tensor, k: Tensor, v: Tensor, qpos: Tensor, kpos: Tensor, cls: int,
             captured: dict[str, Tensor], scale: float) -> Tensor:
        kernel = self.unmasked if cls == FULL or self.mask is None else self.masked
        declared = {p.name for p in kernel.compiled.cascade.params}
        params = {**({"scale": scale} if "scale" in declared else {}), **self.params}
        if "G" in declared:
            params.setdefault("G", q.shape[1] // max(1, k.shape[1]))
        inputs = {self.names["q"]: q, self.names["k"]: k, self.names["v"]: v}
        caps = {**captured, QPOS: qpos.to(q.device), KPOS: kpos.to(q.device)}
        return kernel(inputs, params, caps)[self.output]

    def forward(self, q: Tensor, k: Tensor, v: Tensor, qpos: Tensor, kpos: Tensor, cls: int,
                scale: float) -> tuple[Tensor, None]:
        """The pair's O_i (no lse)."""
        return self._run(q, k, v, qpos, kpos, cls, self.captured, scale), None

    def backward(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 dout: Tensor, dlse: Tensor | None, qpos: Tensor, kpos: Tensor, cls: int,
                 scale: float, need: tuple[str, ...]) -> dict[str, Tensor]:
        """The pair's dQ, dK, dV (under "Q", "K", "V") and captured gradients for ``need``:
        its own kernel's gradients under the global dO (module docstring)."""
        with torch.enable_grad():
            qkv = [t.detach().requires_grad_() for t in (q, k, v)]
            caps = {n: t.detach().requires_grad_() if n in need else t
                    for n, t in self.captured.items()}
            o = self._run(*qkv, qpos, kpos, cls, caps, scale)
            grads = torch.autograd.grad(o, [*qkv, *(caps[n] for n in need)], dout,
                                        allow_unused=True)
        named = dict(zip(("Q", "K", "V", *need), grads))
        like = {"Q": q, "K": k, "V": v, **self.captured}
        return {n: torch.zeros_like(like[n]) if g is None else g for n, g in named.items()}
