"""How heavy is a kernel's key-tile loop? A static reading of the SASS that ``cuobjdump`` prints.

``cuobjdump --dump-sass`` lists one instruction per line with its byte address::

    /*0e80*/                   HGMMA.64x64x16.F32 R24, gdesc[UR8], RZ, !UPT ;
    /*2570*/              @!P4 BRA 0xc60 ;

A loop is a backward branch: a ``BRA`` whose target address is lower than its own address; its
body is the address range ``[target, branch]``. Several back edges to one target (a ``continue``)
are one loop, ending at the last of them. A branch to its own address (``BRA 0x3200`` after
``EXIT``, the trap loop) is no loop. Neither is the return jump of an out-of-line block: ptxas
moves the retry of a TMA barrier wait behind the function's ``EXIT``::

    /*2070*/  @!P1 BRA 0x72b0 ;          # the first try failed: go to the retry block
    /*2080*/  ...                        # (the loop body goes on)
    /*72b0*/  SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR20+0x10000], R15 ;
    /*72c0*/  @!P1 BRA 0x72b0 ;          # spin
    /*72d0*/  BRA 0x2080 ;               # back to where it was called from: no loop

A backward branch is such a return when the instruction before its target branches into the
block that ends with it, and that block cannot be fallen into (it follows an ``EXIT`` or an
unconditional ``BRA``). The retry blocks are cold code outside the loops' address ranges and
not counted in them.

Key-tile loops are the innermost loops that hold tensor-core instructions (HGMMA on sm90, HMMA
on sm80): a loop with tensor-core instructions none of whose nested loops has any. Small loops
without tensor-core instructions inside a key-tile loop (barrier spin-waits) do not make it
"not innermost"; their instructions count as part of its body.

Per key-tile loop the body is counted statically: all instructions, tensor-core instructions,
``MUFU.EX2`` and the rest (``all - tensor core - EX2``). For the same tiles a FlashAttention
kernel cannot do with fewer tensor-core or EX2 instructions, so the rest -- address arithmetic,
masks, guards, conversions, rescaling -- is the overhead to compare against a hand-written kernel.
TMA instructions (``UTMALDG``, ``UTMASTG``, ``UBLKCP``, ...) are counted per kernel and per loop.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

__all__ = [
    "TENSOR_CORE_OPS",
    "KeyTileLoop",
    "SassInstruction",
    "SassSummary",
    "is_tma",
    "key_tile_loops",
    "parse_sass",
    "split_functions",
    "summarize_sass",
]

# Tensor-core opcodes: Hopper warpgroup MMA (fp16/bf16, fp8, int8) and warp-level mma.sync.
TENSOR_CORE_OPS = frozenset({"HGMMA", "QGMMA", "IGMMA", "HMMA", "IMMA"})
EX2 = "MUFU.EX2"

_FUNCTION_RE = re.compile(r"^\s*Function\s*:\s*(\S+)")
# address, optional predicate (@P0, @!UP1, @PT), mnemonic with modifiers, operands up to ';'
_INSTR_RE = re.compile(
    r"^\s*/\*([0-9a-fA-F]+)\*/\s+(@!?U?P(?:T|\d+)\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)"
    r"([^;]*);"
)
_HEX_RE = re.compile(r"0x([0-9a-fA-F]+)")


@dataclass(frozen=True)
class SassInstruction:
    """One SASS instruction: byte address, full mnemonic (``HGMMA.64x64x16.F32``) and, for a
    branch, its target address."""

    address: int
    opcode: str
    target: int | None = None
    predicated: bool = False  # executed under a guard predicate (``@P0``, ``@!UP1``)

    @property
    def base(self) -> str:
        """The mnemonic without modifiers (``HGMMA``)."""
        return self.opcode.split(".", 1)[0]


def is_tma(opcode: str) -> bool:
    """True for the Hopper tensor-memory-accelerator instructions (``UTMA*``, ``UBLK*``)."""
    return opcode.startswith(("UTMA", "UBLK"))


def split_functions(sass: str) -> dict[str, str]:
    """The SASS text of each ``Function : name`` section of a ``cuobjdump`` listing."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in sass.splitlines():
        found = _FUNCTION_RE.match(line)
        if found:
            current = sections.setdefault(found.group(1), [])
            continue
        if current is not None:
            current.append(line)
    return {name: "\n".join(lines) for name, lines in sections.items()}


def parse_sass(sass: str) -> list[SassInstruction]:
    """Instructions of one function's SASS in address order (encoding-only lines skipped).

    A branch target is the last hexadecimal literal among a ``BRA``'s operands
    (``@!P4 BRA 0xc60``, ``BRA.U !UP0, 0x1a0``); a branch without one (to a register) has none.
    """
    out = []
    for line in sass.splitlines():
        found = _INSTR_RE.match(line)
        if not found:
            continue
        address, guard = int(found.group(1), 16), found.group(2)
        opcode, operands = found.group(3), found.group(4)
        target = None
        if opcode.split(".", 1)[0] == "BRA":
            literals = _HEX_RE.findall(operands)
            target = int(literals[-1], 16) if literals else None
        # @PT is "always": only a real predicate makes an instruction conditional
        predicated = guard is not None and guard.strip() not in ("@PT", "@UPT")
        out.append(SassInstruction(address, opcode, target, predicated))
    out.sort(key=lambda ins: ins.address)
    return out


@dataclass(frozen=True)
class KeyTileLoop:
    """Static instruction counts of one key-tile loop body ``[start, end]`` (byte addresses)."""

    start: int
    end: int
    instructions: int
    tensor_core: int
    ex2: int
    tma: int = 0
    opcodes: dict[str, int] = field(default_factory=dict)  # full mnemonic -> count in the body

    @property
    def rest(self) -> int:
        """Instructions that are neither tensor-core nor ``MUFU.EX2``: the overhead."""
        return self.instructions - self.tensor_core - self.ex2

    def count(self, *prefixes: str) -> int:
        """Instructions of the body whose mnemonic starts with one of ``prefixes``."""
        return sum(n for op, n in self.opcodes.items() if op.startswith(prefixes))


def _ends_flow(ins: SassInstruction) -> bool:
    """True when control never falls through ``ins`` (``EXIT`` or an unconditional ``BRA``)."""
    return not ins.predicated and ins.base in ("EXIT", "BRA")


def _returns(instrs: list[SassInstruction]) -> set[int]:
    """Addresses of the return jumps of out-of-line blocks (see the module docstring)."""
    at = {ins.address: i for i, ins in enumerate(instrs)}
    out = set()
    for ins in instrs:
        if ins.target is None or ins.target >= ins.address or ins.predicated \
                or ins.base != "BRA" or ins.target not in at or at[ins.target] == 0:
            continue
        call = instrs[at[ins.target] - 1]  # the branch just before the return point
        entry = call.target
        if call.base == "BRA" and entry is not None and ins.target < entry <= ins.address \
                and entry in at and at[entry] > 0 and _ends_flow(instrs[at[entry] - 1]):
            out.add(ins.address)
    return out


def _loops(instrs: list[SassInstruction]) -> list[tuple[int, int]]:
    """``(start, end)`` of every loop: one per backward-branch target, ending at its last back
    edge (returns of out-of-line blocks are no back edges)."""
    ends: dict[int, int] = {}
    returns = _returns(instrs)
    for ins in instrs:
        if ins.target is not None and ins.target < ins.address and ins.address not in returns:
            ends[ins.target] = max(ends.get(ins.target, ins.address), ins.address)
    return sorted(ends.items())


def key_tile_loops(instrs: list[SassInstruction]) -> list[KeyTileLoop]:
    """The innermost loops holding tensor-core instructions, in address order, with counts."""
    bodies = []
    for start, end in _loops(instrs):
        body = [ins for ins in instrs if start <= ins.address <= end]
        if any(ins.base in TENSOR_CORE_OPS for ins in body):
            bodies.append((start, end, body))
    loops = []
    for start, end, body in bodies:
        nested = any(s >= start and e <= end and (s, e) != (start, end) for s, e, _ in bodies)
        if nested:
            continue
        ops = Counter(ins.opcode for ins in body)
        loops.append(KeyTileLoop(
            start=start, end=end, instructions=len(body),
            tensor_core=sum(1 for ins in body if ins.base in TENSOR_CORE_OPS),
            ex2=ops.get(EX2, 0), tma=sum(n for op, n in ops.items() if is_tma(op)),
            opcodes=dict(sorted(ops.items())),
        ))
    return loops


@dataclass(frozen=True)
class SassSummary:
    """What one function's SASS says: its key-tile loops and its kernel-wide TMA count."""

    function: str
    instructions: int
    tma: int
    loops: tuple[KeyTileLoop, ...]


def summarize_sass(sass: str, function: str | None = None) -> SassSummary:
    """Key-tile loops and TMA count of ``function`` (default: the longest function) in a
    ``cuobjdump --dump-sass`` listing, or in bare instruction lines without a header."""
    sections = split_functions(sass) or {"": sass}
    if function is None or function not in sections:
        function = max(sections, key=lambda name: len(parse_sass(sections[name])))
    instrs = parse_sass(sections[function])
    return SassSummary(
        function=function,
        instructions=len(instrs),
        tma=sum(1 for ins in instrs if is_tma(ins.opcode)),
        loops=tuple(key_tile_loops(instrs)),
    )
