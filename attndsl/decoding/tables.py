"""The block tables of a decode launch: which key blocks each (sequence, split) program reads.

Keys are visited in blocks of ``kv_block`` rows, each inside one page.  Sequence ``b`` has
``ceil(len[b] / kv_block)`` logical blocks; logical block ``j`` (page ``j // per_page``, part
``j % per_page``) is physical block ``(page_table[b, page] * PW + part * kv_block) / kv_block``
of the physical view (:mod:`attndsl.decoding.layout`).  A (sequence, key/value head)
program visits its live blocks (:mod:`attndsl.decoding.pruning`), in order; split ``s`` of
``S`` takes the ``s``-th of S equal chunks of them.  Every listed block is partial (the
kernel evaluates the mask, which holds the length and the user's mask), so the table is
exact whatever the mask.  The tables are torch's ``kv_num_blocks`` [B*S, Hkv, nq] and
``kv_indices`` [B*S, Hkv, nq, chunk] (the same for every query tile: broadcast views).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def logical_blocks(lengths: Tensor, kv_block: int) -> Tensor:
    """``ceil(len[b] / kv_block)`` per sequence (int64)."""
    return (lengths.to(torch.int64) + kv_block - 1) // kv_block


def physical_blocks(page_table: Tensor | None, n_blocks: int, kv_block: int, page: int,
                    pw: int) -> Tensor:
    """[B, n_blocks] physical block of each logical block (the block itself when dense)."""
    j = torch.arange(n_blocks, dtype=torch.int64, device=page_table.device
                     if page_table is not None else "cpu")
    if page_table is None:
        return j[None]
    per_page = page // kv_block
    pages = page_table.to(torch.int64)[:, (j // per_page).clamp(max=page_table.shape[1] - 1)]
    return (pages * pw + (j % per_page)[None] * kv_block) // kv_block


def split_tables(live: Tensor, page_table: Tensor | None, splits: int, q_tiles: int,
                 kv_block: int, page: int, pw: int) -> dict[str, Tensor]:
    """``kv_num_blocks`` [B*S, Hkv, q_tiles] / ``kv_indices`` [B*S, Hkv, q_tiles, chunk] of
    the packed problem (batch ``b * splits + s``) from ``live`` [B, Hkv, n_blocks], the
    logical blocks each (sequence, key/value head) visits: its live blocks in order, cut
    into ``splits`` equal chunks."""
    b, heads, n_blocks = live.shape
    count = live.sum(-1)  # [B, Hkv]
    chunk = max(1, -(-int(count.max()) // splits)) if live.numel() else 1
    order = torch.sort((~live).to(torch.int8), dim=-1, stable=True).indices  # live first
    order = torch.nn.functional.pad(order, (0, splits * chunk - n_blocks)) \
        if splits * chunk > n_blocks else order[..., :splits * chunk]
    phys = physical_blocks(page_table, n_blocks, kv_block, page, pw).to(live.device)
    phys = phys.expand(b, n_blocks)[:, None].expand(b, heads, n_blocks)
    idx = torch.gather(phys, 2, order)  # [B, Hkv, S * chunk]
    idx = idx.reshape(b, heads, splits, chunk).transpose(1, 2)
    start = torch.arange(splits, device=live.device) * chunk
    num = (count[:, None, :] - start[None, :, None]).clamp(0, chunk)  # [B, S, Hkv]
    batch = b * splits
    num = num.reshape(batch, heads, 1).to(torch.int32).expand(batch, heads, q_tiles)
    idx = idx.reshape(batch, heads, 1, chunk).to(torch.int32)
    # no full blocks, given explicitly: the launcher's stand-in for missing full tables has
    # one row, which a second query tile would read past
    none = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=live.device)
    return {"kv_num_blocks": num, "kv_indices": idx.expand(batch, heads, q_tiles, chunk),
            "full_kv_num_blocks": none[..., 0].expand(batch, heads, q_tiles),
            "full_kv_indices": none.expand(batch, heads, q_tiles, 1)}


def inverse_pages(page_table: Tensor, lengths: Tensor, page: int, pw: int, rows: int) -> Tensor:
    """[B, num_pages] int32: the logical page of each physical page in each sequence, -1 for
    pages the sequence does not own (the physical -> logical table of the score programs);
    ``rows`` is the physical view's length (:mod:`attndsl.decoding.layout`)."""
    n_pages = (rows - page) // pw + 1
    b, cols = page_table.shape
    inv = torch.full((b, n_pages), -1, dtype=torch.int32, device=page_table.device)
    j = torch.arange(cols, device=page_table.device)
    used = j[None] < logical_blocks(lengths, page)[:, None]
    rows = torch.arange(b, device=page_table.device)[:, None].expand(b, cols)
    inv[rows[used], page_table.to(torch.int64)[used]] = j.expand(b, cols)[used].to(torch.int32)
    return inv


__all__ = ["inverse_pages", "logical_blocks", "physical_blocks", "split_tables"]
