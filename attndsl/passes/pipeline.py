"""The pass pipeline: Cascade IR -> fused cascade -> streaming schedule -> Tile IR.

Each step is named; ``compile_cascade`` returns every intermediate so that ``attndsl explain``
can print the IR after each pass and the rewrites that fired.

A pass that refuses the cascade raises an :class:`~attndsl.ir.expr.IRError`; the pipeline
puts the source location of the equation to blame in front of its message (the equations of
text and builder specs, and the score/mask equations of FlexAttention programs, carry one).
"""

from __future__ import annotations

from dataclasses import dataclass

from attndsl.ir.cascade import Cascade, Equation, verify
from attndsl.ir.expr import Expr, IRError, Op
from attndsl.ir.tile import TileKernel
from attndsl.passes.lower import Fused, inline
from attndsl.passes.stream import Schedule, derive_schedule
from attndsl.passes.tiling import LoweringError, lower_to_tiles


@dataclass(frozen=True)
class Compiled:
    """Every stage of one compilation."""

    cascade: Cascade
    fused: Fused
    schedule: Schedule
    kernel: TileKernel


def compile_cascade(c: Cascade, stream: bool = True) -> Compiled:
    """verify -> inline (fusion) -> pass analysis + online derivation -> tiles."""
    verify(c)
    schedule = None
    try:
        fused = inline(c)
        schedule = derive_schedule(fused, stream=stream)
        kernel = lower_to_tiles(schedule, c)
    except IRError as err:
        eq = blamed_equation(c, err, schedule)
        if eq is None or eq.loc is None:
            raise
        located = type(err)(eq.loc.message(f"cannot compile {c.name}: {err}"))
        if isinstance(err, LoweringError) and isinstance(located, LoweringError):
            located.tensors, located.subject = err.tensors, err.subject
        raise located from None
    return Compiled(c, fused, schedule, kernel)


def blamed_equation(c: Cascade, err: IRError, schedule: Schedule | None) -> Equation | None:
    """The equation a compile error is about.

    The lowering says what it was lowering (an output, a running reduction, the mask) and
    which tensors it objects to: the answer is the first equation, among those the affected
    outputs are built from, that reads one of those tensors directly, else the first affected
    output itself.  Errors without that information blame the first output."""
    subject = getattr(err, "subject", None)
    if subject is not None and subject[0] == "mask" and c.mask is not None:
        return c.mask
    outputs = list(c.outputs[:1])
    if subject is not None and subject[0] == "output":
        outputs = [subject[1]]
    elif subject is not None and subject[0] == "reduction" and schedule is not None:
        outputs = _outputs_using(schedule, subject[1]) or outputs
    tensors = set(getattr(err, "tensors", ()))
    chain = _built_from(c, outputs)
    for eq in chain:
        if any(x.op is Op.LOAD and x.arg in tensors for x in eq.expr.walk()):
            return eq
    return c.equation(outputs[0]) if outputs else None


def _outputs_using(schedule: Schedule, reduction: str) -> list[str]:
    """The outputs whose finished expressions read ``reduction`` (directly or through other
    running reductions), in schedule order."""
    bodies = {r.name: r.body for p in schedule.passes for r in p}

    def reads(e: Expr, seen: set[str]) -> bool:
        for x in e.walk():
            if x.op is Op.ROW and x.arg not in seen:
                if x.arg == reduction:
                    return True
                seen.add(x.arg)
                if x.arg in bodies and reads(bodies[x.arg], seen):
                    return True
        return False

    return [name for name, _, e in schedule.outputs if reads(e, set())]


def _built_from(c: Cascade, outputs: list[str]) -> list[Equation]:
    """The equations ``outputs`` depend on (themselves included), in cascade order."""
    eqs = {eq.name: eq for eq in c.equations}
    needed: set[str] = set()
    stack = [o for o in outputs if o in eqs]
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        stack.extend(x.arg for x in eqs[name].expr.walk() if x.op is Op.LOAD and x.arg in eqs)
    return [eq for eq in c.equations if eq.name in needed]
