"""The decode problem as a re-indexing of a FlexAttention spec (an IR rewrite, no new printer).

A decode launch computes, for each sequence ``b`` of a ragged batch, query head ``hq`` and new
query ``i < Lq``, attention over the sequence's ``len[b]`` cached keys.  The kernel instead
runs a *packed* problem with indices ``(b', h, r, n)``:

* ``b' = b * S + s``   -- the batch times the S key splits (one program row per split);
* ``h``                -- the key/value head (``Hkv`` of them): GQA packing puts the G query
  heads of a group in one program, so each K/V tile is read once per (b, h, split);
* ``r = g * Lq + i``   -- the G x Lq query rows of that group;
* ``n``                -- a *physical* key: a row of the K/V view (a page pool or a dense
  cache; :mod:`attndsl.decode.layout`).

The user's score and mask programs are rewritten to see the real problem::

    b  -> b' // S                      hq -> h * G + r // Lq
    q  -> len[b] - Lq + r % Lq         (bottom-right: the new queries end the sequence)
    kv -> page[b, n // PW] * P + n % PW   (paged: the logical position of physical row n)
    kv -> n                               (dense)

and the mask gains ``kv < len[b] & q >= 0`` (keys past the length and rows before the
sequence start are not part of the problem).  Which key blocks a program visits -- its split's
pages -- is the block table's job (:mod:`attndsl.decode.tables`), never the mask's.  K and V
are read at batch ``b' // KVB`` (KVB = S for a dense cache, B * S for a page pool viewed as
one physical sequence).  The sizes are kernel parameters, so one compiled kernel serves
every batch, length, page size and split count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attndsl.frontend.flex import INDICES, lower_flex
from attndsl.ir import expr as E
from attndsl.ir.cascade import Cascade, Equation, ParamDecl, TensorDecl, verify
from attndsl.ir.expr import BOOL, FLOAT, INT, Expr, Op

LENGTHS, PAGES = "decode_len", "decode_page"  # captured tensors the rewrite adds
PARAMS = ("KVB", "S", "G", "LQ", "P", "PW")  # int parameters of the packed problem
BHMN = ("b", "h", "m", "n")


@dataclass(frozen=True)
class PackedSpec:
    """The packed cascade, the user's captured tensors (the rewrite adds LENGTHS and, when
    paged, PAGES; the runtime binds those) and the user's mask as traced (over b, h, m, n in
    logical positions; None without a mask_mod), which :mod:`attndsl.decoding.pruning`
    analyses."""

    cascade: Cascade
    captured: dict[str, torch.Tensor]
    paged: bool
    mask: Expr | None


def _p(name: str) -> Expr:
    return E.param(name, INT)


def _fdiv(a: Expr, b: Expr) -> Expr:
    return E.binary(Op.FLOORDIV, a, b)


def _mod(a: Expr, b: Expr) -> Expr:
    return E.binary(Op.MOD, a, b)


def user_positions(paged: bool) -> dict[str, Expr]:
    """The user's (b, h, q_idx, kv_idx) as expressions over the packed indices (see the module
    docstring)."""
    b, h, m, n = (E.index(i) for i in BHMN)
    batch = _fdiv(b, _p("S"))
    length = E.load(LENGTHS, (batch,), INT)
    query = length - _p("LQ") + _mod(m, _p("LQ"))
    if paged:
        page = E.load(PAGES, (batch, _fdiv(n, _p("PW"))), INT)
        key = page * _p("P") + _mod(n, _p("PW"))
    else:
        key = n
    return {"b": batch, "h": h * _p("G") + _fdiv(m, _p("LQ")), "m": query, "n": key}


def reindex(x: Expr, positions: dict[str, Expr]) -> Expr:
    """``x`` with each index read replaced by its expression in ``positions``; the score
    ``S[b, h, m, n]`` stays a tile of the packed problem (it is held out while the indices
    are rewritten)."""
    score = E.load("S", tuple(E.index(i) for i in BHMN))
    held = E.row("decode.score")

    def hold(node: Expr) -> Expr | None:
        return held if node == score else None

    def visit(node: Expr) -> Expr | None:
        if node.op is Op.INDEX and node.arg in positions:
            return positions[node.arg]
        return None

    def restore(node: Expr) -> Expr | None:
        return score if node == held else None
    return x.replace(hold).replace(visit).replace(restore)


def in_sequence(positions: dict[str, Expr]) -> Expr:
    """``kv < len[b] & q >= 0``: the key is cached and the query row is in the sequence."""
    length = E.load(LENGTHS, (positions["b"],), INT)
    return E.binary(Op.AND, E.binary(Op.LT, positions["n"], length),
                    E.binary(Op.GE, positions["m"], E.const(0)))


def packed_spec(score_mod: object = None, mask_mod: object = None, *,
                paged: bool) -> PackedSpec:
    """Trace the user's programs (once, as ``flex_attention`` does) and rewrite them into the
    packed decode cascade."""
    flex = lower_flex(score_mod, mask_mod)
    return packed_from(flex.cascade, flex.captured, paged=paged)


def packed_from(c: Cascade, captured: dict[str, torch.Tensor], *, paged: bool) -> PackedSpec:
    """The packed decode cascade of a FlexAttention cascade ``c`` (``T`` over ``S`` and the
    mask ``Keep``, as :func:`attndsl.frontend.flex.attention_cascade` builds it)."""
    pos = user_positions(paged)
    score = reindex(c.equation("T").expr, pos)
    mask = in_sequence(pos)
    if c.mask is not None:
        mask = E.binary(Op.AND, mask, reindex(c.mask.expr, pos))
    return PackedSpec(_cascade(c, score, mask, captured, paged), captured, paged,
                      None if c.mask is None else c.mask.expr)


def _cascade(user: Cascade, score: Expr, mask: Expr, captured: dict[str, torch.Tensor],
             paged: bool) -> Cascade:
    """The attention cascade of the packed problem: K/V at batch b // KVB, head h."""
    b, h, m, n, e, f = (E.index(i) for i in ("b", "h", "m", "n", "e", "f"))
    kb = _fdiv(b, _p("KVB"))
    s_def = E.reduce_sum("e", E.load("Q", (b, h, m, e)) * E.load("K", (kb, h, n, e))) \
        * E.param("scale")
    t_read = E.load("T", (b, h, m, n))
    equations = (
        Equation("S", BHMN, s_def),
        Equation("T", BHMN, score, user.equation("T").loc),
        Equation("P", BHMN, E.softmax("n", t_read)),
        Equation("O", ("b", "h", "m", "f"),
                 E.reduce_sum("n", E.load("P", (b, h, m, n)) * E.load("V", (kb, h, n, f)))),
        Equation("LSE", ("b", "h", "m"), E.log(E.reduce_sum("n", E.exp(t_read)))),
        Equation("MAX", ("b", "h", "m"), E.reduce_max("n", t_read)),
    )
    tensors = [TensorDecl("Q", ("B", "H", "M", "E")), TensorDecl("K", ("BKV", "H", "N", "E")),
               TensorDecl("V", ("BKV", "H", "N", "F")),
               TensorDecl(LENGTHS, ("decode_B",), INT, "captured")]
    if paged:
        tensors.append(TensorDecl(PAGES, ("decode_B", "decode_NP"), INT, "captured"))
    for name, t in captured.items():
        dtype = BOOL if t.dtype == torch.bool else FLOAT if t.dtype.is_floating_point else INT
        tensors.append(TensorDecl(name, tuple(f"{name}.{i}" for i in range(t.dim())), dtype,
                                  "captured"))
    params = (ParamDecl("scale", FLOAT),) + tuple(ParamDecl(p, INT) for p in PARAMS)
    name = f"decode_{'paged_' if paged else ''}{user.name}"
    mask_eq = Equation("Keep", BHMN, mask, user.mask.loc if user.mask is not None else None)
    return verify(Cascade(name, INDICES, tuple(tensors), params, equations,
                          ("O", "LSE", "MAX"), mask_eq))


__all__ = ["LENGTHS", "PAGES", "PARAMS", "PackedSpec", "in_sequence", "packed_from", "packed_spec",
           "reindex", "user_positions"]
