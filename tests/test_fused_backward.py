"""The fused backward of one-pass tile kernels (passes/tile_grad.py, codegen/tile_backward.py):
gradients of inputs and captured tensors against torch autograd through the float64 oracle,
for every normaliser and for FlexAttention-style specs called through ``attndsl.compile``."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import attndsl
from attndsl.checking import index_sizes, random_problem
from attndsl.passes.grad import GradError
from attndsl.passes.pipeline import compile_cascade
from attndsl.passes.tile_grad import derive_tile_backward

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_key_bounds import _OPS, _side, joined_mask  # noqa: E402
from test_passes import NORMALISERS, softmax_3pass  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 2e-2}


def _check_gradients(kernel: attndsl.Kernel, sizes: dict, dtype: torch.dtype, seed: int,
                     captured: dict | None = None) -> None:
    """Backpropagate random output weights through the kernel and through the oracle."""
    cascade = kernel.compiled.cascade
    gen = torch.Generator().manual_seed(seed)
    prob = random_problem(cascade, sizes, dtype, gen, captured=captured)
    tensors = {**prob.inputs, **{k: v for k, v in prob.captured.items()
                                 if v.is_floating_point()}}
    for t in tensors.values():
        t.requires_grad_(True)
    out = kernel(prob.inputs, prob.params, prob.captured)
    assert kernel.fused_backward is not None
    skip = set(derive_tile_backward(kernel.compiled.kernel).max_stores)  # eager: own test
    weights = {o: torch.randn(v.shape, generator=gen) for o, v in out.items() if o not in skip}
    sum((out[o].float() * w).sum() for o, w in weights.items()).backward()
    ref_leaves = {n: t.detach().double().requires_grad_() for n, t in tensors.items()}
    ref = attndsl.run_cascade(cascade, {**prob.inputs, **prob.captured, **ref_leaves},
                              prob.params)
    sum((ref[o] * w.double()).sum() for o, w in weights.items()).backward()
    for n, t in tensors.items():
        want = ref_leaves[n].grad
        assert t.grad is not None and torch.isfinite(t.grad).all(), n
        err = (t.grad.double() - want).abs().max().item() / max(1.0, want.abs().max().item())
        assert err <= TOL[dtype], (n, err)


@pytest.mark.parametrize("name", sorted(NORMALISERS))
def test_every_normaliser_gets_a_fused_backward(name: str) -> None:
    kernel = attndsl.compile(NORMALISERS[name][0]())
    assert kernel.backward_fallback is None
    assert kernel.fused_backward is not None


@given(name=st.sampled_from(sorted(NORMALISERS)), lq=st.integers(1, 45),
       lkv=st.integers(1, 45), hkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 2]),
       dims=st.sampled_from([(16, 16), (32, 48), (24, 8)]), seed=st.integers(0, 3))
def test_fused_normaliser_gradients_match_the_oracle(name, lq, lkv, hkv, group, dims,
                                                     seed) -> None:
    """Odd lengths, Lq != Lkv, GQA groups, head dims below a power of two, causal masks."""
    cascade = NORMALISERS[name][0]()
    kernel = attndsl.compile(cascade)
    sizes = index_sizes(cascade, 2, hkv * group, hkv, lq, lkv, *dims)
    _check_gradients(kernel, sizes, torch.float32, seed)


@pytest.mark.parametrize("group", [3, 4, 8])
def test_fused_gradients_of_every_group_size_match_the_oracle(group: int) -> None:
    """The group size G is a constexpr of the fused backward kernels (one compile per G):
    groups the hypothesis test above does not draw, dK/dV summed over G query heads."""
    cascade = NORMALISERS["sigmoid"][0]()
    sizes = index_sizes(cascade, 1, 2 * group, 2, 19, 23, 16, 16)
    _check_gradients(attndsl.compile(cascade), sizes, torch.float32, group)


def test_fused_gradients_in_half_precision_match_the_oracle() -> None:
    for name in ("sigmoid", "sink", "softpick"):
        cascade = NORMALISERS[name][0]()
        sizes = index_sizes(cascade, 1, 2, 1, 33, 40, 32, 16)
        _check_gradients(attndsl.compile(cascade), sizes, torch.float16, 1)


SLOPES = torch.tensor([0.5, 0.25])


def _alibi(s, b, h, q, kv):
    return s - SLOPES[h] * (q - kv).abs()


@pytest.mark.parametrize("mask", [lambda b, h, q, kv: kv <= q,
                                  lambda b, h, q, kv: (q - kv).abs() < 7,
                                  lambda b, h, q, kv: (kv < 5) | (kv <= q),
                                  lambda b, h, q, kv: (kv + 9 >= q) & (q >= kv + 1),
                                  lambda b, h, q, kv: (q >= 0) & (q < 20) & (kv <= q - 2)],
                         ids=["causal", "sliding", "prefix", "window_of_sums", "query_bounded"])
def test_flex_specs_through_compile_get_fused_gradients_of_captured_tensors(mask) -> None:
    """A learnable ALiBi slope table (a captured tensor read per head) gets its gradient
    from the tile kernel's scatter; fully masked rows (none here for causal) add nothing."""
    kernel = attndsl.compile(score_mod=_alibi, mask_mod=mask)
    assert kernel.fused_backward is not None
    (cap,) = kernel.captured
    cascade = kernel.compiled.cascade
    sizes = index_sizes(cascade, 2, 2, 2, 29, 37, 16, 16)
    _check_gradients(kernel, sizes, torch.float32, 0, captured={cap: SLOPES.clone()})


@settings(max_examples=10, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(_OPS)), _side, _side), min_size=1, max_size=3),
       st.sampled_from(["&", "|"]), st.integers(1, 40), st.integers(1, 40))
@example([(">=", (1, "q", 0), (1, "kv", 0))], "&", 150, 140)  # blocks of 128, cut short
@example([("<=", (1, "q", -9), (1, "kv", 0)), (">", (1, "q", 0), (1, "kv", 2))], "&", 37, 29)
@example([(">=", (1, "q", 0), (1, "kv", 3))], "&", 37, 29)  # one distance: rows moved by 3
def test_random_distance_masks_get_the_oracles_fused_gradients(terms, join, lq, lkv) -> None:
    """Comparisons of affine index forms, joined (windows, distances, key bounds): the loops
    over key tiles print them relative to start_n (codegen/relative.py), the keys kernel
    absolute over its blocks' ranges of query tiles; odd lengths, Lq != Lkv."""
    kernel = attndsl.compile(score_mod=None, mask_mod=joined_mask(terms, join))
    cascade = kernel.compiled.cascade
    _check_gradients(kernel, index_sizes(cascade, 1, 2, 1, lq, lkv, 16, 16), torch.float32,
                     lq + lkv)


def test_rows_with_no_key_get_zero_gradients() -> None:
    """A mask that empties some rows: their finished sums are 0 and their coefficients
    (1 / 0 for softmax) must not reach dV."""
    kernel = attndsl.compile(score_mod=None, mask_mod=lambda b, h, q, kv: kv + 3 <= q)
    cascade = kernel.compiled.cascade
    _check_gradients(kernel, index_sizes(cascade, 1, 2, 2, 20, 20, 16, 16), torch.float32, 2)


def test_a_max_output_with_a_gradient_uses_the_eager_backward() -> None:
    """MAX = max(n) S: its gradient flows to the arg max, which the fused backward does not
    derive; a nonzero incoming gradient takes the eager path, so the result is still right."""
    kernel = attndsl.compile(score_mod=None, mask_mod=lambda b, h, q, kv: kv <= q)
    assert derive_tile_backward(kernel.compiled.kernel).max_stores == ("MAX",)
    cascade = kernel.compiled.cascade
    gen = torch.Generator().manual_seed(3)
    prob = random_problem(cascade, index_sizes(cascade, 1, 1, 1, 9, 9, 16, 16),
                          torch.float32, gen)
    q = prob.inputs["Q"].requires_grad_(True)
    kernel(prob.inputs, prob.params)["MAX"].sum().backward()
    ref_q = q.detach().double().requires_grad_()
    ref = attndsl.run_cascade(cascade, {**prob.inputs, "Q": ref_q}, prob.params)
    ref["MAX"].sum().backward()
    torch.testing.assert_close(q.grad.double(), ref_q.grad, atol=1e-5, rtol=1e-5)


def test_a_multi_pass_schedule_has_no_fused_backward_and_says_why() -> None:
    kernel = compile_cascade(softmax_3pass(), stream=False).kernel
    with pytest.raises(GradError, match="3 passes"):
        derive_tile_backward(kernel)


def test_explain_shows_the_backward_ir_or_why_there_is_none() -> None:
    from attndsl.explain import backward_text, explain

    text = explain(NORMALISERS["sigmoid"][0](), lq=64, lkv=64)
    assert "== backward" in text and "fused: backward of" in text and "dqk0 +=" in text
    direct = compile_cascade(softmax_3pass(), stream=False)
    assert backward_text(direct).startswith("eager recomputation (no fused backward: ")


@pytest.mark.parametrize("name", ["sink", "differential", "relu2"])
def test_lengths_and_head_dims_that_fill_the_tiles_match_the_oracle(name: str) -> None:
    """The EVEN_M/N/E/F specialisation (no bounds masks): lengths multiples of the CPU tile
    (32) and head dims equal to their block."""
    cascade = NORMALISERS[name][0]()
    sizes = index_sizes(cascade, 1, 2, 1, 64, 32, 32, 16)
    _check_gradients(attndsl.compile(cascade), sizes, torch.float32, 4)


def test_the_static_backward_benchmark_measures_both_kernels_of_a_case() -> None:
    """benchmarks/static_backward.py runs: the sigmoid case's generated and hand-written
    key-tile loops are found in the SASS (tensor-core and EX2 instructions counted)."""
    try:
        from attndsl.runtime.aot import find_cuobjdump
        find_cuobjdump()
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"no Triton CUDA toolchain in this wheel: {err}")
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from benchmarks import static_backward

    rows = static_backward.measure("sm90", [64], ("sigmoid",))
    assert {r["who"] for r in rows} == {"generated", "reference"}, rows
    for r in rows:
        assert "error" not in r and r["loops"] and all(tc > 0 and ex2 > 0
                                                       for _, tc, ex2, _ in r["loops"]), r
    assert "| sigmoid | 64 | dkdv |" in static_backward.table(rows)


def test_gradients_reach_the_source_of_a_prefix_sum_through_the_fused_backward() -> None:
    """The Forgetting Transformer's bias G = cumsum(log sigmoid(A)) is materialised before
    the kernel; the fused backward's dG must flow on into the gate logits A."""
    root = Path(__file__).resolve().parent.parent
    cascade = next(iter(attndsl.parse_file(root / "examples/forgetting_transformer.attn")
                        .values()))
    kernel = attndsl.compile(cascade)
    assert kernel.fused_backward is not None
    gen = torch.Generator().manual_seed(3)
    b, h, n, e = 1, 2, 19, 16
    leaves = {name: torch.randn(shape, generator=gen, requires_grad=True)
              for name, shape in [("Q", (b, h, n, e)), ("K", (b, h, n, e)),
                                  ("V", (b, h, n, e)), ("A", (b, h, n))]}
    out = kernel({k: leaves[k] for k in "QKV"}, {"scale": 0.25}, {"A": leaves["A"]})
    weight = torch.randn(out["O"].shape, generator=gen)
    (out["O"] * weight).sum().backward()
    ref_leaves = {k: t.detach().double().requires_grad_() for k, t in leaves.items()}
    ref = attndsl.run_cascade(cascade, ref_leaves, {"scale": 0.25})
    (ref["O"] * weight.double()).sum().backward()
    for name, t in leaves.items():
        assert t.grad is not None, name
        torch.testing.assert_close(t.grad.double(), ref_leaves[name].grad, atol=1e-4,
                                   rtol=1e-4, msg=name)


@pytest.mark.parametrize("name", ["sigmoid", "off_by_one"])
def test_fused_gradients_over_several_mask_blocks_match_the_oracle(name: str) -> None:
    """Lengths over several 128-key blocks of the closed-form bounds, the last one cut short on
    both sides: the keys and dQ kernels skip empty blocks and drop the mask on full ones."""
    cascade = NORMALISERS[name][0]()
    kernel = attndsl.compile(cascade)
    assert kernel.fused_backward.BOUNDS_BLOCK == 128
    _check_gradients(kernel, index_sizes(cascade, 1, 2, 1, 300, 270, 16, 16), torch.float32, 0)


def test_the_fused_backward_adds_dq_in_its_own_kernel_and_skips_empty_blocks() -> None:
    """dQ is summed in registers by tile_bwd_queries_kernel and added once (no atomics in the
    key-tile loop of the keys kernel); the sigmoid is one exp2 of qk * c + o with c and o
    hoisted, and the scale of d b / d qk is multiplied into dK and dQ once."""
    kernel = attndsl.compile(NORMALISERS["sigmoid"][0]())
    src = Path(kernel.fused_backward.__file__).read_text()
    # each kernel with the step function printed above it
    keys = src[src.index("def _tile_bwd_keys_step("):src.index("def _tile_bwd_queries_step(")]
    queries = src[src.index("def _tile_bwd_queries_step("):src.index("# The fused backward")]
    assert keys.count("tl.atomic_add(") == 2 and "atomic_add(dq_ptr" not in keys  # dK, dV only
    assert queries.count("tl.atomic_add(") == 1 and "atomic_add(dq_ptr" in queries
    for kernel_src in (keys, queries):
        assert "tl.sigmoid" not in kernel_src
        assert "sg0 = 1.0 / (1.0 + tl.exp2(qk0 * sg0_c + sg0_o))" in kernel_src
        assert "# the factor common to every d b / d qk term" in kernel_src
    assert "for start_m in range(blk_lo, tl.where(full, blk_hi, blk_lo), BLOCK_M):" in keys
    assert "for start_n in range(flo0 * 128, tl.minimum(fhi0 * 128, N_len), BLOCK_N):" in queries
    # one step function per kernel, called from each loop: partial and full query blocks;
    # the partial key blocks below the full ones, the full ones, the partial ones above
    for step, calls in (("_tile_bwd_keys_step", ["False", "True"]),
                        ("_tile_bwd_queries_step", ["False", "True", "True"])):
        assert src.count(f"def {step}(") == 1
        assert sorted(re.findall(rf"= {step}\(.*MASKED=(True|False)\)", src)) == calls


def test_a_derivative_that_vanishes_with_the_masked_body_reads_it_without_a_second_select() -> None:
    """sigmoid's d b / d qk = s (1 - s) is 0 where the masked body p = where(keep, s, 0) is:
    dqk reads p (one select per element, as a hand-written kernel); terms that do not vanish
    there keep their own select."""
    from attndsl.codegen.tile_backward import _vanishes

    from attndsl.ir import expr as E
    from attndsl.ir.expr import Op

    kernel = attndsl.compile(NORMALISERS["sigmoid"][0]())
    src = Path(kernel.fused_backward.__file__).read_text()
    keys = src[src.index("def _tile_bwd_keys_step("):src.index("def tile_bwd_keys_kernel(")]
    assert keys.count("p_l0 = tl.where(keep, sg0, 0.0)") == 1
    # s (1 - s) as p - p p (test_a_one_minus_factor_of_a_derivative_is_multiplied_out)
    assert keys.count("dqk = w_l0 * ((p_l0 - (p_l0 * p_l0)))") == 1
    s = E.unary(Op.SIGMOID, E.row("qk0"))
    assert _vanishes(s * (1.0 - s), s) and _vanishes(-(s * 2.0) / 3.0, s)
    assert not _vanishes(1.0 - s, s)  # 1 where the body is 0
    assert not _vanishes(s * E.row("qk0"), s)  # an unbounded factor: inf * 0
    assert not _vanishes(s / E.row("qk0"), s)  # a division by a tile value
    assert not _vanishes(s * float("inf"), s)


def test_the_lowering_gives_the_printer_its_exp2_forms_and_common_factors() -> None:
    """derive_tile_backward lowers the sigmoid of sigmoid attention to one exp2 of
    ``qk * c + o`` (c, o tile-invariant) and the scale every d body / d qk shares to one
    factor per accumulator (dK's and dQ's); the printer only prints them."""
    import ast
    from pathlib import Path

    from test_passes import NORMALISERS

    from attndsl.passes.pipeline import compile_cascade
    from attndsl.passes.tile_grad import derive_tile_backward

    b = derive_tile_backward(compile_cascade(NORMALISERS["sigmoid"][0]()).kernel)
    (u,) = b.unaries
    assert u.node.op.name == "SIGMOID" and u.dot is not None and u.coef is not None
    assert set(b.factors) == {"k", "q"} and all(len(f) == 1 for f in b.factors.values())
    printer = ast.parse((Path(__file__).parents[1] / "codegen" / "tile_backward.py").read_text())
    imported = {a.name for n in ast.walk(printer) if isinstance(n, ast.ImportFrom)
                for a in n.names}
    assert not imported & {"rewrite", "simplify", "RULES", "affine", "invariant"}


def test_a_one_minus_factor_of_a_derivative_is_multiplied_out() -> None:
    """a (1 - b) in d body / d qk is printed as a - a b (one FFMA per element, no 1 - b
    tile: sigmoid's fused dK/dV loop at D=64 on sm90 went from 167 to 150 registers and 536
    to 507 instructions).  The same value whenever a is finite, NaN for NaN; an infinite a
    gives NaN where a (1 - b) may be +-inf.  Anything else is left as it is."""
    import itertools

    from attndsl.ir import expr as E
    from attndsl.ir.expr import Op
    from attndsl.passes.tile_grad import multiplied_out

    a, b, c = (E.row(x) for x in ("a", "b", "c"))
    assert multiplied_out(a * (1.0 - b)) == a - a * b
    assert multiplied_out((1.0 - b) * a) == a - a * b
    assert multiplied_out(a * (1.0 - b) * c) == (a * c) - (a * c) * b
    for e in (1.0 - b, a * (2.0 - b), a * (b - 1.0), a * b, -(a * (1.0 - b)), a + (1.0 - b)):
        assert multiplied_out(e) == e
    values = (0.0, -0.0, 0.5, -3.25, 1.0, 7.0, float("inf"), -float("inf"), float("nan"))

    def ev(e: E.Expr, env: dict) -> torch.Tensor:
        if e.op is Op.ROW:
            return env[e.arg]
        if e.op is Op.CONST:
            return torch.tensor(e.arg, dtype=torch.float64)
        x = [ev(s, env) for s in e.src]
        return {Op.MUL: torch.mul, Op.SUB: torch.sub}[e.op](*x)

    for va, vb in itertools.product(values, repeat=2):
        env = {n: torch.tensor(v, dtype=torch.float64) for n, v in (("a", va), ("b", vb))}
        want, got = ev(a * (1.0 - b), env), ev(multiplied_out(a * (1.0 - b)), env)
        if not torch.isfinite(env["a"]):
            assert not torch.isfinite(got) and (torch.isnan(got) or got == want)
        elif torch.isnan(want):
            assert torch.isnan(got), (va, vb)
        else:
            assert torch.isclose(want, got), (va, vb, want, got)


def test_the_sigmoid_backward_loops_form_no_one_minus_tile() -> None:
    """Both fused backward loops of sigmoid attention multiply W by s - s s: no dqk statement
    subtracts the sigmoid from 1."""
    kernel = attndsl.compile(NORMALISERS["sigmoid"][0]())
    src = Path(kernel.fused_backward.__file__).read_text()
    lines = [x.strip() for x in src.splitlines() if x.strip().startswith("dqk = ")]
    assert len(lines) == 2, lines  # the step functions of the dK/dV and dQ kernels
    assert not any("(1.0 - " in x for x in lines), lines
    assert sum("w_l0 * ((sg0 - (sg0 * sg0)))" in x for x in lines) == 1, lines
