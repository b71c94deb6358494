"""What the tests compare against torch, across the torch versions in the README's table."""

from __future__ import annotations

from typing import Any

import torch

# torch >= 2.14 counts BlockMask.sparsity() over the padded block grid; earlier torch over the
# unpadded lengths (negative when a length is not a multiple of the block size).
TORCH_SPARSITY_OVER_BLOCK_GRID = torch.__version__ >= "2.14"


def torch_block_grid_sparsity(tbm: Any) -> float:
    """Percentage of the block grid that torch's BlockMask ``tbm`` skips, from its own tables:
    ``100 * (1 - (partial + full blocks) / (B * H * ceil(Q_LEN / BQ) * ceil(KV_LEN / BK)))``.

    Where torch itself defines sparsity this way (>= 2.14), its answer must agree."""
    computed = int(tbm.kv_num_blocks.sum())
    if tbm.full_kv_num_blocks is not None:
        computed += int(tbm.full_kv_num_blocks.sum())
    total = tbm.kv_num_blocks.shape[:-1].numel()
    for length, block in zip(tbm.seq_lengths, tbm.BLOCK_SIZE, strict=True):
        total *= -(-length // block)
    value = 100 * (1 - computed / total)
    if TORCH_SPARSITY_OVER_BLOCK_GRID:
        assert abs(value - tbm.sparsity()) < 1e-9, (value, tbm.sparsity())
    return value
