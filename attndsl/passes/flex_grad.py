"""The derivative of a FlexAttention cascade's score: the backward IR of the FA2 kernels.

A FlexAttention cascade (:mod:`attndsl.frontend.flex`) computes ``S = scale Q K^T``,
``T = score_mod(S)``, ``P = softmax(n) T``, ``O = P V`` and ``LSE``.  FlashAttention-2's
backward needs only ``dT/dS`` and, per gather site of a float captured tensor, ``dT/dcap``
(the chain rule of :mod:`attndsl.passes.grad`); :func:`backward_spec` derives them, with the
score tile read as ``ROW(SCORE_ROW)``, into a :class:`BackwardSpec`, which the printer
(codegen/backward.py) only prints and ``attndsl explain`` can show.
"""

from __future__ import annotations

from dataclasses import dataclass

from attndsl.ir import expr as E
from attndsl.ir.cascade import Cascade
from attndsl.ir.expr import FLOAT, Expr, Op
from attndsl.passes.affine import AxisSplit, affine, invariant, is_zero, split_axes
from attndsl.passes.grad import GradError, diff, gather_grads
from attndsl.passes.index_bounds import wrap_captured
from attndsl.passes.rules import LOG2E, RULES, Rule, rewrite, simplify
from attndsl.passes.stream import distribute_const, fold_scales


class NotFlexCascade(GradError):
    """A cascade that is not of FlexAttention's form (the FA2 backward does not apply)."""


SCORE_ROW = "s"  # ROW name of the scaled score tile in backward expressions
QK_ROW = "qk"  # ROW name of the dot tile Q K^T


@dataclass(frozen=True)
class GatherGrad:
    """One gather site of a captured tensor: its subscripts and d T / d (that element)."""

    load: Expr
    deriv: Expr

    @property
    def deps(self) -> frozenset[str]:
        """The tile indices (query m, key n) the gathered element depends on."""
        return frozenset().union(*(s.free_indices() for s in self.load.src))


@dataclass(frozen=True)
class TanhForm:
    """One tanh of the score, printed once per tile as ``1 - 2 / (exp2(x 2 log2e) + 1)``: one
    exp2 and one division, exact in real arithmetic (the forward's ``2 sigmoid(2x) - 1``
    costs an exp, a division and four multiplies), shared by T log2e and dT/dS (softcap's
    ``1 - t^2`` reuses t).  ``nodes``: the TANH nodes it stands for (the score's form over S
    and T log2e's over qk * scale); ``arg2`` is ``x 2 log2e``, as ``qk * coef + offset`` with
    tile-invariant ``coef``/``offset`` (hoisted out of the tile loops) when x is affine in
    the dot tile, else None (the printer evaluates ``arg2_tile`` on the tile)."""

    var: str
    nodes: tuple[Expr, ...]
    coef: Expr | None
    offset: Expr | None
    arg2_tile: Expr


@dataclass(frozen=True)
class BackwardSpec:
    """What the backward kernels evaluate, derived from a FlexAttention cascade."""

    cascade: Cascade
    score: Expr  # T, with S read as ROW(SCORE_ROW)
    dscore: Expr  # dT/dS, same form
    mask: Expr | None
    captured: tuple[tuple[str, int], ...]  # (IR name, rank) read by the score or the mask
    grads: tuple[tuple[str, tuple[GatherGrad, ...]], ...]  # float captured with a gradient
    roles: dict[str, str]
    # T log2e over the dot tile ROW(QK_ROW) = Q K^T, constants folded (P = exp2 of it + neg_lse2)
    log2_score: Expr
    # each distinct tanh of the score and its derivatives, evaluated once per tile
    tanhs: tuple[TanhForm, ...] = ()
    # log2_score as tile + rows[query] + cols[key] (attndsl.passes.affine.split_axes): the
    # printer evaluates the one-axis terms as vectors and folds the rows into neg_lse2
    log2_split: AxisSplit | None = None

    def __str__(self) -> str:
        lines = [f"T = {show(self.score)}", f"dT/dS = {show(self.dscore)}",
                 f"T log2e = {E.render(self.log2_score)}"]
        split = self.log2_split
        if split is not None and split.separable:
            lines.append(f"T log2e split: tile {E.render(split.tile)}; rows "
                         f"{E.render(split.rows)}; cols {E.render(split.cols)}"
                         + ("" if is_zero(split.shift) else f"; shift {E.render(split.shift)}"))
        if self.mask is not None:
            lines.append(f"mask: {E.render(self.mask)}")
        for _, sites in self.grads:
            for g in sites:
                lines.append(f"dT/d{E.render(g.load)} = {show(g.deriv)}")
        return "\n".join(lines)


def _score_read(c: Cascade) -> Expr:
    b, h, m, n = (c.role(r) for r in ("batch", "head", "query", "key"))
    return E.load("S", tuple(E.index(i) for i in (b, h, m, n)))


def _check_flex(c: Cascade) -> None:
    """The backward printer knows the FlexAttention cascade (attndsl.frontend.flex) only."""
    want = {"Q": ("B", "H", "M", "E"), "K": ("B", "HKV", "N", "E"), "V": ("B", "HKV", "N", "F")}
    for name, dims in want.items():
        t = c.tensor(name)
        if t is None or t.dims != dims or t.kind != "input":
            raise NotFlexCascade(f"the backward supports FlexAttention cascades only: expected "
                               f"input {name}[{', '.join(dims)}]")
    for name in ("S", "T", "P", "O", "LSE"):
        if c.equation(name) is None:
            raise NotFlexCascade(f"the backward supports FlexAttention cascades only: cascade "
                               f"{c.name!r} has no equation {name}")
    for node in c.equation("T").expr.walk():
        if node.op is Op.LOAD and node.arg in {eq.name for eq in c.equations}:
            if node != _score_read(c):
                raise NotFlexCascade(f"the score may read S[b, h, m, n] only, got "
                                   f"{E.render(node)}")
        if node.op in (Op.REDUCE_SUM, Op.REDUCE_MAX, Op.SOFTMAX):
            raise NotFlexCascade("the score must be elementwise (no reductions)")


def backward_spec(c: Cascade) -> BackwardSpec:
    """Differentiate the score of a FlexAttention cascade: dT/dS and one dT/dcap per site."""
    _check_flex(c)
    s_load = _score_read(c)
    score = wrap_captured(c.equation("T").expr, c)  # torch's wrap of negative subscripts

    def as_row(e: Expr) -> Expr:
        return e.replace(lambda x: E.row(SCORE_ROW) if x == s_load else None)

    mask = None if c.mask is None else wrap_captured(c.mask.expr, c)
    used = {x.arg for e in [score] + ([mask] if mask is not None else []) for x in e.walk()
            if x.op is Op.LOAD}
    captured = tuple((t.name, len(t.dims)) for t in c.tensors
                     if t.kind == "captured" and t.name in used)
    grads = []
    for t in c.tensors:
        if t.kind != "captured" or t.dtype != FLOAT or t.name not in used:
            continue
        sites = tuple(GatherGrad(ld, as_row(d)) for ld, d in gather_grads(score, t.name))
        if sites:
            grads.append((t.name, sites))
    roles = {i.role: i.name for i in c.indices}
    t = as_row(simplify(score))
    dscore = as_row(diff(score, s_load))
    log2 = log2_score(t, roles)
    exprs = [t, dscore, log2] + [g.deriv for _, sites in grads for g in sites]
    split = split_axes(log2, roles["query"], roles["key"], _tile_indices(roles),
                       tile_start(roles), key_tile_start(roles))
    return BackwardSpec(c, t, dscore, mask, captured, tuple(grads), roles, log2,
                        tanh_forms(exprs, _tile_indices(roles)), split)


def tile_start(roles: dict[str, str]) -> str:
    """The index name of the split's anchor (``mn.start``: not an identifier, so no spec
    index can have it): the start of the query tile's anchor block (the kernels'
    ``anchor_m``), the same in both kernels and in the preprocess kernel, which folds the
    query vector into neg_lse2."""
    return roles["query"] + roles["key"] + ".start"


def key_tile_start(roles: dict[str, str]) -> str:
    """The index name of the key vector's own anchor (``mn.key_start``, the split's
    ``shift``): the dK/dV kernel's key tile, so that its key vector is the same for every
    query tile of its loop."""
    return roles["query"] + roles["key"] + ".key_start"


def _tile_indices(roles: dict[str, str]) -> set[str]:
    return {roles[x] for x in ("query", "key", "qk", "v") if x in roles}


def tanh_forms(exprs: list[Expr], tile: set[str]) -> tuple[TanhForm, ...]:
    """The distinct tanh nodes of ``exprs`` (innermost first), identified by their argument
    over qk: S and qk * scale are one tile."""
    qk_scale = E.row(QK_ROW) * E.param("scale")
    forms: dict[Expr, list] = {}
    for e in exprs:
        for node in e.walk():
            if node.op is not Op.TANH:
                continue
            arg = node.src[0].replace(
                lambda x: qk_scale if x.op is Op.ROW and x.arg == SCORE_ROW else None)
            arg2 = rewrite(arg * (2.0 * LOG2E), RULES + [distribute_const])
            forms.setdefault(arg2, []).append(node)
    out = []
    for i, (arg2, nodes) in enumerate(forms.items()):
        ab = affine(arg2, tile, {QK_ROW: E.const(1.0)})
        coef, offset = (None, None) if ab is None else (simplify(ab[0]), simplify(ab[1]))
        out.append(TanhForm(f"th{i}", tuple(dict.fromkeys(nodes)), coef, offset, arg2))
    return tuple(out)


def log2_score(t: Expr, roles: dict[str, str]) -> Expr:
    """``T log2e`` with the score tile as ``qk * scale`` and the constants folded by the
    stream pass's rules: ``qk * (scale * log2e)`` for a plain score, one multiply as in the
    forward (``(x + y) c -> x c + y c``, ``(x a) b -> x (a b)`` for tile-invariant a, b)."""
    tile = _tile_indices(roles)
    qk = E.row(QK_ROW) * E.param("scale")
    scaled = t.replace(lambda x: qk if x.op is Op.ROW and x.arg == SCORE_ROW else None)
    return rewrite(scaled * LOG2E, RULES + [distribute_const, fold_scales(tile),
                                            fold_hoisted(tile)])


def fold_hoisted(tile: set[str]) -> Rule:
    def rule(e: Expr) -> Expr | None:
        """(x * a) * c -> x * (a * c) for a captured read a of the batch and head only and a
        constant c (ALiBi's slope[h] (n - m) log2e: the slope times log2e is one hoisted
        scalar, the tile pays one multiply)"""
        if e.op is not Op.MUL or e.src[0].op is not Op.MUL or e.src[1].op is not Op.CONST:
            return None
        for x, a in (e.src[0].src, e.src[0].src[::-1]):
            if invariant(a, tile) and not invariant(x, tile):
                return x * E.binary(Op.MUL, a, e.src[1])
        return None
    return Rule("fold-hoisted", rule)



def show(e: Expr) -> str:
    """An expression as text, the score tile shown as S."""
    return E.render(e.replace(
        lambda x: E.param("S") if x.op is Op.ROW and x.arg == SCORE_ROW else None))


def one_line(e: Expr, limit: int = 70) -> str:
    """An expression as comment text (printable ASCII, shortened)."""
    text = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in show(e))
    return text if len(text) <= limit else text[: limit - 3] + "..."



__all__ = ["QK_ROW", "SCORE_ROW", "BackwardSpec", "GatherGrad", "NotFlexCascade", "TanhForm",
           "backward_spec", "key_tile_start", "one_line", "show", "tile_start"]
