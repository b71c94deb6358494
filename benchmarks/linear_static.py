"""Static comparison: attndsl's chunked linear kernels against flash-linear-attention's.

Both sides are compiled ahead of time on the CPU with :func:`attndsl.runtime.aot.compile_kernels`
(Triton's real compiler and ptxas; no GPU) for retention (a fixed per-head decay), simple GLA
(a scalar gate per position) and GLA (a gate per position and key dim), forward and backward,
and reported per kernel as registers, spills (STL/LDL), shared memory, tensor-core
instructions, the instructions of the innermost tensor-core loops of the SASS
(:mod:`attndsl.runtime.sass`; ``-`` when the kernel has no such loop) and programs (CTAs) per
SM from the occupancy estimate.

flash-linear-attention (fla-core 0.6.0) is compiled with bf16 inputs, its chunk of 64, sub-chunk
16 (GLA), BK = BV = 64 and 4 warps, 2 stages: one config of its autotune lists (it ships no tuned
configs).  attndsl's kernels are compiled as its runtime launches them
(:func:`attndsl.runtime.linear_kernels.static_specs`).

fla-core is not a dependency of attndsl (nor of CI); to run the FLA side::

    pip download fla-core einops --no-deps -d fla && cd fla && unzip -q fla_core-*.whl \
        && unzip -q einops-*.whl && cd ..
    python benchmarks/linear_static.py --fla fla

Without ``--fla`` (or when the directory does not hold an importable ``fla``) only attndsl's
kernels are reported and the FLA side says it was skipped.

usage: python benchmarks/linear_static.py [--fla DIR] [--dims 64 128] [--targets sm90 sm80]
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import triton

from attndsl.runtime import linear_kernels as lk
from attndsl.runtime.aot import CompiledReport, KernelSpec, compile_kernels

VARIANTS = ("retention", "simple_gla", "gla")
TITLES = {"retention": "retention (fixed per-head decay)",
          "simple_gla": "simple GLA (scalar gate per position)",
          "gla": "GLA (gate per position and key dim)"}
FLA_BT, FLA_BC, FLA_WARPS, FLA_STAGES = 64, 16, 4, 2
# FLA tensors kept in fp32 (gates and their cumulative sums, intra-chunk scores, final and
# initial states and their gradients); every other pointer is bf16 (or listed per kernel).
FLA_FP32 = frozenset({"g", "gk", "g_gamma", "A", "dA", "dg", "ht", "h0", "dh0", "dht"})


def _unwrap(fn: Any) -> Any:
    """The ``@triton.jit`` function under FLA's ``@heuristics`` / ``@autotune`` wrappers."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    while isinstance(fn, (Autotuner, Heuristics)):
        fn = fn.fn
    return fn


def _runtime_args(jit: Any) -> list[str]:
    """The arguments of a Triton kernel that are not ``tl.constexpr``."""
    params = inspect.signature(jit.fn).parameters.values()
    return [p.name for p in params if "constexpr" not in str(p.annotation)]


def fla_spec(fn: Any, target: str, absent: Sequence[str], constexprs: dict[str, Any],
             fp32: Sequence[str] = ()) -> KernelSpec:
    """An FLA kernel's compile request: each runtime argument is ``None`` (``absent``), the
    length ``T`` (i32), ``scale`` (fp32) or a pointer (fp32 for gates and scores, else bf16)."""
    jit = _unwrap(fn)
    const = dict(constexprs)
    sig = {}
    for name in _runtime_args(jit):
        if name in absent:
            const[name] = None
        elif name == "T":
            sig[name] = "i32"
        elif name == "scale":
            sig[name] = "fp32"
        else:
            sig[name] = "*fp32" if name in FLA_FP32 or name in fp32 else "*bf16"
    const = {k: v for k, v in const.items() if k in jit.arg_names}
    return KernelSpec(jit, sig, const, target, FLA_WARPS, FLA_STAGES)


def fla_specs(variant: str, dim: int, target: str) -> list[tuple[str, KernelSpec]]:
    """FLA's forward and backward kernels for ``variant`` at head dim ``dim`` (H = 4)."""
    from fla.ops.common import chunk_h, chunk_o
    from fla.ops.gla import chunk as gla

    bk = bv = min(64, dim)
    shape = dict(B=1, H=4, HQ=4, HV=4, NG=1, K=dim, V=dim, BT=FLA_BT, BS=FLA_BT, BK=bk, BV=bv,
                 BC=FLA_BC, NC=FLA_BT // FLA_BC, IS_VARLEN=False, STATE_V_FIRST=False,
                 USE_GRAPH=False, USE_INITIAL_STATE=False, STORE_FINAL_STATE=False,
                 STORE_INITIAL_STATE_GRADIENT=False, USE_FINAL_STATE_GRADIENT=False,
                 USE_DW=False)
    varlen = ("cu_seqlens", "chunk_indices", "split_offsets", "h0", "ht", "dh0", "dht", "dw")
    gates = dict(USE_G=variant == "simple_gla", USE_G_GAMMA=variant == "retention",
                 USE_GK=variant == "gla", USE_GV=False)
    unused = {"retention": ("g", "gk", "gv"), "simple_gla": ("g_gamma", "gk", "gv"),
              "gla": ("g", "g_gamma", "gv")}[variant] + varlen
    c = {**shape, **gates}

    def spec(fn: Any, **kw: Any) -> KernelSpec:
        return fla_spec(fn, target, unused, {**c, **kw.pop("const", {})}, **kw)

    def gla_spec(fn: Any, **kw: Any) -> KernelSpec:  # GLA's own kernels read the gate as g
        return fla_spec(fn, target, ("g_gamma",) + varlen, {**c, **kw.pop("const", {})}, **kw)

    h = ("chunk_fwd_kernel_h", spec(chunk_h.chunk_fwd_kernel_h))
    dh = ("chunk_bwd_kernel_dh", spec(chunk_h.chunk_bwd_kernel_dh))
    if variant != "gla":
        return [h, ("chunk_fwd_kernel_o", spec(chunk_o.chunk_fwd_kernel_o)), dh,
                ("chunk_bwd_kernel_dqkwg", spec(chunk_o.chunk_bwd_kernel_dqkwg)),
                ("chunk_bwd_kernel_dv", spec(chunk_o.chunk_bwd_kernel_dv))]
    intra_bk = max(16, 1 << (dim - 1).bit_length())
    return [h,
            ("chunk_gla_fwd_A_kernel_intra_sub_inter",
             gla_spec(gla.chunk_gla_fwd_A_kernel_intra_sub_inter)),
            ("chunk_gla_fwd_A_kernel_intra_sub_intra",
             gla_spec(gla.chunk_gla_fwd_A_kernel_intra_sub_intra, const=dict(BK=intra_bk))),
            ("chunk_gla_fwd_kernel_o", gla_spec(gla.chunk_gla_fwd_kernel_o)),
            dh,
            ("chunk_gla_bwd_kernel_dA", gla_spec(gla.chunk_gla_bwd_kernel_dA)),
            ("chunk_gla_bwd_kernel_dv", gla_spec(gla.chunk_gla_bwd_kernel_dv)),
            ("chunk_gla_bwd_kernel_intra", gla_spec(gla.chunk_gla_bwd_kernel_intra,
                                                    fp32=("dq", "dk"))),
            ("chunk_gla_bwd_kernel_inter", gla_spec(gla.chunk_gla_bwd_kernel_inter,
                                                    fp32=("dq", "dk", "dq2", "dk2")))]


def loop_cell(r: CompiledReport) -> str:
    """The innermost tensor-core loops: instructions (tensor-core, EX2) per body."""
    if not r.loops:
        return "-"
    return " + ".join(f"{lp.instructions} ({lp.tensor_core} TC, {lp.ex2} EX2)" for lp in r.loops)


def table(rows: list[tuple[str, str, CompiledReport]]) -> str:
    """One line per kernel."""
    head = ("side", "kernel", "regs", "spills", "smem KiB", "TC instr", "TC-loop instr",
            "CTAs/SM", "fits")
    cells = [head]
    for side, name, r in rows:
        spills = f"{r.spill_stores}/{r.spill_loads}" + (f" ({r.stack_bytes}B)" if r.spills else "")
        cells.append((side, name, str(r.registers), spills, f"{r.shared_total_bytes / 1024:.1f}",
                      f"{r.tc_kind} x{r.tc_count}" if r.tc_count else "none", loop_cell(r),
                      f"{r.programs_per_sm} ({r.occupancy:.0%})", "yes" if r.fits else "NO"))
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def compile_side(side: str, named: list[tuple[str, KernelSpec]], jobs: int
                 ) -> list[tuple[str, str, CompiledReport]]:
    reports = compile_kernels([s for _, s in named], jobs=jobs)
    return [(side, name, r) for (name, _), r in zip(named, reports)]


def fla_available(path: str | None) -> str:
    """'' when ``fla`` imports from ``path``, else why the FLA side is skipped."""
    if path is None:
        return "skipped: no --fla DIR (see the module docstring for how to get fla-core)"
    sys.path.insert(0, os.path.abspath(path))
    os.environ["PYTHONPATH"] = os.pathsep.join([os.path.abspath(path),
                                                os.environ.get("PYTHONPATH", "")])
    try:
        import fla.ops.gla.chunk  # noqa: F401
    except ImportError as err:
        return f"skipped: fla does not import from {path} ({err})"
    return ""


def fla_version() -> str:
    """The version of the ``fla`` that imported."""
    import fla

    return f"fla-core {getattr(fla, '__version__', 'unknown')}"


def main(argv: Sequence[str] | None = None,
         out: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fla", help="directory holding the unpacked fla-core (and einops)")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--targets", nargs="+", default=["sm90"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--jobs", type=int, default=2, help="compiler child processes")
    args = parser.parse_args(argv)
    skipped = fla_available(args.fla)
    out(f"triton {triton.__version__}; FLA: {skipped or fla_version()}; attndsl bf16 features, "
        f"chunk {lk.CHUNK}, blocks of {lk.BLOCK}, {lk.WARPS} warps")
    for target in args.targets:
        for variant in args.variants:
            for dim in args.dims:
                out(f"== {TITLES[variant]}, head dim {dim}, {target} ==")
                rows = compile_side("attndsl", lk.static_specs(variant, dim, target), args.jobs)
                if not skipped:
                    rows += compile_side("FLA", fla_specs(variant, dim, target), args.jobs)
                out(table(rows))
                if skipped:
                    out(f"FLA: {skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
