"""Static kernel benchmark: generated key-tile loops against hand-written ones, from SASS.

No GPU is needed. For each case, target (sm_90a, sm_80), dtype (fp16, bf16) and head dim
(64, 128) this compiles, with the project's AOT path (:mod:`attndsl.runtime.aot`, Triton's real
compiler in child processes, at most two at once), the forward kernel attndsl generates for
the case and the hand-written reference of ``benchmarks/reference/`` with the same config
(128 x 64 tiles, 8 warps, the generated module's stages: 3 at D = 64, 2 at D = 128), and the
generated backward kernels next to the FlashAttention-2 references. Per kernel: registers,
spills, shared memory; per key-tile loop (:mod:`attndsl.runtime.sass`): all instructions,
tensor-core, ``MUFU.EX2``, the rest, and the ratio generated / hand-written; TMA instructions
(``UTMALDG``, ``UTMASTG``, ...) per kernel.

Which generated forward a target runs: an sm90 launch reads its tiles through tensor
descriptors (the constexpr ``TMA``; codegen/loads.py) when the module's ``tma_choice`` accepts
the layout, sm80 and CPU launches through pointers.  On sm90 both variants are compiled (row
keys ``generated``: pointer loads, ``generated_tma``: descriptors) and the row's ``default``
names the one a launch runs, found by recording the launch with ``tma=True`` on the CPU, where
``tma_choice`` makes the same layout checks as on an sm90 GPU, and from the module's
``pointer_default`` (a kernel whose scores read a captured tensor per key tile, and one of
head dims at most 64, runs on pointers by default; :func:`tma_default`).  The
summary's generated column is that default (marked ``T`` for TMA), with the pointer variant's
registers next to it; the TMA table compares the two loop by loop.  ``--quick`` (a smoke run)
and ``--no-tma`` compile the pointer variant only; ``--tma`` is the default and kept for old
command lines.

How a kernel is obtained: exactly as a user runs it. The generated kernels come from
``attndsl.flex_attention`` with the examples' ``score_mod``/``mask_mod`` (``examples/*.py``),
the forward with ``kernel_options`` holding the tile config, the backward through autograd
with ``deterministic=True`` (so the dQ kernel, one program per query tile, runs); the sigmoid
backward from ``examples/sigmoid.attn`` via ``attndsl.compile``. Each call runs under Triton's
interpreter with every launch *recorded instead of executed*
(:func:`attndsl.runtime.gpu_report.record_launches`): the recorded arguments give the
compile signature exactly as a GPU launch specialises it, whatever the generated kernel's
argument names or constexprs are. Launches are recorded with fp16 tensors and retyped to bf16
(the CPU launcher upcasts bf16 for the interpreter); the backward's tile config (CPU values at
record time) is replaced by the generated module's GPU ``backward_config`` for the target's
compute capability when it has one (else :data:`BACKWARD_CONFIG`), used for the references too.

Like for like: the reference converts the document ids to int32 on the host, so the
generated ``document`` kernel is given the same int32 id table (its ``mask_mod`` captures
it).  ``document_int64`` is the same case with the example's int64 ids, measured against
the same reference: the ids fit int32, so the launch compares them in int32 (I32_INDICES),
but the kernel still reads 8 bytes per id.

How loops are paired (:func:`loop_kinds`, :func:`pair_loops`): a key-tile loop is *masked* when
it compares indices about once per score element a thread owns (``ISETP`` counts; a mask is
elementwise, loop control and row guards are per tile or per row), counted above the kernel's
least-comparing loop when the kernel has several; there, as many selects (``FSEL``) above the
least-selecting loop count too, since a window's two compares may be merged into one.  Each
generated loop is compared with the first reference loop of the same kind (the reference
kernels have one loop body per kind); a kernel pair with a single loop each is paired directly.
A kind the reference lacks has no ratio: e.g. the reference dQ kernel's diagonal is a single
key tile when BLOCK_M == BLOCK_N, which the compiler takes out of the loop.

Usage::

    python benchmarks/static_kernel.py                 # everything (tens of minutes on 2 cores)
    python benchmarks/static_kernel.py --quick         # causal, sm90, fp16, D=64
    python benchmarks/static_kernel.py --cases dense,causal --targets sm90 --dims 128
    python benchmarks/static_kernel.py --cases dense,causal --targets sm90 --no-backward --no-tma
    python benchmarks/static_kernel.py --rescore benchmarks/results/X.json --check

The .md lists the rows whose default launch misses a parity target (benchmarks/parity.py);
``--check`` exits 1 when there is one.

Writes ``benchmarks/results/static_kernel_<date>.json`` and ``.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ["TRITON_INTERPRET"] = "1"  # launches are recorded through the interpreter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import torch  # noqa: E402
import triton  # noqa: E402
from _common import and_masks, causal_mask  # noqa: E402  (examples/_common.py)

import attndsl  # noqa: E402
from attndsl.frontend.load import load_spec  # noqa: E402
from attndsl.runtime.aot import (  # noqa: E402
    CompiledReport,
    KernelSpec,
    compile_kernels,
    estimate_occupancy,
)
from attndsl.runtime.gpu_report import RecordedLaunch, record_launches  # noqa: E402
from attndsl.runtime.sass import KeyTileLoop  # noqa: E402
from benchmarks.parity import misses  # noqa: E402
from benchmarks.reference import backward as ref_bwd  # noqa: E402
from benchmarks.reference import forward as ref_fwd  # noqa: E402

TARGETS = ("sm90", "sm80")
DTYPES = ("fp16", "bf16")
DIMS = (64, 128)
# forward cases that differ from a reference case only in their inputs -> that case
FORWARD_VARIANTS = {"document_int64": "document"}
FORWARD_CASES = tuple(ref_fwd.CASES) + tuple(FORWARD_VARIANTS)
BACKWARD_CASES = tuple(ref_bwd.CASES)
BATCH, HEADS, LENGTH = 2, 16, 1024
BLOCK_M, BLOCK_N, WARPS = 128, 64, 8
# The backward config when the generated module names none: per kernel, as the tutorial splits.
BACKWARD_CONFIG = {"dkdv": {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
                   "dq": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}}
# example file per case (score_mod / mask_mod from its make()), and whether it groups heads
EXAMPLES = {"dense": None, "causal": "causal", "sliding_window": "sliding_window",
            "prefix_lm": "prefix_lm", "alibi_causal": "alibi", "softcap": "softcap",
            "relative_bias": "relative_bias", "document": "document_mask",
            "document_int64": "document_mask",
            "gqa_causal": "gqa_causal", "sigmoid": "sigmoid"}


def stages(dim: int) -> int:
    """Pipeline stages of the compared forward config (the generated module's GPU default)."""
    return 3 if dim <= 64 else 2


# ----------------------------------------------------------------------------- inputs


def _example(name: str) -> Any:
    """The example module ``examples/<name>.py``."""
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _qkv(case: str, dim: int, grad: bool = False) -> tuple[torch.Tensor, ...]:
    """fp16 q [B, H, L, D], k and v [B, H / G, L, D] (G = 4 for GQA), random."""
    gen = torch.Generator().manual_seed(0)
    kv_heads = HEADS // ref_fwd.CASES.get(reference_case(case), (0, 0, 1))[2]
    shapes = [(BATCH, HEADS, LENGTH, dim)] + [(BATCH, kv_heads, LENGTH, dim)] * 2
    return tuple(torch.randn(s, generator=gen).half().requires_grad_(grad) for s in shapes)


def reference_case(case: str) -> str:
    """The hand-written reference's case of a benchmark case (``FORWARD_VARIANTS``)."""
    return FORWARD_VARIANTS.get(case, case)


def _document_ids() -> torch.Tensor:
    """The example's document ids [LENGTH] (int64), as the reference launcher takes them."""
    doc = _example("document_mask")
    return doc.document_ids(LENGTH, doc.NUM_DOCS, doc.generator())


def _mods(case: str) -> dict:
    """``{"score_mod", "mask_mod"}`` of the case's example (none for dense); ``document``
    captures the ids as int32, as the reference reads them."""
    name = EXAMPLES[case]
    if name is None:
        return {"score_mod": None, "mask_mod": None}
    if case == "document":
        ids = _document_ids().to(torch.int32)
        mask = _example(name).generate_doc_mask(ids, ids)
        return {"score_mod": None, "mask_mod": and_masks(mask, causal_mask)}
    return _example(name).make(BATCH, HEADS, LENGTH, LENGTH)


def _reference_extras(case: str) -> dict:
    """The captured tensors of the case, as the reference launcher takes them."""
    if case == "alibi_causal":
        return {"slopes": _example("alibi").alibi_slopes(HEADS)}
    if case == "relative_bias":
        return {"bias": torch.randn(HEADS, 2 * LENGTH - 1)}
    if reference_case(case) == "document":
        return {"doc": _document_ids()}
    return {}


# ----------------------------------------------------------------------------- recording


def _one(launches: list[RecordedLaunch], what: str) -> RecordedLaunch:
    if len(launches) != 1:
        raise RuntimeError(f"{what}: expected one kernel launch, recorded {len(launches)}")
    return launches[0]


def generated_forward(case: str, dim: int, tma: bool | None = None) -> RecordedLaunch:
    """The generated forward kernel's launch, through ``attndsl.flex_attention`` (``tma``: the
    config's load-path request, None = the target's default)."""
    q, k, v = _qkv(case, dim)
    mods = _mods(case)
    options = {"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "num_warps": WARPS,
               "num_stages": stages(dim)}
    if tma is not None:
        options["tma"] = tma
    return _one(record_launches(lambda: attndsl.flex_attention(
        q, k, v, score_mod=mods["score_mod"], mask_mod=mods["mask_mod"],
        enable_gqa=case == "gqa_causal", kernel_options=options)), f"{case} forward")


def tma_default(case: str, dim: int) -> tuple[bool, str]:
    """(whether an sm90 launch of the case reads through tensor descriptors, the reason).

    The launch is recorded with ``tma=True`` on the CPU: the module's ``tma_choice`` then makes
    exactly the checks an sm90 GPU launch makes by default (the installed triton's
    ``tl.make_tensor_descriptor``, base alignment, unit column strides, 16-byte row strides,
    the 256-element box), everything but the device's compute capability, which is sm90's,
    and the module's ``pointer_default`` (its PREFER_POINTERS, head dims of at most 64), which
    a GPU launch without ``tma=True`` follows."""
    launch = generated_forward(case, dim, tma=True)
    module = launch.fn.__globals__
    blocks = {b: launch.constexprs[b] for b in ("BLOCK_E", "BLOCK_F")}
    why_pointers = module["pointer_default"](blocks, module.get("PREFER_POINTERS", ""))
    if why_pointers:
        return False, why_pointers
    path = module.get("LOAD_PATH", {})
    use = bool(path.get("tma")) and bool(launch.constexprs.get("TMA"))
    return use, str(path.get("reason", "the module reports no load path"))


def reference_forward(case: str, dim: int) -> RecordedLaunch:
    """The hand-written forward kernel's launch with the same config."""
    q, k, v = _qkv(case, dim)
    return _one(record_launches(lambda: ref_fwd.attention(
        q, k, v, reference_case(case), block_m=BLOCK_M, block_n=BLOCK_N, num_warps=WARPS,
        num_stages=stages(dim), **_reference_extras(case))), f"{case} reference forward")


def _role(launch: RecordedLaunch) -> str | None:
    """``preprocess`` / ``dkdv`` / ``dq`` from a backward kernel's name, or None (the fused
    backward's ``tile_bwd_rows`` / ``_keys`` / ``_queries`` kernels as well)."""
    name = launch.name.lower()
    for role, marks in (("preprocess", ("preprocess", "bwd_rows")),
                        ("dkdv", ("dkdv", "dk_dv", "bwd_keys")), ("dq", ("dq", "bwd_queries"))):
        if any(mark in name for mark in marks):
            return role
    return None


def generated_backward(case: str, dim: int) -> dict[str, RecordedLaunch]:
    """The generated backward kernels' launches by role (none for an eager backward)."""
    q, k, v = _qkv(case, dim, grad=True)

    def run() -> None:
        if case == "sigmoid":
            cascade, _ = load_spec(str(ROOT / "examples" / "sigmoid.attn")).build(
                BATCH, HEADS, LENGTH, LENGTH)
            out = attndsl.compile(cascade)({"Q": q, "K": k, "V": v})["O"]
        else:
            mods = _mods(case)
            out = attndsl.flex_attention(q, k, v, score_mod=mods["score_mod"],
                                         mask_mod=mods["mask_mod"],
                                         kernel_options={"deterministic": True})
        out.backward(torch.ones_like(out))

    found: dict[str, RecordedLaunch] = {}
    for launch in record_launches(run):
        role = _role(launch)
        if role is not None:
            found[role] = launch
    return found


def backward_config(launches: dict[str, RecordedLaunch], dim: int, target: str = "sm90"
                    ) -> dict[str, dict]:
    """The generated module's GPU backward config per kernel on ``target`` (``sm90``, ``sm80``:
    the compute capability it is chosen by; ``BACKWARD_CONFIG`` if the module has none)."""
    for launch in launches.values():
        fn = launch.fn.__globals__.get("backward_config")
        if callable(fn):
            major, minor = divmod(int(target.removeprefix("sm")), 10)
            cfg = fn("cuda", dim, dim, (major, minor))
            return {role: {k: int(value) for k, value in cfg[role].items()}
                    for role in ("dkdv", "dq")}
    return BACKWARD_CONFIG


def reference_backward(case: str, dim: int, config: dict[str, dict]) -> dict[str, RecordedLaunch]:
    """The FA2 reference backward launches by role, with ``config``'s tiles."""
    q, k, v = _qkv(case, dim)
    do = torch.randn_like(q)
    o, lse = torch.empty_like(q), torch.empty(q.shape[:3])
    tiles = config["dkdv"]
    kw = dict(block_m=tiles["BLOCK_M"], block_n=tiles["BLOCK_N"],
              num_warps=tiles["num_warps"], num_stages=tiles["num_stages"])
    slopes = _reference_extras(case).get("slopes")

    def run() -> Any:
        if case == "sigmoid":
            return ref_bwd.sigmoid_attention_backward(q, k, v, do, **kw)
        return ref_bwd.attention_backward(q, k, v, o, lse, do, case, slopes=slopes, **kw)

    return {role: launch for launch in record_launches(run)
            if (role := _role(launch)) is not None}


# ----------------------------------------------------------------------------- comparison


@dataclass
class Job:
    """One compile: which kernel, for which cell of the table."""

    direction: str  # forward / backward
    case: str
    target: str
    dtype: str
    dim: int
    kernel: str  # fwd / preprocess / dkdv / dq
    side: str  # generated / reference / generated_tma (the tensor-descriptor variant)
    spec: KernelSpec
    default: str = "generated"  # the generated side a launch on the target runs


def _spec(launch: RecordedLaunch, target: str, dtype: str, tiles: dict | None = None
          ) -> KernelSpec:
    retype = None if dtype == "fp16" else ("fp16", dtype)
    over = {}
    for key, value in (tiles or {}).items():
        if key in launch.constexprs or key in ("num_warps", "num_stages"):
            over[key] = value
    return launch.spec(target, dtype=retype, **over)


# targets with tensor descriptors (TMA): the descriptor variant is compiled there with --tma
TMA_TARGETS = ("sm90",)


def forward_jobs(cases: list[str], targets: list[str], dtypes: list[str], dims: list[int],
                 tma: bool = False) -> list[Job]:
    """Generated and reference forward compiles per cell; with ``tma`` also the generated
    kernel's tensor-descriptor variant on :data:`TMA_TARGETS`, which is then the cell's
    default when :func:`tma_default` says an sm90 launch chooses it."""
    jobs = []
    for case in cases:
        for dim in dims:
            launches = {"generated": generated_forward(case, dim),
                        "reference": reference_forward(case, dim)}
            chosen = tma and any(t in TMA_TARGETS for t in targets) and tma_default(case, dim)[0]
            for target in targets:
                with_tma = tma and target in TMA_TARGETS
                default = "generated_tma" if with_tma and chosen else "generated"
                for dtype in dtypes:
                    for side, launch in launches.items():
                        jobs.append(Job("forward", case, target, dtype, dim, "fwd", side,
                                        _spec(launch, target, dtype), default))
                    if with_tma:
                        jobs.append(Job("forward", case, target, dtype, dim, "fwd",
                                        "generated_tma", _spec(launches["generated"], target,
                                                               dtype, {"TMA": True}), default))
    return jobs


def backward_jobs(cases: list[str], targets: list[str], dtypes: list[str], dims: list[int]
                  ) -> list[Job]:
    jobs = []
    for case in cases:
        for dim in dims:
            gen = generated_backward(case, dim)
            ref = reference_backward(case, dim, backward_config(gen, dim))
            for target in targets:  # the references take each target's tiles, as ours
                config = backward_config(gen, dim, target)
                for dtype in dtypes:
                    for side, launches in (("generated", gen), ("reference", ref)):
                        for role, launch in launches.items():
                            tiles = config.get(role, config["dq"])
                            jobs.append(Job("backward", case, target, dtype, dim, role, side,
                                            _spec(launch, target, dtype, tiles)))
    return jobs


def elements_per_thread(spec: KernelSpec) -> int:
    """Score elements one thread holds: BLOCK_M * BLOCK_N / threads."""
    consts = spec.constexprs
    return max(1, consts.get("BLOCK_M", 1) * consts.get("BLOCK_N", 1) // (32 * spec.num_warps))


def loop_kinds(loops: tuple[KeyTileLoop, ...], per_thread: int) -> list[str]:
    """``masked`` / ``unmasked`` per loop, by its integer compares (``ISETP``) and selects.

    A mask compares indices once per score element a thread owns (``per_thread``) and selects
    ``-inf`` for each; loop control and per-row guards compare and select a few times per tile.
    With several loops in a kernel, a loop is masked when it has at least ``0.75 * per_thread``
    compares, or as many selects (``FSEL``, ``SEL``), more than the kernel's loop with the
    fewest: compilers merge a mask's compares (``0 <= m - n <= w`` is one unsigned compare),
    never its selects.  A single loop is masked when it has at least ``0.75 * per_thread``
    compares at all (a score's own selects, e.g. a subscript's wrap, do not make it masked)."""
    compares = [loop.count("ISETP") for loop in loops]
    if len(loops) == 1:
        return ["masked" if compares[0] >= 0.75 * per_thread else "unmasked"]
    selects = [loop.count("FSEL") + loop.count("SEL") for loop in loops]
    return ["masked" if c >= min(compares) + 0.75 * per_thread or
            s >= min(selects) + 0.75 * per_thread else "unmasked"
            for c, s in zip(compares, selects, strict=True)]


def _loop_row(loop: KeyTileLoop, kind: str) -> dict:
    return {"kind": kind, "all": loop.instructions, "tensor_core": loop.tensor_core,
            "ex2": loop.ex2, "rest": loop.rest, "tma": loop.tma,
            "selects": loop.count("FSEL") + loop.count("SEL"), "int_compares": loop.count("ISETP"),
            "opcodes": loop.opcodes}


def _kernel_row(job: Job, report: CompiledReport | Exception) -> dict:
    row = {"side": job.side, "kernel_name": getattr(job.spec.fn, "__name__", "?"),
           "num_warps": job.spec.num_warps, "num_stages": job.spec.num_stages,
           "tiles": [job.spec.constexprs.get("BLOCK_M"), job.spec.constexprs.get("BLOCK_N")]}
    if isinstance(report, Exception):
        row["error"] = f"{type(report).__name__}: {str(report).splitlines()[-1][:300]}"
        return row
    per_thread = elements_per_thread(job.spec)
    row.update(registers=report.registers, spills=report.spill_stores + report.spill_loads,
               stack=report.stack_bytes, shared_bytes=report.shared_total_bytes,
               tma=report.tma_count,
               loops=[_loop_row(lp, kind) for lp, kind in
                      zip(report.loops, loop_kinds(report.loops, per_thread), strict=True)])
    return row


def pair_loops(gen: dict, ref: dict) -> list[dict]:
    """Each generated loop next to the first reference loop of its kind, with the ratio; a
    kernel pair with one loop each is paired whatever the kinds (same structure).

    The ratio is per key tile: instructions per tensor-core instruction, generated over
    hand-written. The tiles are the same, so one tile's MMAs are the same; a loop body that
    the compiler unrolled over ``k`` tiles holds ``k`` times as many (``tiles_per_body``).
    With equal tensor-core counts this is the plain instruction ratio."""
    gen_loops, ref_loops = gen.get("loops", []), ref.get("loops", [])
    pairs = []
    for loop in gen_loops:
        if len(gen_loops) == len(ref_loops) == 1:
            match = ref_loops[0]
        else:
            match = next((r for r in ref_loops if r["kind"] == loop["kind"]), None)
        ratio = tiles = None
        if match and loop["tensor_core"] and match["tensor_core"]:
            tiles = loop["tensor_core"] / match["tensor_core"]
            ratio = round(loop["all"] / match["all"] / tiles, 3)
        pairs.append({"kind": (match or loop)["kind"], "generated": loop, "reference": match,
                      "ratio": ratio, "tiles_per_body": tiles})
    return pairs


def rescore(path: Path) -> list[dict]:
    """Rows of a written JSON result with the loop pairs recomputed (no compiling)."""
    rows = json.loads(path.read_text())["rows"]
    for row in rows:
        row["loops"] = pair_loops(row["generated"] or {}, row["reference"] or {})
        if "generated_tma" in row:
            row["tma_loops"] = pair_loops(row["generated_tma"] or {}, row["reference"] or {})
    return rows


def compare(jobs: list[Job], reports: list[CompiledReport | Exception]) -> list[dict]:
    """Rows of the result: one per (direction, case, target, dtype, dim, kernel)."""
    cells: dict[tuple, dict] = {}
    defaults: dict[tuple, str] = {}
    for job, report in zip(jobs, reports, strict=True):
        key = (job.direction, job.case, job.target, job.dtype, job.dim, job.kernel)
        cells.setdefault(key, {})[job.side] = _kernel_row(job, report)
        defaults[key] = job.default
    rows = []
    for key, sides in cells.items():
        direction, case, target, dtype, dim, kernel = key
        gen, ref = sides.get("generated"), sides.get("reference")
        row = {"direction": direction, "case": case, "target": target, "dtype": dtype,
               "dim": dim, "kernel": kernel, "generated": gen, "reference": ref,
               "loops": pair_loops(gen or {}, ref or {}), "default": defaults[key]}
        if "generated_tma" in sides:
            row["generated_tma"] = sides["generated_tma"]
            row["tma_loops"] = pair_loops(sides["generated_tma"], ref or {})
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- output


def _regs(side: dict | None) -> str:
    if side is None:
        return "none"
    if "error" in side:
        return "error"
    spill = f", {side['spills']} spill" if side["spills"] or side["stack"] else ""
    tma = f", {side['tma']} TMA" if side.get("tma") else ""
    return f"{side['registers']}{spill}, {side['shared_bytes'] / 1024:.0f}K{tma}"


def _counts(loop: dict | None) -> str:
    if loop is None:
        return "-"
    return f"{loop['all']} ({loop['tensor_core']}/{loop['ex2']}/{loop['rest']})"


def markdown(rows: list[dict], meta: dict) -> str:
    """The result table: one line per generated key-tile loop (or kernel without loops)."""
    lines = [
        f"Static SASS, compiled on CPU, no GPU; triton {meta['triton']}, {meta['date']}; "
        f"forward tiles {BLOCK_M}x{BLOCK_N}, {WARPS} warps, stages 3 (D=64) / 2 (D=128); "
        f"backward tiles per kernel as listed. Loop counts: all (tensor-core / MUFU.EX2 / "
        f"rest); kernel: registers, spills, shared memory.",
        "",
        "| dir | case | target | dtype | D | kernel | loop | generated | hand-written | ratio "
        "| gen regs, smem | ref regs, smem |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        head = (f"| {row['direction'][:3]} | {row['case']} | {row['target']} | {row['dtype']} "
                f"| {row['dim']} | {row['kernel']}")
        regs = f"{_regs(row['generated'])} | {_regs(row['reference'])} |"
        if not row["loops"]:
            ref_loops = (row["reference"] or {}).get("loops", [])
            ref = _counts(ref_loops[0]) if ref_loops else "-"
            gen = "no generated kernel" if row["generated"] is None else \
                (row["generated"].get("error") or "no key-tile loop")
            lines.append(f"{head} | - | {gen} | {ref} | - | {regs}")
        for pair in row["loops"]:
            ratio = "-" if pair["ratio"] is None else f"{pair['ratio']:.2f}"
            if (pair["tiles_per_body"] or 1) != 1:
                ratio += f" (x{pair['tiles_per_body']:g} tiles)"
            lines.append(f"{head} | {pair['kind']} | {_counts(pair['generated'])} | "
                         f"{_counts(pair['reference'])} | {ratio} | {regs}")
    return "\n".join(lines) + "\n"


def tma_table(rows: list[dict]) -> str:
    """The tensor-descriptor (TMA) variant next to the pointer-load one and the hand-written
    kernel: per loop of the pointer variant, its counts, the TMA variant's loop of the same
    kind, the reference's, the two ratios, and per kernel registers, shared memory and TMA
    instructions; ``(default)`` marks the TMA variant where an sm90 launch runs it."""
    lines = ["| case | target | dtype | D | loop | pointer loads | TMA | hand-written | ratio "
             "pointer / TMA | pointer regs, smem | TMA regs, smem, TMA instr | ref regs, smem |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if "generated_tma" not in row:
            continue
        tma_by_kind = {}
        for pair in row["tma_loops"]:
            tma_by_kind.setdefault(pair["kind"], pair)
        head = f"| {row['case']} | {row['target']} | {row['dtype']} | {row['dim']}"
        default = " (default)" if _default_is_tma(row) else ""
        regs = (f"{_regs(row['generated'])} | {_regs(row['generated_tma'])}{default} | "
                f"{_regs(row['reference'])} |")
        if not row["loops"]:
            lines.append(f"{head} | - | - | - | - | - | {regs}")
        for pair in row["loops"]:
            other = tma_by_kind.get(pair["kind"], {})
            ratios = " / ".join("-" if r is None else f"{r:.2f}"
                                for r in (pair["ratio"], other.get("ratio")))
            lines.append(f"{head} | {pair['kind']} | {_counts(pair['generated'])} | "
                         f"{_counts(other.get('generated'))} | {_counts(pair['reference'])} | "
                         f"{ratios} | {regs}")
    return "\n".join(lines) + "\n"


def _default_is_tma(row: dict) -> bool:
    """Whether the row's default launch is the tensor-descriptor variant (and it compiled)."""
    return row.get("default") == "generated_tma" and "generated_tma" in row


def _ratios(row: dict) -> str:
    """``unmasked / masked`` ratios of the loops of the row's default launch (the largest per
    kind), ``-`` if none."""
    best: dict[str, float] = {}
    for pair in row["tma_loops" if _default_is_tma(row) else "loops"]:
        if pair["ratio"] is not None:
            best[pair["kind"]] = max(best.get(pair["kind"], 0.0), pair["ratio"])
    return " / ".join(f"{best[k]:.2f}" if k in best else "-" for k in ("unmasked", "masked"))


def _regs_pair(row: dict) -> str:
    """``gen / ref`` registers of the default launch (``T``: the TMA variant, then the pointer
    variant's in brackets; ``s``: spills)."""
    tma = _default_is_tma(row)
    gen = (row["generated_tma"] if tma else row["generated"]) or {}
    ref = row["reference"] or {}
    if "registers" not in gen or "registers" not in ref:
        return "-"
    spill = lambda side: "s" if side["spills"] or side["stack"] else ""  # noqa: E731
    text = f"{gen['registers']}{spill(gen)}{'T' if tma else ''} / {ref['registers']}{spill(ref)}"
    pointer = row["generated"] or {}
    if tma and "registers" in pointer:
        text += f" (pointer {pointer['registers']}{spill(pointer)})"
    return text


def row_misses(row: dict) -> list[str]:
    """The parity targets (benchmarks/parity.py) that the row's default launch misses; a side
    that failed to compile, or was not recorded, is a miss too.  A kernel without a key-tile
    loop that the reference has no counterpart of (the fused backward's rows kernel) has
    nothing to compare."""
    tma = _default_is_tma(row)
    gen = (row["generated_tma"] if tma else row["generated"]) or {}
    ref = row["reference"] or {}
    if not ref and not gen.get("loops") and "error" not in gen:
        return []
    broken = [f"{who}: {side.get('error', 'not compiled')}" for who, side in
              (("generated", gen), ("reference", ref)) if "registers" not in side]
    if broken:
        return broken
    pairs = row["tma_loops" if tma else "loops"]
    occupancy = tuple(estimate_occupancy(side["registers"], side["shared_bytes"],
                                         side["num_warps"], row["target"])[0]
                      for side in (gen, ref))
    return misses([(pair["kind"], pair["ratio"]) for pair in pairs],
                  (gen["registers"], ref["registers"]), (gen["spills"], ref["spills"]),
                  occupancy)


def missed_targets(rows: list[dict]) -> str:
    """One line per row whose default launch misses a parity target ("" when none does)."""
    lines = []
    for row in rows:
        found = row_misses(row)
        if found:
            lines.append(f"- {row['direction'][:3]} {row['case']} {row['target']} {row['dtype']} "
                         f"D={row['dim']} {row['kernel']}: " + "; ".join(found))
    return "\n".join(lines)


def summary(rows: list[dict], dtype: str = "fp16") -> str:
    """One line per (direction, case, D, kernel) with key-tile loops: per target the loop
    ratios (unmasked / masked, the worst loop of each kind) and registers (gen / ref, ``s``:
    spills) of the launch the target runs by default: on sm90 the tensor-descriptor variant
    when the layout allows it (``T``; the pointer variant's registers in brackets)."""
    targets = sorted({r["target"] for r in rows}, reverse=True)
    cells: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        if row["dtype"] == dtype and row["loops"]:
            key = (row["direction"], row["case"], row["dim"], row["kernel"])
            cells.setdefault(key, {})[row["target"]] = row
    head = " | ".join(f"{t} ratio unmasked / masked | {t} regs gen / ref" for t in targets)
    lines = [f"| dir | case | D | kernel | {head} |",
             "| --- | --- | --- | --- |" + " --- | --- |" * len(targets)]
    for (direction, case, dim, kernel), by_target in cells.items():
        parts = []
        for t in targets:
            row = by_target.get(t)
            parts += [_ratios(row), _regs_pair(row)] if row else ["-", "-"]
        lines.append(f"| {direction[:3]} | {case} | {dim} | {kernel} | " + " | ".join(parts)
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one case (causal), one target (sm90), one dtype (fp16), D=64")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--targets", help=f"comma-separated, from {','.join(TARGETS)}")
    parser.add_argument("--dtypes", help=f"comma-separated, from {','.join(DTYPES)}")
    parser.add_argument("--dims", help="comma-separated head dims (default 64,128)")
    parser.add_argument("--no-backward", action="store_true", help="forward kernels only")
    parser.add_argument("--tma", action="store_true",
                        help="also the generated forward's tensor-descriptor (TMA) variant on "
                             f"{', '.join(TMA_TARGETS)} (the default except with --quick)")
    parser.add_argument("--no-tma", action="store_true",
                        help="the pointer-load variant only (what sm80 and CPU launches run)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a row's default launch misses a parity target "
                             "(benchmarks/parity.py)")
    parser.add_argument("--jobs", type=int, default=2, help="compiling children (at most 2)")
    parser.add_argument("--rescore", help="recompute the pairs and tables of a JSON result")
    parser.add_argument("--out", help="output path without extension "
                                      "(default benchmarks/results/static_kernel_<date>)")
    args = parser.parse_args(argv)
    split = lambda text, default: default if not text else text.split(",")  # noqa: E731
    cases = split(args.cases, ["causal"] if args.quick else None)
    targets = split(args.targets, ["sm90"] if args.quick else list(TARGETS))
    dtypes = split(args.dtypes, ["fp16"] if args.quick else list(DTYPES))
    dims = [int(d) for d in split(args.dims, ["64"] if args.quick else list(DIMS))]
    known = set(FORWARD_CASES) | set(BACKWARD_CASES)
    unknown = sorted(set(cases or []) - known)
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {sorted(known)}")
    fwd_cases = [c for c in (cases or FORWARD_CASES) if c in FORWARD_CASES]
    bwd_cases = [] if args.no_backward else \
        [c for c in (cases or BACKWARD_CASES) if c in BACKWARD_CASES]
    if args.rescore:
        path = Path(args.rescore)
        data = json.loads(path.read_text())
        rows = rescore(path)
        _write(rows, data["meta"], path.with_suffix(""), sorted({r["dtype"] for r in rows}))
        return 1 if args.check and missed_targets(rows) else 0
    t0 = time.perf_counter()
    tma = args.tma or not (args.quick or args.no_tma)
    jobs = forward_jobs(fwd_cases, targets, dtypes, dims, tma) + \
        backward_jobs(bwd_cases, targets, dtypes, dims)
    reports = compile_kernels([job.spec for job in jobs], jobs=max(1, min(2, args.jobs)),
                              strict=False)
    rows = compare(jobs, reports)
    meta = {"date": datetime.date.today().isoformat(), "triton": triton.__version__,
            "torch": torch.__version__, "compiled": len(jobs),
            "seconds": round(time.perf_counter() - t0, 1), "batch": BATCH, "heads": HEADS,
            "length": LENGTH, "forward_tiles": [BLOCK_M, BLOCK_N, WARPS],
            "note": "static SASS, compiled on CPU, no GPU"}
    out = Path(args.out) if args.out else \
        ROOT / "benchmarks" / "results" / f"static_kernel_{meta['date']}"
    _write(rows, meta, out, dtypes)
    print(f"{len(jobs)} kernels compiled in {meta['seconds']} s; wrote {out}.json and .md")
    return 1 if args.check and missed_targets(rows) else 0


def _write(rows: list[dict], meta: dict, out: Path, dtypes: list[str]) -> int:
    """``out``.json (meta and rows) and ``out``.md (summaries per dtype, then every loop)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    short = "\n".join(f"Summary, {d} (worst loop of each kind; per target the launch it runs "
                      f"by default, T: tensor descriptors):\n\n{summary(rows, d)}"
                      for d in dtypes)
    tma = tma_table(rows) if any("generated_tma" in r for r in rows) else ""
    if tma:
        tma = f"Tensor-descriptor (TMA) variant of the generated forward:\n\n{tma}\n"
    missed = missed_targets(rows) or "none"
    missed = f"Parity targets missed (benchmarks/parity.py), default launches:\n\n{missed}\n"
    out.with_suffix(".md").write_text(f"{short}\n{missed}\n{tma}All loops:\n\n"
                                      f"{markdown(rows, meta)}")
    print(short)
    print(missed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
