"""Ahead-of-time compilation of Triton kernels and a resource report, without a GPU.

Triton's compiler needs no GPU or driver: ``triton.compile`` on an ``ASTSource`` with an explicit
``GPUTarget`` runs the whole pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> ptxas -> cubin) on the
CPU. This module compiles a kernel for a named NVIDIA target, reads the cubin back with the
``cuobjdump`` shipped in the Triton wheel, and reports what the kernel would use on that GPU.

Where the compile runs: in this process, unless Triton's interpreter is on or has been used
here (:func:`interpreter_active`) -- then in one fresh ``python -m attndsl.runtime.aot`` child
without TRITON_INTERPRET, which imports the kernel from its file. Running interpreted ``@jit``
helpers leaves ``triton.language`` patched (triton 3.8), so an in-process GPU compile after CPU
runs fails; the child makes every caller (tests, ``attndsl explain --target``) independent of it.

What Triton itself checks, and when: ``triton.compile`` does *not* check shared memory against
the device; an over-large config compiles fine (a 256x256x256 attention tile reports 896 KiB) and
only fails at the first launch (``CompiledKernel._init_handles`` raises ``OutOfResources``).
ptxas never fails for registers either: it caps at 255 per thread and spills to local memory.
So both limits are checked here, from ``metadata.shared`` and the cubin.

Alignment hints: a launch with torch tensors specialises every pointer argument, and every
integer argument that is a multiple of 16, as divisible by 16 (``tt.divisibility = 16``); that
enables vectorised and asynchronous copies. A bare ``ASTSource`` assumes nothing, which changes the
code a lot. Pointers are therefore marked aligned by default (``assume_aligned=True``); integer
arguments (strides) are marked with Triton's ``"i32:16"`` notation, as in
``triton/tools/compile.py``. Example (128x64 fp16 attention tile, D=64, sm90, 4 warps, 3 stages):
with the row strides hinted, 228 registers, no spills, 64 KiB shared; without the stride hints,
255 registers, a 72-byte spill stack and 24 KiB shared.

Formulas used (all per streaming multiprocessor, SM):

* shared bytes per program  ``S = metadata.shared + static SHARED of the cubin``;
  it fits when ``S <= smem_per_block`` of the target (Triton's launcher allows dynamic shared
  memory up to the per-block opt-in limit minus the static part).
* occupancy, in programs (CTAs) per SM, following the CUDA occupancy calculator::

      regs_per_warp = ceil(regs * 32 / 256) * 256          # allocation unit: 256 regs per warp
      by_regs    = (4 * floor(16384 / regs_per_warp)) // num_warps   # 4 sub-partitions x 16K regs
      by_smem    = floor(smem_per_sm / (S + 1024))          # 1 KiB reserved per block (sm80+)
      by_threads = max_threads_per_sm // (32 * num_warps)
      programs_per_sm = min(by_regs, by_smem, by_threads, max_blocks_per_sm)

  This assumes the largest shared-memory carveout (Triton's launcher asks for it when S > 48 KiB)
  and ignores warp-allocation granularity subtleties; it is an estimate, not the driver's answer.
* ``occupancy = programs_per_sm * num_warps * 32 / max_threads_per_sm``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import json
import math
import os
import re
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attndsl.runtime.modules import cache_dir, write_module
from attndsl.runtime.sass import KeyTileLoop, summarize_sass

__all__ = [
    "TARGETS",
    "CompiledReport",
    "KernelSpec",
    "TargetLimits",
    "attention_bound",
    "child_env",
    "clear_cache",
    "compile_kernel",
    "compile_kernels",
    "estimate_occupancy",
    "find_cuobjdump",
    "format_report",
    "interpreter_active",
    "normalize_target",
    "prune_configs",
]


@dataclass(frozen=True)
class TargetLimits:
    """Per-target hardware limits used for the fit check and the occupancy estimate."""

    name: str
    capability: int
    smem_per_block: int  # opt-in maximum dynamic + static shared memory of one block, bytes
    smem_per_sm: int  # shared memory of one SM at the largest carveout, bytes
    max_threads_per_sm: int
    max_blocks_per_sm: int
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_threads_per_block: int = 1024
    reserved_smem_per_block: int = 1024  # system use, counted against the SM (cc >= 8.0)


_KIB = 1024

# Source: CUDA C++ Programming Guide, "Compute Capabilities", table "Technical Specifications per
# Compute Capability" (max shared memory per SM / per thread block, max resident threads and blocks
# per SM, 64K 32-bit registers per SM, 255 registers per thread) and its note that 1 KB of shared
# memory per block is reserved for system use on compute capability 8.x and 9.0.
TARGETS: dict[str, TargetLimits] = {
    "sm80": TargetLimits("sm80", 80, 163 * _KIB, 164 * _KIB, 2048, 32),  # A100
    "sm86": TargetLimits("sm86", 86, 99 * _KIB, 100 * _KIB, 1536, 16),  # A10, RTX 30xx
    "sm89": TargetLimits("sm89", 89, 99 * _KIB, 100 * _KIB, 1536, 24),  # L4, L40, RTX 40xx
    "sm90": TargetLimits("sm90", 90, 227 * _KIB, 228 * _KIB, 2048, 32),  # H100, H200
}

# Roofline ceilings for attention_bound: (dense bf16/fp16 FLOP/s, DRAM bytes/s).
# sm90 (H100 SXM): 790e12 is a large bf16 GEMM measured on the project's H100 machines (datasheet
#   peak ~989e12); 3.0e12 B/s is the achievable copy bandwidth given in the project brief
#   (datasheet HBM3 3.35e12), not measured by this module.
# sm80 (A100 SXM 80 GB): datasheet peaks, NOT measured: 312e12 dense bf16, 2.0e12 B/s HBM2e.
# sm86 / sm89 name many different boards, so no single ceiling is recorded for them.
_CEILINGS: dict[str, tuple[float, float]] = {
    "sm90": (790e12, 3.0e12),
    "sm80": (312e12, 2.0e12),
}


def normalize_target(target: str | int) -> str:
    """Return the canonical target name (``"sm90"``) for ``"sm90"``, ``"sm_90"``, ``"90"`` or 90."""
    text = str(target).strip().lower()
    match = re.fullmatch(r"(?:sm_?)?(\d+)", text)
    name = f"sm{match.group(1)}" if match else None
    if name not in TARGETS:
        allowed = ", ".join(TARGETS)
        raise ValueError(
            f"unknown target {target!r}; allowed: {allowed} (also written sm_90 or 90)"
        )
    return name


@dataclass(frozen=True)
class CompiledReport:
    """Resources of one compiled kernel configuration on one target.

    ``shared_bytes`` is Triton's ``metadata.shared`` (dynamic shared memory requested at launch);
    ``static_shared_bytes`` is the cubin's static ``SHARED`` (1 KiB on the sm90 kernels seen so
    far, 0 on sm8x).
    ``spill_stores`` / ``spill_loads`` count STL / LDL instructions in the SASS (static count);
    ``stack_bytes`` / ``local_bytes`` are cuobjdump's ``STACK`` / ``LOCAL`` per thread.
    ``tc_kind`` is ``"HGMMA"`` (Hopper warpgroup MMA), ``"HMMA"`` (mma.sync) or ``"none"``, and
    ``tc_count`` the static number of such instructions in the SASS.
    ``loops`` are the key-tile loops of the SASS (see :mod:`attndsl.runtime.sass`) in address
    order, and ``tma_count`` the static number of TMA instructions (``UTMALDG``, ``UBLKCP``, ...).
    """

    name: str
    target: str
    num_warps: int
    num_stages: int
    constexprs: dict[str, Any]
    registers: int
    stack_bytes: int
    local_bytes: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    static_shared_bytes: int
    tc_kind: str
    tc_count: int
    hgmma_count: int
    hmma_count: int
    programs_per_sm: int
    occupancy: float
    fits: bool
    reason: str = ""
    loops: tuple[KeyTileLoop, ...] = ()
    tma_count: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompiledReport:
        """Inverse of ``dataclasses.asdict`` (the child process sends reports as JSON)."""
        loops = tuple(KeyTileLoop(**loop) for loop in data.get("loops", ()))
        return cls(**{**data, "loops": loops})

    @property
    def limits(self) -> TargetLimits:
        """Hardware limits of this report's target."""
        return TARGETS[self.target]

    @property
    def shared_total_bytes(self) -> int:
        """Shared memory of one program: dynamic (``metadata.shared``) plus static."""
        return self.shared_bytes + self.static_shared_bytes

    @property
    def spills(self) -> bool:
        """True when the kernel touches local memory (stack frame or LDL/STL)."""
        return bool(self.stack_bytes or self.local_bytes or self.spill_stores or self.spill_loads)


def estimate_occupancy(
    registers: int, shared_total: int, num_warps: int, target: str | int
) -> tuple[int, str]:
    """Programs (CTAs) per SM and the limiting resource; see the module docstring for formulas.

    Returns ``(0, limiter)`` when one program alone does not fit on an SM.
    """
    lim = TARGETS[normalize_target(target)]
    threads = 32 * num_warps
    if threads > lim.max_threads_per_block:
        return 0, "threads"
    if shared_total > lim.smem_per_block:
        return 0, "smem"
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by = {
        "regs": (4 * ((lim.regs_per_sm // 4) // regs_per_warp)) // num_warps,
        "smem": lim.smem_per_sm // (shared_total + lim.reserved_smem_per_block),
        "threads": lim.max_threads_per_sm // threads,
        "blocks": lim.max_blocks_per_sm,
    }
    limiter = min(by, key=lambda k: by[k])
    return by[limiter], limiter


# ----------------------------------------------------------------------------- cuobjdump


def find_cuobjdump(triton_dir: str | None = None) -> str:
    """Path of the ``cuobjdump`` shipped in the Triton wheel (``backends/nvidia/bin``)."""
    if triton_dir is None:
        import triton

        triton_dir = os.path.dirname(triton.__file__)
    path = os.path.join(triton_dir, "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"cuobjdump not found at {path}; it ships with the Triton wheel's NVIDIA backend "
            "(triton/backends/nvidia/bin). Reinstall triton with the NVIDIA backend."
        )
    return path


def _run_cuobjdump(cubin: bytes) -> tuple[str, str]:
    """Return (``--dump-resource-usage`` text, ``--dump-sass`` text) for a cubin.

    The listing is a pure function of the cubin's bytes and of the tool, and disassembling
    is the slow part of a report once Triton's own cache holds the cubin (about 0.4 s per
    kernel, ten times Triton's cache lookup), so it is cached on disk, in
    ``cache_dir()/cuobjdump``, by the hash of both (:func:`_listing_path`)."""
    tool = find_cuobjdump()
    path = _listing_path(tool, cubin)
    cached = _read_listing(path)
    if cached is not None:
        return cached
    listing = _disassemble(tool, cubin)
    try:
        write_module(json.dumps({"usage": listing[0], "sass": listing[1]}), path,
                     cache_entry=True)
    except OSError:  # a full or read-only disk costs the next report a disassembly, no more
        pass
    return listing


@functools.lru_cache(maxsize=8)
def _tool_digest(tool: str, size: int, mtime_ns: int) -> str:
    """Hash of the cuobjdump binary's bytes (read once per version of the file)."""
    with open(tool, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def _listing_path(tool: str, cubin: bytes) -> Path:
    """Cache entry of ``cubin``'s listing: named by the hash of the tool's bytes and the
    cubin's, so another cuobjdump (another Triton wheel) or another cubin never shares it."""
    info = os.stat(tool)
    key = hashlib.sha256(_tool_digest(tool, info.st_size, info.st_mtime_ns).encode()
                         + cubin).hexdigest()[:32]
    return cache_dir() / "cuobjdump" / f"{key}.json"


def _read_listing(path: Path) -> tuple[str, str] | None:
    """The cached (usage, sass) listing at ``path``, or None when there is none or the entry
    is unreadable, truncated or not such a listing (it is then rebuilt and replaced)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # never open a FIFO: it would block
            return None
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str)
                                              for k in ("usage", "sass")):
        return None
    return entry["usage"], entry["sass"]


def _disassemble(tool: str, cubin: bytes) -> tuple[str, str]:
    """Run ``tool`` on ``cubin`` for its resource usage and its SASS."""
    with tempfile.TemporaryDirectory(prefix="attndsl_aot_") as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(cubin)
        outputs = []
        for flag in ("--dump-resource-usage", "--dump-sass"):
            proc = subprocess.run([tool, flag, path], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"cuobjdump {flag} failed ({proc.returncode}): {proc.stderr}")
            outputs.append(proc.stdout)
    return outputs[0], outputs[1]


_FUNCTION_RE = re.compile(r"Function\s+([^\s:]+)\s*:")
_FIELD_RE = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")
_SASS_OP_RE = re.compile(r"^\s*/\*[0-9a-fA-F]+\*/\s+(?:@!?U?P(?:T|\d+)\s+)?([A-Z][A-Z0-9_]*)", re.M)


def _parse_resource_usage(text: str, kernel: str) -> dict[str, int]:
    """Parse ``REG:.. STACK:.. SHARED:.. LOCAL:..`` of ``kernel`` (or the only/largest function)."""
    per_fn: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        found = _FUNCTION_RE.search(line)
        if found:
            current = found.group(1)
            continue
        if current is not None and "REG:" in line:
            per_fn[current] = {k: int(v) for k, v in _FIELD_RE.findall(line)}
            current = None
    if not per_fn:
        raise RuntimeError(f"could not parse cuobjdump --dump-resource-usage output:\n{text}")
    usage = per_fn.get(kernel) or max(per_fn.values(), key=lambda d: d.get("REG", 0))
    return {key: usage.get(key, 0) for key in ("REG", "STACK", "SHARED", "LOCAL")}


def _count_opcodes(sass: str) -> Counter[str]:
    """Static count of SASS opcodes (the mnemonic before the first dot, predicate stripped)."""
    return Counter(_SASS_OP_RE.findall(sass))


# ----------------------------------------------------------------------------- compile


def _as_jit_function(fn: Callable[..., Any]) -> Any:
    """A real ``JITFunction`` for ``fn``, whatever TRITON_INTERPRET says.

    ``triton.jit`` returns an interpreter object when TRITON_INTERPRET=1, so plain functions are
    wrapped with ``JITFunction`` directly and interpreter objects are unwrapped via ``.fn``.
    """
    from triton.runtime.jit import JITFunction

    # InterpretedFunction, Autotuner and Heuristics all keep the wrapped kernel in ``.fn``.
    while not isinstance(fn, JITFunction) and not inspect.isfunction(fn) and hasattr(fn, "fn"):
        fn = fn.fn
    if isinstance(fn, JITFunction):
        return fn
    if not inspect.isfunction(fn):
        raise TypeError(f"expected a @triton.jit function or a plain Python function, got {fn!r}")
    return JITFunction(fn)


def _source_key(jit_fn: Any) -> tuple[str, str, str, str]:
    """Content key of a kernel: source text (from ``def``), module, qualname, Triton's cache_key.

    Triton's ``cache_key`` hashes the source of called ``@jit`` helpers and constexpr globals too.
    """
    raw = jit_fn.fn
    src = textwrap.dedent(inspect.getsource(raw))
    start = re.search(r"^def\s+\w+\s*\(", src, re.M)
    src = src[start.start():] if start else src
    try:
        deps = str(jit_fn.cache_key)
    except Exception:  # helper resolution problems surface at compile time instead
        deps = ""
    digest = hashlib.sha256(src.encode("utf-8")).hexdigest()
    return digest, raw.__module__, raw.__qualname__, deps


def _build_signature(
    jit_fn: Any,
    signature: Mapping[str, str],
    constexprs: Mapping[str, Any],
    assume_aligned: bool,
) -> tuple[dict[str, str], dict[tuple[int, ...], Any], dict[tuple[int, ...], list]]:
    """Signature / constexprs / attrs in the form ``ASTSource`` takes (Triton 3.3 .. 3.9).

    Signature values may carry a ``":16"`` divisibility hint; constexpr arguments get the type
    ``"constexpr"``; constexpr parameters left out fall back to their Python default.
    """
    names = list(jit_fn.arg_names)
    unknown = sorted((set(signature) | set(constexprs)) - set(names))
    if unknown:
        raise ValueError(f"{jit_fn.__name__} has no arguments {unknown}; arguments: {names}")
    consts = dict(constexprs)
    for param in jit_fn.params:
        if param.name in signature or param.name in consts:
            continue
        if not (param.is_constexpr and param.has_default):
            raise ValueError(f"argument {param.name!r} of {jit_fn.__name__} has no type or value")
        consts[param.name] = param.default
    sig: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for index, name in enumerate(names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        ty, _, hint = str(signature[name]).replace(" ", "").partition(":")
        if hint not in ("", "16"):
            raise ValueError(f"argument {name!r}: only the ':16' hint is supported, got {hint!r}")
        sig[name] = ty
        if hint == "16" or (assume_aligned and ty.startswith("*") and not hint):
            attrs[(index,)] = [["tt.divisibility", 16]]
    constants = {(names.index(k),): v for k, v in consts.items()}
    return sig, constants, attrs


_CACHE: dict[tuple, CompiledReport] = {}
_CACHE_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget all reports compiled in this process."""
    with _CACHE_LOCK:
        _CACHE.clear()


@dataclass(frozen=True)
class _Request:
    """One compile: a kernel, its argument types and constexprs, a target and a launch config."""

    jit_fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    target: str
    num_warps: int
    num_stages: int
    assume_aligned: bool
    options: dict[str, Any]

    @property
    def key(self) -> tuple:
        """Cache key: kernel content and every compile input, spelled canonically."""
        return (
            _source_key(self.jit_fn),
            tuple(sorted((k, str(v)) for k, v in self.signature.items())),
            tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())),
            self.target,
            self.num_warps,
            self.num_stages,
            self.assume_aligned,
            tuple(sorted((k, repr(v)) for k, v in self.options.items())),
        )


def _request(
    fn: Callable[..., Any],
    signature: Mapping[str, str],
    constexprs: Mapping[str, Any],
    target: str | int,
    num_warps: int,
    num_stages: int,
    assume_aligned: bool,
    options: Mapping[str, Any] | None,
) -> _Request:
    """Validate one compile request (target name, launch config, argument coverage)."""
    name = normalize_target(target)
    if int(num_warps) < 1 or int(num_stages) < 1:
        raise ValueError(f"num_warps and num_stages must be >= 1, got {num_warps}, {num_stages}")
    jit_fn = _as_jit_function(fn)
    _build_signature(jit_fn, signature, constexprs, assume_aligned)  # raises on a bad signature
    return _Request(jit_fn, dict(signature), dict(constexprs), name, int(num_warps),
                    int(num_stages), bool(assume_aligned), dict(options or {}))


def compile_kernel(
    fn: Callable[..., Any],
    signature: dict[str, str],
    constexprs: dict[str, object],
    target: str,
    num_warps: int,
    num_stages: int,
    *,
    assume_aligned: bool = True,
    options: Mapping[str, Any] | None = None,
) -> CompiledReport:
    """Compile ``fn`` for ``target`` with ``triton.compile`` (no GPU needed) and report resources.

    ``fn`` is a ``@triton.jit`` function, an interpreter-wrapped one, or a plain function holding
    a Triton kernel body. ``signature`` maps runtime arguments to Triton types (``"*fp16"``,
    ``"i32"``, ``"fp32"``, optionally ``"i32:16"``); ``constexprs`` maps constexpr arguments to
    values. ``options`` are extra Triton compile options (e.g. ``maxnreg``).

    In a process that runs Triton's interpreter the compile happens in a fresh child process
    (see :func:`interpreter_active`); ``fn`` must then be defined at module level in a file.

    Results are cached in-process on (source hash, signature, constexprs, target, warps, stages,
    alignment, options): an identical request returns the identical report object.
    """
    req = _request(fn, signature, constexprs, target, num_warps, num_stages, assume_aligned,
                   options)
    return _compile_all([req])[0]


def interpreter_active() -> bool:
    """True when ``triton.compile`` cannot be trusted in this process.

    That is when TRITON_INTERPRET is on (Triton's own spelling: 1, true, on) or when Triton's
    interpreter has been loaded here: running an interpreted ``@jit`` helper patches
    ``triton.language`` builtins for good (triton 3.8 restores the patches only around a whole
    kernel launch), after which a GPU compile fails with errors such as
    ``'InterpreterBuilder' object has no attribute 'grid_idx'``.
    """
    flag = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")
    return flag or "triton.runtime.interpreter" in sys.modules


def child_env() -> dict[str, str]:
    """Environment of a child process that compiles with the real Triton compiler."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["ATTNDSL_NO_INTERPRET"] = "1"  # importing attndsl must not switch the interpreter on
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, without its warning
    return env


def _compile_all(requests: Sequence[_Request], jobs: int = 1,
                 strict: bool = True) -> list[CompiledReport | Exception]:
    """Reports for ``requests``: cached ones as they are, the rest compiled here or in child
    processes, whichever :func:`interpreter_active` allows; ``jobs > 1`` always compiles in
    that many children at once (threads waiting on ``python -m attndsl.runtime.aot``).

    With ``strict`` the first failed compile raises; without, its exception takes its place in
    the list (and is not cached)."""
    keys = [req.key for req in requests]
    with _CACHE_LOCK:
        found: dict[tuple, CompiledReport | Exception] = {
            key: _CACHE[key] for key in keys if key in _CACHE}
    todo = {key: req for key, req in zip(keys, requests) if key not in found}
    if todo:
        pending = list(todo.values())
        if jobs > 1 or interpreter_active():
            fresh = _compile_in_children(pending, max(1, jobs), strict)
        else:
            fresh = [_compile_here_or_error(req, strict) for req in pending]
        with _CACHE_LOCK:
            for key, report in zip(todo, fresh):
                found[key] = report if isinstance(report, Exception) else \
                    _CACHE.setdefault(key, report)
    return [found[key] for key in keys]


def _compile_here_or_error(req: _Request, strict: bool) -> CompiledReport | Exception:
    """:func:`_compile_here`, or (not ``strict``) the exception it raised."""
    try:
        return _compile_here(req)
    except Exception as err:
        if strict:
            raise
        return err


def _compile_in_children(requests: Sequence[_Request], jobs: int,
                         strict: bool) -> list[CompiledReport | Exception]:
    """``requests`` split into ``jobs`` contiguous chunks, each compiled by its own child."""
    chunk = -(-len(requests) // jobs)
    parts = [list(requests[i:i + chunk]) for i in range(0, len(requests), chunk)]
    if len(parts) == 1:
        return _compile_in_child(parts[0], strict)
    with ThreadPoolExecutor(max_workers=len(parts)) as pool:
        done = list(pool.map(lambda part: _compile_in_child(part, strict), parts))
    return [report for part in done for report in part]


@dataclass(frozen=True)
class KernelSpec:
    """One kernel to compile: the arguments of :func:`compile_kernel`, as data."""

    fn: Callable[..., Any]
    signature: Mapping[str, str]
    constexprs: Mapping[str, Any]
    target: str
    num_warps: int
    num_stages: int
    assume_aligned: bool = True
    options: Mapping[str, Any] | None = None


def compile_kernels(specs: Sequence[KernelSpec], *, jobs: int = 1,
                    strict: bool = True) -> list[CompiledReport | Exception]:
    """Compile many kernels (cached like :func:`compile_kernel`), in up to ``jobs`` child
    processes at once; without ``strict`` a request that is invalid or fails to compile is
    returned as its exception."""
    results: list[CompiledReport | Exception | None] = []
    requests = []
    for s in specs:
        try:
            requests.append(_request(s.fn, s.signature, s.constexprs, s.target, s.num_warps,
                                     s.num_stages, s.assume_aligned, s.options))
            results.append(None)
        except (ValueError, TypeError) as err:
            if strict:
                raise
            results.append(err)
    compiled = iter(_compile_all(requests, jobs, strict))
    return [next(compiled) if r is None else r for r in results]


def _compile_here(req: _Request) -> CompiledReport:
    """Run ``triton.compile`` in this process and read the cubin back."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    lim = TARGETS[req.target]
    sig, constants, attrs = _build_signature(req.jit_fn, req.signature, req.constexprs,
                                             req.assume_aligned)
    src = ASTSource(fn=req.jit_fn, signature=sig, constexprs=constants, attrs=attrs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", lim.capability, 32),
        options={**req.options, "num_warps": req.num_warps, "num_stages": req.num_stages},
    )
    built_for = str(getattr(compiled.metadata, "arch", req.target)).replace("_", "")
    if built_for != req.target:  # TRITON_OVERRIDE_ARCH wins over the GPUTarget in triton.compile
        raise RuntimeError(f"asked for {req.target} but Triton compiled for {built_for}")
    usage_text, sass = _run_cuobjdump(compiled.asm["cubin"])
    usage = _parse_resource_usage(usage_text, compiled.metadata.name)
    ops = _count_opcodes(sass)
    report = _make_report(
        compiled.metadata.name, lim, req.num_warps, req.num_stages, dict(req.constexprs),
        usage, ops, int(compiled.metadata.shared),
    )
    summary = summarize_sass(sass, compiled.metadata.name)
    return dataclasses.replace(report, loops=summary.loops, tma_count=summary.tma)


# ----------------------------------------------------------------------------- child process

# Exceptions a child may report that are re-raised as the same type (anything else: RuntimeError).
_CHILD_ERRORS: dict[str, type[Exception]] = {
    "ValueError": ValueError, "TypeError": TypeError, "FileNotFoundError": FileNotFoundError,
}


def _locate(jit_fn: Any) -> tuple[str, str]:
    """(source file, qualified name) by which a child process finds the kernel."""
    raw = jit_fn.fn
    path = inspect.getsourcefile(raw)
    if path is None or not os.path.isfile(path) or "<locals>" in raw.__qualname__:
        raise ValueError(
            f"{raw.__qualname__} must be defined at module level in a .py file: this process runs "
            "Triton's interpreter, so the kernel is compiled in a child process that imports it "
            "from its file"
        )
    return os.path.abspath(path), raw.__qualname__


def _payload(req: _Request) -> dict[str, Any]:
    """A JSON-ready description of ``req`` for the child."""
    path, qualname = _locate(req.jit_fn)
    payload = {
        "file": path, "qualname": qualname, "signature": req.signature,
        "constexprs": req.constexprs, "target": req.target, "num_warps": req.num_warps,
        "num_stages": req.num_stages, "assume_aligned": req.assume_aligned,
        "options": req.options,
    }
    try:
        json.dumps(payload)
    except TypeError as err:
        raise TypeError(
            f"{qualname}: constexprs and options must be numbers, strings or bools to be sent to "
            f"the compiling child process ({err})"
        ) from None
    return payload


def _compile_in_child(requests: Sequence[_Request],
                      strict: bool = True) -> list[CompiledReport | Exception]:
    """Compile ``requests`` in one fresh ``python -m attndsl.runtime.aot`` without the
    interpreter; errors come back with their message (and type, for the usual ones): raised
    when ``strict``, else returned in place of the report."""
    payloads = [_payload(req) for req in requests]
    proc = subprocess.run([sys.executable, "-m", "attndsl.runtime.aot"],
                          input=json.dumps(payloads), capture_output=True, text=True,
                          env=child_env(), timeout=1800, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"ahead-of-time compile child failed ({proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    reports: list[CompiledReport | Exception] = []
    for req, result in zip(requests, json.loads(lines[-1]), strict=True):
        if "error" in result:
            kind, message = result["error"]
            err = _CHILD_ERRORS.get(kind, RuntimeError)(message)
            if strict:
                raise err
            reports.append(err)
            continue
        reports.append(CompiledReport.from_dict({**result["report"],
                                                 "constexprs": req.constexprs}))
    return reports


def _load_kernel(path: str, qualname: str, modules: dict[str, Any]) -> Any:
    """The object ``qualname`` of the Python file ``path`` (imported once per file)."""
    if path not in modules:
        name = "_attndsl_aot_" + hashlib.sha256(path.encode()).hexdigest()[:16]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, os.path.dirname(path))  # sibling imports, as when run from there
        spec.loader.exec_module(module)
        modules[path] = module
    obj = modules[path]
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _child_main() -> None:
    """Read compile requests (JSON) on stdin, print one JSON list of reports or errors."""
    if interpreter_active():
        raise SystemExit("the compiling child must run without TRITON_INTERPRET")
    modules: dict[str, Any] = {}
    results = []
    for job in json.loads(sys.stdin.read()):
        try:
            fn = _load_kernel(job["file"], job["qualname"], modules)
            req = _request(fn, job["signature"], job["constexprs"], job["target"],
                           job["num_warps"], job["num_stages"], job["assume_aligned"],
                           job["options"])
            results.append({"report": dataclasses.asdict(_compile_here(req))})
        except Exception as err:  # reported to the parent with its type and message
            results.append({"error": [type(err).__name__, f"{err}"]})
    print(json.dumps(results))


def _make_report(
    kernel: str,
    lim: TargetLimits,
    num_warps: int,
    num_stages: int,
    constexprs: dict[str, Any],
    usage: Mapping[str, int],
    ops: Mapping[str, int],
    shared: int,
) -> CompiledReport:
    hgmma, hmma = ops.get("HGMMA", 0), ops.get("HMMA", 0)
    tc_kind = "HGMMA" if hgmma else ("HMMA" if hmma else "none")
    regs, static_shared = usage["REG"], usage["SHARED"]
    total = shared + static_shared
    stl, ldl = ops.get("STL", 0), ops.get("LDL", 0)
    problems = []
    if total > lim.smem_per_block:
        problems.append(
            f"shared memory {total} B ({total / _KIB:.1f} KiB) > {lim.smem_per_block} B "
            f"({lim.smem_per_block // _KIB} KiB) per block on {lim.name}"
        )
    if regs > lim.max_regs_per_thread:
        problems.append(f"{regs} registers per thread > {lim.max_regs_per_thread}")
    if usage["STACK"] or usage["LOCAL"] or stl or ldl:
        problems.append(
            f"register spills: STACK {usage['STACK']} B, LOCAL {usage['LOCAL']} B, "
            f"{stl} STL / {ldl} LDL"
        )
    if 32 * num_warps > lim.max_threads_per_block:
        problems.append(f"{32 * num_warps} threads per block > {lim.max_threads_per_block}")
    programs, _ = estimate_occupancy(regs, total, num_warps, lim.name)
    return CompiledReport(
        name=kernel,
        target=lim.name,
        num_warps=num_warps,
        num_stages=num_stages,
        constexprs=constexprs,
        registers=regs,
        stack_bytes=usage["STACK"],
        local_bytes=usage["LOCAL"],
        spill_stores=stl,
        spill_loads=ldl,
        shared_bytes=shared,
        static_shared_bytes=static_shared,
        tc_kind=tc_kind,
        tc_count=hgmma if hgmma else hmma,
        hgmma_count=hgmma,
        hmma_count=hmma,
        programs_per_sm=programs,
        occupancy=programs * num_warps * 32 / lim.max_threads_per_sm,
        fits=not problems,
        reason="; ".join(problems),
    )


# ----------------------------------------------------------------------------- reports


def format_report(reports: Sequence[CompiledReport]) -> str:
    """Fixed-width table: config, regs, spills (STL/LDL), smem KiB, TC instr, occupancy, fits."""
    header = ("target", "config", "regs", "spills", "smem KiB", "TC instr", "occupancy", "fits")
    rows = [header]
    for r in reports:
        config = " ".join(f"{k}={v}" for k, v in r.constexprs.items())
        config = f"{config} w{r.num_warps} s{r.num_stages}".strip()
        spills = f"{r.spill_stores}/{r.spill_loads}" + (f" ({r.stack_bytes}B)" if r.spills else "")
        rows.append((
            r.target,
            config,
            str(r.registers),
            spills,
            f"{r.shared_total_bytes / _KIB:.1f}",
            f"{r.tc_kind} x{r.tc_count}" if r.tc_count else "none",
            f"{r.programs_per_sm}/SM {r.occupancy:.0%}",
            "yes" if r.fits else "NO",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def prune_configs(
    fn: Callable[..., Any],
    signature: dict[str, str],
    constexpr_base: dict[str, object],
    configs: list[dict],
    target: str,
) -> list[tuple[dict, CompiledReport]]:
    """Compile each config and keep those that fit, in input order.

    A config holds constexprs (``BLOCK_M``, ``BLOCK_N``, ...) merged over ``constexpr_base`` plus
    ``num_warps`` (default 4) and ``num_stages`` (default 3). Compile errors propagate.
    """
    requests = []
    for config in configs:
        consts = dict(constexpr_base)
        consts.update({k: v for k, v in config.items() if k not in ("num_warps", "num_stages")})
        requests.append(_request(fn, signature, consts, target, int(config.get("num_warps", 4)),
                                 int(config.get("num_stages", 3)), True, None))
    reports = _compile_all(requests)  # one child process for all of them, when one is needed
    return [(config, report) for config, report in zip(configs, reports) if report.fits]


def attention_bound(flops: float, bytes_moved: float, target: str) -> float:
    """Roofline lower bound in seconds: ``max(flops / peak_flops, bytes_moved / bandwidth)``.

    Ceilings (see ``_CEILINGS``): sm90 790e12 FLOP/s (measured bf16 GEMM) and 3.0e12 B/s;
    sm80 312e12 FLOP/s and 2.0e12 B/s, datasheet peaks rather than measurements.
    """
    name = normalize_target(target)
    if name not in _CEILINGS:
        raise ValueError(f"no roofline ceilings recorded for {name}; known: {', '.join(_CEILINGS)}")
    if flops < 0 or bytes_moved < 0:
        raise ValueError("flops and bytes_moved must be non-negative")
    peak, bandwidth = _CEILINGS[name]
    return max(flops / peak, bytes_moved / bandwidth)


if __name__ == "__main__":
    _child_main()
