"""The pass pipeline: Cascade IR -> fused cascade -> streaming schedule -> Tile IR.

Each step is named; ``compile_cascade`` returns every intermediate so that ``attndsl explain``
can print the IR after each pass and the rewrites that fired.
"""

from __future__ import annotations

from dataclasses import dataclass

from attndsl.ir.cascade import Cascade, verify
from attndsl.ir.tile import TileKernel
from attndsl.passes.lower import Fused, inline
from attndsl.passes.stream import Schedule, derive_schedule
from attndsl.passes.tiling import lower_to_tiles


@dataclass(frozen=True)
class Compiled:
    """Every stage of one compilation."""

    cascade: Cascade
    fused: Fused
    schedule: Schedule
    kernel: TileKernel


def compile_cascade(c: Cascade, stream: bool = True) -> Compiled:
    """verify -> inline (fusion) -> pass analysis + online derivation -> tiles."""
    verify(c)
    fused = inline(c)
    schedule = derive_schedule(fused, stream=stream)
    return Compiled(c, fused, schedule, lower_to_tiles(schedule, c))
