"""Mask analysis: which (batch, head, query tile, key tile) blocks of a mask are empty or full.

One job per module, in dependency order:

* :mod:`.intervals` -- interval arithmetic: :class:`Iv` and one sound bound rule per Op;
* :mod:`.summaries` -- range min / max of captured tensors (:class:`RangeTable`);
* :mod:`.tiles` -- the tile grid, the classes EMPTY / PARTIAL / FULL and the result
  (:class:`TileMap`, its key-tile segments ``kv_ranges``);
* :mod:`.evaluator` -- an expression's bounds over many boxes at once
  (:class:`IntervalEvaluator`);
* :mod:`.classify` -- the interval pass over the tile grid (coarse to fine), refinement of the
  undecided tiles and exact evaluation (:func:`classify_tiles`, :func:`exact_classes`,
  :func:`check_mask`);
* :mod:`.symbolic`, :mod:`.bands`, :mod:`.closed_form` -- closed forms of each query tile's
  key-tile ranges for masks made of bands (:func:`kv_tile_bounds`, :func:`kv_tile_segments`,
  :func:`closed_form_segments` and the plans' block ``SPARSE_BLOCK``).

torch's table layout of the classes lives with the block masks (:mod:`attndsl.block_tables`).
The exact evaluation uses the IR's element-wise evaluator (:mod:`attndsl.ir.evaluate`), not
the eager oracle.
"""

from attndsl.passes.mask.classify import (
    CHUNKED,
    CLOSED_FORM,
    MAX_ELEMENTS,
    REFINE_BUDGET,
    SUMMARIES,
    check_mask,
    classify_tiles,
    exact_classes,
)
from attndsl.passes.mask.closed_form import (
    SPARSE_BLOCK,
    KVBounds,
    closed_form_segments,
    kv_tile_bounds,
    kv_tile_segments,
)
from attndsl.passes.mask.evaluator import Boxes, IntervalEvaluator
from attndsl.passes.mask.intervals import Iv
from attndsl.passes.mask.summaries import RangeTable
from attndsl.passes.mask.tiles import (
    EMPTY,
    FULL,
    MAX_SEGMENTS,
    PARTIAL,
    Geometry,
    MaskAnalysisError,
    TileMap,
)

__all__ = ["CHUNKED", "CLOSED_FORM", "EMPTY", "FULL", "MAX_ELEMENTS", "MAX_SEGMENTS", "PARTIAL",
           "REFINE_BUDGET", "SPARSE_BLOCK", "SUMMARIES", "Boxes", "Geometry", "IntervalEvaluator",
           "Iv", "KVBounds", "MaskAnalysisError", "RangeTable", "TileMap", "check_mask",
           "classify_tiles", "closed_form_segments", "exact_classes", "kv_tile_bounds",
           "kv_tile_segments"]
