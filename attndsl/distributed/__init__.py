"""Context parallelism: attndsl attention over a sequence sharded across ranks.

* :mod:`.layout` -- contiguous / striped / zigzag layouts, ``shard`` / ``unshard``;
* :mod:`.positions` -- the cascade rewrite that makes programs see global positions;
* :mod:`.pairs` -- (query shard, key shard) pairs classified by the mask analysis, work per
  rank and the layout chosen by it;
* :mod:`.merge` -- the exact merge of partial (O, lse) states and extra normaliser terms;
* :mod:`.kernels` -- one pair through the generated forward / backward kernels;
* :mod:`.ring` -- the ring schedule over torch.distributed, forward and backward;
* :mod:`.api` -- ``context_parallel_attention``, ``tree_decode``, ``choose_layout``;
* :mod:`.linear` -- ``context_parallel_linear``: linear attention, one all-gather of states.
"""

from attndsl.distributed.api import choose_layout, context_parallel_attention, tree_decode
from attndsl.distributed.layout import LAYOUTS, positions, shard, unshard
from attndsl.distributed.linear import context_parallel_linear

__all__ = ["LAYOUTS", "choose_layout", "context_parallel_attention", "context_parallel_linear",
           "positions", "shard", "tree_decode", "unshard"]
