"""The block tables of a decode launch: which key blocks each (sequence, split) program reads.

Keys are visited in blocks of ``kv_block`` rows, each inside one page.  Sequence ``b`` has
``ceil(len[b] / kv_block)`` logical blocks; logical block ``j`` (page ``j // per_page``, part
``j % per_page``) is physical block ``(page_table[b, page] * PW + part * kv_block) / kv_block``
of the physical view (:mod:`attndsl.decoding.layout`).  Split ``s`` of ``S`` takes logical blocks
``[s * chunk, (s + 1) * chunk)``.  Every listed block is partial (the kernel evaluates the
mask, which holds the length and the user's mask), so the table is exact whatever the mask.
The tables are torch's ``kv_num_blocks`` [B*S, 1, nq] and ``kv_indices`` [B*S, 1, nq, chunk]
(the same for every head and query tile: broadcast views).
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


def split_tables(lengths: Tensor, page_table: Tensor | None, splits: int, q_tiles: int,
                 kv_block: int, page: int, pw: int) -> dict[str, Tensor]:
    """``kv_num_blocks`` / ``kv_indices`` of the packed problem, batch ``b * splits + s``."""
    blocks = logical_blocks(lengths, kv_block)
    most = int(blocks.max()) if blocks.numel() else 0
    chunk = max(1, -(-most // splits))
    phys = physical_blocks(page_table, splits * chunk, kv_block, page, pw).to(lengths.device)
    phys = phys.expand(lengths.shape[0], -1).reshape(-1, splits, chunk)
    start = torch.arange(splits, device=lengths.device) * chunk
    count = (blocks[:, None] - start[None]).clamp(0, chunk)  # [B, S]
    batch = lengths.shape[0] * splits
    num = count.reshape(batch, 1, 1).to(torch.int32).expand(batch, 1, q_tiles)
    idx = phys.reshape(batch, 1, 1, chunk).to(torch.int32).expand(batch, 1, q_tiles, chunk)
    return {"kv_num_blocks": num, "kv_indices": idx}


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
