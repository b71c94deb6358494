"""Ahead-of-time compile + resource report for Triton kernels (no GPU needed).

Compiles a small FlashAttention-style forward kernel for sm80/sm86/sm90 with the real Triton
compiler and checks facts read back from the cubin. Measured with triton 3.9 (ptxas in the
wheel), pointers assumed 16-byte aligned as at a real launch, BLOCK_M=128, BLOCK_N=64, D=64,
4 warps, 3 stages:
  sm90: 228 registers, 16 HGMMA, 64 KiB dynamic + 1 KiB static shared, no spills;
  sm80: 255 registers, 128 HMMA, 48 KiB shared, no spills.
"""

from __future__ import annotations

import pytest
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from attndsl.runtime import aot


def attn_fwd_body(
    Q, K, V, Out,
    stride_qm, stride_kn, stride_vn, stride_om,
    n_ctx, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < n_ctx
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=row_ok, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): softmax with exp2
    for start_n in range(0, n_ctx, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(K + cols[None, :] * stride_kn + offs_d[:, None],
                    mask=cols[None, :] < n_ctx, other=0.0)
        qk = tl.dot(q, k) * qk_scale
        qk = tl.where(cols[None, :] < n_ctx, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :],
                    mask=cols[:, None] < n_ctx, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(Out + offs_m[:, None] * stride_om + offs_d[None, :],
             acc.to(Out.dtype.element_ty), mask=row_ok)


# Built directly so that TRITON_INTERPRET=1 set by another test module cannot swap it for an
# interpreter object (compile_kernel would unwrap that too).
attn_fwd = JITFunction(attn_fwd_body)


def add_body(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < N) + 1.0, mask=offs < N)


def sig(dtype: str) -> dict[str, str]:
    # Pointers are assumed 16-byte aligned by compile_kernel; the row strides get Triton's
    # ":16" divisibility hint, as a launch with contiguous [*, 64] tensors would specialise them.
    # Without the stride hints, sm90 spills (255 regs, STACK 72) and uses 24 KiB shared.
    ptr = f"*{dtype}"
    return {
        "Q": ptr, "K": ptr, "V": ptr, "Out": ptr,
        "stride_qm": "i32:16", "stride_kn": "i32:16", "stride_vn": "i32:16", "stride_om": "i32:16",
        "n_ctx": "i32", "sm_scale": "fp32",
    }


BASE = {"BLOCK_M": 128, "BLOCK_N": 64, "HEAD_DIM": 64}
HUGE = {"BLOCK_M": 128, "BLOCK_N": 128, "HEAD_DIM": 128}  # 4 stages on sm86: ~224 KiB smem


def report(target: str, dtype: str = "fp16", consts=None, warps: int = 4, stages: int = 3):
    return aot.compile_kernel(attn_fwd, sig(dtype), dict(consts or BASE), target, warps, stages)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_sm90_uses_hgmma_without_spills(dtype):
    r = report("sm90", dtype)
    assert r.target == "sm90" and r.num_warps == 4 and r.num_stages == 3
    assert r.tc_kind == "HGMMA" and r.hgmma_count > 0 and r.hmma_count == 0
    assert r.tc_count == r.hgmma_count
    assert not r.spills and r.stack_bytes == 0 and r.spill_stores == r.spill_loads == 0
    assert 0 < r.registers <= 255
    assert 0 < r.shared_total_bytes <= aot.TARGETS["sm90"].smem_per_block
    assert r.fits and r.reason == ""
    assert r.programs_per_sm >= 1 and 0 < r.occupancy <= 1


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_sm80_uses_hmma(dtype):
    r = report("sm80", dtype)
    assert r.tc_kind == "HMMA" and r.hmma_count > 0 and r.hgmma_count == 0
    assert 0 < r.registers <= 255
    assert 0 < r.shared_total_bytes <= aot.TARGETS["sm80"].smem_per_block


def test_cache_returns_identical_object():
    first = report("sm90")
    assert report("sm90") is first
    # Same source text, other spellings of the kernel and the target: still a cache hit.
    assert aot.compile_kernel(attn_fwd_body, sig("fp16"), dict(BASE), "sm_90", 4, 3) is first
    assert aot.compile_kernel(JITFunction(attn_fwd_body), sig("fp16"), BASE, "90", 4, 3) is first


def test_huge_config_does_not_fit_and_is_pruned():
    huge = report("sm86", consts=HUGE, stages=4)
    assert not huge.fits
    assert huge.shared_total_bytes > aot.TARGETS["sm86"].smem_per_block
    assert "shared memory" in huge.reason and "sm86" in huge.reason
    assert huge.spills and "spills" in huge.reason  # ptxas also spills at 255 registers
    assert huge.programs_per_sm == 0

    small = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    configs = [{**HUGE, "num_warps": 4, "num_stages": 4}, small]
    kept = aot.prune_configs(attn_fwd, sig("fp16"), {"HEAD_DIM": 64}, configs, "sm86")
    assert [cfg for cfg, _ in kept] == [small]
    assert kept[0][1].fits and kept[0][1].tc_kind == "HMMA"

    table = aot.format_report([report("sm90"), huge])
    lines = table.splitlines()
    assert len(lines) == 4 and "regs" in lines[0] and "TC instr" in lines[0]
    assert "HGMMA x" in lines[2] and lines[2].rstrip().endswith("yes")
    assert lines[3].rstrip().endswith("NO")


def test_compiles_under_triton_interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreted = triton.jit(add_body)
    assert not isinstance(interpreted, JITFunction)  # the interpreter object
    r = aot.compile_kernel(interpreted, {"X": "*fp32", "Y": "*fp32", "N": "i32"},
                           {"BLOCK": 1024}, "sm80", 4, 1)
    assert r.fits and r.name == "add_body" and r.tc_kind == "none"
    assert aot.compile_kernel(add_body, {"X": "*fp32", "Y": "*fp32", "N": "i32"},
                              {"BLOCK": 1024}, "sm80", 4, 1) is r


@pytest.mark.parametrize("bad", ["sm70", "sm_100", "hopper", "a100", ""])
def test_bad_target_lists_allowed_names(bad):
    with pytest.raises(ValueError, match="sm80, sm86, sm89, sm90"):
        aot.compile_kernel(attn_fwd, sig("fp16"), BASE, bad, 4, 3)


@pytest.mark.parametrize("spelling", ["sm90", "sm_90", "90", "SM90", 90])
def test_target_spellings(spelling):
    assert aot.normalize_target(spelling) == "sm90"


def test_missing_argument_is_reported():
    with pytest.raises(ValueError, match="HEAD_DIM"):
        aot.compile_kernel(attn_fwd, sig("fp16"), {"BLOCK_M": 64, "BLOCK_N": 64}, "sm90", 4, 3)


def test_missing_cuobjdump_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cuobjdump"):
        aot.find_cuobjdump(str(tmp_path))


def test_occupancy_formula():
    # 228 regs -> 232 per thread allocated = 7424 per warp; 2 warps per 16K-register quadrant ->
    # 8 warps -> 2 programs of 4 warps; smem 233472 // (66560 + 1024) = 3; threads 2048 // 128.
    assert aot.estimate_occupancy(228, 65536 + 1024, 4, "sm90") == (2, "regs")
    assert aot.estimate_occupancy(64, 100 * 1024, 4, "sm90") == (2, "smem")
    assert aot.estimate_occupancy(32, 0, 4, "sm86") == (12, "threads")
    assert aot.estimate_occupancy(255, 200 * 1024, 4, "sm86") == (0, "smem")


def test_attention_bound():
    assert aot.attention_bound(790e12, 0.0, "sm90") == pytest.approx(1.0)
    assert aot.attention_bound(0.0, 3.0e12, "sm_90") == pytest.approx(1.0)
    assert aot.attention_bound(312e12, 1.0e12, "sm80") == pytest.approx(1.0)
    assert aot.attention_bound(1e12, 4.0e12, "sm80") == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no roofline"):
        aot.attention_bound(1.0, 1.0, "sm86")


HELPER = None  # the interpreted helper, set by the test that launches apply_helper_body


def add_one_helper_body(x):
    return x + 1.0


def apply_helper_body(X, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(X + offs, HELPER(tl.load(X + offs, mask=offs < N)), mask=offs < N)


def test_gpu_compile_works_after_an_interpreted_helper_call(monkeypatch):
    """Running an interpreted @jit helper leaves triton.language patched on triton 3.8; the
    compile must still succeed (it runs in a fresh child process) and report real numbers."""
    import torch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(globals(), "HELPER", triton.jit(add_one_helper_body))
    x = torch.zeros(8)
    triton.jit(apply_helper_body)[(1,)](x, 8, BLOCK=8)
    assert torch.equal(x, torch.ones(8))
    assert aot.interpreter_active()
    r = aot.compile_kernel(add_body, {"X": "*fp32", "Y": "*fp32", "N": "i32"},
                           {"BLOCK": 256}, "sm90", 2, 1)
    assert r.fits and r.name == "add_body" and r.registers > 0 and r.target == "sm90"


def test_a_local_kernel_under_the_interpreter_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def local_kernel(X, BLOCK: tl.constexpr):
        tl.store(X + tl.arange(0, BLOCK), 0.0)

    with pytest.raises(ValueError, match="module level.*child process"):
        aot.compile_kernel(local_kernel, {"X": "*fp32"}, {"BLOCK": 16}, "sm80", 4, 1)


def test_compile_errors_in_the_child_keep_their_message(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="(?s)add_body.*power of 2"):
        aot.compile_kernel(add_body, {"X": "*fp32", "Y": "*fp32", "N": "i32"},
                           {"BLOCK": 1000}, "sm80", 4, 1)  # tl.arange needs a power of 2


@pytest.mark.parametrize(("target", "tc"), [("sm90", "HGMMA"), ("sm80", "HMMA")])
def test_the_key_tile_loop_of_a_real_compile_holds_the_tile_exponentials(target, tc):
    r = report(target)
    (loop,) = r.loops  # one key loop in this kernel; the epilogue division is no loop
    threads = 32 * r.num_warps
    # p = exp2(qk - m): one EX2 per score element a thread holds, plus alpha per row it holds.
    assert loop.ex2 >= BASE["BLOCK_M"] * BASE["BLOCK_N"] // threads
    assert 0 < loop.tensor_core == loop.count(tc) <= r.tc_count
    assert loop.rest == loop.instructions - loop.tensor_core - loop.ex2 > 0
    assert r.tma_count == 0  # pointer loads: no tensor descriptors in this kernel


def _fake_cuobjdump(directory, name: str = "cuobjdump", tag: str = "v1"):
    """A stand-in cuobjdump that logs each run and prints its flag, its tag and the cubin."""
    tool = directory / name
    log = directory / f"{name}.log"
    tool.write_text(f'#!/bin/sh\necho "$1" >> "{log}"\necho "{tag} $1 $(cat "$2")"\n')
    tool.chmod(0o755)
    return str(tool), log


def _runs(log) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_a_cubins_listing_is_disassembled_once_and_then_read_from_the_cache(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("ATTNDSL_CACHE", str(tmp_path / "cache"))
    tool, log = _fake_cuobjdump(tmp_path)
    monkeypatch.setattr(aot, "find_cuobjdump", lambda: tool)
    first = aot._run_cuobjdump(b"cubin-a")
    assert first == ("v1 --dump-resource-usage cubin-a\n", "v1 --dump-sass cubin-a\n")
    assert _runs(log) == 2
    assert aot._run_cuobjdump(b"cubin-a") == first and _runs(log) == 2
    assert aot._run_cuobjdump(b"cubin-b")[1] == "v1 --dump-sass cubin-b\n" and _runs(log) == 4


def test_another_cuobjdump_never_reads_the_listing_an_earlier_one_cached(tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv("ATTNDSL_CACHE", str(tmp_path / "cache"))
    old, _ = _fake_cuobjdump(tmp_path, "old", "v1")
    new, new_log = _fake_cuobjdump(tmp_path, "new", "v2")
    monkeypatch.setattr(aot, "find_cuobjdump", lambda: old)
    aot._run_cuobjdump(b"cubin-a")
    monkeypatch.setattr(aot, "find_cuobjdump", lambda: new)
    assert aot._run_cuobjdump(b"cubin-a")[1] == "v2 --dump-sass cubin-a\n"
    assert _runs(new_log) == 2


@pytest.mark.parametrize("damage", ["truncated", "not a listing", "directory", "binary"])
def test_a_damaged_cached_listing_is_disassembled_again_and_replaced(tmp_path, monkeypatch,
                                                                     damage):
    monkeypatch.setenv("ATTNDSL_CACHE", str(tmp_path / "cache"))
    tool, log = _fake_cuobjdump(tmp_path)
    monkeypatch.setattr(aot, "find_cuobjdump", lambda: tool)
    want = aot._run_cuobjdump(b"cubin-a")
    (entry,) = (tmp_path / "cache" / "cuobjdump").iterdir()
    text = entry.read_text()
    entry.unlink()
    if damage == "truncated":
        entry.write_text(text[: len(text) // 2])
    elif damage == "not a listing":
        entry.write_text('{"usage": 1, "sass": null}')
    elif damage == "directory":
        entry.mkdir()
    else:
        entry.write_bytes(b"\xff\xfe\x00")
    assert aot._run_cuobjdump(b"cubin-a") == want and _runs(log) == 4
    assert entry.is_file() and aot._run_cuobjdump(b"cubin-a") == want and _runs(log) == 4


def test_a_cache_that_cannot_be_written_still_gives_the_listing(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNDSL_CACHE", str(tmp_path / "cache"))
    tool, log = _fake_cuobjdump(tmp_path)
    monkeypatch.setattr(aot, "find_cuobjdump", lambda: tool)

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(aot, "write_module", refuse)
    assert aot._run_cuobjdump(b"cubin-a")[1] == "v1 --dump-sass cubin-a\n"
    assert aot._run_cuobjdump(b"cubin-a")[1] == "v1 --dump-sass cubin-a\n" and _runs(log) == 4
