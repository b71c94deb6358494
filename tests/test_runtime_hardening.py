"""Runtime hardening: tile plans never go stale, empty and meta inputs give outputs of the right
shape, and the module cache survives corrupt entries, stale bytecode, unusable directories and
concurrent processes."""

from __future__ import annotations

import importlib.util
import json
import os
import py_compile
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import attndsl
from attndsl import api
from attndsl.runtime import modules, plan_cache
from attndsl.runtime import plan as runtime_plan
from attndsl.runtime.modules import import_path, load_source, write_module

Tensor = torch.Tensor
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log")


def _oracle(q: Tensor, k: Tensor, v: Tensor, mask_mod: Callable) -> dict[str, Tensor]:
    kernel = attndsl.compile(mask_mod=mask_mod)
    return attndsl.run_cascade(kernel.compiled.cascade, {"Q": q, "K": k, "V": v,
                                                         **kernel.captured},
                               {"scale": q.shape[-1] ** -0.5, "G": 1})


# -- 1. tile plans ------------------------------------------------------------------------------

@pytest.mark.parametrize("limit", [plan_cache.CONTENT_LIMIT, 0], ids=["by_content", "by_identity"])
def test_a_document_id_tensor_rebuilt_each_step_matches_the_oracle_every_step(
        limit: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step frees the previous document ids and allocates new ones of the same size (the
    allocator reuses the address, and the version counter is 1 each time): a plan keyed by
    id() and version would be reused with the old documents' key tiles."""
    monkeypatch.setattr(plan_cache, "CONTENT_LIMIT", limit)
    runtime_plan._PLANS.clear()
    L = 384  # 3 x 3 tiles of 128: documents move across tile boundaries from step to step
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, L, 16, generator=gen) for _ in range(3))
    for step in range(5):
        docs = torch.empty(L, dtype=torch.long)
        docs.copy_((torch.arange(L) + 64 * step) // 160)

        def same_doc(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor,
                     docs: Tensor = docs) -> Tensor:
            return docs[q_idx] == docs[kv_idx]

        out = attndsl.flex_attention(q, k, v, mask_mod=same_doc)
        ref = _oracle(q, k, v, same_doc)["O"]
        torch.testing.assert_close(out.double(), ref, atol=5e-5, rtol=5e-5,
                                   msg=f"step {step}: stale tile plan")
        del docs, same_doc


def test_an_identity_keyed_plan_is_dropped_when_its_tensor_is_freed() -> None:
    cache = plan_cache.TensorKeyedCache()
    big = torch.zeros(plan_cache.CONTENT_LIMIT // 8 + 1, dtype=torch.long)  # past the limit
    cache.put("parts", {"t": big}, "plan")
    assert cache.get("parts", {"t": big}) == "plan"
    big.add_(1)  # an in-place write bumps the version: no longer the same key
    assert cache.get("parts", {"t": big}) is None
    cache.put("parts", {"t": big}, "plan")
    del big
    assert len(cache) == 0


def test_content_keyed_plans_are_shared_by_equal_tensors_and_split_by_writes() -> None:
    cache = plan_cache.TensorKeyedCache()
    a = torch.arange(10)
    cache.put("parts", {"t": a}, "plan")
    assert cache.get("parts", {"t": torch.arange(10)}) == "plan"
    a[3] = 0
    assert cache.get("parts", {"t": a}) is None
    assert cache.get("parts", {"t": torch.arange(10).int()}) is None  # dtype is in the key


# -- 2. empty problems --------------------------------------------------------------------------

DOCS = torch.arange(40) // 7


def doc_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return DOCS[q_idx] == DOCS[kv_idx]


def causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return q_idx >= kv_idx


EMPTY_SHAPES = [pytest.param(s, id=i) for s, i in [
    ((0, 2, 30, 40), "B0"), ((2, 0, 30, 40), "H0"), ((2, 2, 0, 40), "Lq0"),
    ((2, 2, 30, 0), "Lkv0")]]


def _empty_qkv(B: int, H: int, Lq: int, Lkv: int, grad: bool = False) -> tuple[Tensor, ...]:
    q = torch.randn(B, H, Lq, 16)
    k, v = torch.randn(B, H, Lkv, 16), torch.randn(B, H, Lkv, 24)
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def _assert_empty_result(out: Tensor, lse: Tensor, B: int, H: int, Lq: int, Lkv: int) -> None:
    """torch's convention: empty outputs; no keys: every row is 0 with lse -inf."""
    assert out.shape == (B, H, Lq, 24) and lse.shape == (B, H, Lq)
    if Lkv == 0:
        assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("mask_mod", [None, causal, doc_mask])
@pytest.mark.parametrize("shape", EMPTY_SHAPES)
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
def test_flex_attention_of_an_empty_problem_gives_empty_outputs_and_zero_gradients(
        shape: tuple, mask_mod: Callable | None, grad: bool) -> None:
    q, k, v = _empty_qkv(*shape, grad=grad)
    out, lse = attndsl.flex_attention(q, k, v, mask_mod=mask_mod, return_lse=True)
    _assert_empty_result(out, lse, *shape)
    if grad:
        (out.sum() + lse[~torch.isinf(lse)].sum()).backward()
        for t in (q, k, v):
            assert t.grad is not None and t.grad.shape == t.shape and (t.grad == 0).all()


@pytest.mark.parametrize("shape", EMPTY_SHAPES)
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
def test_a_compiled_kernel_of_an_empty_problem_gives_empty_outputs(shape: tuple,
                                                                   grad: bool) -> None:
    q, k, v = _empty_qkv(*shape, grad=grad)
    out = attndsl.compile(mask_mod=doc_mask)({"Q": q, "K": k, "V": v})
    _assert_empty_result(out["O"], out["LSE"], *shape)
    if grad:
        out["O"].sum().backward()
        for t in (q, k, v):
            assert t.grad is not None and t.grad.shape == t.shape and (t.grad == 0).all()


@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_a_standalone_module_of_an_empty_problem_gives_empty_outputs(
        shape: tuple, tmp_path: Path) -> None:
    kernel = attndsl.compile(mask_mod=doc_mask)
    mod = import_path(write_module(kernel.source, tmp_path / "doc_kernel.py"))
    q, k, v = _empty_qkv(*shape)
    out = mod.launch({"Q": q, "K": k, "V": v}, captured=dict(kernel.captured))
    _assert_empty_result(out["O"], out["LSE"], *shape)
    out = mod.attention(q, k, v, return_all=True, captured=dict(kernel.captured))
    _assert_empty_result(out["O"], out["LSE"], *shape)


def test_query_heads_without_key_heads_are_still_an_error() -> None:
    q, k, v = _empty_qkv(1, 2, 8, 8)
    with pytest.raises(api.AttentionError, match="not a multiple of 0 key/value heads"):
        attndsl.flex_attention(q, k[:, :0], v[:, :0], enable_gqa=True)


# -- 4. meta tensors ----------------------------------------------------------------------------

def _meta_qkv(grad: bool) -> tuple[Tensor, ...]:
    shapes = ((2, 4, 30, 16), (2, 2, 40, 16), (2, 2, 40, 32))
    return tuple(torch.empty(s, device="meta", dtype=torch.float16).requires_grad_(grad)
                 for s in shapes)


@pytest.mark.parametrize("mask_mod", [None, causal, doc_mask])
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
def test_meta_inputs_give_meta_outputs_of_the_right_shape(mask_mod: Callable | None,
                                                          grad: bool) -> None:
    slopes = torch.randn(4, requires_grad=grad)  # a CPU tensor with data, captured

    def alibi(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score + slopes[h] * (kv_idx - q_idx)

    q, k, v = _meta_qkv(grad)
    out, lse = attndsl.flex_attention(q, k, v, score_mod=alibi, mask_mod=mask_mod,
                                      return_lse=True, enable_gqa=True)
    assert (out.device.type, out.shape, out.dtype) == ("meta", (2, 4, 30, 32), torch.float16)
    assert (lse.device.type, lse.shape, lse.dtype) == ("meta", (2, 4, 30), torch.float32)
    if grad:
        out.float().sum().backward()
        assert [t.grad.shape for t in (q, k, v)] == [t.shape for t in (q, k, v)]
        assert all(t.grad.device.type == "meta" for t in (q, k, v))
        assert slopes.grad is None  # nothing was computed: no (uninitialised) gradient


def test_a_compiled_kernel_of_meta_inputs_gives_meta_outputs() -> None:
    q = torch.empty(2, 4, 30, 16, device="meta")
    k = torch.empty(2, 4, 40, 16, device="meta")
    out = attndsl.compile(mask_mod=doc_mask)({"Q": q, "K": k, "V": k})
    assert {n: (t.device.type, tuple(t.shape)) for n, t in out.items()} == {
        "O": ("meta", (2, 4, 30, 16)), "LSE": ("meta", (2, 4, 30)), "MAX": ("meta", (2, 4, 30))}



def test_meta_inputs_skip_the_checks_that_read_table_values() -> None:
    """A table read through another table's values: the subscript's range comes from the
    values, which meta tensors do not have; the launch gives the shapes without reading them."""
    bias = torch.randn(6)

    def doc_bias(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score + bias[DOCS[kv_idx]]

    q, k, v = _meta_qkv(False)
    out = attndsl.flex_attention(q, k, v, score_mod=doc_bias, mask_mod=doc_mask,
                                 enable_gqa=True)
    assert (out.device.type, out.shape) == ("meta", (2, 4, 30, 32))

# -- 3. the module cache ------------------------------------------------------------------------

@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache directory, and no module loaded in memory yet."""
    monkeypatch.setenv("ATTNDSL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(modules, "_LOADED", {})
    return tmp_path / "cache"


def _entry(source: str) -> Path:
    load_source(source)
    (path,) = [p for p in modules.cache_dir().glob("k_*.py")]
    modules._LOADED.clear()
    return path


@pytest.mark.parametrize("damage", ["non_utf8", "truncated", "directory"])
def test_a_damaged_cache_entry_is_rebuilt(cache: Path, damage: str) -> None:
    source = "VALUE = 'intact'\n"
    path = _entry(source)
    if damage == "non_utf8":
        path.write_bytes(b"VALUE = '\xff\xfe'\n")
    elif damage == "truncated":
        path.write_bytes(source.encode()[:9])
    else:
        path.unlink()
        (path / "sub").mkdir(parents=True)
    assert load_source(source).VALUE == "intact"
    assert path.read_text() == source


def test_a_truncated_pyc_never_breaks_a_load(cache: Path) -> None:
    source = "VALUE = 'from source'\n"
    path = _entry(source)
    pyc = Path(importlib.util.cache_from_source(str(path)))
    py_compile.compile(str(path), cfile=str(pyc))
    pyc.write_bytes(pyc.read_bytes()[:20])  # a valid header, the code cut short
    assert load_source(source).VALUE == "from source"
    assert import_path(path, "attndsl_test_truncated_pyc").VALUE == "from source"


def test_bytecode_of_an_edited_source_with_the_same_mtime_never_runs(cache: Path) -> None:
    """A .pyc records the source's mtime and size only: an entry edited (or rebuilt) within
    the same second to text of the same length would run the old code."""
    source, edited = "VALUE = 'new'\n", "VALUE = 'old'\n"
    path = _entry(source)
    stat = path.stat()
    path.write_text(edited)
    py_compile.compile(str(path), cfile=importlib.util.cache_from_source(str(path)))
    path.write_text(source)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert load_source(source).VALUE == "new"
    assert import_path(path, "attndsl_test_stale_pyc").VALUE == "new"


@pytest.mark.parametrize("where", ["under_a_file", "a_file"])
def test_an_unusable_cache_directory_falls_back_with_a_warning_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    root = blocker / "cache" if where == "under_a_file" else blocker
    monkeypatch.setenv("ATTNDSL_CACHE", str(root))
    monkeypatch.setattr(modules, "_LOADED", {})
    with pytest.warns(RuntimeWarning, match="ATTNDSL_CACHE") as record:
        assert load_source("VALUE = 3\n").VALUE == 3
    assert len(record) == 1 and str(root) in str(record[0].message)
    assert modules.cache_dir() != root and modules.cache_dir().is_dir()


_CHILD = """
import os, sys, time
import torch
import attndsl

def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx

def shifted(score, b, h, q_idx, kv_idx):
    return score * 0.8125 + (kv_idx - q_idx) * 0.0625

q = torch.randn(1, 2, 20, 16, generator=torch.Generator().manual_seed(1))
print("ready", flush=True)
while not os.path.exists(sys.argv[1]):  # start together: every process finds a cold cache
    time.sleep(0.01)
out = attndsl.flex_attention(q, q, q, score_mod=shifted, mask_mod=causal)
kernel = attndsl.compile(score_mod=shifted, mask_mod=causal)
ref = attndsl.run_cascade(kernel.compiled.cascade, {"Q": q, "K": q, "V": q},
                          {"scale": 0.25, "G": 1})["O"]
print(float((out.double() - ref).abs().max()))
"""


def test_eight_processes_sharing_a_cold_cache_all_get_correct_results(cache: Path,
                                                                      tmp_path: Path) -> None:
    go = tmp_path / "go"
    env = dict(os.environ, ATTNDSL_CACHE=str(cache), TRITON_INTERPRET="1")
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(go)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(8)]
    for p in procs:  # every process has imported attndsl: start them together
        assert p.stdout.readline().strip() == "ready", p.communicate()[1][-2000:]
    go.touch()
    results = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
        assert float(out.strip().splitlines()[-1]) < 1e-4
    assert len(list(cache.glob("k_*.py"))) == 1 and not list(cache.glob("*.tmp"))


# -- the autotune file --------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b"[1, 2, 3]", b'{"k": "cfg"',
                                     "directory"])
def test_a_corrupt_tuning_file_is_ignored_and_replaced(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       content: bytes | str) -> None:
    kernel = attndsl.compile(mask_mod=causal)
    mod = import_path(write_module(kernel.source, tmp_path / "k.py"), "attndsl_test_tuning")
    monkeypatch.setenv("ATTNDSL_CACHE", str(tmp_path))
    tuning = tmp_path / "tuning.json"
    if content == "directory":
        tuning.mkdir()
    else:
        tuning.write_bytes(content)
    q = torch.randn(1, 1, 40, 16)
    out = mod.launch({"Q": q, "K": q, "V": q}, {"scale": 0.25}, config={"autotune": True})
    ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True, scale=0.25)
    torch.testing.assert_close(out["O"], ref, atol=1e-5, rtol=1e-5)
    if content != "directory":
        (cfg,) = json.loads(tuning.read_text()).values()
        assert set(cfg) == {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "tma"}


def test_a_tuning_entry_with_bad_values_is_re_tuned(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = attndsl.compile(mask_mod=causal)
    mod = import_path(write_module(kernel.source, tmp_path / "k.py"), "attndsl_test_tuning2")
    monkeypatch.setenv("ATTNDSL_CACHE", str(tmp_path))
    monkeypatch.setattr(mod, "_TUNED", {})
    q = torch.randn(1, 1, 40, 16)
    mod.launch({"Q": q, "K": q, "V": q}, {"scale": 0.25}, config={"autotune": True})
    tuning = tmp_path / "tuning.json"
    (key,) = json.loads(tuning.read_text())
    tuning.write_text(json.dumps({key: {"BLOCK_M": 24, "BLOCK_N": "x", "num_warps": 4}}))
    monkeypatch.setattr(mod, "_TUNED", {})
    out = mod.launch({"Q": q, "K": q, "V": q}, {"scale": 0.25}, config={"autotune": True})
    ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True, scale=0.25)
    torch.testing.assert_close(out["O"], ref, atol=1e-5, rtol=1e-5)
    assert mod._TUNED[key]["BLOCK_N"] in (32, 64, 128)


def test_block_masks_default_to_the_cpu_when_the_accelerator_torch_names_is_unusable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # a CUDA build of torch on a machine without a driver (what a fresh install resolves)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    mask = attndsl.create_block_mask(lambda b, h, q, kv: kv <= q, 1, 1, 64, 64)
    assert mask.kv_num_blocks.device.type == "cpu"


def test_compile_of_a_parsed_spec_dictionary_says_to_pick_one_spec() -> None:
    specs = attndsl.parse_text("spec s {\n  index b: B batch, h: H head, m: M query, n: N key,"
                               " e: E qk, f: F v\n  input Q[B, H, M, E], K[B, H, N, E], "
                               "V[B, H, N, F]\n  S[b,h,m,n] = Q[b,h,m,e] * K[b,h,n,e]\n"
                               "  O[b,h,m,f] = softmax(n) S[b,h,m,n] * V[b,h,n,f]\n"
                               "  output O\n}\n")
    with pytest.raises(attndsl.AttentionError, match="pass one of its values"):
        attndsl.compile(specs)


def _kv_block_mask(num: list, idx: list, length: int):
    from torch.nn.attention.flex_attention import BlockMask

    return BlockMask.from_kv_blocks(torch.tensor([[num]], dtype=torch.int32),
                                    torch.tensor([[idx]], dtype=torch.int32), BLOCK_SIZE=128,
                                    mask_mod=lambda b, h, m, n: m >= n,
                                    seq_lengths=(length, length))


def test_a_block_mask_without_full_tables_over_several_query_blocks_matches_sdpa() -> None:
    """Without full-block tables every query block reads a stand-in table of its own (it used
    to read past a one-row stand-in)."""
    q, k, v = (torch.randn(1, 1, 256, 16) for _ in range(3))
    out = attndsl.flex_attention(q, k, v, block_mask=_kv_block_mask([1, 2], [[0, 1], [0, 1]],
                                                                     256))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num, idx, match", [
    ([1, 3], [[0, 1], [0, 1]], "counts in"),       # more blocks than the table has columns
    ([1, 2], [[0, 1], [0, 2]], "key blocks in"),   # a key block past the keys
    ([1], [[0, 1]], "query-block rows"),           # fewer rows than query blocks
])
def test_block_tables_the_kernel_would_read_past_are_refused(num, idx, match) -> None:
    q, k, v = (torch.randn(1, 1, 256, 16) for _ in range(3))
    with pytest.raises(ValueError, match=match):
        attndsl.flex_attention(q, k, v, block_mask=_kv_block_mask(num, idx, 256))


@pytest.mark.parametrize("junk", [3, "causal", {"kv_num_blocks": 1}, (1, 2)])
def test_a_block_mask_that_is_not_one_is_refused_by_name(junk) -> None:
    q = torch.randn(1, 1, 16, 16)
    with pytest.raises(attndsl.AttentionError, match=rf"must be a BlockMask .*; "
                                                     rf"{type(junk).__name__} has no"):
        attndsl.flex_attention(q, q, q, block_mask=junk)


def test_a_compiled_kernel_reads_a_block_masks_lengths_by_input_name_not_order() -> None:
    causal = lambda b, h, i, j: j <= i  # noqa: E731
    kernel = attndsl.compile(mask_mod=causal)
    q, k, v = torch.randn(1, 2, 48, 16), torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)
    bm = attndsl.create_block_mask(causal, 1, 2, 48, 32)
    want = kernel({"Q": q, "K": k, "V": v}, block_mask=bm)["O"]
    for order in ({"K": k, "Q": q, "V": v}, {"V": v, "K": k, "Q": q}):
        assert torch.equal(kernel(order, block_mask=bm)["O"], want)
    with pytest.raises(attndsl.AttentionError, match=r"built for \(Q_LEN, KV_LEN\) = \(48, 32\)"
                                                     r", but the inputs have \(32, 48\)"):
        kernel({"Q": k, "K": q, "V": q}, block_mask=bm)


@pytest.mark.parametrize("maker", ["attndsl", "torch"])
@pytest.mark.parametrize("grad", [False, True])
def test_a_block_mask_broadcast_over_heads_its_mask_reads_is_refused(maker: str,
                                                                      grad: bool) -> None:
    """Tile classes found for head 0 skip other heads' masks: refused, never wrong."""
    per_head = lambda b, h, i, j: j <= i - 10 * h  # noqa: E731
    create = attndsl.create_block_mask if maker == "attndsl" else \
        __import__("torch.nn.attention.flex_attention", fromlist=["x"]).create_block_mask
    kw = {} if maker == "attndsl" else {"device": "cpu"}
    q = torch.randn(1, 4, 40, 16, requires_grad=grad)
    with pytest.raises(attndsl.AttentionError, match=r"built for H = 1 \(broadcast over the "
                                                     r"inputs' 4\), but its mask_mod reads the "
                                                     r"head index"):
        attndsl.flex_attention(q, q, q, block_mask=create(per_head, 1, None, 40, 40, **kw))
    causal = lambda b, h, i, j: j <= i  # noqa: E731  (reads no head: broadcast is exact)
    out = attndsl.flex_attention(q, q, q, block_mask=create(causal, 1, 1, 40, 40, **kw))
    torch.testing.assert_close(out, attndsl.flex_attention(q, q, q, mask_mod=causal))
    exact = create(per_head, 1, 4, 40, 40, **kw)
    torch.testing.assert_close(attndsl.flex_attention(q, q, q, block_mask=exact),
                               attndsl.flex_attention(q, q, q, mask_mod=per_head))


def test_a_compiled_kernel_refuses_a_block_mask_broadcast_over_the_batch_its_mask_reads() -> None:
    per_batch = lambda b, h, i, j: j <= i - 5 * b  # noqa: E731
    kernel = attndsl.compile(mask_mod=per_batch)
    q = torch.randn(2, 1, 32, 16)
    with pytest.raises(attndsl.AttentionError, match=r"built for B = 1 .* reads the batch"):
        kernel({"Q": q, "K": q, "V": q},
               block_mask=attndsl.create_block_mask(per_batch, None, 1, 32, 32))


def test_a_kernels_captured_tensors_are_checked_by_name_and_kind() -> None:
    """``Kernel(captured=...)`` replaces a traced table: a misspelt name (which would leave the
    traced table in place) and a table of another kind (floats where the program does integer
    floor division) are refused by name, not run."""
    tab = torch.tensor([3, 5])

    def score_mod(s, b, h, q_idx, kv_idx):
        return s + ((q_idx - kv_idx) // tab[h]).float() * 0.5

    kern = attndsl.compile(score_mod=score_mod)
    (name,) = kern.captured
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(api.AttentionError, match=rf"no captured tensor 'cap9'; it captures "
                                                 rf"\['{name}'\]"):
        kern({"Q": q, "K": q, "V": q}, captured={"cap9": tab})
    for wrong in (torch.tensor([2.5, 4.5]), torch.tensor([True, False])):
        with pytest.raises(api.AttentionError, match=rf"'{name}' holds int values .* got "
                                                     rf"{wrong.dtype}"):
            kern({"Q": q, "K": q, "V": q}, captured={name: wrong})
    assert kern({"Q": q, "K": q, "V": q}, captured={name: tab.int()})["O"].shape == q.shape
