"""The SASS key-tile-loop analyser (attndsl.runtime.sass) on hand-written listings.

The listing below imitates ``cuobjdump --dump-sass``: a prologue, a key-tile loop whose body
holds a barrier spin-wait (an inner loop without tensor-core instructions) and a ``continue``
(a second back edge to the same header), a second loop without tensor-core instructions, and
the trap loop after ``EXIT`` (a branch to its own address).
"""

from __future__ import annotations

from attndsl.runtime.sass import is_tma, key_tile_loops, parse_sass, summarize_sass

LISTING = """
\tcode for sm_90a
\t\tFunction : attn_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;              /* 0x00000a00ff017b82 */
                                                                       /* 0x000fe20000000800 */
        /*0010*/                   UTMALDG.2D [UR8], [UR4] ;
        /*0020*/                   S2R R0, SR_TID.X ;
        /*0030*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR6], R3 ;
        /*0040*/              @!P0 BRA 0x30 ;
        /*0050*/                   HGMMA.64x64x16.F32 R24, gdesc[UR8], RZ, !UPT ;
        /*0060*/                   FMUL R2, R24, R5 ;
        /*0070*/                   MUFU.EX2 R26, R2 ;
        /*0080*/              @P1 BRA 0x30 ;
        /*0090*/                   FSEL R4, R26, -INF , P2 ;
        /*00a0*/                   HGMMA.64x64x16.F32 R56, R88, gdesc[UR8].tnspB, R56 ;
        /*00b0*/                   UBLKCP.S.G [UR4], [UR6], UR8 ;
        /*00c0*/              @!P4 BRA 0x30 ;
        /*00d0*/                   IADD3 R7, R7, 0x1, RZ ;
        /*00e0*/                   ISETP.GE.AND P0, PT, R7, R9, PT ;
        /*00f0*/              @!P0 BRA 0xd0 ;
        /*0100*/                   EXIT ;
        /*0110*/                   BRA 0x110;                          /* 0xfffffffc00fc7947 */
"""


def test_backward_branches_are_parsed_with_their_targets() -> None:
    instrs = parse_sass(LISTING)
    assert len(instrs) == 18  # the encoding-only line is not an instruction
    branches = [(ins.address, ins.target) for ins in instrs if ins.base == "BRA"]
    assert branches == [(0x40, 0x30), (0x80, 0x30), (0xC0, 0x30), (0xF0, 0xD0), (0x110, 0x110)]
    assert instrs[5].opcode == "HGMMA.64x64x16.F32" and instrs[5].base == "HGMMA"


def test_the_key_tile_loop_spans_its_last_back_edge_and_keeps_its_spin_wait() -> None:
    (loop,) = key_tile_loops(parse_sass(LISTING))
    assert (loop.start, loop.end) == (0x30, 0xC0)
    assert loop.instructions == 10  # 0x30 .. 0xc0, the spin-wait and the continue included
    assert (loop.tensor_core, loop.ex2, loop.tma) == (2, 1, 1)
    assert loop.rest == 7
    assert loop.count("FSEL") == 1 and loop.count("BRA") == 3 and loop.count("SYNCS") == 1


def test_loops_without_tensor_cores_and_the_trap_loop_are_not_key_tile_loops() -> None:
    no_mma = LISTING.replace("HGMMA", "FFMA")
    assert key_tile_loops(parse_sass(no_mma)) == []


def test_only_the_innermost_tensor_core_loop_counts() -> None:
    # An outer loop (0x20 .. 0x110) around the key-tile loop also holds HGMMA but is not reported.
    outer = LISTING.replace("        /*0110*/                   BRA 0x110;",
                            "        /*0110*/              @P3 BRA 0x20 ;")
    loops = key_tile_loops(parse_sass(outer))
    assert [(lp.start, lp.end) for lp in loops] == [(0x30, 0xC0)]


def test_summary_counts_tma_per_kernel_and_picks_the_named_function() -> None:
    other = "\t\tFunction : helper\n        /*0000*/                   EXIT ;\n"
    summary = summarize_sass(LISTING + other, "attn_kernel")
    assert summary.function == "attn_kernel" and summary.instructions == 18
    assert summary.tma == 2 and len(summary.loops) == 1
    assert summarize_sass(LISTING + other).function == "attn_kernel"  # the longest by default
    assert is_tma("UTMASTG.2D") and is_tma("UBLKCP.S.G") and not is_tma("ULDC.64")


def test_the_target_report_table_shows_tma_and_key_tile_loop_counts() -> None:
    from attndsl.runtime.gpu_report import format_reports

    row = {"config": [128, 64, 8, 3], "registers": 125, "spills": 0, "shared": 66560,
           "tc_kind": "HGMMA", "tc_count": 8, "tma": 2, "programs_per_sm": 2, "fits": True,
           "loops": [{"all": 396}, {"all": 714}]}
    header, line = format_reports([row]).splitlines()
    assert "TMA" in header and "loop instr" in header
    assert line.split()[-4:] == ["2", "2", "396,714", "yes"]
