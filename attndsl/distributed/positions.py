"""Global positions in a cascade: the query and key indices seen by score and mask programs.

A rank holds the rows of Q (and, at one ring step, of K/V) at some global positions; the
kernel indexes its tensors by the *local* row.  The rewrite below keeps every read of Q, K, V
and of the cascade's own equations at the local index and replaces every other use of the
query index m (key index n) by a read of a captured int64 tensor of global positions::

    score/mask program (m, n)   ->   (QPOS[m], KPOS[n])
    captured reads doc[m]       ->   doc[QPOS[m]]         (captured tensors are global)
    Q[b, h, m, e], S[b, h, m, n] stay local

One compiled kernel (forward and backward) then serves every layout, rank and ring step:
positions are data, not code, and the mask analysis sees the same positions through its
range summaries of QPOS / KPOS (exact, as for any captured tensor).
"""

from __future__ import annotations

from attndsl.ir import expr as E
from attndsl.ir.cascade import Cascade, Equation, TensorDecl, verify
from attndsl.ir.expr import INT, Expr, Op
from attndsl.runtime.checks import AttentionError

QPOS, KPOS = "QPOS", "KPOS"  # the captured position tensors' names


def positioned(c: Cascade) -> Cascade:
    """``c`` with its programs reading global positions (see the module docstring)."""
    q, k = c.role("query"), c.role("key")
    taken = {t.name for t in c.tensors} | {eq.name for eq in c.equations}
    for name in (QPOS, KPOS):
        if name in taken:
            raise AttentionError(f"cascade {c.name!r} already names a tensor {name!r}; "
                                 f"context parallelism needs that name for global positions")
    local = {t.name for t in c.tensors if t.kind == "input"} | {eq.name for eq in c.equations}
    swap = {q: E.load(QPOS, (E.index(q),), INT), k: E.load(KPOS, (E.index(k),), INT)}

    def rewrite(e: Expr, memo: dict[Expr, Expr]) -> Expr:
        if e in memo:
            return memo[e]
        if e.op is Op.INDEX and e.arg in swap:
            out = swap[e.arg]
        elif e.op is Op.LOAD and e.arg in local:
            _check_local(c, e, q, k)
            out = Expr(e.op, tuple(rewrite(s, memo) if not s.free_indices() & {q, k} else s
                                   for s in e.src), e.arg, e.dtype)
        elif e.src:
            out = Expr(e.op, tuple(rewrite(s, memo) for s in e.src), e.arg, e.dtype)
        else:
            out = e
        memo[e] = out
        return out

    memo: dict[Expr, Expr] = {}
    equations = tuple(Equation(eq.name, eq.indices, rewrite(eq.expr, memo), eq.loc)
                      for eq in c.equations)
    mask = None if c.mask is None else Equation(c.mask.name, c.mask.indices,
                                                rewrite(c.mask.expr, memo), c.mask.loc)
    tensors = c.tensors + (TensorDecl(QPOS, (f"{QPOS}.0",), INT, "captured"),
                           TensorDecl(KPOS, (f"{KPOS}.0",), INT, "captured"))
    return verify(Cascade(c.name, c.indices, tensors, c.params, equations, c.outputs, mask))


def _check_local(c: Cascade, load: Expr, q: str, k: str) -> None:
    """A local read must use the query / key index plainly (``Q[b, h, m, e]``): a shifted
    read such as ``K[b, h, n + 1, e]`` would cross into another rank's shard."""
    for s in load.src:
        if s.free_indices() & {q, k} and s.op is not Op.INDEX:
            raise AttentionError(
                f"cascade {c.name!r} reads {load.arg}[{', '.join(map(str, load.src))}]: "
                f"context parallelism needs the query / key index as a plain subscript of "
                f"Q, K, V and of equations (a shard holds only its own rows)")
