"""Static mask benchmark: one mask, several spellings, the same kernel?

A FlexAttention ``mask_mod`` can say "the 64 keys before the query" many ways:
``q - kv <= 64``, ``kv + 64 >= q``, ``kv >= q - 64``.  A hand-written kernel compares the
distance ``m - n`` (``benchmarks/reference/``); the printer rewrites each spelling whose sides
differ by ``c (m - n) + k`` into that distance compare (``codegen/key_bounds.py``).  This
compiles, with the project's AOT path (no GPU), the generated forward kernel of every spelling
in :data:`GROUPS` with the static benchmark's config (128 x 64 tiles, 8 warps, 3 / 2 stages,
pointer loads, fp16) and reports per kernel the registers, spills and the instructions of its
key-tile loops, and the masked loop's ratio to the group's first spelling (the distance form a
hand-written kernel uses).

Usage::

    python benchmarks/static_masks.py                       # sm90 and sm80, D = 64
    python benchmarks/static_masks.py --targets sm80 --dims 64,128

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # launches are recorded through the interpreter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402

import attndsl  # noqa: E402
from attndsl.runtime.aot import compile_kernels  # noqa: E402
from attndsl.runtime.gpu_report import record_launches  # noqa: E402
from benchmarks.static_kernel import (  # noqa: E402
    BATCH,
    BLOCK_M,
    BLOCK_N,
    HEADS,
    LENGTH,
    WARPS,
    _spec,
    elements_per_thread,
    loop_kinds,
    stages,
)

MaskMod = Callable[..., torch.Tensor]
# group -> [(spelling, mask_mod)], the first spelling being the distance form
GROUPS: dict[str, list[tuple[str, MaskMod]]] = {
    "causal": [
        ("q >= kv", lambda b, h, q, kv: q >= kv),
        ("q - kv >= 0", lambda b, h, q, kv: q - kv >= 0),
        ("kv - q <= 0", lambda b, h, q, kv: kv - q <= 0),
        ("q + 1 > kv", lambda b, h, q, kv: q + 1 > kv),
    ],
    "causal, 3 back": [
        ("q - kv >= 3", lambda b, h, q, kv: q - kv >= 3),
        ("q >= kv + 3", lambda b, h, q, kv: q >= kv + 3),
        ("kv + 3 <= q", lambda b, h, q, kv: kv + 3 <= q),
        ("kv <= q - 3", lambda b, h, q, kv: kv <= q - 3),
    ],
    "window of 64": [
        ("(q - kv >= 0) & (q - kv <= 64)", lambda b, h, q, kv: (q - kv >= 0) & (q - kv <= 64)),
        ("(q >= kv) & (kv + 64 >= q)", lambda b, h, q, kv: (q >= kv) & (kv + 64 >= q)),
        ("(kv <= q) & (kv >= q - 64)", lambda b, h, q, kv: (kv <= q) & (kv >= q - 64)),
        ("(q - 64 <= kv) & (kv - q <= 0)", lambda b, h, q, kv: (q - 64 <= kv) & (kv - q <= 0)),
    ],
}


def measure(mask_mod: MaskMod, target: str, dim: int) -> dict:
    """Registers, spills and key-tile loops of the generated forward for ``mask_mod``."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, HEADS, LENGTH, dim, generator=gen, dtype=torch.float16)
               for _ in range(3))
    options = {"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "num_warps": WARPS,
               "num_stages": stages(dim), "tma": False}
    launch, = record_launches(lambda: attndsl.flex_attention(q, k, v, mask_mod=mask_mod,
                                                             kernel_options=options))
    spec = _spec(launch, target, "fp16")
    report, = compile_kernels([spec])
    kinds = loop_kinds(report.loops, elements_per_thread(spec))
    loops = [(kind, loop.instructions) for kind, loop in zip(kinds, report.loops, strict=True)]
    masked = max((n for kind, n in loops if kind == "masked"), default=None)
    return {"registers": report.registers, "spills": report.spill_stores + report.spill_loads,
            "loops": loops, "masked": masked}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="sm90,sm80")
    parser.add_argument("--dims", default="64")
    args = parser.parse_args(argv)
    print(f"Static SASS, compiled on CPU, no GPU; triton {triton.__version__}, torch "
          f"{torch.__version__}; tiles {BLOCK_M}x{BLOCK_N}, {WARPS} warps, pointer loads, fp16."
          "\n")
    print("| mask | spelling | target | D | masked loop | ratio | all loops | regs | spills |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for target in args.targets.split(","):
        for dim in (int(d) for d in args.dims.split(",")):
            for group, spellings in GROUPS.items():
                first = None
                for spelling, mask_mod in spellings:
                    row = measure(mask_mod, target, dim)
                    first = first or row["masked"]
                    ratio = f"{row['masked'] / first:.2f}" if row["masked"] and first else "-"
                    loops = ", ".join(f"{n}{'m' if kind == 'masked' else ''}"
                                      for kind, n in row["loops"])
                    print(f"| {group} | `{spelling}` | {target} | {dim} | {row['masked']} | "
                          f"{ratio} | {loops} | {row['registers']} | {row['spills']} |",
                          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
