"""Random problems for any cascade, and the comparison of a kernel with the float64 oracle.

Sizes of extents that no index names (a captured table's length, an input's key/value head
count under any name) are derived from how the cascade reads them: one more than the largest
subscript any read can produce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import ModuleType

import torch

from attndsl.eager import eval_expr, run_cascade
from attndsl.ir.cascade import Cascade
from attndsl.ir.expr import BOOL, FLOAT, Op
from attndsl.passes.pipeline import Compiled
from attndsl.passes.scans import scan_equations
from attndsl.runtime.delta import AUTO, run_delta
from attndsl.runtime.linear import run_linear, scan_inputs
from attndsl.runtime.modules import load_kernel_module

TOLERANCE = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@dataclass
class Problem:
    inputs: dict[str, torch.Tensor]
    captured: dict[str, torch.Tensor]
    params: dict[str, float | int]
    sizes: dict[str, int]


def index_sizes(c: Cascade, B: int, H: int, Hkv: int, Lq: int, Lkv: int, E: int, F: int,
                ) -> dict[str, int]:
    """Extent sizes by role for the usual attention extents."""
    by_role = {"batch": B, "head": H, "query": Lq, "key": Lkv, "qk": E, "v": F}
    sizes = {i.extent: by_role[i.role] for i in c.indices}
    sizes.setdefault("HKV", Hkv)
    return sizes


def random_problem(c: Cascade, sizes: dict[str, int], dtype: torch.dtype,
                   gen: torch.Generator, device: str | torch.device = "cpu",
                   captured: dict[str, torch.Tensor] | None = None,
                   params: dict[str, float | int] | None = None) -> Problem:
    """Random inputs (and captured tensors, unless given) for cascade ``c`` at ``sizes``."""
    sizes = dict(sizes)
    params = dict(params or {})
    for p in c.params:
        if p.name == "scale" and p.default is None and p.dtype == FLOAT:
            params.setdefault("scale", 1.0 / math.sqrt(max(1, sizes.get(_qk_extent(c), 1))))
        elif p.name == "G" and "HKV" in sizes:
            params.setdefault("G", sizes[_head_extent(c)] // sizes["HKV"])
        elif p.default is not None:
            params.setdefault(p.name, p.default)
        elif p.name not in sizes:
            params.setdefault(p.name, 0.5 if p.dtype == FLOAT else 2)
    captured = dict(captured or {})
    for t in c.tensors:
        if t.kind == "captured" and t.name in captured:
            sizes.update(zip(t.dims, (int(s) for s in captured[t.name].shape)))
    for t in c.tensors:  # extents no index names (a table's length, K's head count HKV)
        if t.name not in captured:
            for d, ext in enumerate(t.dims):
                if ext not in sizes:
                    sizes[ext] = _needed_extent(c, t.name, d, sizes, params)
    inputs = {}
    for t in c.tensors:
        if t.name in captured:
            continue
        shape = [sizes[d] for d in t.dims]
        if t.kind == "input":
            inputs[t.name] = torch.randn(shape, generator=gen).to(dtype).to(device)
        elif t.name not in captured:
            if t.dtype == FLOAT:
                captured[t.name] = torch.randn(shape, generator=gen).to(device)
            elif t.dtype == BOOL:
                captured[t.name] = (torch.rand(shape, generator=gen) < 0.7).to(device)
            else:
                captured[t.name] = torch.randint(0, 3, shape, generator=gen).to(device)
    derived = scan_inputs(c, {**inputs, **captured}, params)  # prefix sums the kernels read
    captured.update({k: v for k, v in derived.items() if k not in captured})
    return Problem(inputs, captured, params, sizes)


def kernel_outputs(compiled: Compiled, problem: Problem,
                   module: ModuleType | None = None) -> list[dict[str, torch.Tensor]]:
    """The outputs of each form the cascade compiled to: the quadratic kernel (``module``, or
    the one loaded from ``compiled``) and the chunked linear form, where they exist."""
    outs = []
    if compiled.kernel is not None:
        module = module or load_kernel_module(compiled.kernel)
        outs.append(module.launch(problem.inputs, problem.params, problem.captured))
    if compiled.recurrence is not None:  # the delta rule: chunked (if any) and recurrent
        tensors = {**problem.inputs, **problem.captured}
        cascade = compiled.stage("materialise-scans")
        for chunk in ((AUTO, None) if compiled.recurrence.form == "chunked" else (None,)):
            outs.append(run_delta(compiled.recurrence, cascade, tensors, problem.params,
                                  chunk=chunk)[0])
        return outs
    if compiled.linear.form == "chunked":
        scans = tuple(eq.name for eq in scan_equations(compiled.cascade))
        outs.append(run_linear(compiled.linear.outputs, compiled.stage("materialise-scans"),
                               {**problem.inputs, **problem.captured}, problem.params,
                               scans=scans)[0])
    return outs


def _qk_extent(c: Cascade) -> str:
    return next((i.extent for i in c.indices if i.role == "qk"), "E")


def _head_extent(c: Cascade) -> str:
    return next((i.extent for i in c.indices if i.role == "head"), "H")


def _needed_extent(c: Cascade, tensor: str, dim: int, sizes: dict[str, int],
                   params: dict[str, float | int]) -> int:
    """The smallest size that every subscript of a read of ``tensor`` along ``dim`` fits
    (1 + the largest, and minus the smallest negative one; at least 1)."""
    axes = [i.name for i in c.indices]
    ranges = {i.name: torch.arange(sizes[i.extent]) for i in c.indices}
    scalars = {**sizes, **params}
    best = 0
    eqs = list(c.equations) + ([c.mask] if c.mask is not None else [])
    for eq in eqs:
        for node in eq.expr.walk():
            if node.op is Op.LOAD and node.arg == tensor:
                sub = node.src[dim]
                if any(n.op in (Op.LOAD, Op.REDUCE_SUM, Op.REDUCE_MAX) for n in sub.walk()):
                    best = max(best, 64)
                    continue
                vals = eval_expr(sub, axes, ranges, {}, scalars)
                if vals.numel():  # negatives wrap (torch's rule): -size <= i < size
                    best = max(best, int(vals.max()) + 1, -int(vals.min()))
    return max(best, 1)


@dataclass
class Comparison:
    """Worst absolute error (relative to the output's scale) per output."""

    errors: dict[str, float] = field(default_factory=dict)
    nan: bool = False

    def worst(self) -> float:
        return max(self.errors.values(), default=0.0)


def compare(outputs: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> Comparison:
    """The kernel's ``outputs`` against the oracle's: an infinity of the same sign and a NaN
    where the oracle's is NaN (the spec's own value there, e.g. a score program giving NaN)
    agree; a NaN anywhere else is flagged."""
    out = Comparison()
    for name, ref in reference.items():
        got = outputs[name].detach().cpu().double()
        both_nan = torch.isnan(got) & torch.isnan(ref)
        if (torch.isnan(got) & ~both_nan).any():
            out.nan = True
        same = (torch.isinf(ref) & (got == ref)) | both_nan
        diff = torch.where(same, torch.zeros_like(ref), (got - ref).abs())
        finite = ref[torch.isfinite(ref)]
        scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
        out.errors[name] = float(torch.nan_to_num(diff, nan=math.inf).max()) / scale \
            if diff.numel() else 0.0
    return out


def oracle(c: Cascade, problem: Problem) -> dict[str, torch.Tensor]:
    return run_cascade(c, {**problem.inputs, **problem.captured}, problem.params)
