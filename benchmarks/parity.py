"""The kernel-parity targets, checked: what a generated kernel may cost next to its
hand-written reference compiled with the same config (static SASS; benchmarks/static_kernel.py
and benchmarks/static_backward.py).

Per key-tile loop pair (generated over hand-written instructions, per key tile):

    ratio <= 1.00 on unmasked loops,   ratio <= 1.05 on masked loops

and per kernel: registers <= the reference's + 8, and no spills where the reference has none.
:func:`misses` answers the targets a measured pair does not meet, one line each, empty when
it meets them all; the benchmarks print them and ``--check`` makes any a failing exit status.
"""

from __future__ import annotations

from collections.abc import Iterable

LOOP_LIMITS = {"unmasked": 1.00, "masked": 1.05}  # kind -> the largest ratio allowed
REGISTER_MARGIN = 8  # registers a generated kernel may hold beyond the reference's


def misses(ratios: Iterable[tuple[str, float | None]], registers: tuple[int, int],
           spills: tuple[int, int], occupancy: tuple[int, int] | None = None) -> list[str]:
    """The targets missed by one generated kernel against its reference: ``ratios`` holds
    (loop kind, ratio or None when unpaired) per generated loop, ``registers`` and ``spills``
    are (generated, reference).  Ratios are compared as rounded to three decimals (as the
    benchmarks report them).  ``occupancy`` (programs per SM, generated and reference) goes
    beside a register miss: whether the extra registers cost resident programs."""
    out = []
    for kind, ratio in ratios:
        limit = LOOP_LIMITS.get(kind)
        if limit is not None and ratio is not None and round(ratio, 3) > limit:
            out.append(f"{kind} loop {ratio:.3f} > {limit:.2f}")
    gen_regs, ref_regs = registers
    if gen_regs > ref_regs + REGISTER_MARGIN:
        line = f"registers {gen_regs} > {ref_regs} + {REGISTER_MARGIN}"
        if occupancy is not None:
            line += f" (programs per SM: {occupancy[0]}, reference {occupancy[1]})"
        out.append(line)
    gen_spills, ref_spills = spills
    if gen_spills and not ref_spills:
        out.append(f"{gen_spills} spills where the reference has none")
    return out
