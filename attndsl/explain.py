"""``attndsl explain``: the passes run (in order, with the named rewrite rules that fired in
each and how often), the IR after each pass, the rewrites that fired, the pass count, the tile
plan, the backward (fused, or why not), the mask's tile classes, and (with a target) the GPU
resource report."""

from __future__ import annotations

import torch

from attndsl.ir import expr as E
from attndsl.ir.cascade import Cascade
from attndsl.ir.expr import Expr, Op
from attndsl.key_tile_plan import plan_key_tiles
from attndsl.passes.grad import GradError
from attndsl.passes.pipeline import PIPELINE, RECURRENCE_PIPELINE, Compiled, compile_cascade
from attndsl.passes.tile_grad import derive_tile_backward


def _section(title: str, body: str) -> str:
    return f"== {title} ==\n{body}\n"


def explain(c: Cascade, captured: dict[str, torch.Tensor] | None = None, lq: int = 512,
            lkv: int = 512, target: str | None = None) -> str:
    comp = compile_cascade(c)
    if comp.recurrence is not None:  # a state recurrence: the delta pass's decision
        return "\n".join([
            _section("cascade (as written)", str(c)),
            _section("passes, with the rewrite rules that fired in each", pass_list(comp)),
            _section("delta rule: chunked or recurrent", str(comp.recurrence)),
            _section("quadratic form: not compiled", comp.quadratic_error or "")])
    direct = compile_cascade(c, stream=False).schedule
    out = [_section("cascade (as written)", str(c)),
           _section("passes, with the rewrite rules that fired in each", pass_list(comp)),
           _section("after inline (fusion of the score/mask chain)", str(comp.fused))]
    out.append(_section("linearise: quadratic, chunked linear or recurrent", str(comp.linear)))
    if comp.kernel is None:
        out.append(_section("quadratic form: not compiled (the chunked form is the kernel)",
                            comp.quadratic_error or ""))
        return "\n".join(out)
    out.append(_section(f"direct schedule: {direct.direct_passes} passes over the keys",
                        str(direct)))
    rules = "\n".join(f"- {r}" for r in comp.schedule.fired)
    out.append(_section("rewrites that fired", rules or "(none)"))
    out.append(_section(
        f"streamed schedule: {comp.schedule.direct_passes}-pass -> "
        f"{len(comp.schedule.passes)}-pass", str(comp.schedule)))
    out.append(_section("tile plan (Tile IR)", str(comp.kernel)))
    out.append(_section("backward (attndsl.compile's kernels)", backward_text(comp)))
    if comp.fused.mask is not None:
        defaults = {p.name: E.const(p.default) for p in c.params if p.default is not None}
        mask = comp.fused.mask.replace(
            lambda n: defaults.get(n.arg) if n.op is Op.PARAM else None)
        out.append(_section("mask as the kernels evaluate it on partial tiles",
                            _lowered(comp, comp.fused.mask)))
        out.append(_section(f"mask tiles at Lq={lq}, Lkv={lkv}",
                            _mask_picture(mask, captured or {}, lq, lkv)))
    if target is not None:
        out.append(_section(f"GPU report for {target}", _target_report(comp, target)))
    return "\n".join(out)


def _lowered(comp: Compiled, mask: Expr) -> str:
    """The mask after the printers' lowering (codegen/key_bounds.py: decided compares folded,
    key bounds merged, comparisons of sums as distance compares), beside the written one."""
    from attndsl.codegen.key_bounds import lowered_mask

    roles = comp.kernel.roles
    lowered = lowered_mask(mask, roles["query"], roles["key"])
    if lowered == mask:
        return f"{E.render(mask)}  (as written)"
    return f"{E.render(lowered)}\n  written: {E.render(mask)}"


def backward_text(comp: Compiled) -> str:
    """The backward IR of the fused backward (passes/tile_grad.py), or why the backward
    recomputes through the eager executor instead."""
    try:
        return "fused: " + str(derive_tile_backward(comp.kernel))
    except GradError as err:
        return f"eager recomputation (no fused backward: {err})"


def pass_list(comp: Compiled) -> str:
    """One line per pass run (name: what it does), then ``- rule xN`` per rule that fired."""
    docs = {p.name: p.doc for p in PIPELINE + RECURRENCE_PIPELINE}
    lines = []
    for i, record in enumerate(comp.trace):
        lines.append(f"{i + 1}. {record.name}: {docs.get(record.name, '')}".rstrip(": "))
        lines.extend(f"   - {rule} x{count}" for rule, count in record.rules)
    return "\n".join(lines)


def _mask_picture(mask: Expr, captured: dict[str, torch.Tensor], lq: int, lkv: int) -> str:
    """The key-tile plan of the mask at (lq, lkv) (what the kernel reads) and its tiles."""
    try:
        plan = plan_key_tiles(mask, captured, 1, 1, lq, lkv)
        tiles = plan.tile_map()
    except (ValueError, RuntimeError, IndexError) as err:
        return f"(not analysable at these sizes: {err})"
    assert tiles is not None
    return f"{plan}\n{tiles.picture()}"


def _target_report(comp, target: str) -> str:
    from attndsl.runtime.gpu_report import kernel_reports

    return kernel_reports(comp.kernel, target)
