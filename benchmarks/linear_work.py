"""Work of the chunked linear form against the quadratic form of the same cascade, measured.

The cascade is ``examples/simple_gla.attn`` (scalar gates, causal), which compiles to both
forms.  Both kernels run in Triton's interpreter on the CPU, where every ``tl.dot`` goes
through ``InterpreterBuilder.create_dot``: this script wraps it and counts the dot products
executed and their multiply-accumulates (M * N * K each), i.e. the tensor-core work of each
kernel as it actually ran (key tiles visited by the quadratic kernel, chunks and state updates
by the chunked one), plus the interpreter's wall time.  The quadratic kernel's work grows as
L^2 (causal: about L^2 / 2 score entries, each in a QK^T and a PV product), the chunked one's
as L (per chunk of C positions: the state update K^T V in the states kernel, Q K^T, Q H and
P V in the output kernel).  The recurrent kernel (decode) does no dots: one rank-1 state
update per position, L per (batch, head).

usage: python benchmarks/linear_work.py [--lengths 256 512 1024 2048] [--dim 64]
       [--chunk 64] [--out benchmarks/results/linear-work.txt]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

import attndsl  # noqa: E402
from attndsl.frontend.text import parse_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class DotCounter:
    """Counts the dots the interpreter executes and their multiply-accumulates."""

    def __init__(self) -> None:
        self.dots = 0
        self.macs = 0
        self._orig = interpreter.InterpreterBuilder.create_dot

    def __enter__(self) -> DotCounter:
        counter, orig = self, self._orig

        def create_dot(builder, a, b, d, *args, **kwargs):  # noqa: ANN001, ANN202
            m, k = a.data.shape[-2:]
            counter.dots += 1
            counter.macs += int(m) * int(k) * int(b.data.shape[-1])
            return orig(builder, a, b, d, *args, **kwargs)

        interpreter.InterpreterBuilder.create_dot = create_dot
        return self

    def __exit__(self, *exc: object) -> None:
        interpreter.InterpreterBuilder.create_dot = self._orig


def measure(run) -> tuple[int, int, float]:  # noqa: ANN001
    with DotCounter() as c:
        t0 = time.perf_counter()
        run()
        dt = time.perf_counter() - t0
    return c.dots, c.macs, dt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cascade = parse_file(ROOT / "examples" / "simple_gla.attn")["simple_gla"]
    kernel = attndsl.compile(cascade)
    lines = [f"simple_gla, B=H=1, E=F={args.dim}, chunk {args.chunk}, Triton interpreter "
             f"(CPU), torch {torch.__version__}",
             f"{'L':>6s} {'form':10s} {'dots':>8s} {'MACs':>14s} {'MACs/L':>10s} "
             f"{'time s':>8s}"]
    for length in args.lengths:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 1, length, args.dim, generator=gen) for _ in range(3))
        cap = {"A": torch.randn(1, 1, length, generator=gen) + 3}
        inputs = {"Q": q, "K": k, "V": v}
        derived = attndsl.api.scan_inputs(cascade, {**inputs, **cap}, {})
        quadratic = {**cap, **derived}
        runs = {"quadratic": lambda x=inputs, c=quadratic: kernel.module.launch(x, {}, c, None,
                                                                                {}),
                "chunked": lambda x=inputs, c=cap: kernel.linear(x, captured=c,
                                                                 chunk=args.chunk)}
        for form, run in runs.items():
            dots, macs, dt = measure(run)
            lines.append(f"{length:6d} {form:10s} {dots:8d} {macs:14d} {macs / length:10.0f} "
                         f"{dt:8.2f}")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
