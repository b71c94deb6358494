"""Decoding: a few new queries per sequence against a (paged, ragged) K/V cache.

Built from IR rewrites and the runtime, with the prefill kernel generator unchanged:
``reindex`` (the packed problem: GQA groups, key splits, logical positions), ``layout``
(physical views of K/V), ``pruning`` (the key blocks a mask keeps), ``tables`` (the key
blocks of each program), ``split`` (how many splits), ``traffic`` (the bandwidth model),
``api`` (:func:`decode`; the split states merge by :mod:`attndsl.distributed.merge`) and
``cache`` (:class:`PagedKVCache`, and the block masks of ``attndsl.flex_attention`` over
its pages).
"""

from attndsl.decoding.api import decode
from attndsl.decoding.cache import PagedKVCache

__all__ = ["PagedKVCache", "decode"]
