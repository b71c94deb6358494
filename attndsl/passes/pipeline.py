"""The pass pipeline, as data: a list of named passes from the Cascade IR to the Tile IR.

    verify -> materialise-scans -> inline -> expand-softmax -> linearise -> stream -> tile
    Cascade   Cascade              Fused     Fused             Fused        Schedule  TileKernel

Each :class:`Pass` has a name, a docstring (its ``run``'s), and a dataclass of options (the
``stream`` pass: ``StreamOptions(stream=True)``).  :func:`run_pipeline` runs the list and
keeps, per pass, the IR it produced and the named rewrite rules that fired in it (with
counts), so that ``attndsl explain`` and the golden tests can print the IR after each pass.

With verification on (``verify=True``, or the environment variable ``ATTNDSL_VERIFY=1``; the
test suite always sets it) the verifier of each IR runs after every pass: the Cascade IR's
:func:`attndsl.ir.cascade.verify`, :func:`attndsl.passes.lower.verify_fused`,
:func:`attndsl.passes.stream.verify_schedule`, and the Tile IR's :func:`attndsl.ir.tile.verify`.
The input cascade is always verified (the ``verify`` pass).

A pass that refuses the cascade raises an :class:`~attndsl.ir.expr.IRError`;
:func:`compile_cascade` puts the source location of the equation to blame in front of its
message (the equations of text and builder specs, and the score/mask equations of
FlexAttention programs, carry one).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from attndsl.ir import cascade as cascade_ir
from attndsl.ir import tile as tile_ir
from attndsl.ir.cascade import Cascade, Equation
from attndsl.ir.expr import Expr, IRError, Op
from attndsl.ir.tile import TileKernel
from attndsl.passes.delta import decide_delta, has_recurrence
from attndsl.passes.linear import linearise
from attndsl.passes.lower import Fused, inline, verify_fused
from attndsl.passes.rules import recording
from attndsl.passes.scans import materialise_scans
from attndsl.passes.softmax import expand_softmax_outputs
from attndsl.passes.stream import Schedule, derive_schedule, verify_schedule
from attndsl.passes.tiling import LoweringError, lower_to_tiles

VERIFY_ENV = "ATTNDSL_VERIFY"


@dataclass(frozen=True)
class NoOptions:
    """A pass without options."""


@dataclass(frozen=True)
class StreamOptions:
    """``stream``: apply the streaming rewrites (split-exp, split-sum, defer-division) before
    scheduling; without them the schedule keeps the direct pass count."""

    stream: bool = True


@dataclass(frozen=True)
class Pass:
    """One named step ``run(ir, options) -> ir`` with its options' dataclass."""

    name: str
    run: Callable[[Any, Any], Any]
    options: type = NoOptions

    @property
    def doc(self) -> str:
        """The first line of the pass's docstring."""
        return (self.run.__doc__ or "").strip().splitlines()[0]


def _verify(c: Cascade, _: NoOptions) -> Cascade:
    """Check the input cascade is well formed (indices, tensors, equations, no cycles)."""
    return cascade_ir.verify(c)


def _materialise_scans(c: Cascade, _: NoOptions) -> Cascade:
    """Per-position prefix sums (cumsum) become captured tensors the runtime computes."""
    return materialise_scans(c)


def _delta_rule(c: Cascade, _: NoOptions) -> Any:
    """Recognise the state recurrence (the delta rule); choose chunked or recurrent."""
    return decide_delta(c)


def _linearise(f: Fused, _: NoOptions) -> Fused:
    """Decide quadratic vs chunked linear vs recurrent; the decision is kept on the IR."""
    return linearise(f)


def _inline(c: Cascade, _: NoOptions) -> Fused:
    """Inline every equation into the outputs and the mask: one fused expression each."""
    return inline(c)


def _expand_softmax(f: Fused, _: NoOptions) -> Fused:
    """Write softmax(n) x as exp(x - max(n) x) / sum(n) exp(x - max(n) x)."""
    return expand_softmax_outputs(f)


def _stream(f: Fused, options: StreamOptions) -> Schedule:
    """Pass analysis (FuseMax) and the online derivation: passes of running reductions."""
    return derive_schedule(f, stream=options.stream)


def _tile(s: Schedule, _: NoOptions) -> TileKernel:
    """Lower the schedule to the Tile IR: operands, dot products, running rows, stores."""
    return lower_to_tiles(s, s.cascade)


PIPELINE: tuple[Pass, ...] = (
    Pass("verify", _verify),
    Pass("materialise-scans", _materialise_scans),
    Pass("inline", _inline),
    Pass("expand-softmax", _expand_softmax),
    Pass("linearise", _linearise),
    Pass("stream", _stream, StreamOptions),
    Pass("tile", _tile),
)

# A spec with a state recurrence (recur) has no sum over keys to fuse or stream: its pipeline
# ends in the delta pass's decision (attndsl.passes.delta.DeltaDecision).
RECURRENCE_PIPELINE: tuple[Pass, ...] = (
    Pass("verify", _verify),
    Pass("materialise-scans", _materialise_scans),
    Pass("delta-rule", _delta_rule),
)

VERIFIERS: dict[type, Callable[[Any], Any]] = {
    Cascade: cascade_ir.verify, Fused: verify_fused, Schedule: verify_schedule,
    TileKernel: tile_ir.verify}


@dataclass(frozen=True)
class PassRecord:
    """What one pass produced, and the named rewrite rules that fired in it (name, count),
    most frequent first, ties by name."""

    name: str
    ir: Any
    rules: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Compiled:
    """Every stage of one compilation (``trace``: each pass's output, in order)."""

    cascade: Cascade
    fused: Fused
    schedule: Schedule | None  # None: no quadratic form (see ``quadratic_error``)
    kernel: TileKernel | None
    trace: tuple[PassRecord, ...] = field(default=(), compare=False, repr=False)
    # why the quadratic form could not be compiled, for a cascade whose chunked linear form
    # is its only one (a feature map such as elu(k) + 1, a per-key-dim decay inside q.k)
    quadratic_error: str | None = field(default=None, compare=False)
    # the delta pass's DeltaDecision for a spec with a state recurrence (then fused, schedule
    # and kernel are None: RECURRENCE_PIPELINE)
    recurrence: Any = field(default=None, compare=False)

    @property
    def linear(self) -> Any:
        """The linearise pass's :class:`~attndsl.passes.linear.LinearDecision` (for a
        recurrence spec, the delta pass's :class:`~attndsl.passes.delta.DeltaDecision`)."""
        if self.recurrence is not None:
            return self.recurrence
        return self.stage("linearise").linear

    def stage(self, name: str) -> Any:
        """The IR after the pass called ``name``."""
        for r in self.trace:
            if r.name == name:
                return r.ir
        raise KeyError(f"no pass {name!r} in this compilation; passes: "
                       f"{[r.name for r in self.trace]}")


def verification_on() -> bool:
    """Whether ``ATTNDSL_VERIFY`` asks for the verifiers between passes."""
    return os.environ.get(VERIFY_ENV, "") not in ("", "0")


def run_pipeline(ir: Any, passes: tuple[Pass, ...] = PIPELINE,
                 options: Mapping[str, Any] | None = None,
                 verify: bool | None = None,
                 records: list[PassRecord] | None = None) -> tuple[PassRecord, ...]:
    """Run ``passes`` in order on ``ir``; ``options`` maps a pass name to its options (the
    defaults otherwise); ``verify`` (default: :func:`verification_on`) runs the verifier of
    each pass's result.  ``records``, when given, receives each pass's record as it completes
    (what had been done when a pass raised)."""
    options = dict(options or {})
    unknown = set(options) - {p.name for p in passes}
    if unknown:
        raise ValueError(f"options for unknown pass(es) {sorted(unknown)}; the passes are "
                         f"{[p.name for p in passes]}")
    check = verification_on() if verify is None else verify
    records = [] if records is None else records
    for p in passes:
        opts = options.get(p.name, p.options())
        if not isinstance(opts, p.options):
            raise TypeError(f"pass {p.name!r} takes {p.options.__name__}, got "
                            f"{type(opts).__name__}")
        with recording() as counts:
            ir = p.run(ir, opts)
        if check and type(ir) in VERIFIERS:
            VERIFIERS[type(ir)](ir)
        fired = tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        records.append(PassRecord(p.name, ir, fired))
    return tuple(records)


def compile_cascade(c: Cascade, stream: bool = True) -> Compiled:
    """verify -> inline (fusion) -> expand-softmax -> stream (pass analysis + online
    derivation) -> tile.  An IRError of a pass after ``verify`` is re-raised located at the
    equation to blame (:func:`blamed_equation`).  A spec with a state recurrence runs
    :data:`RECURRENCE_PIPELINE` instead (its errors are located by the delta pass)."""
    if has_recurrence(c):
        trace = run_pipeline(c, RECURRENCE_PIPELINE)
        return Compiled(c, None, None, None, trace,  # type: ignore[arg-type]
                        f"{c.name} is a state recurrence: it has no quadratic form (a sum "
                        f"over keys); it runs as the delta rule (Kernel.linear)",
                        recurrence=trace[-1].ir)
    done: list[PassRecord] = []
    try:
        trace = run_pipeline(c, options={"stream": StreamOptions(stream=stream)}, records=done)
    except IRError as err:
        if not done:  # the verifier's own errors are located already
            raise
        schedule = next((r.ir for r in done if r.name == "stream"), None)
        eq = blamed_equation(c, err, schedule)
        located = err
        if eq is not None and eq.loc is not None:
            located = type(err)(eq.loc.message(f"cannot compile {c.name}: {err}"))
            if isinstance(err, LoweringError) and isinstance(located, LoweringError):
                located.tensors, located.subject = err.tensors, err.subject
        linear = next((r.ir.linear for r in done if r.name == "linearise"), None)
        if linear is not None and linear.form == "chunked":  # the linear form is enough
            by_name = {r.name: r.ir for r in done}
            return Compiled(c, by_name["inline"], None, None, tuple(done), str(located))
        if located is err:
            raise
        raise located from None
    by_name = {r.name: r.ir for r in trace}
    return Compiled(c, by_name["inline"], by_name["stream"], by_name["tile"], trace)


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
