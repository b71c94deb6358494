"""Static sm90 comparison: attndsl's chunked linear kernels against flash-linear-attention's.

Both are compiled ahead of time on the CPU with :func:`attndsl.runtime.aot.compile_kernel`
(Triton's real compiler and ptxas; no GPU), in one child process, and reported as registers,
spills, shared memory and tensor-core instructions.  flash-linear-attention's chunked forward
of simple GLA / retention is two kernels, ``chunk_fwd_kernel_h`` (the inter-chunk states,
stored per chunk) then ``chunk_fwd_kernel_o`` (the outputs); attndsl's is one,
``chunked_forward_kernel`` (states carried in registers).  FLA's kernels are compiled with
bf16 inputs (their usual use) and one config of their autotune list; attndsl's read fp32
features (the runtime evaluates q, k, v and the gate in fp32), so their dots are TF32.

The fla-core wheel is not a dependency: download and unpack it, then pass its directory::

    pip download fla-core --no-deps && unzip -q fla_core-*.whl -d fla_core
    python benchmarks/linear_static.py --fla fla_core        # needs einops importable

usage: python benchmarks/linear_static.py --fla DIR [--dims 64 128] [--target sm90]
"""

from __future__ import annotations

import argparse
import os
import sys

from attndsl.runtime import linear_kernels as lk
from attndsl.runtime.aot import compile_kernel, format_report


def attndsl_reports(dim: int, target: str) -> list:
    sig = {n: "*fp32" for n in ("Q", "K", "V", "G", "S0", "Out", "ST", "SP")}
    sig.update({"L": "i32", "E": "i32", "F": "i32"})
    const = dict(HAS_GATE=True, VECTOR=False, HAS_S0=False, SAVE=False,
                 C=lk.default_chunk(dim), BE=dim, BF=lk.FORWARD_BF)
    fwd = compile_kernel(lk.chunked_forward_kernel, sig, const, target, lk.WARPS, 1)
    bsig = {n: "*fp32" for n in ("Q", "K", "V", "G", "SP", "DO", "DST", "DQ", "DK", "DV",
                                 "DS0")}
    bsig.update({"L": "i32", "E": "i32", "F": "i32"})
    bwd = compile_kernel(lk.chunked_backward_kernel, bsig,
                         dict(HAS_GATE=True, VECTOR=False, C=16, BE=dim, BF=dim), target,
                         lk.WARPS, 1)
    return [fwd, bwd]


def fla_reports(dim: int, target: str) -> list:
    from fla.ops.common.chunk_h import chunk_fwd_kernel_h
    from fla.ops.common.chunk_o import chunk_fwd_kernel_o

    def jit(fn):  # noqa: ANN001, ANN202 -- strip @heuristics / @autotune
        while not hasattr(fn, "arg_names") or hasattr(fn, "fn") and hasattr(fn.fn, "arg_names"):
            fn = fn.fn
        return fn

    none = dict(g_gamma=None, gk=None, gv=None, h0=None, ht=None, cu_seqlens=None,
                split_offsets=None)
    h = compile_kernel(jit(chunk_fwd_kernel_h),
                       {"k": "*bf16", "v": "*bf16", "h": "*bf16", "g": "*fp32", "T": "i32"},
                       dict(none, H=4, K=dim, V=dim, BT=64, BS=64, BK=64, BV=64, USE_G=True,
                            USE_G_GAMMA=False, USE_GK=False, USE_GV=False,
                            USE_INITIAL_STATE=False, STORE_FINAL_STATE=False,
                            IS_VARLEN=False, STATE_V_FIRST=False), target, 4, 2)
    o = compile_kernel(jit(chunk_fwd_kernel_o),
                       {"q": "*bf16", "k": "*bf16", "v": "*bf16", "h": "*bf16", "g": "*fp32",
                        "o": "*bf16", "scale": "fp32", "T": "i32"},
                       dict(g_gamma=None, cu_seqlens=None, chunk_indices=None, H=4, HV=4,
                            K=dim, V=dim, BT=64, BK=64, BV=64, USE_G=True, USE_G_GAMMA=False,
                            STATE_V_FIRST=False, IS_VARLEN=False), target, 4, 2)
    return [h, o]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fla", required=True, help="directory of the unpacked fla-core wheel")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--target", default="sm90")
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.fla))
    os.environ["PYTHONPATH"] = os.pathsep.join([os.path.abspath(args.fla),
                                                os.environ.get("PYTHONPATH", "")])
    for dim in args.dims:
        print(f"== simple GLA (scalar gate), head dim {dim}, {args.target} ==")
        print("attndsl: chunked_forward_kernel, chunked_backward_kernel")
        print(format_report(attndsl_reports(dim, args.target)))
        print("flash-linear-attention: chunk_fwd_kernel_h, chunk_fwd_kernel_o")
        print(format_report(fla_reports(dim, args.target)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
