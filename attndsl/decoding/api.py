"""``attndsl.decode``: attention of a few new queries per sequence against a K/V cache.

::

    query:   (B, Hq, Lq, E)                         Lq new queries per sequence (1 to decode,
                                                    more for speculative decoding or a chunk
                                                    of a chunked prefill)
    key, value, dense:  (B, Hkv, N, E) / (B, Hkv, N, Ev)
    key, value, paged:  (num_pages, page_size, Hkv, E) ("NPHD") or
                        (num_pages, Hkv, page_size, E) ("NHPD"), with
    page_table: (B, max_pages) int   physical page of each logical page of a sequence
    lengths:    (B,) int             keys of each sequence, the Lq new ones included
    -> out (B, Hq, Lq, Ev)

Query ``i`` of sequence ``b`` sits at position ``lengths[b] - Lq + i`` (bottom-right: the new
queries end the sequence), so ``kv_idx <= q_idx`` is the causal mask of a chunked prefill;
``score_mod`` / ``mask_mod`` see logical positions, the real batch and the query head.  A row
before the sequence start (``lengths[b] < Lq``) and a sequence of length 0 see no keys (0,
lse = -inf).  ``sinks`` (Hq,) are per-head sink logits added once to each denominator;
a softmax-family cascade (``cascade=``) brings its own.

One launch runs the packed problem of :mod:`attndsl.decoding.reindex` (GQA groups in one
program, the keys split S ways by batch ``b * S + s``; K/V read in place, Q copied S times),
then the log-sum-exp merge of :mod:`attndsl.distributed.merge` (the one merge rule, shared
with context parallelism) combines the splits.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from attndsl.api import AuxOutput
from attndsl.decoding.layout import PhysicalKV, dense_kv, paged_kv
from attndsl.decoding.pruning import live_blocks
from attndsl.decoding.reindex import LENGTHS, PAGES, PackedSpec, packed_from, packed_spec
from attndsl.decoding.split import choose_splits, sm_count
from attndsl.decoding.tables import inverse_pages, logical_blocks, split_tables
from attndsl.distributed.merge import add_sink, merge
from attndsl.distributed.normaliser import softmax_form
from attndsl.ir.cascade import Cascade
from attndsl.runtime.checks import AttentionError, check_scale, kernel_options
from attndsl.runtime.kernels import compiled

Tensor = torch.Tensor
DENSE_BLOCK = 64  # key rows per block of a dense cache
MAX_Q_BLOCK = 128  # packed query rows per program at most


def decode(query: Tensor, key: Tensor, value: Tensor, lengths: Tensor, *,
           page_table: Tensor | None = None, layout: str = "NPHD",
           score_mod: Callable | None = None, mask_mod: Callable | None = None,
           scale: float | None = None, sinks: Tensor | None = None, splits: int | None = None,
           return_lse: bool = False, return_aux: Any = None,
           kernel_options: dict | None = None, cascade: Cascade | None = None,
           params: dict | None = None, captured: dict[str, Tensor] | None = None) -> Any:
    """Decode attention (see the module docstring).  Returns ``out``, ``(out, lse)`` with
    ``return_lse`` or ``(out, AuxOutput(lse, max_scores))`` with ``return_aux``, as
    ``flex_attention`` does; lse includes the sinks, max_scores is over the keys.

    ``cascade`` (with its ``params`` and ``captured`` tensors) replaces score_mod/mask_mod by
    a cascade of the softmax family (:mod:`attndsl.distributed.normaliser`: softmax,
    off-by-one softmax, learned sinks -- an extra normaliser term becomes the sink logit);
    other normalisers (sigmoid, ReLU, ...) have no split merge and are refused by name."""
    _check_splits(splits)
    _check_types(query, key, value, page_table, sinks)
    scale = check_scale("decode", scale)
    spec_of = _spec_source(score_mod, mask_mod, cascade, params, captured, sinks,
                           query.shape[1] if query.dim() == 4 else 0)
    if spec_of.sinks is not None:
        sinks = spec_of.sinks
    if not spec_of.scaled:
        scale = 1.0
    elif scale is None and (params or {}).get("scale") is not None:
        scale = float(params["scale"])  # a cascade's own scale parameter
    kv = dense_kv(key, value) if page_table is None else paged_kv(key, value, layout)
    _check(query, kv, lengths, page_table, sinks)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise AttentionError("decode is forward-only (inference); call it under "
                             "torch.no_grad() or use flex_attention for training")
    b, hq, lq, _ = query.shape
    hkv = kv.k.shape[1]
    group = hq // hkv if hkv else 1
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if query.numel() == 0 or query.device.type == "meta":
        out, lse, mx = _empty(query, kv.v.shape[-1])
    else:
        out, lse, mx = _run(query, kv, lengths, page_table, spec_of, float(scale), group,
                            splits, kernel_options)
    out, lse, mx = (t.reshape(b, hq, lq, *t.shape[4:]) for t in (out, lse, mx))
    if sinks is not None:
        out, lse = add_sink(out, lse, sinks)
    if return_aux is not None:
        return out, AuxOutput(lse if return_aux.lse else None,
                              mx if return_aux.max_scores else None)
    return (out, lse) if return_lse else out


def _check_types(query: Any, key: Any, value: Any, page_table: Any, sinks: Any) -> None:
    """Tensors where tensors are expected, and a dense cache of 4 dims, before any shape is
    read (a 3-D cache failed with an IndexError, a list with an AttributeError)."""
    given = {"query": query, "key": key, "value": value, "page_table": page_table,
             "sinks": sinks}
    for name, t in given.items():
        if not isinstance(t, torch.Tensor) and (t is not None or name in ("query", "key",
                                                                           "value")):
            raise AttentionError(f"decode: {name} must be a torch.Tensor, got "
                                 f"{type(t).__name__}")
    if page_table is None:
        for name, t in (("key", key), ("value", value)):
            if t.dim() != 4:
                raise AttentionError(f"decode: a dense {name} cache must be (B, Hkv, N, D), "
                                     f"got {tuple(t.shape)}")


def _check_splits(splits: Any) -> None:
    """``splits``: None (chosen from the GPU) or a whole number >= 1 of key splits; a float
    failed inside torch's expand and a bool was refused as the kernel's parameter 'S'."""
    if splits is None:
        return
    if isinstance(splits, bool) or not isinstance(splits, numbers.Integral) or splits < 1:
        raise AttentionError(f"decode: splits must be None or an int >= 1 (how many ways "
                             f"the keys are split), got {splits!r}")


def _empty(query: Tensor, f: int) -> tuple[Tensor, Tensor, Tensor]:
    b, hq, lq, _ = query.shape
    dev = query.device
    out = torch.zeros(b, hq, 1, lq, f, dtype=query.dtype, device=dev)
    lse = torch.full((b, hq, 1, lq), -math.inf, device=dev)
    return out, lse, lse.clone()


@dataclass(frozen=True)
class _Source:
    """What the packed spec is made from: a FlexAttention cascade and its tensors, whether
    its scores are scaled, and the sink logits a softmax-form cascade brings."""

    flex: Cascade | None  # None: trace score_mod / mask_mod
    captured: dict[str, Tensor]
    score_mod: Callable | None
    mask_mod: Callable | None
    scaled: bool = True
    sinks: Tensor | None = None

    def packed(self, paged: bool) -> PackedSpec:
        if self.flex is None:
            return packed_spec(self.score_mod, self.mask_mod, paged=paged)
        return packed_from(self.flex, self.captured, paged=paged)


def _spec_source(score_mod: Any, mask_mod: Any, cascade: Cascade | None, params: dict | None,
                 captured: dict | None, sinks: Tensor | None, heads: int) -> _Source:
    """FlexAttention functions, or a softmax-family cascade as FlexAttention plus sinks."""
    for name, fn in (("score_mod", score_mod), ("mask_mod", mask_mod)):
        if fn is not None and not callable(fn):
            raise AttentionError(f"decode: {name} must be a FlexAttention function, got "
                                 f"{type(fn).__name__}; pass a cascade as cascade=")
    if cascade is None:
        for name, given in (("params", params), ("captured", captured)):
            if given:
                raise AttentionError(f"decode: {name}= holds a cascade's own {name}; with "
                                     f"score_mod / mask_mod it would be ignored (their "
                                     f"tensors are captured from the functions)")
        return _Source(None, {}, score_mod, mask_mod)
    if not isinstance(cascade, Cascade):
        raise AttentionError(f"decode: cascade= must be a Cascade, got "
                             f"{type(cascade).__name__} (parse_text / parse_file return a "
                             f"dict of them by spec name)")
    if score_mod is not None or mask_mod is not None:
        raise AttentionError("decode: pass either a cascade or score_mod/mask_mod, not both")
    try:
        form = softmax_form(cascade, params, captured)
    except AttentionError as err:  # the same merge combines decode's key splits
        raise AttentionError(f"decode: {err} (decode splits the keys the same way)") from None
    logit = form.sink_logit(heads)
    if logit is not None and sinks is not None:
        raise AttentionError(f"decode: cascade {cascade.name!r} has its own normaliser term; "
                             f"do not pass sinks= as well")
    return _Source(form.flex, form.captured, None, None, form.scaled, logit)


def _check(query: Tensor, kv: PhysicalKV, lengths: Tensor, page_table: Tensor | None,
           sinks: Tensor | None) -> None:
    """Shapes, dtypes and devices, with what was expected."""
    if query.dim() != 4:
        raise AttentionError(f"decode: query must be (B, Hq, Lq, E), got {tuple(query.shape)}")
    b, hq, _, e = query.shape
    hkv, dim = kv.k.shape[1], kv.k.shape[3]
    if not (query.dtype == kv.k.dtype == kv.v.dtype) or query.dtype not in (
            torch.float16, torch.bfloat16, torch.float32):
        raise AttentionError(f"decode: query, key and value must share one float dtype "
                             f"(float16, bfloat16, float32), got {query.dtype}, {kv.k.dtype}, "
                             f"{kv.v.dtype}")
    if e != dim or not 16 <= e <= 256 or not 16 <= kv.v.shape[3] <= 256:
        raise AttentionError(f"decode: head dims must agree and be 16..256: query {e}, key "
                             f"{dim}, value {kv.v.shape[3]}")
    if hkv == 0 or hq % hkv:
        raise AttentionError(f"decode: {hq} query heads are not a multiple of {hkv} key/value "
                             f"heads")
    if not kv.paged and kv.k.shape[0] != b:
        raise AttentionError(f"decode: key has batch {kv.k.shape[0]}, query {b}")
    if not isinstance(lengths, torch.Tensor):
        raise AttentionError(f"decode: lengths must be an integer tensor of shape ({b},), got "
                             f"{type(lengths).__name__}")
    if lengths.shape != (b,) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise AttentionError(f"decode: lengths must be an integer tensor of shape ({b},), got "
                             f"{lengths.dtype} {tuple(lengths.shape)}")
    tensors = [kv.k, kv.v, lengths] + [t for t in (page_table, sinks) if t is not None]
    if any(t.device != query.device for t in tensors):
        raise AttentionError(f"decode: every tensor must be on {query.device}")
    if sinks is not None and sinks.shape != (hq,):
        raise AttentionError(f"decode: sinks must have shape ({hq},), got {tuple(sinks.shape)}")
    if b and query.device.type != "meta" and int(lengths.min()) < 0:
        raise AttentionError(f"decode: lengths must be >= 0, got {lengths.tolist()}")
    if page_table is None:
        if b and query.device.type != "meta" and int(lengths.max()) > kv.k.shape[2]:
            raise AttentionError(f"decode: a length exceeds the cache's {kv.k.shape[2]} rows: "
                                 f"{lengths.tolist()}")
        return
    _check_pages(page_table, lengths, kv, b)


def _check_pages(page_table: Tensor, lengths: Tensor, kv: PhysicalKV, b: int) -> None:
    if page_table.dim() != 2 or page_table.shape[0] != b or page_table.dtype.is_floating_point \
            or page_table.dtype == torch.bool:
        raise AttentionError(f"decode: page_table must be an integer (B={b}, max_pages) tensor, "
                             f"got {page_table.dtype} {tuple(page_table.shape)}")
    if kv.page % 16:
        raise AttentionError(f"decode: page_size {kv.page} must be a multiple of 16 (the "
                             f"smallest key tile)")
    if not b or page_table.device.type == "meta":
        return
    need = logical_blocks(lengths, kv.page)
    if int(need.max()) > page_table.shape[1]:
        raise AttentionError(f"decode: a sequence needs {int(need.max())} pages but page_table "
                             f"has {page_table.shape[1]} columns")
    used = torch.arange(page_table.shape[1], device=page_table.device)[None] < need[:, None]
    pages = page_table[used]
    n_pages = (kv.k.shape[2] - kv.page) // kv.pw + 1
    if pages.numel() and (int(pages.min()) < 0 or int(pages.max()) >= n_pages):
        raise AttentionError(f"decode: page_table lists pages outside [0, {n_pages}) for the "
                             f"sequences' lengths")
    # the score and mask programs see each physical page's one logical page in a sequence
    ordered = torch.where(used, page_table.to(torch.int64), -1).sort(dim=-1).values
    twice = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if bool(twice.any()):
        seq = int(twice.any(-1).nonzero()[0, 0])
        raise AttentionError(f"decode: page_table row {seq} lists a page twice (each logical "
                             f"page of a sequence needs its own physical page)")


def _kv_block(kv: PhysicalKV) -> int:
    """Key rows per block: the largest power of two <= 128 dividing the page and the rows
    from one page's start to the next (dense: 64).  Pages then start on block boundaries:
    a page stride of, say, 24 rows for 16-row pages would put page 1 across two 16-row
    blocks, of which the tables (one block per page-sized piece) list only the first."""
    if not kv.paged:
        return DENSE_BLOCK
    block = min(MAX_Q_BLOCK, kv.page & -kv.page)
    rows = math.gcd(block, kv.pw)
    if rows < min(block, 16):  # the kernels' key tiles are >= 16 rows (tl.dot)
        raise AttentionError(
            f"decode: the pages start every {kv.pw} rows (the page stride over the row "
            f"stride), which is not a multiple of {min(block, 16)} rows; the kernels read "
            f"each page in blocks of that many rows (pad the page stride, or make the pool "
            f"contiguous)")
    return rows


def _run(query: Tensor, kv: PhysicalKV, lengths: Tensor, page_table: Tensor | None,
         source: _Source, scale: float, group: int, splits: int | None,
         options: dict | None) -> tuple[Tensor, Tensor, Tensor]:
    """One launch of the packed problem, then the merge; returns [B, Hkv, G, Lq, ...]."""
    b, hq, lq, e = query.shape
    hkv, rows = kv.k.shape[1], group * lq
    spec = source.packed(kv.paged)
    _, module = compiled(spec.cascade)
    kv_block = _kv_block(kv)
    q_block = min(MAX_Q_BLOCK, max(16, 1 << (rows - 1).bit_length()))
    q_tiles = -(-rows // q_block)
    live = live_blocks(spec.mask, spec.captured, lengths, hq, hkv, lq, kv_block)
    most = int(live.sum(-1).max())
    if splits is None:
        splits = choose_splits(b * hkv * q_tiles, most, sm_count(query.device))
    packed = query.reshape(b, hkv, rows, e)
    if splits > 1:
        packed = packed.unsqueeze(1).expand(b, splits, hkv, rows, e).reshape(-1, hkv, rows, e)
    tables = split_tables(live, page_table, splits, q_tiles, kv_block, kv.page, kv.pw)
    captured = {**spec.captured, LENGTHS: lengths.to(torch.int32)}
    if kv.paged:
        captured[PAGES] = inverse_pages(page_table, lengths, kv.page, kv.pw, kv.k.shape[2])
    params = {"scale": scale, "KVB": splits * (b if kv.paged else 1), "S": splits, "G": group,
              "LQ": lq, "P": kv.page, "PW": kv.pw}
    try:
        out = module.launch({"Q": packed, "K": kv.k, "V": kv.v}, params, captured,
                            {**tables, "Q_BLOCK_SIZE": q_block, "KV_BLOCK_SIZE": kv_block},
                            kernel_options(options))
    except module.AttentionInputError as err:
        raise AttentionError(f"decode: {err}") from None
    shape = (b, splits, hkv, group, lq)
    o, lse = out["O"].reshape(*shape, -1), out["LSE"].reshape(shape)
    merged, merged_lse = merge([(o[:, s], lse[:, s]) for s in range(splits)])
    return merged.to(query.dtype), merged_lse, out["MAX"].reshape(shape).amax(1)


__all__ = ["decode"]
