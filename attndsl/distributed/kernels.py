"""One (query shard, key shard) pair through attndsl's generated kernels.

The spec is positioned (:mod:`.positions`) once and compiled twice: with its mask (PARTIAL
pairs, key tiles from the mask analysis at the pair's global positions) and without it (FULL
pairs: no mask evaluated at all).  The forward returns the pair's (O_i, lse_i), merged by
:mod:`.merge`; the backward is FlashAttention-2's, which needs only the *global* O, dO and
lse of the rows: with them each pair's dQ, dK, dV and captured-tensor gradients are exact
partial sums of the single-process gradients (P = exp(T - lse) is the global probability).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from attndsl.autograd import _SPECS, register_spec
from attndsl.distributed.merge import Partial
from attndsl.distributed.positions import KPOS, QPOS, positioned
from attndsl.errors import SubscriptError
from attndsl.frontend.flex import lower_flex
from attndsl.ir.cascade import Cascade
from attndsl.ir.expr import Expr, Op
from attndsl.key_tile_plan import SPARSE_BLOCK, KeyTilePlan, plan_key_tiles
from attndsl.passes.mask import FULL
from attndsl.runtime.checks import AttentionError
from attndsl.runtime.plan import mask_plan
from attndsl.runtime.user_names import relabelled, user_labels

Tensor = torch.Tensor


@dataclass
class PairKernels:
    """The positioned spec's masked and unmasked kernels and the tensors they capture."""

    cascade: Cascade  # positioned, with its mask (or none)
    masked: str  # spec keys of attndsl.autograd's registry
    unmasked: str
    captured: dict[str, Tensor]  # the programs' captured tensors, by IR name
    labels: dict[str, str] = field(default_factory=dict)  # IR name -> the user's, for errors

    @classmethod
    def of(cls, score_mod: Callable | None, mask_mod: Callable | None) -> PairKernels:
        """The kernels of FlexAttention programs (traced here)."""
        flex = lower_flex(score_mod, mask_mod)
        return cls.of_cascade(flex.cascade, flex.captured,
                              user_labels((score_mod, mask_mod), flex.captured))

    @classmethod
    def of_cascade(cls, flex: Cascade, captured: dict[str, Tensor],
                   labels: dict[str, str] | None = None) -> PairKernels:
        """The kernels of a FlexAttention cascade (:func:`attndsl.frontend.flex.
        attention_cascade`'s form) reading ``captured``."""
        pc = positioned(flex)
        bare = pc.replace_equations(pc.equations, None, keep_mask=False)
        return cls(pc, register_spec(pc), register_spec(bare), dict(captured), dict(labels or {}))

    def _refusal(self, err: IndexError) -> SubscriptError:
        """A pair's subscript refusal as the user reads the programs: positions as the
        cascade's own indices (QPOS[m] is the global m) and captured tensors by name."""
        q, k = self.cascade.role("query"), self.cascade.role("key")
        out = relabelled(err, self.labels)
        text = str(out).replace(f"{QPOS}[{q}]", q).replace(f"{KPOS}[{k}]", k)
        return SubscriptError(text)

    @property
    def mask(self) -> Expr | None:
        return None if self.cascade.mask is None else self.cascade.mask.expr

    def empty_state(self, out_shape: tuple[int, ...], device: torch.device) -> Partial:
        """The merged state before any pair: O = 0, lse = -inf (:mod:`.merge`)."""
        return Partial.empty(out_shape, device)

    def _captured(self, qpos: Tensor, kpos: Tensor, device: torch.device) -> dict[str, Tensor]:
        return {**self.captured, QPOS: qpos.to(device), KPOS: kpos.to(device)}

    def _plan(self, q: Tensor, k: Tensor, qpos: Tensor, kpos: Tensor, cached: bool = False
              ) -> KeyTilePlan:
        """The pair's key-tile plan from the mask analysis at its positions; ``cached``: the
        forward's (kept by the runtime's plan cache, keyed by the positions' values, so
        the next call with the same layout reuses it)."""
        used = {x.arg for x in self.mask.walk() if x.op is Op.LOAD}
        caps = {n: t for n, t in self._captured(qpos, kpos, q.device).items() if n in used}
        if cached:
            return mask_plan(self.mask, caps, q.shape[0], q.shape[1], q.shape[2], k.shape[2],
                             q.device, closed_form=False)
        return plan_key_tiles(self.mask, caps, q.shape[0], q.shape[1], q.shape[2], k.shape[2],
                              (SPARSE_BLOCK, SPARSE_BLOCK), q.device, closed_form=False)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, qpos: Tensor, kpos: Tensor,
                cls: int, scale: float) -> tuple[Tensor, Tensor]:
        """(O_i, lse_i) of the pair; ``cls`` is its class (FULL: the unmasked kernel)."""
        full = cls == FULL or self.mask is None
        entry = _SPECS[self.unmasked if full else self.masked]
        tables = None if full else self._plan(q, k, qpos, kpos, cached=True).launch_tables()
        try:
            out = entry.forward.launch({"Q": q, "K": k, "V": v},
                                       {"scale": scale, "G": q.shape[1] // max(1, k.shape[1])},
                                       self._captured(qpos, kpos, q.device), tables)
        except entry.forward.AttentionInputError as err:
            raise AttentionError(str(err)) from None
        except IndexError as err:
            raise self._refusal(err) from None
        return out["O"], out["LSE"]

    def backward(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 dout: Tensor, dlse: Tensor | None, qpos: Tensor, kpos: Tensor, cls: int,
                 scale: float, need: tuple[str, ...]) -> dict[str, Tensor]:
        """The pair's share of dQ, dK, dV (under "Q", "K", "V") and of the gradients of the
        captured tensors named in ``need``, from the rows' global O, lse and dO."""
        full = cls == FULL or self.mask is None
        entry = _SPECS[self.unmasked if full else self.masked]
        tables = None
        if not full:
            tables = KeyTilePlan.from_op_args(*self._plan(q, k, qpos, kpos).op_args())
            tables = tables.launch_tables()
        try:
            return entry.backward.launch_backward(
                {"Q": q, "K": k, "V": v}, {"O": out, "LSE": lse}, {"O": dout, "LSE": dlse},
                {"scale": scale}, self._captured(qpos, kpos, q.device), need, tables, None,
                False)
        except IndexError as err:
            raise self._refusal(err) from None
