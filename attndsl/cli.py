"""The ``attndsl`` command line: compile, check, explain and list examples.

Exit codes: 0 success; 1 a check found errors above tolerance; 2 bad usage or a spec that does
not load, trace, parse or compile (the message says why and where).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from attndsl.checking import (
    TOLERANCE,
    compare,
    index_sizes,
    kernel_outputs,
    oracle,
    random_problem,
)
from attndsl.errors import AttnDSLError
from attndsl.frontend.load import LoadedSpec, load_spec
from attndsl.passes.pipeline import compile_cascade
from attndsl.runtime.modules import import_path, load_kernel_module, module_source, write_module

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# every error a bad spec or bad arguments can cause (AttnDSLError covers SpecLoadError,
# SpecError, TraceError, IRError, ...); the ValueError of a bad --target value; the
# IndexError of a captured subscript out of range (as torch raises it, standalone modules too)
USER_ERRORS = (AttnDSLError, ValueError, IndexError)


def _load(spec: str) -> LoadedSpec:
    return load_spec(spec)


def cmd_compile(args: argparse.Namespace) -> int:
    spec = _load(args.spec)
    t0 = time.perf_counter()
    cascade, _ = spec.build()
    compiled = compile_cascade(cascade)
    if compiled.kernel is None:
        print(f"error: {cascade.name} has no quadratic kernel to write as a standalone module "
              f"(its chunked linear form runs through attndsl.compile(spec).linear): "
              f"{compiled.quadratic_error}", file=sys.stderr)
        return 2
    source = module_source(compiled.kernel)
    ms = (time.perf_counter() - t0) * 1e3
    if args.target:  # record the ahead-of-time GPU report in the module's header
        from attndsl.runtime.gpu_report import compile_reports, format_reports

        report = format_reports(compile_reports(compiled.kernel, args.target, args.dtype,
                                                args.head_dim, args.head_dim))
        header = (f"# Target report ({args.target}, {args.dtype}, head dim {args.head_dim}), "
                  f"compiled on the CPU:\n" + "\n".join(f"#   {ln}" for ln in
                                                        report.splitlines()) + "\n")
        source = header + source
    write_module(source, args.output)
    print(f"wrote {args.output}: {compiled.schedule.direct_passes}-pass cascade -> "
          f"{len(compiled.schedule.passes)}-pass kernel ({ms:.1f} ms from spec to source)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    spec = _load(args.spec)
    gen = torch.Generator().manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    worst: dict[str, float] = {}
    failed = False
    module_file = None
    for trial in range(args.trials):
        B, H = int(torch.randint(1, 3, (1,), generator=gen)), int(torch.randint(1, 4, (1,),
                                                                               generator=gen))
        hkv = H if not spec.enable_gqa else 1
        H = H * (2 if spec.enable_gqa else 1)
        lq = 1 if trial == 1 else int(torch.randint(1, args.max_len + 1, (1,), generator=gen))
        lkv = int(torch.randint(1, args.max_len + 1, (1,), generator=gen))
        e = [16, 32, 48, 64][int(torch.randint(0, 4, (1,), generator=gen))]
        cascade, captured = spec.build(B, H, lq, lkv, device)
        compiled = compile_cascade(cascade)
        if compiled.kernel is None:
            module = None
        elif args.output:  # the spec may depend on the sizes (closure constants): rewrite it
            write_module(module_source(compiled.kernel), args.output)
            module_file = args.output
            module = import_path(args.output)
        else:
            module = load_kernel_module(compiled.kernel)
        for name in args.dtypes.split(","):
            dtype = DTYPES[name]
            sizes = index_sizes(cascade, B, H, hkv, lq, lkv, e, e)
            prob = random_problem(cascade, sizes, dtype, gen, device, captured)
            ref = oracle(cascade, prob)
            res = max((compare(out, ref) for out in kernel_outputs(compiled, prob, module)),
                      key=lambda r: (r.nan, r.worst()))
            err = res.worst()
            worst[name] = max(worst.get(name, 0.0), err)
            if res.nan or err > TOLERANCE[dtype]:
                failed = True
                print(f"  FAIL {name} B={B} H={H} Hkv={hkv} Lq={lq} Lkv={lkv} E={e}: "
                      f"{res.errors}{' (NaN)' if res.nan else ''}")
    for name, err in worst.items():
        tol = TOLERANCE[DTYPES[name]]
        print(f"{spec.name}: {name:5s} worst error {err:.2e} (tolerance {tol:.0e}) over "
              f"{args.trials} shapes {'ok' if err <= tol else 'FAIL'}")
    if module_file:
        print(f"module written to {module_file} and checked from there")
    return 1 if failed else 0


def cmd_examples(args: argparse.Namespace) -> int:
    if not EXAMPLES.is_dir():  # a wheel installs the package, not the repository's examples/
        print(f"attndsl: no examples at {EXAMPLES}: they ship with the source tree "
              "(examples/ of a checkout), not with an installed wheel", file=sys.stderr)
        return 1
    for path in sorted(EXAMPLES.glob("*.py")) + sorted(EXAMPLES.glob("*.attn")):
        if path.name.startswith("_"):
            continue
        doc = _first_doc_line(path)
        print(f"{path.name:32s} {doc}")
    return 0


def _first_doc_line(path: Path) -> str:
    text = path.read_text()
    if path.suffix == ".py":
        import ast

        doc = ast.get_docstring(ast.parse(text)) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def cmd_explain(args: argparse.Namespace) -> int:
    from attndsl.explain import explain

    spec = _load(args.spec)
    cascade, captured = spec.build(1, 1, args.lq, args.lkv, "cpu")
    print(explain(cascade, captured, lq=args.lq, lkv=args.lkv, target=args.target))
    return 0


def _positive(text: str) -> int:
    """An argparse type: a whole number >= 1 (sizes, lengths, trial counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _dtype_list(text: str) -> str:
    """An argparse type: a comma list of fp32, fp16, bf16 (refused by the subcommand's own
    parser, which names itself and the option)."""
    bad = [d for d in text.split(",") if d not in DTYPES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown dtype(s) {bad}; choose from "
                                         f"{sorted(DTYPES)}, comma-separated")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attndsl", description="Compile attention variants "
                                "(FlexAttention score/mask programs, .attn Einsum cascades) "
                                "into fused Triton kernels.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    spec_help = ("a .py file (make(), score_mod/mask_mod or cascade), path.py:NAME, "
                 "module:NAME, or a .attn file (file.attn:NAME)")
    c = sub.add_parser("compile", help="write a standalone kernel module for a spec",
                       description="Write a standalone Python module (Triton kernel + launcher) "
                       "for SPEC; it needs only torch and triton at run time.")
    c.add_argument("spec", help=spec_help)
    c.add_argument("-o", "--output", required=True, help="the .py module to write")
    c.add_argument("--target", help="also compile for sm80/sm86/sm89/sm90 and record the "
                   "resource report (registers, spills, shared memory) in the header")
    c.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="input dtype for the --target report (default fp16)")
    c.add_argument("--head-dim", type=_positive, default=64,
                   help="head dim for the --target report")
    c.set_defaults(fn=cmd_compile)
    k = sub.add_parser("check", help="property-test a spec's kernel against the oracle",
                       description="Run SPEC's kernel on random shapes and dtypes and compare "
                       "with the float64 eager oracle; prints the worst error per dtype.")
    k.add_argument("spec", help=spec_help)
    k.add_argument("--trials", type=_positive, default=4, help="random shapes to try (default 4)")
    k.add_argument("--max-len", type=_positive, default=80, help="largest Lq/Lkv (default 80)")
    k.add_argument("--dtypes", type=_dtype_list, default="fp32,fp16,bf16",
                   help="comma list of fp32,fp16,bf16")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("-o", "--output", help="also write the module here and check it from there")
    k.set_defaults(fn=cmd_check)
    e = sub.add_parser("examples", help="list the bundled examples",
                       description="List examples/*.py and examples/*.attn.")
    e.set_defaults(fn=cmd_examples)
    x = sub.add_parser("explain", help="show the IR after each pass and the kernel plan",
                       description="Print the cascade, the fused form, the rewrites that fired, "
                       "the pass count, the schedule, the tile plan and the mask's tile picture.")
    x.add_argument("spec", help=spec_help)
    x.add_argument("--lq", type=_positive, default=512, help="query length for the tile picture")
    x.add_argument("--lkv", type=_positive, default=512, help="key length for the tile picture")
    x.add_argument("--target", default=None, help="also compile for sm80/sm86/sm89/sm90 and "
                   "report registers, spills, shared memory, tensor-core instructions")
    x.set_defaults(fn=cmd_explain)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except BrokenPipeError:  # output piped into a reader that stopped early (| head)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at exit
        return 0
    except USER_ERRORS as err:
        text = str(err)  # located errors (file:line:col: error: ...) are printed as they are
        prefix = "" if ": error: " in text.split("\n", 1)[0] else f"attndsl {args.command}: error: "
        print(prefix + text, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
