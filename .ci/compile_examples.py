"""Compile every example in examples/ (.py and .attn) for a GPU target on this CPU.

Each example's forward kernel is generated and compiled with its default config by Triton's
real compiler (ptxas included) in one child process, as ``attndsl explain --target`` does.
A kernel passes when it compiles, fits in shared memory, does not spill, and uses the target's
tensor cores (HGMMA on sm90, HMMA on sm8x).  Exit status 1 when any example does not pass.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import triton

from attndsl.frontend.load import load_spec
from attndsl.passes.pipeline import compile_cascade
from attndsl.runtime.gpu_report import kernel_path, run_jobs

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example_files() -> list[Path]:
    """The bundled examples (helpers such as ``_common.py`` excluded)."""
    return sorted(p for p in EXAMPLES.iterdir()
                  if p.suffix in (".py", ".attn") and not p.name.startswith("_"))


def problems(result: dict, target: str) -> str:
    """Why a compiled kernel does not pass ('' when it does)."""
    if "error" in result:
        return result["error"]
    found = []
    if not result["fits"]:
        found.append(result["reason"])
    want = "HGMMA" if target == "sm90" else "HMMA"
    if result["tc_kind"] != want:
        found.append(f"tensor cores: {result['tc_kind']}, expected {want}")
    return "; ".join(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="sm90")
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    jobs, modules, linear_only = [], {}, []
    for path in example_files():
        cascade, _ = load_spec(str(path)).build(1, 2, 64, 64)
        compiled = compile_cascade(cascade)
        kernel = compiled.kernel
        form = compiled.linear.form
        if form != "quadratic":  # runs as a linear or recurrent form by default: its fixed
            linear_only.append((path.name, form))  # kernels (runtime/linear*.py, delta*.py)
            continue  # are compiled for sm90 by tests/test_linear.py and tests/test_delta.py
        module = kernel_path(kernel)
        modules[path.name] = module
        jobs.append({"path": module, "target": args.target, "dtype": args.dtype,
                     "e": args.head_dim, "f": args.head_dim,
                     "sparsity": 1 if kernel.mask is not None else 0, "config": None})
    # The child compiles each distinct (kernel, config) once; examples may share a kernel.
    by_module = {r["path"]: r for r in run_jobs(jobs)}
    print(f"triton {triton.__version__}, target {args.target}, {args.dtype}, "
          f"head dim {args.head_dim}")
    print(f"{'example':28s} {'config':16s} {'regs':>5s} {'spills':>6s} {'smem KiB':>9s} "
          f"{'tensor cores':>13s}  result")
    failed = 0
    for name, module in modules.items():
        r = by_module[module]
        why = problems(r, args.target)
        failed += bool(why)
        cfg = "{}x{} {}w {}s".format(*r["config"])
        if "error" in r:
            print(f"{name:28s} {cfg:16s} FAILED: {why}")
            continue
        print(f"{name:28s} {cfg:16s} {r['registers']:5d} {r['spills']:6d} "
              f"{r['shared'] / 1024:9.1f} {r['tc_kind'] + ' x' + str(r['tc_count']):>13s}  "
              f"{'ok' if not why else 'FAILED: ' + why}")
    for name, form in linear_only:
        print(f"{name:28s} {form} form (its kernels: tests/test_linear.py, test_delta.py, sm90)")
    print(f"{len(modules) - failed} of {len(modules)} examples with a generated kernel pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
