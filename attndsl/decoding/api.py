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
lse = -inf).  ``sinks`` (Hq,) are per-head sink logits added once to each denominator.

One launch runs the packed problem of :mod:`attndsl.decoding.reindex` (GQA groups in one
program, the keys split S ways by batch ``b * S + s``; K/V read in place, Q copied S times),
then :mod:`attndsl.decoding.merge` combines the splits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from attndsl.api import AuxOutput
from attndsl.decoding.layout import PhysicalKV, dense_kv, paged_kv
from attndsl.decoding.merge import add_sink, merge_splits
from attndsl.decoding.pruning import live_blocks
from attndsl.decoding.reindex import LENGTHS, PAGES, packed_spec
from attndsl.decoding.split import choose_splits, sm_count
from attndsl.decoding.tables import inverse_pages, logical_blocks, split_tables
from attndsl.runtime.checks import AttentionError, kernel_options
from attndsl.runtime.kernels import compiled

Tensor = torch.Tensor
DENSE_BLOCK = 64  # key rows per block of a dense cache
MAX_Q_BLOCK = 128  # packed query rows per program at most


def decode(query: Tensor, key: Tensor, value: Tensor, lengths: Tensor, *,
           page_table: Tensor | None = None, layout: str = "NPHD",
           score_mod: Callable | None = None, mask_mod: Callable | None = None,
           scale: float | None = None, sinks: Tensor | None = None, splits: int | None = None,
           return_lse: bool = False, return_aux: Any = None,
           kernel_options: dict | None = None) -> Any:
    """Decode attention (see the module docstring).  Returns ``out``, ``(out, lse)`` with
    ``return_lse`` or ``(out, AuxOutput(lse, max_scores))`` with ``return_aux``, as
    ``flex_attention`` does; lse includes the sinks, max_scores is over the keys."""
    _check_programs(score_mod, mask_mod)
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
        out, lse, mx = _run(query, kv, lengths, page_table, score_mod, mask_mod, float(scale),
                            group, splits, kernel_options)
    out, lse, mx = (t.reshape(b, hq, lq, *t.shape[4:]) for t in (out, lse, mx))
    if sinks is not None:
        out, lse = add_sink(out, lse, sinks.reshape(1, hq, 1))
    if return_aux is not None:
        return out, AuxOutput(lse if return_aux.lse else None,
                              mx if return_aux.max_scores else None)
    return (out, lse) if return_lse else out


def _empty(query: Tensor, f: int) -> tuple[Tensor, Tensor, Tensor]:
    b, hq, lq, _ = query.shape
    dev = query.device
    out = torch.zeros(b, hq, 1, lq, f, dtype=query.dtype, device=dev)
    lse = torch.full((b, hq, 1, lq), -math.inf, device=dev)
    return out, lse, lse.clone()


def _check_programs(score_mod: Any, mask_mod: Any) -> None:
    """Only FlexAttention programs: their softmax is what the split merge combines."""
    for name, fn in (("score_mod", score_mod), ("mask_mod", mask_mod)):
        if fn is not None and not callable(fn):
            raise AttentionError(
                f"decode: {name} must be a FlexAttention function, got {type(fn).__name__}; "
                f"a cascade's own normaliser (sigmoid, ReLU, ...) has no split merge here: "
                f"run it with attndsl.compile(cascade) (use sinks= for sink logits and "
                f"off-by-one softmax, which decode merges)")


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
    if page_table.dim() != 2 or page_table.shape[0] != b or page_table.dtype.is_floating_point:
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


def _kv_block(kv: PhysicalKV) -> int:
    """Key rows per block: the largest power of two <= 128 dividing the page (dense: 64)."""
    if not kv.paged:
        return DENSE_BLOCK
    return min(MAX_Q_BLOCK, kv.page & -kv.page)


def _run(query: Tensor, kv: PhysicalKV, lengths: Tensor, page_table: Tensor | None,
         score_mod: Callable | None, mask_mod: Callable | None, scale: float, group: int,
         splits: int | None, options: dict | None) -> tuple[Tensor, Tensor, Tensor]:
    """One launch of the packed problem, then the merge; returns [B, Hkv, G, Lq, ...]."""
    b, hq, lq, e = query.shape
    hkv, rows = kv.k.shape[1], group * lq
    spec = packed_spec(score_mod, mask_mod, paged=kv.paged)
    _, module = compiled(spec.cascade)
    kv_block = _kv_block(kv)
    q_block = min(MAX_Q_BLOCK, max(16, 1 << (rows - 1).bit_length()))
    q_tiles = -(-rows // q_block)
    live = live_blocks(spec.mask, spec.captured, lengths, hq, hkv, lq, kv_block)
    most = int(live.sum(-1).max())
    if splits is None:
        splits = choose_splits(b * hkv * q_tiles, most, sm_count(query.device))
    if splits < 1:
        raise AttentionError(f"decode: splits must be >= 1, got {splits}")
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
    o, lse, mx = merge_splits(out["O"].reshape(*shape, -1), out["LSE"].reshape(shape),
                              out["MAX"].reshape(shape), 1)
    return o, lse, mx


__all__ = ["decode"]
