"""How many splits of the key index a decode launch uses.

A decode problem has ``B * Hkv * q_tiles`` programs after GQA packing (often fewer than the
SMs of a GPU); splitting each sequence's keys into ``S`` parts multiplies that by S, at the
cost of a merge over S partial states.  S is the smallest count that gives every SM
``WAVES`` programs, capped so that each split keeps at least ``MIN_BLOCKS`` key blocks (the
merge and the per-program setup stay small next to the key traffic).  On a CPU (Triton's
interpreter runs programs one after another) splitting only adds work: S = 1.
"""

from __future__ import annotations

import torch

WAVES = 2  # programs per SM wanted
MIN_BLOCKS = 4  # key blocks a split keeps at least


def sm_count(device: torch.device) -> int:
    """The streaming multiprocessors of a CUDA device (0 elsewhere)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_splits(programs: int, max_blocks: int, sms: int) -> int:
    """S for ``programs`` packed programs whose longest sequence has ``max_blocks`` key
    blocks on a device with ``sms`` SMs (see the module docstring)."""
    if sms <= 0 or programs <= 0 or max_blocks <= 0:
        return 1
    want = -(-WAVES * sms // programs)
    return max(1, min(want, max_blocks // MIN_BLOCKS))


__all__ = ["MIN_BLOCKS", "WAVES", "choose_splits", "sm_count"]
