"""The forward kernel's tensor-descriptor (TMA) load path (codegen/loads.py).

Forced on in Triton's interpreter (``config={"tma": True}``) it gives the float64 oracle's
answer on ragged lengths, Lq != Lkv, grouped heads and several operands; a layout a descriptor
cannot read falls back to pointer loads with the reason recorded; the sm90 compile of the TMA
variant holds TMA instructions (compiled in a child process without TRITON_INTERPRET), and the
autotuner's static pruning compiles TMA candidates as TMA kernels.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import triton.language as tl
from attndsl.codegen.loads import tma_choice

import attndsl
from attndsl.eager import run_cascade
from attndsl.frontend.load import load_spec
from attndsl.passes.pipeline import compile_cascade
from attndsl.runtime import gpu_report
from attndsl.runtime.gpu_report import kernel_path, record_launches, run_jobs
from attndsl.runtime.modules import load_kernel_module
from attndsl.runtime.sass import summarize_sass

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
needs_descriptors = pytest.mark.skipif(
    not hasattr(tl, "make_tensor_descriptor"),
    reason="this triton has no tl.make_tensor_descriptor (device-side tensor descriptors)")


def _run(example: str, inputs: dict, params: dict, config: dict) -> tuple[dict, dict, dict]:
    """(kernel outputs, oracle outputs, the launch's LOAD_PATH) of an example."""
    cascade, _ = load_spec(str(ROOT / "examples" / example)).build()
    module = load_kernel_module(compile_cascade(cascade).kernel)
    out = module.launch(inputs, params, {}, None, dict(CONFIG, **config))
    return out, run_cascade(cascade, inputs, params), dict(module.LOAD_PATH)


def _inputs(m: int, n: int, e: int, f: int, heads: int = 2, kv_heads: int = 2,
            dtype: torch.dtype = torch.float32) -> dict:
    return {"Q": torch.randn(2, heads, m, e, dtype=dtype),
            "K": torch.randn(2, kv_heads, n, e, dtype=dtype),
            "V": torch.randn(2, kv_heads, n, f, dtype=dtype)}


CASES = {  # example, (M, N, E, F), query heads, key/value heads, params
    "causal, ragged lengths": ("causal.attn", (37, 53, 24, 20), 2, 2, {"scale": 0.2}),
    "cross attention, Lq != Lkv": ("cross_attention.attn", (19, 70, 16, 32), 2, 2, {"scale": 0.3}),
    "grouped heads": ("gqa_causal.attn", (45, 45, 16, 16), 4, 2, {"scale": 0.25, "G": 2}),
    "sliding window, closed-form ranges": ("sliding_window.attn", (75, 75, 16, 16), 2, 2,
                                           {"scale": 0.25, "W": 20}),
}


@needs_descriptors
@pytest.mark.parametrize("case", list(CASES))
def test_tensor_descriptor_loads_give_the_oracles_attention(case: str) -> None:
    example, (m, n, e, f), hq, hkv, params = CASES[case]
    out, ref, path = _run(example, _inputs(m, n, e, f, hq, hkv), params, {"tma": True})
    assert path == {"tma": True, "reason": "tensor descriptors (TMA)"}
    for name, value in ref.items():
        torch.testing.assert_close(out[name].double(), value, atol=2e-5, rtol=2e-5)


@needs_descriptors
def test_a_kernel_with_two_score_dots_reads_every_operand_through_a_descriptor() -> None:
    """Differential attention: two Q and two K operands, each with its own descriptor."""
    cascade, _ = load_spec(str(ROOT / "examples" / "differential.attn")).build()
    module = load_kernel_module(compile_cascade(cascade).kernel)
    assert len([p for p in module.TMA_TENSORS if p in
                {v[0] for v in module.OPERANDS.values()}]) == len(module.OPERANDS)
    shapes = {t: [2 if d in ("B", "H") else 33 if d in ("M", "N") else 16 for d in dims]
              for t, dims in module.TENSOR_DIMS.items()}
    inputs = {t: torch.randn(s) for t, s in shapes.items()}
    params = {"scale": 0.25, "lam": 0.5}
    out = module.launch(inputs, params, {}, None, dict(CONFIG, tma=True))
    assert module.LOAD_PATH["tma"] is True
    ref = run_cascade(cascade, inputs, params)
    for name, value in ref.items():
        torch.testing.assert_close(out[name].double(), value, atol=2e-5, rtol=2e-5)


@needs_descriptors
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_descriptor_loads_give_the_oracles_attention(dtype) -> None:
    """16-bit tiles through descriptors (the interpreter upcasts bf16 after the load)."""
    inputs = _inputs(41, 41, 32, 16, 4, 2, dtype)
    out, ref, path = _run("gqa_causal.attn", inputs, {"scale": 0.2, "G": 2}, {"tma": True})
    assert path["tma"] is True
    torch.testing.assert_close(out["O"].double(), ref["O"], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("example", ["causal.attn", "differential.attn"])
def test_the_key_tile_descriptors_are_made_before_the_query_tiles(example: str) -> None:
    """Descriptors lie in the program's scratch in the order they are made; the ones the key
    loop reads every tile come first (at the scratch base), the query tile's, read once, after
    (ptxas kept the address in vector registers otherwise: 8 more instructions per key tile
    on sm90, codegen/triton.py ``_key_tiles_first``)."""
    cascade, _ = load_spec(str(ROOT / "examples" / example)).build()
    source = Path(load_kernel_module(compile_cascade(cascade).kernel).__file__).read_text()
    # each operand descriptor in the order made: read once per program when its tile rows
    # are BLOCK_M query rows, else every key tile
    once = [block == "BLOCK_M" for block in re.findall(
        r"tl\.make_tensor_descriptor\(base_\w+, .*\[(\w+), \w+\]\)", source)]
    assert any(once) and not all(once), once
    assert once == sorted(once), once


EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))


@needs_descriptors
def test_every_examples_descriptor_variant_compiles_for_sm90_without_spills() -> None:
    """An sm90 launch takes the descriptor path by default: each example's kernel must build
    there, with its default config, hold TMA instructions and fit without spills."""
    jobs = []
    for path in EXAMPLES:
        kernel = compile_cascade(load_spec(str(path)).build(1, 2, 64, 64)[0]).kernel
        if kernel is not None:
            jobs.append({"path": kernel_path(kernel), "target": "sm90", "dtype": "fp16",
                         "e": 64, "f": 64, "sparsity": 1 if kernel.mask is not None else 0,
                         "config": None, "tma_loads": True, "example": path.stem})
    for r in run_jobs(jobs):
        assert "error" not in r, (r["example"], r["error"])
        assert r["tma"] > 0 and r["fits"] and r["tc_kind"] == "HGMMA", (r["example"], r)


def _misaligned_rows() -> dict:  # fp16 rows of 20 elements: a 40-byte row stride
    return _inputs(33, 33, 20, 16, dtype=torch.float16)


def _transposed_k() -> dict:  # K's feature dim is not the contiguous one
    x = _inputs(33, 33, 16, 16)
    x["K"] = x["K"].transpose(-1, -2).contiguous().transpose(-1, -2)
    return x


def _offset_base() -> dict:  # Q starts 4 bytes into its storage
    x = _inputs(33, 33, 16, 16)
    x["Q"] = torch.randn(x["Q"].numel() + 1)[1:].view(x["Q"].shape)
    return x


@needs_descriptors
@pytest.mark.parametrize("layout, reason", [
    (_misaligned_rows, "not a multiple of 16"),
    (_transposed_k, "along the tile columns"),
    (_offset_base, "not 16-byte aligned"),
])
def test_a_layout_a_descriptor_cannot_read_falls_back_to_pointer_loads(layout, reason) -> None:
    inputs = layout()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out, ref, path = _run("causal.attn", inputs, {"scale": 0.25}, {"tma": True})
    assert path["tma"] is False and reason in path["reason"], path
    assert any(reason in str(w.message) for w in seen)
    tol = 2e-3 if inputs["Q"].dtype == torch.float16 else 2e-5
    torch.testing.assert_close(out["O"].double(), ref["O"], atol=tol, rtol=tol)


def test_cpu_launches_use_pointer_loads_unless_descriptors_are_asked_for() -> None:
    _, _, path = _run("causal.attn", _inputs(16, 16, 16, 16), {"scale": 0.25}, {})
    assert path["tma"] is False and "tma=True" in path["reason"]


def _descriptor_tensors() -> dict:
    t = torch.randn(1, 2, 64, 64, dtype=torch.float16)
    return {"q_ptr": (t, 2, 3, ("BLOCK_M", "BLOCK_E"))}


BLOCKS = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_E": 64, "BLOCK_F": 64}
WIDE = dict(BLOCKS, BLOCK_E=128, BLOCK_F=128)  # head dims 65 to 128


@needs_descriptors
@pytest.mark.parametrize("major, expected", [(8, False), (9, True), (10, True)])
def test_descriptors_are_chosen_on_sm90_and_later_gpus_only(monkeypatch, major: int,
                                                            expected: bool) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    use, why = tma_choice(None, torch.device("cuda"), _descriptor_tensors(), WIDE)
    assert use is expected, why
    assert tma_choice(False, torch.device("cuda"), _descriptor_tensors(), WIDE)[0] is False


@needs_descriptors
@pytest.mark.parametrize("e, f", [(64, 64), (32, 64), (64, 16)])
def test_head_dims_of_at_most_64_take_pointer_loads_unless_descriptors_are_asked_for(
        monkeypatch, e: int, f: int) -> None:
    """At 64 columns the descriptor key-tile loop is the heavier one (codegen/loads.py
    pointer_default): an sm90 launch takes pointers by default and descriptors on request; a
    wider qk or v head dim takes descriptors."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda, tensors = torch.device("cuda"), _descriptor_tensors()
    narrow = dict(BLOCKS, BLOCK_E=e, BLOCK_F=f)
    use, why = tma_choice(None, cuda, tensors, narrow)
    assert not use and "head dims of at most 64" in why
    assert tma_choice(True, cuda, tensors, narrow)[0]
    assert tma_choice(None, cuda, tensors, dict(narrow, BLOCK_F=128))[0]
    assert tma_choice(None, cuda, tensors, dict(narrow, BLOCK_E=128))[0]


def _causal_module():
    return load_kernel_module(compile_cascade(
        load_spec(str(ROOT / "examples" / "causal.attn")).build()[0]).kernel)


@needs_descriptors
def test_a_gpu_launch_that_names_no_load_path_may_run_either(monkeypatch) -> None:
    """The launcher's load path: (the default, whether the autotuner may time the other one):
    open on a GPU launch that names none and whose layout descriptors can read, closed when
    the config names one or the layout needs pointers."""
    module = _causal_module()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(module, "ensure_allocator", lambda: None)
    cuda = torch.device("cuda")
    t = torch.randn(1, 2, 64, 128, dtype=torch.float16)
    args = {ptr: t for ptr in module.TMA_TENSORS}
    tiles = {"BLOCK_M": 128, "BLOCK_N": 64}
    assert module._load_path(dict(tiles), cuda, args, 64, 64) == (False, True)
    assert module._load_path(dict(tiles), cuda, args, 128, 128) == (True, True)
    assert module._load_path(dict(tiles, tma=False), cuda, args, 128, 128) == (False, False)
    assert module._load_path(dict(tiles, tma=True), cuda, args, 64, 64) == (True, False)
    assert module._load_path(dict(tiles), torch.device("cpu"), args, 128, 128) == (False, False)
    rows_of_40_bytes = {ptr: torch.randn(1, 2, 64, 20, dtype=torch.float16)
                        for ptr in module.TMA_TENSORS}
    assert module._load_path(dict(tiles), cuda, rows_of_40_bytes, 128, 128) == (False, False)


def test_the_autotuner_keeps_the_faster_load_path(tmp_path: Path, monkeypatch) -> None:
    """Candidates that differ in their load path are timed like tile configs: the faster one's
    ``tma`` is what the launch runs and what the tuning file keeps (a non-bool is refused)."""
    import time

    module = _causal_module()
    monkeypatch.setenv("ATTNDSL_CACHE", str(tmp_path))
    monkeypatch.setattr(module, "_TUNED", {})
    ran: list[bool] = []

    def run(c: dict) -> None:
        ran.append(c["tma"])
        time.sleep(0.0 if c["tma"] else 0.02)

    candidates = [dict(CONFIG, tma=tma) for tma in (False, True)]
    key = ("spec", "cpu", "torch.float16", 64, 64, 1, 1, 1, 1, 64, 64, (False, True))
    assert module._tuned(key, candidates, run) == dict(CONFIG, tma=True)
    assert ran == [False, True]
    saved = json.loads((tmp_path / "tuning.json").read_text())
    assert saved == {repr(key): dict(CONFIG, tma=True)}
    assert module._valid_config(dict(CONFIG, tma=False))
    assert not module._valid_config(dict(CONFIG, tma="yes"))
    assert not module._valid_config(dict(CONFIG, tma=1))


@needs_descriptors
def test_a_block_over_the_tma_box_limit_falls_back() -> None:
    use, why = tma_choice(True, torch.device("cpu"), _descriptor_tensors(),
                          dict(BLOCKS, BLOCK_M=512))
    assert not use and "256" in why


@needs_descriptors
def test_the_sm90_compile_of_the_descriptor_variant_holds_tma_instructions() -> None:
    cascade, _ = load_spec(str(ROOT / "examples" / "causal.attn")).build(1, 2, 64, 64)
    path = kernel_path(compile_cascade(cascade).kernel)
    jobs = [{"path": path, "target": "sm90", "dtype": "fp16", "e": 64, "f": 64, "sparsity": 1,
             "config": [128, 64, 8, 3], "tma_loads": tma} for tma in (True, False)]
    tma, pointer = run_jobs(jobs)
    assert "error" not in tma and "error" not in pointer, (tma, pointer)
    assert tma["tma"] > 0 and pointer["tma"] == 0
    assert tma["spills"] == 0 and tma["tc_kind"] == "HGMMA"
    assert len(tma["loops"]) == len(pointer["loops"]) == 1  # the wait retries are no loops
    assert tma["loops"][0]["tensor_core"] == pointer["loops"][0]["tensor_core"]


def test_static_pruning_compiles_each_candidate_with_its_load_path(monkeypatch) -> None:
    seen: list[dict] = []

    def jobs(batch: list[dict]) -> list[dict]:
        seen.extend(batch)
        return [dict(j, fits=True, shared=0) for j in batch]

    monkeypatch.setattr(gpu_report, "run_jobs", jobs)
    module = load_kernel_module(compile_cascade(
        load_spec(str(ROOT / "examples" / "causal.attn")).build()[0]).kernel)
    key = (module.SPEC_HASH, "cuda:0", torch.float16, 64, 64, 1, 1, 1, 1, 1024, 1024, True)
    candidates = [dict(CONFIG, tma=True), dict(CONFIG, BLOCK_M=64, tma=True)]
    assert gpu_report.prune_candidates(module, key, candidates, "sm90") == candidates
    assert [j["tma_loads"] for j in seen] == [True, True]


RETRY_SASS = """
        /*0100*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR20], R15 ;
        /*0110*/              @!P1 BRA 0x200 ;
        /*0120*/                   HGMMA.64x64x16.F32 R24, gdesc[UR8], RZ, !UPT ;
        /*0130*/                   MUFU.EX2 R1, R2 ;
        /*0140*/                   UTMALDG.2D [UR32], [UR10] ;
        /*0150*/               @P0 BRA 0x100 ;
        /*0160*/                   EXIT ;
        /*0200*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR20], R15 ;
        /*0210*/              @!P1 BRA 0x200 ;
        /*0220*/                   BRA 0x120 ;
        /*0230*/                   BRA 0x230;
"""


def test_the_return_jump_of_an_out_of_line_wait_retry_is_no_loop() -> None:
    """ptxas puts the retry of a TMA barrier wait behind EXIT, jumping back into the loop:
    that jump must not make a second key-tile loop [0x120, 0x220] overlapping the first."""
    summary = summarize_sass(RETRY_SASS)
    assert [(lp.start, lp.end) for lp in summary.loops] == [(0x100, 0x150)]
    assert summary.loops[0].tma == 1 and summary.tma == 1


@needs_descriptors
def test_the_static_benchmark_reports_the_descriptor_variant(tmp_path: Path) -> None:
    out = tmp_path / "quick"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "static_kernel.py"),
                           "--quick", "--no-backward", "--tma", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["meta"]["compiled"] == 3
    (row,) = data["rows"]
    tma, pointer = row["generated_tma"], row["generated"]
    assert "error" not in tma and tma["tma"] > 0 and pointer["tma"] == 0
    assert sorted(p["kind"] for p in row["tma_loops"]) == sorted(p["kind"] for p in row["loops"])
    for pair in row["tma_loops"]:
        assert pair["generated"]["tensor_core"] == pair["reference"]["tensor_core"] > 0
        assert pair["generated"]["tma"] > 0  # the key and value tiles, loaded in the loop
    assert "Tensor-descriptor (TMA) variant" in out.with_suffix(".md").read_text()


@needs_descriptors
def test_a_kernel_whose_scores_read_a_table_per_key_prefers_pointer_loads(monkeypatch) -> None:
    """A relative-bias table read per key tile is a cp.async beside the descriptor loads, which
    serialises the wgmma: the module says so (PREFER_POINTERS), a default sm90 launch takes
    pointer loads, ``tma=True`` still gets descriptors; a table read in the mask only (document
    ids) and a per-head table (ALiBi slopes) leave descriptors the default."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    table, ids, slopes = torch.randn(2, 127), torch.arange(64) // 20, torch.rand(2)

    def module_of(score_mod=None, mask_mod=None) -> dict:
        q = torch.randn(1, 2, 64, 64)
        launch, = record_launches(lambda: attndsl.flex_attention(
            q, q, q, score_mod=score_mod, mask_mod=mask_mod, kernel_options={"tma": True}))
        return launch.fn.__globals__

    bias = module_of(score_mod=lambda s, b, h, qi, kv: s + table[h, qi - kv + 63])
    document = module_of(mask_mod=lambda b, h, qi, kv: ids[qi] == ids[kv])
    alibi = module_of(score_mod=lambda s, b, h, qi, kv: s + slopes[h] * (kv - qi))
    assert "serialises the wgmma" in bias["PREFER_POINTERS"]
    assert document["PREFER_POINTERS"] == alibi["PREFER_POINTERS"] == ""
    tensors = _descriptor_tensors()
    cuda = torch.device("cuda")
    use, why = bias["tma_choice"](None, cuda, tensors, BLOCKS, bias["PREFER_POINTERS"])
    assert not use and why == bias["PREFER_POINTERS"]
    assert bias["tma_choice"](True, cuda, tensors, BLOCKS, bias["PREFER_POINTERS"])[0]
    assert document["tma_choice"](None, cuda, tensors, WIDE, document["PREFER_POINTERS"])[0]


def test_the_gpu_report_marks_the_load_path_a_default_launch_takes(monkeypatch) -> None:
    """``attndsl report`` on sm90 lists the default config twice (pointer and descriptor
    loads); only the one a launch naming no load path takes is marked ``(default)``: pointers
    at head dims of at most 64, descriptors above, pointers where the module prefers them."""
    causal = kernel_path(compile_cascade(
        load_spec(str(ROOT / "examples" / "causal.attn")).build()[0]).kernel)
    assert not gpu_report.default_takes_tma(causal, 64, 64)
    assert gpu_report.default_takes_tma(causal, 128, 128)
    assert gpu_report.default_takes_tma(causal, 64, 128)
    bias = kernel_path(compile_cascade(
        load_spec(str(ROOT / "examples" / "relative_bias.attn")).build()[0]).kernel)
    assert not gpu_report.default_takes_tma(bias, 128, 128)

    jobs: list[list[dict]] = []
    monkeypatch.setattr(gpu_report, "run_jobs", lambda js: jobs.append(js) or js)
    for dim, tma_default in ((64, False), (128, True)):
        rows = gpu_report.compile_reports(compile_cascade(load_spec(
            str(ROOT / "examples" / "causal.attn")).build()[0]).kernel, "sm90", e=dim, f=dim)
        marked = [r for r in rows if r.get("default")]
        assert len(marked) == 1 and bool(marked[0].get("tma_loads")) == tma_default
        assert rows[0]["config"] is None and rows[1]["config"] is None
