"""The static kernel benchmark (benchmarks/static_kernel.py) runs and reports real numbers.

The smoke test runs ``--quick`` forward-only in a subprocess (the benchmark records launches
under Triton's interpreter and compiles in its own children) and checks the JSON it writes:
each loop with its counts and kind, ratios against the hand-written kernel, registers and
shared memory of both kernels. The pairing rules and the backward recording are tested on
their own, without compiling.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attndsl.runtime.sass import KeyTileLoop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import static_kernel  # noqa: E402

from benchmarks import parity, static_backward  # noqa: E402


def test_quick_run_writes_loop_counts_and_ratios(tmp_path: Path) -> None:
    out = tmp_path / "quick"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "static_kernel.py"),
                           "--quick", "--no-backward", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.perf_counter() - t0 < 120
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["meta"]["triton"] and data["meta"]["compiled"] == 2
    (row,) = data["rows"]
    assert (row["case"], row["target"], row["dtype"], row["dim"]) == ("causal", "sm90", "fp16",
                                                                       64)
    for side in (row["generated"], row["reference"]):
        assert "error" not in side, side
        assert 0 < side["registers"] <= 255 and side["shared_bytes"] > 0
    kinds = sorted(pair["kind"] for pair in row["loops"])
    assert kinds == ["masked", "unmasked"]  # causal: below the diagonal and on it
    for pair in row["loops"]:
        gen, ref = pair["generated"], pair["reference"]
        assert gen["tensor_core"] == ref["tensor_core"] > 0  # same tiles, same MMAs
        assert gen["ex2"] >= 32 and ref["ex2"] >= 32  # 128 x 64 scores over 256 threads
        assert gen["rest"] == gen["all"] - gen["tensor_core"] - gen["ex2"]
        assert pair["ratio"] == pytest.approx(gen["all"] / ref["all"], abs=1e-3)
    table = out.with_suffix(".md").read_text()
    assert "| for | causal | sm90 | fp16 | 64 | fwd | masked |" in table
    # the parity guard: this cell meets every target on each triton of the version matrix
    assert static_kernel.row_misses(row) == []
    assert "Parity targets missed (benchmarks/parity.py), default launches:\n\nnone" in table


def _loop(compares: int, all_: int = 100, selects: int = 2) -> KeyTileLoop:
    return KeyTileLoop(0, 16, all_, 8, 34, opcodes={"ISETP.GE.AND": compares,
                                                    "FSEL": selects})


def test_loops_are_masked_when_they_compare_once_per_score_element() -> None:
    # 32 score elements per thread: one mask compare each, against a few for loop control
    assert static_kernel.loop_kinds((_loop(12), _loop(111)), 32) == ["unmasked", "masked"]
    assert static_kernel.loop_kinds((_loop(33),), 32) == ["masked"]
    assert static_kernel.loop_kinds((_loop(2),), 16) == ["unmasked"]
    # small tiles (4 elements per thread): guards of the unmasked loop do not make it masked
    assert static_kernel.loop_kinds((_loop(26), _loop(10)), 4) == ["masked", "unmasked"]


def test_a_loop_whose_mask_compares_were_merged_is_masked_by_its_selects() -> None:
    """0 <= m - n <= w compiles to one unsigned compare per element (fewer than one per
    element after the compiler shares them), but every masked score still selects -inf."""
    loops = (_loop(22, selects=66), _loop(4), _loop(22, selects=66))
    assert static_kernel.loop_kinds(loops, 32) == ["masked", "unmasked", "masked"]
    # one loop: its selects alone (a subscript's wrap in the score) do not make it masked
    assert static_kernel.loop_kinds((_loop(3, selects=40),), 32) == ["unmasked"]


def test_generated_loops_are_paired_with_the_reference_loop_of_their_kind() -> None:
    gen = {"loops": [{"kind": "masked", "all": 120, "tensor_core": 8},
                     {"kind": "unmasked", "all": 90, "tensor_core": 8}]}
    ref = {"loops": [{"kind": "unmasked", "all": 60, "tensor_core": 8},
                     {"kind": "masked", "all": 100, "tensor_core": 8}]}
    pairs = static_kernel.pair_loops(gen, ref)
    assert [(p["kind"], p["ratio"]) for p in pairs] == [("masked", 1.2), ("unmasked", 1.5)]
    lone = static_kernel.pair_loops(gen, {"loops": [{"kind": "unmasked", "all": 60,
                                                     "tensor_core": 8}]})
    assert [p["ratio"] for p in lone] == [None, 1.5]  # no masked reference loop: no ratio


def test_a_loop_unrolled_over_several_key_tiles_is_compared_per_tile() -> None:
    # sm80 unrolls a constant-trip inner loop: 8 tiles in one body, 8x the tensor-core ops
    gen = {"loops": [{"kind": "unmasked", "all": 1733, "tensor_core": 256}]}
    ref = {"loops": [{"kind": "unmasked", "all": 183, "tensor_core": 32}]}
    (pair,) = static_kernel.pair_loops(gen, ref)
    assert pair["tiles_per_body"] == 8
    assert pair["ratio"] == pytest.approx(1733 / 8 / 183, abs=1e-3)


def test_the_backward_launches_are_recorded_by_role() -> None:
    found = static_kernel.generated_backward("causal", 64)
    assert {"preprocess", "dkdv", "dq"} <= set(found)
    config = static_kernel.backward_config(found, 64)
    assert set(config) == {"dkdv", "dq"}
    refs = static_kernel.reference_backward("causal", 64, config)
    assert set(refs) == {"preprocess", "dkdv", "dq"}
    # the references are recorded with the generated module's GPU tiles
    assert refs["dkdv"].constexprs["BLOCK_N"] == config["dkdv"]["BLOCK_N"]
    assert refs["dkdv"].num_warps == config["dkdv"]["num_warps"]


@pytest.mark.skipif(not hasattr(__import__("triton.language").language, "make_tensor_descriptor"),
                    reason="the installed triton has no tensor descriptors")
def test_an_sm90_launch_of_the_benchmark_layout_defaults_to_tensor_descriptors_above_d64(
        ) -> None:
    use, why = static_kernel.tma_default("causal", 128)
    assert use is True and why == "tensor descriptors (TMA)"
    use, why = static_kernel.tma_default("causal", 64)
    assert use is False and "head dims of at most 64" in why


def _loop_row(all_: int) -> dict:
    return {"kind": "unmasked", "all": all_, "tensor_core": 8, "ex2": 34, "rest": all_ - 42}


def _side(registers: int, tma: int = 0, all_: int = 300) -> dict:
    return {"registers": registers, "spills": 0, "stack": 0, "tma": tma, "shared_bytes": 65536,
            "num_warps": 8, "loops": [_loop_row(all_)]}


def _row(default: str) -> dict:
    row = {"direction": "forward", "case": "dense", "target": "sm90", "dtype": "fp16",
           "dim": 64, "kernel": "fwd", "generated": _side(123), "generated_tma": _side(110, 21),
           "reference": _side(108, all_=334),
           "default": default}
    row["loops"] = static_kernel.pair_loops(row["generated"], row["reference"])
    row["tma_loops"] = static_kernel.pair_loops(row["generated_tma"], row["reference"])
    return row


def test_the_summary_reports_the_launch_a_target_runs_with_the_pointer_variant_beside_it() -> None:
    tma = static_kernel.summary([_row("generated_tma")])
    assert "| 110T / 108 (pointer 123) |" in tma
    pointer = static_kernel.summary([_row("generated")])
    assert "| 123 / 108 |" in pointer and "T" not in pointer.split("\n")[-2].split("|")[-2]
    assert "(default)" in static_kernel.tma_table([_row("generated_tma")])
    assert "(default)" not in static_kernel.tma_table([_row("generated")])


def test_spellings_of_a_distance_mask_compile_to_the_same_loops() -> None:
    """benchmarks/static_masks.py: ``kv <= q - 3`` (a key bound int32 cannot read relative to
    the tile) compiles to the loops of the distance form ``q - kv >= 3``."""
    import static_masks

    spellings = dict(static_masks.GROUPS["causal, 3 back"])
    distance = static_masks.measure(spellings["q - kv >= 3"], "sm90", 64)
    bound = static_masks.measure(spellings["kv <= q - 3"], "sm90", 64)
    assert distance["masked"] and [kind for kind, _ in distance["loops"]].count("masked") == 1
    assert bound["loops"] == distance["loops"] and bound["spills"] == 0


def test_the_parity_targets_bound_each_loop_kind_the_registers_and_the_spills() -> None:
    assert parity.misses([("unmasked", 1.0), ("masked", 1.05)], (188, 180), (0, 0)) == []
    assert parity.misses([("unmasked", 1.0004)], (100, 100), (0, 0)) == []  # rounds to 1.000
    assert parity.misses([("unmasked", 1.0006), ("masked", 1.051)], (189, 180), (2, 0)) == [
        "unmasked loop 1.001 > 1.00", "masked loop 1.051 > 1.05", "registers 189 > 180 + 8",
        "2 spills where the reference has none"]
    assert parity.misses([("masked", None)], (255, 255), (14, 20)) == []  # unpaired; ref spills
    assert parity.misses([], (200, 180), (0, 0), (1, 2)) == [
        "registers 200 > 180 + 8 (programs per SM: 1, reference 2)"]


def test_a_row_lists_what_its_default_launch_misses() -> None:
    row = _row("generated")  # pointer variant: 300 / 334 instructions, 123 / 108 registers
    # 256 threads of 123 or of 108 registers: two programs fill an SM's 64K registers
    assert static_kernel.row_misses(row) == ["registers 123 > 108 + 8 (programs per SM: 2, "
                                             "reference 2)"]
    assert static_kernel.row_misses(_row("generated_tma")) == []  # 110 / 108 registers
    row["reference"] = {"error": "CompilationError: out of resources"}
    assert static_kernel.row_misses(row) == ["reference: CompilationError: out of resources"]
    listed = static_kernel.missed_targets([_row("generated"), _row("generated_tma")])
    assert listed == ("- for dense sm90 fp16 D=64 fwd: registers 123 > 108 + 8 (programs per "
                      "SM: 2, reference 2)")


def test_the_backward_lists_the_kernels_that_miss_a_target() -> None:
    def side(who: str, kernel: str, loops: list, registers: int) -> dict:
        return {"case": "dense", "D": 128, "kernel": kernel, "who": who, "registers": registers,
                "spills": 0, "loops": [(n, 36, 32, n - 68) for n in loops]}

    rows = [side("generated", "dq", [355], 127), side("reference", "dq", [339], 137),
            side("generated", "dkdv", [388], 176), side("reference", "dkdv", [399], 195)]
    assert static_backward.missed_targets(rows) == "- dense D=128 dq: unmasked loop 1.047 > 1.00"
    rows[2]["registers"] = 204
    assert static_backward.missed_targets(rows).splitlines()[1] == \
        "- dense D=128 dkdv: registers 204 > 195 + 8"


def test_the_causal_backward_meets_the_parity_targets_on_sm90() -> None:
    """A parity guard on the installed triton: the causal D=64 dK/dV and dQ kernels, compiled
    for sm_90a next to the hand-written FA2 backward (each triton of the version matrix meets
    every target there)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "static_backward.py"),
                           "--target", "sm90", "--dims", "64", "--cases", "causal", "--check"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "Parity targets missed (sm90, benchmarks/parity.py):\nnone" in proc.stdout


def test_a_kernel_the_reference_lacks_is_no_miss_but_an_unrecorded_one_is() -> None:
    rows_kernel = {"direction": "backward", "case": "sigmoid", "target": "sm90",
                   "dtype": "fp16", "dim": 64, "kernel": "preprocess", "loops": [],
                   "generated": _side(40) | {"loops": []}, "reference": None,
                   "default": "generated"}
    assert static_kernel.row_misses(rows_kernel) == []
    unrecorded = dict(rows_kernel, kernel="dq", generated=None, reference=_side(124))
    assert static_kernel.row_misses(unrecorded) == ["generated: not compiled"]


def test_the_fused_backward_kernels_are_recorded_by_role() -> None:
    class Named:
        def __init__(self, name: str) -> None:
            self.name = name

    roles = [static_kernel._role(Named(n)) for n in
             ("tile_bwd_rows_kernel", "tile_bwd_keys_kernel", "tile_bwd_queries_kernel",
              "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel")]
    assert roles == ["preprocess", "dkdv", "dq", "dkdv", "dq"]
