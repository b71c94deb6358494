"""Static weight of the generated backward loops against hand-written FA2 backward kernels.

No GPU: every launch is recorded on the CPU (:func:`attndsl.runtime.gpu_report.record_launches`,
the exact arguments the launchers pass), then compiled ahead of time for the target with the
reference's tile config (``BLOCK_M = BLOCK_N = 64``, 8 warps, 2 stages) and read back from the
SASS: registers, spills and, per key-tile loop (innermost loop bodies holding tensor-core
instructions), all instructions, tensor-core, ``MUFU.EX2`` and the rest.

Compared: the dK/dV and dQ kernels of the FlexAttention backward (codegen/backward.py, dQ by the
deterministic kernel so that the dK/dV loop holds no atomics, as the reference's) against
``benchmarks/reference/backward.py`` for dense, causal, ALiBi + causal and softcap; and the
fused backward of sigmoid attention (codegen/tile_backward.py: its keys and queries kernels)
against the hand-written sigmoid backward's dK/dV and dQ kernels.

    python benchmarks/static_backward.py [--target sm90] [--dims 64 128] [--json out.json] [--diff]
                                         [--check]

After the table it lists the generated kernels that miss a parity target (benchmarks/parity.py);
``--check`` exits 1 when there is one.

Loops pair like with like (:func:`pairs`: unmasked with unmasked, masked with masked);
``--diff`` prints, per pair, the SASS mnemonics whose counts differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # launches are recorded through the interpreter

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attndsl.runtime import aot  # noqa: E402
from attndsl.runtime.gpu_report import record_launches  # noqa: E402
from benchmarks.parity import misses  # noqa: E402

REF_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
LENGTH = 256


def _causal(b, h, q, kv):
    return kv <= q


def _tensors(d: int, heads: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, heads, LENGTH, d, generator=gen).half() for _ in range(4)]


SLOPES = torch.tensor([0.5, 0.25])


def _alibi(s, b, h, q, kv):
    return s + SLOPES[h] * (kv - q)


def _softcap(s, b, h, q, kv):
    return 30.0 * torch.tanh(s / 30.0)


# case -> (score_mod, mask_mod) of the FlexAttention spec, as the reference computes it
FLEX_CASES = {"dense": (None, None), "causal": (None, _causal),
              "alibi_causal": (_alibi, _causal), "softcap": (_softcap, None)}


def generated_flex(case: str, d: int) -> list:
    """Recorded launches of the FlexAttention backward (dK/dV and deterministic dQ)."""
    from attndsl.autograd import load_backward_module
    from attndsl.block_mask import create_block_mask
    from attndsl.frontend.flex import lower_flex
    from attndsl.key_tile_plan import KeyTilePlan
    from attndsl.runtime.plan import block_mask_plan

    score, mask = FLEX_CASES[case]
    spec = lower_flex(score, mask)
    module = load_backward_module(spec.cascade)
    q, k, v, do = _tensors(d)
    lse = torch.zeros(q.shape[:3])
    tables = None
    if mask is not None:  # the block mask's eight tables, as flex_attention's backward gets
        plan = block_mask_plan(create_block_mask(mask, 1, 2, LENGTH, LENGTH), LENGTH, LENGTH)
        tables = KeyTilePlan.from_op_args(*plan.op_args()).launch_tables()
    cfg = {"dkdv": dict(REF_CONFIG), "dq": dict(REF_CONFIG)}
    return record_launches(lambda: module.launch_backward(
        {"Q": q, "K": k, "V": v}, {"O": q, "LSE": lse}, {"O": do, "LSE": None},
        {"scale": d ** -0.5}, dict(spec.captured), (), tables, cfg, True))


def generated_sigmoid(d: int) -> list:
    """Recorded launches of the fused backward of examples/sigmoid.attn."""
    import attndsl
    from attndsl.frontend.text import parse_file

    root = Path(__file__).resolve().parents[1]
    kernel = attndsl.compile(parse_file(root / "examples" / "sigmoid.attn")["sigmoid"])
    module = kernel.fused_backward
    q, k, v, do = _tensors(d)
    return record_launches(lambda: module.launch_backward(
        {"Q": q, "K": k, "V": v}, {"bias": -6.0}, {}, {"O": do}, (),
        {**REF_CONFIG}))


def reference(case: str, d: int) -> list:
    from benchmarks.reference import backward as ref

    q, k, v, do = _tensors(d)
    lse = torch.zeros(q.shape[:3])
    cfg = dict(block_m=64, block_n=64, num_warps=8, num_stages=2)
    if case == "sigmoid":
        return record_launches(lambda: ref.sigmoid_attention_backward(q, k, v, do, **cfg))
    return record_launches(lambda: ref.attention_backward(q, k, v, q, lse, do, case,
                                                          slopes=SLOPES.clone(), **cfg))


def _pick(launches: list, *names: str) -> list:
    return [x for x in launches if x.name in names]


def _loops(report) -> list[tuple[int, int, int, int]]:
    return [(lp.instructions, lp.tensor_core, lp.ex2, lp.rest) for lp in report.loops]


def pairs(gen: list, ref: list) -> list[tuple[str, int, int]]:
    """Like with like: ``(label, generated index, reference index)`` per comparable loop.

    A kernel's unmasked loop is its lightest (the same step without the mask); it pairs with
    the other kernel's unmasked loop, and the masked loops pair in address order.  A kernel
    without a mask has one loop, ``unmasked``; a reference with one loop has no masked loop
    to compare (its dQ diagonal loop runs one trip, which the compiler unrolls), so only the
    unmasked loops pair then (the sigmoid dQ kernel's masked loop comes after its unmasked
    one: pairing by position would compare it with the reference's unmasked loop)."""
    if not gen or not ref:
        return []

    def lightest(loops: list) -> int:
        return min(range(len(loops)), key=lambda i: loops[i][0])

    g0, r0 = lightest(gen), lightest(ref)
    out = [("unmasked", g0, r0)]
    masked = zip((i for i in range(len(gen)) if i != g0), (i for i in range(len(ref)) if i != r0))
    out += [("masked", g, r) for g, r in masked]
    return out


def opcode_diff(gen: dict[str, int], ref: dict[str, int], limit: int = 14) -> str:
    """The mnemonics whose counts differ between two loop bodies, largest difference first:
    ``IMAD.IADD +16, I2FP.F32.S32 +16, ...`` (generated minus reference)."""
    delta = {op: gen.get(op, 0) - ref.get(op, 0) for op in set(gen) | set(ref)}
    ranked = sorted((d, op) for op, d in delta.items() if d)
    ranked.sort(key=lambda x: -abs(x[0]))
    return ", ".join(f"{op} {d:+d}" for d, op in ranked[:limit])


CASES = ("dense", "causal", "alibi_causal", "softcap", "sigmoid")


def measure(target: str, dims: list[int], cases: tuple[str, ...] = CASES) -> list[dict]:
    """One row per (case, D, kernel, generated or reference): registers, spills, loops."""
    rows = []
    specs, labels = [], []
    for d in dims:
        for case in (c for c in FLEX_CASES if c in cases):
            gen = generated_flex(case, d)
            ref = reference(case, d)
            pairs = [("dkdv", _pick(gen, "attention_bwd_dkdv_kernel"),
                      _pick(ref, "reference_bwd_dkdv")),
                     ("dq", _pick(gen, "attention_bwd_dq_kernel"), _pick(ref, "reference_bwd_dq"))]
            for kind, g, r in pairs:
                for who, launch in (("generated", g[0]), ("reference", r[0])):
                    over = {k: v for k, v in REF_CONFIG.items() if k in launch.constexprs}
                    specs.append(launch.spec(target, num_warps=8, num_stages=2, **over))
                    labels.append((case, d, kind, who))
        if "sigmoid" not in cases:
            continue
        gen = generated_sigmoid(d)
        ref = reference("sigmoid", d)
        for kind, g, r in (("dkdv", "tile_bwd_keys_kernel", "reference_bwd_dkdv"),
                           ("dq", "tile_bwd_queries_kernel", "reference_bwd_dq")):
            for who, launch in (("generated", _pick(gen, g)[0]), ("reference", _pick(ref, r)[0])):
                over = {k: v for k, v in REF_CONFIG.items() if k in launch.constexprs}
                specs.append(launch.spec(target, num_warps=8, num_stages=2, **over))
                labels.append(("sigmoid", d, kind, who))
    reports = aot.compile_kernels(specs, jobs=2, strict=False)
    for (case, d, kind, who), rep in zip(labels, reports):
        if isinstance(rep, Exception):
            rows.append({"case": case, "D": d, "kernel": kind, "who": who,
                         "error": f"{type(rep).__name__}: {str(rep)[:300]}"})
            continue
        rows.append({"case": case, "D": d, "kernel": kind, "who": who, "target": target,
                     "registers": rep.registers, "spills": rep.spill_stores + rep.spill_loads,
                     "loops": _loops(rep), "opcodes": [lp.opcodes for lp in rep.loops]})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| case | D | kernel | generated: loops (all/tc/ex2/rest), regs, spills | "
           "reference | ratio (all, per loop) |", "|---|---|---|---|---|---|"]
    keyed = {(r["case"], r["D"], r["kernel"], r["who"]): r for r in rows}
    for (case, d, kind, who), r in keyed.items():
        if who != "generated":
            continue
        ref = keyed.get((case, d, kind, "reference"))

        def cell(x):
            if x is None or "error" in x:
                return (x or {}).get("error", "-")
            return f"{x['loops']}, {x['registers']} regs, {x['spills']} spills"

        ratio = "-"
        if ref and "error" not in ref and "error" not in r:
            ratio = ", ".join(f"{label} {r['loops'][g][0] / ref['loops'][h][0]:.2f}"
                              for label, g, h in pairs(r["loops"], ref["loops"])) or "-"
        out.append(f"| {case} | {d} | {kind} | {cell(r)} | {cell(ref)} | {ratio} |")
    return "\n".join(out)


def diffs(rows: list[dict]) -> str:
    """Per paired loop, the opcodes whose counts differ (what the generated loop does beyond
    the reference, or less)."""
    keyed = {(r["case"], r["D"], r["kernel"], r["who"]): r for r in rows}
    out = []
    for (case, d, kind, who), r in keyed.items():
        ref = keyed.get((case, d, kind, "reference"))
        if who != "generated" or not ref or "error" in r or "error" in ref:
            continue
        for label, g, h in pairs(r["loops"], ref["loops"]):
            out.append(f"{case} D{d} {kind} {label} {r['loops'][g][0]} vs {ref['loops'][h][0]}: "
                       + opcode_diff(r["opcodes"][g], ref["opcodes"][h]))
    return "\n".join(out)


def missed_targets(rows: list[dict]) -> str:
    """One line per generated kernel that misses a parity target (benchmarks/parity.py), or
    that it or its reference failed to compile; "" when none does."""
    keyed = {(r["case"], r["D"], r["kernel"], r["who"]): r for r in rows}
    lines = []
    for (case, d, kind, who), r in keyed.items():
        if who != "generated":
            continue
        ref = keyed.get((case, d, kind, "reference"))
        broken = [f"{side}: {x.get('error', 'not compiled') if x else 'not compiled'}"
                  for side, x in (("generated", r), ("reference", ref)) if not x or "error" in x]
        found = broken or misses(
            [(label, r["loops"][g][0] / ref["loops"][h][0])
             for label, g, h in pairs(r["loops"], ref["loops"])],
            (r["registers"], ref["registers"]), (r["spills"], ref["spills"]))
        if found:
            lines.append(f"- {case} D={d} {kind}: " + "; ".join(found))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="sm90")
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--json", default=None)
    ap.add_argument("--diff", action="store_true",
                    help="print the opcode counts that differ per paired loop")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when a generated kernel misses a parity target")
    args = ap.parse_args()
    rows = measure(args.target, args.dims, tuple(args.cases))
    print(table(rows))
    missed = missed_targets(rows)
    print(f"\nParity targets missed ({args.target}, benchmarks/parity.py):\n{missed or 'none'}")
    if args.diff:
        print(diffs(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
