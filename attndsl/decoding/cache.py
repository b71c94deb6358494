"""A paged K/V cache for users, and ``attndsl.flex_attention`` over its pages.

:class:`PagedKVCache` keeps K and V in pages (``[num_pages, page_size, Hkv, D]`` or the
transposed ``[num_pages, Hkv, page_size, D]``), a page table ``[max_batch, max_pages]`` and
each sequence's length; ``append`` writes a step's K/V (allocating pages from a free list),
``gather`` reads a sequence back in logical order, ``free`` returns its pages.

For ``flex_attention`` (as torch's paged-attention helper does), K and V are the pool viewed
as one physical sequence (:mod:`attndsl.decoding.layout`, broadcast over the batch with stride
0), the block mask's key block is a page and it lists each sequence's physical pages, and the
score / mask programs are wrapped to see logical positions: key row ``n`` is logical position
``logical[b, n // PW] * page_size + n % PW`` through a captured physical -> logical page table
(-1 for pages the sequence does not own), query ``i`` is at ``lengths[b] - Lq + i``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch

from attndsl.block_mask import BlockMask
from attndsl.decoding.api import decode
from attndsl.decoding.layout import LAYOUTS, PhysicalKV, paged_kv
from attndsl.decoding.pruning import live_blocks
from attndsl.decoding.tables import inverse_pages, split_tables
from attndsl.runtime.checks import AttentionError

Tensor = torch.Tensor


class PagedKVCache:
    """Pages of K and V for up to ``max_batch`` sequences of up to ``max_pages`` pages."""

    def __init__(self, num_pages: int, page_size: int, heads: int, head_dim: int, *,
                 max_batch: int, max_pages: int, v_dim: int | None = None,
                 layout: str = "NPHD", dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if layout not in LAYOUTS:
            raise AttentionError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
        _check_sizes(num_pages=num_pages, heads=heads, max_batch=max_batch,
                     max_pages=max_pages)
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0 \
                or page_size % 16:
            raise AttentionError(f"PagedKVCache: page_size must be a positive multiple of 16 "
                                 f"(the smallest key tile), got {page_size!r}")
        _check_sizes(head_dim=head_dim, v_dim=head_dim if v_dim is None else v_dim)
        shape = ((num_pages, page_size, heads) if layout == "NPHD"
                 else (num_pages, heads, page_size))
        self.layout, self.page_size = layout, page_size
        self.k_pages = torch.zeros(*shape, head_dim, dtype=dtype, device=device)
        self.v_pages = torch.zeros(*shape, v_dim or head_dim, dtype=dtype, device=device)
        self.page_table = torch.zeros(max_batch, max_pages, dtype=torch.int32, device=device)
        self.lengths = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self._owned: list[list[int]] = [[] for _ in range(max_batch)]
        self._free = list(range(num_pages))[::-1]

    def physical(self) -> PhysicalKV:
        """The pool as one physical sequence (``[1, Hkv, N, D]`` views)."""
        return paged_kv(self.k_pages, self.v_pages, self.layout)

    # -- bookkeeping ---------------------------------------------------------------------------
    def _seq(self, seq: int, what: str) -> int:
        """``seq`` as a sequence number in [0, max_batch), refused otherwise (a negative one
        would name a sequence from the end, as Python's indexing does)."""
        batch = self.page_table.shape[0]
        if isinstance(seq, bool) or not hasattr(seq, "__index__") or \
                not 0 <= seq.__index__() < batch:
            raise AttentionError(f"{what}: the sequence must be an int in [0, {batch}), got "
                                 f"{seq!r}")
        return seq.__index__()

    def reserve(self, seq: int, length: int) -> None:
        """Allocate pages so that sequence ``seq`` can hold ``length`` tokens."""
        seq = self._seq(seq, "reserve")
        if isinstance(length, bool) or not hasattr(length, "__index__") or length < 0:
            raise AttentionError(f"reserve: length must be an int >= 0, got {length!r}")
        need = -(-length // self.page_size)
        if need > self.page_table.shape[1]:
            raise AttentionError(f"sequence {seq} would need {need} pages; the cache holds "
                                 f"{self.page_table.shape[1]} per sequence")
        owned = self._owned[seq]
        if need - len(owned) > len(self._free):
            raise AttentionError(f"out of pages: sequence {seq} needs {need - len(owned)} more, "
                                 f"{len(self._free)} are free")
        while len(owned) < need:
            page = self._free.pop()
            self.page_table[seq, len(owned)] = page
            owned.append(page)

    def append(self, k: Tensor, v: Tensor, seqs: list[int] | None = None) -> None:
        """Write ``k`` / ``v`` ``[len(seqs), Hkv, L, D]`` after each sequence's last token."""
        seqs = list(range(k.shape[0])) if seqs is None else [int(s) for s in seqs]
        self._check_append(k, v, seqs)
        steps = k.shape[2]
        for row, seq in enumerate(seqs):
            start = int(self.lengths[seq])
            self.reserve(seq, start + steps)
            pos = torch.arange(start, start + steps, device=k.device)
            pages = self.page_table[seq].to(torch.int64)[pos // self.page_size]
            slot = pos % self.page_size
            for pool, x in ((self.k_pages, k[row]), (self.v_pages, v[row])):
                rows = x.transpose(0, 1).to(pool.dtype)  # [L, Hkv, D]
                if self.layout == "NPHD":
                    pool[pages, slot] = rows
                else:
                    pool[pages, :, slot] = rows
            self.lengths[seq] = start + steps

    def _check_append(self, k: Tensor, v: Tensor, seqs: list[int]) -> None:
        """Refuse an append that does not fit, before anything is written (an append is all or
        nothing: no sequence grows when another one would not fit)."""
        heads = self.k_pages.shape[2 if self.layout == "NPHD" else 1]
        head_dim = self.k_pages.shape[-1]
        want = (len(seqs), heads, k.shape[2] if k.dim() == 4 else 0)
        if (k.dim() != 4 or v.dim() != 4 or tuple(k.shape[:3]) != want
                or tuple(v.shape[:3]) != want or k.shape[3] != head_dim
                or v.shape[3] != self.v_pages.shape[-1]):
            raise AttentionError(
                f"append: k {tuple(k.shape)} and v {tuple(v.shape)} must be "
                f"[{len(seqs)}, {heads}, L, {head_dim}] and [{len(seqs)}, {heads}, L, "
                f"{self.v_pages.shape[-1]}] (sequences, the cache's heads, new tokens, dims)")
        if not (k.is_floating_point() and v.is_floating_point()):
            raise AttentionError(f"append: k and v must be floating point, got {k.dtype}, "
                                 f"{v.dtype}")
        # as FlashInfer's append_paged_kv_cache (and vLLM's cache write, which quantizes only
        # to an explicit fp8 cache dtype with scales): the cache stores what the model makes,
        # so another dtype is a mistake -- a narrowing loses bits silently, and even an exact
        # widening (fp16 into fp32) doubles the cache a model meant to hold in 16 bits
        if k.dtype != self.k_pages.dtype or v.dtype != self.v_pages.dtype:
            raise AttentionError(f"append: k and v are {k.dtype}, {v.dtype}; the cache holds "
                                 f"{self.k_pages.dtype} (convert them, or make the cache with "
                                 f"dtype={k.dtype})")
        batch = self.page_table.shape[0]
        if any(not 0 <= s < batch for s in seqs) or len(set(seqs)) != len(seqs):
            raise AttentionError(f"append: seqs must be distinct sequence numbers in "
                                 f"[0, {batch}), got {seqs}")
        more = 0
        for seq in seqs:
            need = -(-(int(self.lengths[seq]) + k.shape[2]) // self.page_size)
            if need > self.page_table.shape[1]:
                raise AttentionError(f"sequence {seq} would need {need} pages; the cache holds "
                                     f"{self.page_table.shape[1]} per sequence")
            more += max(0, need - len(self._owned[seq]))
        if more > len(self._free):
            raise AttentionError(f"out of pages: the append needs {more} more pages, "
                                 f"{len(self._free)} are free; nothing was written")

    def gather(self, seq: int) -> tuple[Tensor, Tensor]:
        """Sequence ``seq``'s K and V in logical order, ``[Hkv, length, D]``."""
        seq = self._seq(seq, "gather")
        pos = torch.arange(int(self.lengths[seq]), device=self.k_pages.device)
        pages = self.page_table[seq].to(torch.int64)[pos // self.page_size]
        slot = pos % self.page_size
        if self.layout == "NPHD":
            return (self.k_pages[pages, slot].transpose(0, 1),
                    self.v_pages[pages, slot].transpose(0, 1))
        return (self.k_pages[pages, :, slot].transpose(0, 1),
                self.v_pages[pages, :, slot].transpose(0, 1))

    def free(self, seq: int) -> None:
        """Return sequence ``seq``'s pages and set its length to 0."""
        seq = self._seq(seq, "free")
        self._free.extend(reversed(self._owned[seq]))
        self._owned[seq] = []
        self.page_table[seq] = 0
        self.lengths[seq] = 0

    # -- attention -----------------------------------------------------------------------------
    def decode(self, query: Tensor, **kw: Any) -> Any:
        """:func:`attndsl.decoding.decode` over the first ``query.shape[0]`` sequences."""
        b = query.shape[0]
        return decode(query, self.k_pages, self.v_pages, self.lengths[:b],
                      page_table=self.page_table[:b], layout=self.layout, **kw)

    def flex_inputs(self, batch: int) -> tuple[Tensor, Tensor]:
        """K and V for ``flex_attention``: the physical sequence, broadcast to ``batch``."""
        kv = self.physical()
        return (kv.k.expand(batch, *kv.k.shape[1:]), kv.v.expand(batch, *kv.v.shape[1:]))

    def _logical(self, batch: int) -> tuple[Tensor, Tensor, PhysicalKV]:
        max_batch = self.lengths.shape[0]
        if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or \
                not 1 <= batch <= max_batch:
            raise AttentionError(f"batch must be an int in [1, {max_batch}] (the cache's "
                                 f"max_batch), got {batch!r}")
        kv = self.physical()
        lengths = self.lengths[:batch].clone()
        return (inverse_pages(self.page_table[:batch], lengths, kv.page, kv.pw, kv.k.shape[2]),
                lengths, kv)

    def score_mod(self, score_mod: Callable, batch: int, q_len: int) -> Callable:
        """``score_mod`` seeing the logical query and key positions of the first ``batch``
        sequences (their lengths now)."""
        inv, lengths, kv = self._logical(batch)
        page, pw = kv.page, kv.pw

        def paged_score(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            key = inv[b, kv_idx // pw] * page + kv_idx % pw
            return score_mod(score, b, h, lengths[b] - q_len + q_idx, key)
        return paged_score

    def block_mask(self, mask_mod: Callable | None, batch: int, q_len: int) -> BlockMask:
        """A block mask over the physical pages of the first ``batch`` sequences: key block
        = a page (its largest power-of-two part up to 128), each sequence's own pages listed
        (all partial: the mask holds the lengths), ``mask_mod`` seeing logical positions."""
        inv, lengths, kv = self._logical(batch)
        kv_block = min(128, kv.page & -kv.page)
        if kv.page % 16:
            raise AttentionError(f"page_size {kv.page} must be a multiple of 16")
        q_block = 128
        live = live_blocks(None, {}, lengths, 1, 1, q_len, kv_block)
        tables = split_tables(live, self.page_table[:batch], 1, -(-q_len // q_block),
                              kv_block, kv.page, kv.pw)
        page, pw = kv.page, kv.pw

        def paged_mask(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            owner = inv[b, kv_idx // pw]
            key = owner * page + kv_idx % pw
            query = lengths[b] - q_len + q_idx
            keep = (owner >= 0) & (key < lengths[b]) & (query >= 0)
            return keep if mask_mod is None else keep & mask_mod(b, h, query, key)
        return BlockMask.from_tables((q_len, kv.k.shape[2]), tables["kv_num_blocks"],
                                     tables["kv_indices"], tables["full_kv_num_blocks"],
                                     tables["full_kv_indices"], None, None, None, None,
                                     BLOCK_SIZE=(q_block, kv_block), mask_mod=paged_mask,
                                     mechanism="the page table")


def _check_sizes(**sizes: int) -> None:
    """Refuse a size of the cache that is not a positive int, by name."""
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise AttentionError(f"PagedKVCache: {name} must be a positive int, got {size!r}")


__all__ = ["PagedKVCache"]
