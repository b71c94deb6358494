"""Ahead-of-time GPU reports for generated kernels (registers, spills, shared memory,
tensor-core instructions, key-tile loops), computed on a CPU with Triton's own compiler.

A thin layer over :mod:`attndsl.runtime.aot`, which compiles (in a child process whenever this
one runs Triton's interpreter) and reads the cubin back. This module knows how a generated
forward module is launched -- which arguments are strides, which constexprs a launch sets -- and
turns a (module, target, dtype, head dims, sparsity, config) job into an :class:`aot.KernelSpec`.

:func:`record_launches` reads the same facts from a real call instead: it runs any launcher
(``attndsl.flex_attention``, a generated module's ``launch``, a hand-written kernel's wrapper)
under the interpreter with each launch recorded, not executed, and gives the compile signature
as a GPU launch would specialise it (benchmarks/static_kernel.py compiles that way).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from attndsl.ir.tile import TileKernel
from attndsl.passes.mask import SPARSE_BLOCK
from attndsl.runtime.aot import (
    TARGETS,
    CompiledReport,
    KernelSpec,
    compile_kernels,
    normalize_target,
)
from attndsl.runtime.modules import cache_dir, module_source, write_module

CANDIDATES = [(128, 64, 4, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)]


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def signature(module: Any, dtype: str, e: int, f: int) -> tuple[dict, dict]:
    """(signature, stride constexprs) as a launch with contiguous tensors specialises.

    The strides come from the module's ``STRIDES`` table (pointer -> its stride arguments in
    dim order), not from their names: the last one of every tensor is 1 (specialised to a
    constant); the row strides the kernel takes as constexprs (``ROW_STRIDES``) are the head
    dim of their tile (a contiguous [.., rows, D] tensor); the others of the attention
    operands and outputs are multiples of 16 when both head dims are, those of captured
    tensors plain i32."""
    strides: dict[str, tuple[str, ...]] = module.STRIDES
    tiles = {entry[0] for table in (module.OPERANDS, module.OUTPUTS)
             for entry in table.values()}
    aligned = e % 16 == 0 and f % 16 == 0
    kind: dict[str, str] = {}
    for ptr, names in strides.items():
        for d, name in enumerate(names):
            kind[name] = "unit" if d == len(names) - 1 else \
                "i32:16" if ptr in tiles and aligned else "i32"
    sig: dict[str, str] = {}
    rows = getattr(module, "ROW_STRIDES", {}).get("attention_fwd_kernel", {})
    units: dict[str, int] = {a: e if cols == "E_len" else f for a, cols in rows.items()}
    for a, ty in module.ARG_TYPES.items():
        if kind.get(a) == "unit":
            units[a] = 1  # contiguous last dim: specialised to 1 at launch
            continue
        if a in kind:
            sig[a] = kind[a]
        elif a in ("E_len", "F_len"):
            sig[a] = "i32:16" if (e if a == "E_len" else f) % 16 == 0 else "i32"
        else:
            sig[a] = ty.format(dtype=dtype)
    return sig, units


def _spec(job: dict) -> KernelSpec:
    """The compile of one (module, target, dtype, head dims, sparsity, segments, config) job."""
    from attndsl.runtime.modules import import_path

    module = import_path(job["path"])
    dtype, e, f = job["dtype"], job["e"], job["f"]
    sig, units = signature(module, dtype, e, f)
    bm, bn, warps, stages = job["config"]
    consts = dict(units, BLOCK_M=bm, BLOCK_N=bn, BLOCK_E=max(16, _next_pow2(e)),
                  BLOCK_F=max(16, _next_pow2(f)), EVEN_N=True, SPARSITY=job["sparsity"],
                  SPARSE_Q=job.get("sparse_q", SPARSE_BLOCK),
                  SPARSE_KV=job.get("sparse_kv", SPARSE_BLOCK),
                  SEGMENTS=job.get("segments") or (module.BOUNDS_SEGMENTS
                                                   if job["sparsity"] == 3 else 1),
                  EDGE_STAGES=module.edge_stages(stages),
                  DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False,
                  STATS=False, TMA=bool(job.get("tma_loads", False)))
    consts.update(_constexpr_params(module, job.get("params") or {}))
    return KernelSpec(module.attention_fwd_kernel, sig, consts, job["target"], warps, stages)


def _constexpr_params(module: Any, given: dict) -> dict:
    """The values of the parameters a generated forward kernel takes as constexprs
    (``CONSTEXPR_PARAMS``, e.g. the GQA group size G) by kernel argument: ``given`` by name
    (a launch's), else the parameter's default, else 1 (for G: no grouping)."""
    defaults = getattr(module, "PARAM_DEFAULTS", {})
    return {arg: given.get(p, defaults.get(p, 1))
            for p, arg in getattr(module, "CONSTEXPR_PARAMS", {}).items()}


def _row(job: dict, report: CompiledReport | Exception) -> dict:
    """The job with its report's numbers (or the error: a config Triton cannot build is
    reported, not fatal)."""
    out = dict(job)
    if isinstance(report, Exception):
        out["error"] = f"{type(report).__name__}: {str(report).splitlines()[0][:200]}"
        return out
    r = report
    out.update(registers=r.registers, spills=r.spill_stores + r.spill_loads,
               stack=r.stack_bytes, shared=r.shared_total_bytes, tc_kind=r.tc_kind,
               tc_count=r.tc_count, programs_per_sm=r.programs_per_sm, fits=r.fits,
               reason=r.reason, tma=r.tma_count,
               loops=[{"all": lp.instructions, "tensor_core": lp.tensor_core, "ex2": lp.ex2,
                       "rest": lp.rest} for lp in r.loops])
    return out


def default_config(kernel_path: str, dtype: str, e: int, f: int) -> list[int]:
    """The generated module's own default GPU config (BLOCK_M, BLOCK_N, warps, stages)."""
    import torch

    from attndsl.runtime.modules import import_path

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    cfg = import_path(kernel_path).default_config(e, f, torch_dtype, "cuda")
    return [cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"]]


def run_jobs(jobs: list[dict]) -> list[dict]:
    """Compile many jobs (one aot child process for all, when this process is interpreted);
    a job with ``"config": None`` gets the module's default GPU config; repeated jobs once."""
    unique, seen = [], set()
    for job in jobs:
        job = dict(job)
        if job["config"] is None:
            job["config"] = default_config(job["path"], job["dtype"], job["e"], job["f"])
        key = (job["path"], job["target"], job["dtype"], job["e"], job["f"], job["sparsity"],
               job.get("segments", 1), tuple(job["config"]), bool(job.get("tma_loads")),
               tuple(sorted((job.get("params") or {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(job)
    specs: list[KernelSpec | Exception] = []
    for job in unique:
        try:
            specs.append(_spec(job))
        except Exception as err:  # a module that cannot be read is reported like a failed build
            specs.append(err)
    good = iter(compile_kernels([s for s in specs if isinstance(s, KernelSpec)], strict=False))
    reports = [next(good) if isinstance(s, KernelSpec) else s for s in specs]
    return [_row(job, report) for job, report in zip(unique, reports, strict=True)]


def kernel_path(kernel: TileKernel) -> str:
    """The kernel's module written to the cache for a child process to compile, named by the
    hash of its source (as :func:`attndsl.runtime.modules.load_source`), so two processes
    whose printers differ (two attndsl versions) never compile each other's module."""
    source = module_source(kernel)
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    path = cache_dir() / f"aot_{digest}.py"
    write_module(source, path, cache_entry=True)
    return str(path)


def compile_reports(kernel: TileKernel, target: str, dtype: str = "fp16", e: int = 64,
                    f: int = 64, sparsity: int = 1) -> list[dict]:
    """Compile the default and every candidate config of ``kernel`` for ``target``; on a
    target with TMA (sm90) also the default config's tensor-descriptor variant, which a
    launch there uses by default from head dims above 64 when the layout allows it (and the
    autotuner times against pointer loads); ``default`` marks the one load path of the
    default config that a launch naming none takes (:func:`default_takes_tma`).  ``target``
    is any spelling :func:`~attndsl.runtime.aot.normalize_target` takes (an unknown one is a
    ValueError listing the known targets)."""
    target = normalize_target(target)
    path = kernel_path(kernel)
    configs = [None] + [list(c) for c in CANDIDATES]
    jobs = [{"path": path, "target": target, "dtype": dtype, "e": e, "f": f,
             "sparsity": sparsity, "config": c, "default": c is None} for c in configs]
    if TARGETS[target].capability >= 90:
        takes_tma = default_takes_tma(path, e, f)
        jobs.insert(1, dict(jobs[0], tma_loads=True, default=takes_tma))
        jobs[0]["default"] = not takes_tma
    return run_jobs(jobs)


def default_takes_tma(kernel_path: str, e: int, f: int) -> bool:
    """Whether an sm90 launch of the module at head dims ``e``, ``f`` that names no load path
    reads through tensor descriptors (contiguous, aligned tensors assumed): the module's own
    ``pointer_default`` with the head-dim blocks a launch sets, and its PREFER_POINTERS."""
    from attndsl.runtime.modules import import_path

    module = import_path(kernel_path)
    if not getattr(module, "TMA_TENSORS", None):
        return False
    blocks = {"BLOCK_E": max(16, _next_pow2(e)), "BLOCK_F": max(16, _next_pow2(f))}
    return not module.pointer_default(blocks, getattr(module, "PREFER_POINTERS", ""))


def format_reports(reports: list[dict]) -> str:
    """A table of reports: config (``tma``: the tensor-descriptor variant), registers, spills,
    shared memory, tensor-core and TMA instructions, programs per SM, the key-tile loops'
    instruction counts, fits."""
    lines = [f"{'BLOCK_M x N, warps, stages':28s} {'regs':>5s} {'spills':>6s} {'smem KiB':>9s} "
             f"{'tensor cores':>14s} {'TMA':>4s} {'CTAs/SM':>7s} {'loop instr':>11s}  fits"]
    for r in reports:
        cfg = "{} x {}, {}w, {}s".format(*r["config"]) + \
            (", tma" if r.get("tma_loads") else "") + ("  (default)" if r.get("default") else "")
        if "error" in r:
            lines.append(f"{cfg:28s} failed: {r['error']}")
            continue
        tc = f"{r['tc_kind']} x{r['tc_count']}"
        loops = ",".join(str(lp["all"]) for lp in r.get("loops", [])) or "-"
        fits = "yes" if r["fits"] else "no: " + r["reason"]
        lines.append(f"{cfg:28s} {r['registers']:5d} {r['spills']:6d} {r['shared'] / 1024:9.1f} "
                     f"{tc:>14s} {r.get('tma', 0):4d} {r['programs_per_sm']:7d} {loops:>11s}  "
                     f"{fits}")
    return "\n".join(lines)


def kernel_reports(kernel: TileKernel, target: str, dtype: str = "fp16", e: int = 64,
                   f: int = 64) -> str:
    return format_reports(compile_reports(kernel, target, dtype, e, f))


# ----------------------------------------------------------------------------- autotuning

_DTYPES = {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}


def device_target(device: str) -> str | None:
    """The :data:`aot.TARGETS` name of a CUDA device (``"cuda:0"`` -> ``"sm90"``), or None."""
    import torch

    major, minor = torch.cuda.get_device_capability(torch.device(device))
    name = f"sm{major}{minor}"
    return name if name in TARGETS else None


def prune_candidates(module: Any, key: tuple, candidates: list[dict],
                     target: str) -> list[dict]:
    """The autotuning candidates of a generated forward module that fit ``target`` statically.

    ``key`` is the launcher's tuning key ``(spec hash, device, dtype, E, F, sparsity, sparse_q,
    sparse_kv, segments, M, N, tma, the values of CONSTEXPR_PARAMS)``. Each candidate is
    compiled ahead of time (:func:`run_jobs`) with the load path it will run with (its
    ``tma``: tensor descriptors or pointer loads) and its constexpr parameters, and kept when
    its report fits: shared memory within the block limit, no register spills. When none
    fits, those that at least compile within the shared-memory limit are kept (they run,
    with spills); when none of those either, the candidates are returned as given (the timing
    loop then reports what cannot run)."""
    _, _, dtype, e, f, sparsity, sparse_q, sparse_kv, segments = key[:9]
    names = getattr(module, "CONSTEXPR_PARAMS", {})  # their values end a launcher's key
    static = dict(zip(names, key[12], strict=True)) if len(key) > 12 else {}
    base = {"path": module.__file__, "target": target, "dtype": _DTYPES[str(dtype)], "e": e,
            "f": f, "sparsity": sparsity, "segments": segments, "sparse_q": sparse_q,
            "sparse_kv": sparse_kv, "params": static}
    configs = [([c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"]],
                bool(c.get("tma"))) for c in candidates]
    rows = {(tuple(r["config"]), r["tma_loads"]): r for r in
            run_jobs([{**base, "config": c, "tma_loads": tma} for c, tma in configs])}
    found = [rows.get((tuple(c), tma), {"error": "not compiled"}) for c, tma in configs]
    fit = [c for c, r in zip(candidates, found, strict=True) if r.get("fits")]
    smem = TARGETS[target].smem_per_block
    runs = [c for c, r in zip(candidates, found, strict=True)
            if "error" not in r and r["shared"] <= smem]
    return fit or runs or list(candidates)


def install_static_pruning(module: Any,
                           target_of: Callable[[str], str | None] = device_target) -> None:
    """Make a generated forward module's autotuner drop, before timing anything, the
    candidates whose static report does not fit the device (:func:`prune_candidates`).

    Wraps the module's ``_tuned(key, candidates, run)`` (the launcher times each candidate
    there); a module without one, a CPU key or a device without :data:`aot.TARGETS` limits is
    left as it is. Installed once per module."""
    tuned = getattr(module, "_tuned", None)
    if not callable(tuned) or getattr(tuned, "statically_pruned", False):
        return

    kept: dict[str, list] = {}

    def already_tuned(skey: str) -> bool:  # the launcher's memory and file, when it has them
        memory = getattr(module, "_TUNED", {})
        read = getattr(module, "_read_tuning", None)
        return skey in memory or (callable(read) and skey in read())

    def pruned(key: tuple, candidates: list, run: Callable) -> dict:
        skey = repr(key)
        device = str(key[1]) if len(key) > 1 else ""
        if skey not in kept and len(candidates) > 1 and device.startswith("cuda") \
                and len(key) >= 9 and not already_tuned(skey):
            target = target_of(device)
            kept[skey] = candidates if target is None else \
                prune_candidates(module, key, candidates, target)
        return tuned(key, kept.get(skey, candidates), run)

    pruned.statically_pruned = True  # type: ignore[attr-defined]
    module._tuned = pruned


# ----------------------------------------------------------------------------- recorded launches

# Launch keywords that are compile options, not kernel arguments.
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclass(frozen=True)
class RecordedLaunch:
    """One kernel launch as a GPU launch would specialise it, ready for :mod:`aot`.

    ``signature`` holds the runtime arguments with the types Triton's launcher gives them
    (``"*fp16"``, ``"i32"``, ``"fp32"``) and ``":16"`` on integers divisible by 16;
    ``constexprs`` the constexpr arguments plus the integers equal to 1 and the ``None``s, which
    Triton specialises into constants. ``fn`` is the kernel's Python function.
    """

    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    grid: tuple[int, ...]

    @property
    def name(self) -> str:
        """The kernel's function name."""
        return self.fn.__name__

    def spec(self, target: str, *, dtype: tuple[str, str] | None = None,
             **overrides: Any) -> KernelSpec:
        """An :class:`aot.KernelSpec` for ``target``; ``dtype=("fp16", "bf16")`` retypes the
        pointers of one element type (the launch was recorded on the CPU, where the launcher
        may upcast bf16), ``overrides`` replace constexprs and ``num_warps``/``num_stages``."""
        sig = dict(self.signature)
        if dtype is not None:
            old, new = (f"*{d}" for d in dtype)
            sig = {k: new if v == old else v for k, v in sig.items()}
        warps = int(overrides.pop("num_warps", self.num_warps))
        stages = int(overrides.pop("num_stages", self.num_stages))
        unknown = sorted(set(overrides) - set(self.constexprs))
        if unknown:
            raise ValueError(f"{self.name} has no constexprs {unknown}; it has "
                             f"{sorted(self.constexprs)}")
        return KernelSpec(self.fn, sig, {**self.constexprs, **overrides}, target, warps, stages)


def _specialise(value: Any) -> tuple[str, str]:
    """(type, key) that Triton's launcher gives a runtime argument (key ``"D"``: divisible by
    16; type ``"constexpr"``: the value becomes a constant)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    ty, key = native_specialize_impl(BaseBackend, value, False, True, True)
    return ty, key


def _record(fn: Any, args: tuple, kwargs: dict, grid: Any) -> RecordedLaunch:
    """The launch ``fn[grid](*args, **kwargs)`` in :class:`RecordedLaunch` form."""
    options = {k: kwargs.pop(k) for k in _LAUNCH_OPTIONS if k in kwargs}
    params = inspect.signature(fn).parameters
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    sig: dict[str, str] = {}
    consts: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        annotation = params[name].annotation
        if "constexpr" in str(getattr(annotation, "__name__", annotation)):
            consts[name] = value
            continue
        ty, key = _specialise(value)
        if ty == "constexpr":
            consts[name] = value
        else:
            sig[name] = ty + (":16" if key == "D" and not ty.startswith("*") else "")
    shape = grid if isinstance(grid, tuple) else (grid,)
    return RecordedLaunch(fn, sig, consts, int(options.get("num_warps", 4)),
                          int(options.get("num_stages", 3)), tuple(int(g) for g in shape))


def record_launches(run: Callable[[], Any]) -> list[RecordedLaunch]:
    """Call ``run()`` with every kernel launch recorded instead of executed, in launch order.

    The launches run through Triton's interpreter (TRITON_INTERPRET=1 in this process, CPU
    tensors): each ``kernel[grid](...)`` is turned into a :class:`RecordedLaunch` and returns
    without computing anything, so outputs hold whatever ``torch.empty`` gave. This reads the
    exact arguments the generated launcher passes -- names, dtypes, which integers a GPU launch
    would specialise -- without knowing the launcher's conventions.
    """
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[RecordedLaunch] = []

    def recording_run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        if not warmup:
            launches.append(_record(self.fn, args, dict(kwargs), grid))

    original = InterpretedFunction.run
    InterpretedFunction.run = recording_run
    try:
        run()
    finally:
        InterpretedFunction.run = original
    return launches
