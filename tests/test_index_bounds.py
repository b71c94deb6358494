"""Subscripts of captured tensors follow torch's indexing: in-range negatives wrap once,
anything outside [-size, size) raises IndexError (naming the tensor, the dimension, the range
and the size) before the kernel runs -- from the kernel's launcher, the eager oracle, the mask
analysis and generated standalone modules alike; the kernel never reads out of bounds."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from attndsl.codegen.triton import _emit_index_ranges
from attndsl.codegen.writer import Lines as _Lines
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask as torch_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex

import attndsl
from attndsl import index_check as rt
from attndsl.block_mask import create_block_mask
from attndsl.cli import main
from attndsl.eager import eval_expr, run_cascade
from attndsl.frontend.flex import lower_flex
from attndsl.frontend.text import parse_text
from attndsl.ir import expr as E
from attndsl.ir.expr import Op
from attndsl.passes.index_bounds import IndexSite, nonneg, site_intervals
from attndsl.passes.pipeline import compile_cascade
from attndsl.runtime.modules import import_path, load_kernel_module, write_module

Tensor = torch.Tensor
L = 16


def _qkv(seed: int = 0, lq: int = L, lkv: int = L) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, lq, 16, generator=g)
    return q, torch.randn(1, 2, lkv, 16, generator=g), torch.randn(1, 2, lkv, 16, generator=g)


def _torch(q: Tensor, k: Tensor, v: Tensor, score_mod=None, mask_mod=None) -> Tensor:
    """torch's flex_attention (eager on the CPU); IndexError as torch raises it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bm = None if mask_mod is None else torch_block_mask(mask_mod, 1, 2, q.shape[2],
                                                            k.shape[2], device="cpu")
        return torch_flex(q, k, v, score_mod=score_mod, block_mask=bm)


def _outcome(fn) -> Tensor | IndexError:
    try:
        return fn()
    except IndexError as err:
        return err


def _oracle(q: Tensor, k: Tensor, v: Tensor, score_mod=None, mask_mod=None) -> Tensor:
    spec = lower_flex(score_mod, mask_mod)
    out = run_cascade(spec.cascade, {"Q": q, "K": k, "V": v, **spec.captured},
                      {"scale": 0.25, "G": 1})
    return out["O"].float()


def _agree(score_mod=None, mask_mod=None, lq: int = L, lkv: int = L) -> bool:
    """attndsl's kernel, its oracle and torch agree: the same output, or all raise IndexError.
    Returns whether the subscripts were in range."""
    q, k, v = _qkv(lq=lq, lkv=lkv)
    want = _outcome(lambda: _torch(q, k, v, score_mod, mask_mod))
    got = _outcome(lambda: attndsl.flex_attention(q, k, v, score_mod=score_mod,
                                                  mask_mod=mask_mod))
    ref = _outcome(lambda: _oracle(q, k, v, score_mod, mask_mod))
    if isinstance(want, IndexError):
        assert isinstance(got, IndexError), "the kernel ran where torch raises IndexError"
        assert isinstance(ref, IndexError), "the oracle ran where torch raises IndexError"
        assert "index out of range" in str(got) and "captured by" in str(got)
        return False
    assert not isinstance(got, IndexError), got
    assert not isinstance(ref, IndexError), ref
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ref, want, atol=2e-5, rtol=2e-5)
    return True


# -- kernel vs oracle vs torch over index offsets ---------------------------------------------

@given(size=st.sampled_from([4, 16, 24]), off=st.integers(-30, 30))
def test_score_mod_offsets_agree_with_torch(size: int, off: int) -> None:
    table = torch.randn(size, generator=torch.Generator().manual_seed(size))
    fine = _agree(score_mod=lambda s, b, h, q, kv: s + table[kv + off])
    assert fine == (-size <= off and L - 1 + off < size)


@given(size=st.sampled_from([16, 31, 40]), off=st.integers(-20, 20))
def test_relative_offsets_wrap_like_torch(size: int, off: int) -> None:
    """q - kv spans [-(L - 1), L - 1]: negative offsets read from the end, as in torch."""
    table = torch.randn(2, size, generator=torch.Generator().manual_seed(size))
    fine = _agree(score_mod=lambda s, b, h, q, kv: s + table[h, q - kv + off])
    assert fine == (-size <= off - (L - 1) and L - 1 + off < size)


@given(size=st.sampled_from([8, 16]), off=st.integers(-20, 20))
def test_mask_mod_offsets_agree_with_torch(size: int, off: int) -> None:
    allowed = torch.rand(size, generator=torch.Generator().manual_seed(size)) < 0.6
    allowed[0] = True
    fine = _agree(mask_mod=lambda b, h, q, kv: allowed[kv + off] | (kv == 0))
    assert fine == (-size <= off and L - 1 + off < size)


def test_where_selected_subscripts_are_proven_in_range() -> None:
    """The value of where(kv < 4, kv, 0) lies in [0, 3]: torch runs it, so must the kernel
    (the interval of the branch kv is narrowed by the condition)."""
    small = torch.randn(4)
    assert _agree(score_mod=lambda s, b, h, q, kv: s + small[torch.where(kv < 4, kv, 0)])
    assert _agree(score_mod=lambda s, b, h, q, kv: s + small[torch.clamp(kv - 2, -4, 3)])


def test_a_read_in_the_unselected_branch_is_still_checked() -> None:
    """torch evaluates both branches of where: small[kv] past the end raises there too."""
    small = torch.randn(4)
    assert not _agree(score_mod=lambda s, b, h, q, kv: torch.where(kv < 4, s + small[kv], s))


# -- data-dependent subscripts ----------------------------------------------------------------

def test_data_dependent_subscripts_wrap_and_bad_values_raise() -> None:
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(2, 5, generator=g)
    dist = torch.randint(-5, 5, (1, L, L), generator=g)
    assert _agree(score_mod=lambda s, b, h, q, kv: s + bias[h, dist[b, q, kv]])
    dist[0, 3, 7] = 5  # one value past the end
    assert not _agree(score_mod=lambda s, b, h, q, kv: s + bias[h, dist[b, q, kv]])
    q, k, v = _qkv()
    named = r"'cap1' \(bias, captured by <lambda>\(\)\) \(shape \(2, 5\)\)"
    with pytest.raises(IndexError, match=rf"subscript 1 .*{named} takes values in \[-5, 5\]"):
        attndsl.flex_attention(q, k, v,
                               score_mod=lambda s, b, h, q, kv: s + bias[h, dist[b, q, kv]])


def test_out_of_range_message_names_tensor_dimension_range_and_size() -> None:
    small = torch.randn(4)
    q, k, v = _qkv()
    with pytest.raises(IndexError) as info:
        attndsl.flex_attention(q, k, v, score_mod=lambda s, b, h, q, kv: s + small[kv])
    text = str(info.value)
    assert "'cap0' (small, captured by <lambda>()) (shape (4,))" in text and "[0, 15]" in text
    assert "dimension 0 has size 4" in text and "-4 .. 3" in text


def test_far_index_raises_instead_of_reading_memory() -> None:
    small = torch.randn(4)
    q, k, v = _qkv()
    with pytest.raises(IndexError, match=r"\[1000000, 1000015\]"):
        attndsl.flex_attention(q, k, v, score_mod=lambda s, b, h, q, kv: s + small[kv + 10**6])


# -- .attn specs --------------------------------------------------------------------------------

ATTN = """
spec shifted {
  index b: B batch, h: H head, m: M query, n: N key, e: E qk, f: F v
  input Q[B, H, M, E], K[B, H, N, E], V[B, H, N, F]
  tensor slopes[H]: float
  tensor table[T]: float
  param scale: float
  param off: int = 0
  S[b,h,m,n] = Q[b,h,m,e] * K[b,h,n,e] * scale - slopes[h + off] * (m - n) + table[n - m + off]
  P[b,h,m,n] = softmax(n) S[b,h,m,n]
  O[b,h,m,f] = P[b,h,m,n] * V[b,h,n,f]
  output O
}
"""


@given(off=st.integers(-12, 12), size=st.sampled_from([3, 12, 20]))
def test_attn_spec_offsets_kernel_and_oracle_agree(off: int, size: int) -> None:
    (c,) = parse_text(ATTN).values()
    module = load_kernel_module(compile_cascade(c).kernel)
    g = torch.Generator().manual_seed(size)
    q, k, v = (torch.randn(1, 2, 10, 16, generator=g) for _ in range(3))
    captured = {"slopes": torch.randn(2, generator=g), "table": torch.randn(size, generator=g)}
    params = {"scale": 0.25, "off": off}
    got = _outcome(lambda: module.launch({"Q": q, "K": k, "V": v}, params, captured)["O"])
    ref = _outcome(lambda: run_cascade(c, {"Q": q, "K": k, "V": v, **captured}, params)["O"])
    slopes_ok, table_ok = -2 <= off <= 0, -size <= off - 9 and 9 + off < size
    if not (slopes_ok and table_ok):
        assert isinstance(got, IndexError) and isinstance(ref, IndexError), (got, ref)
        if slopes_ok or table_ok:  # one site out of range: the same tensor, range and size
            assert str(got).split(" of tensor")[1] == str(ref).split(" of tensor")[1]
        return
    # the same values as the wrap written out by hand
    i = torch.arange(10)
    bias = captured["table"][(i[None, :] - i[:, None] + off) % size]
    slope = captured["slopes"][(torch.arange(2) + off) % 2]
    s = q @ k.transpose(-1, -2) * 0.25 - slope[:, None, None] * (i[:, None] - i[None, :]) + bias
    want = torch.softmax(s, -1) @ v
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ref.float(), want, atol=2e-5, rtol=2e-5)


def test_attn_check_reports_an_out_of_range_subscript(tmp_path: Path, capsys) -> None:
    bad = (Path(__file__).resolve().parent.parent / "examples" / "alibi.attn").read_text()
    path = tmp_path / "bad.attn"
    path.write_text(bad.replace("slopes[h] * (m - n)", "slopes[h - 100] * (m - n)"))
    assert main(["check", str(path), "--trials", "1", "--dtypes", "fp32"]) == 2
    err = capsys.readouterr().err
    assert "index out of range: subscript 0 (h - 100) of tensor 'slopes'" in err
    assert "Traceback" not in err


def test_input_subscripts_do_not_wrap() -> None:
    """Operands (Q/K/V-side inputs) take 0 <= i < size only, in the kernel and the oracle."""
    text = ATTN.replace("K[b,h,n,e]", "K[b,h - off,n,e]").replace("slopes[h + off]",
                                                                  "slopes[h]")
    (c,) = parse_text(text).values()
    module = load_kernel_module(compile_cascade(c).kernel)
    q = torch.randn(1, 2, 4, 16)
    tensors = {"Q": q, "K": q, "V": q}
    cap = {"slopes": torch.randn(2), "table": torch.randn(8)}
    for run in (lambda: module.launch(tensors, {"off": 1}, cap),
                lambda: run_cascade(c, {**tensors, **cap}, {"off": 1, "scale": 0.1})):
        with pytest.raises(IndexError, match=r"'K'.*\[-1, 0\].*valid indices: 0 \.\. 1\)"):
            run()


# -- standalone modules, the mask analysis, gradients -------------------------------------------

def test_standalone_module_checks_subscripts_itself(tmp_path: Path) -> None:
    table = torch.randn(2, 31)
    kernel = attndsl.compile(score_mod=lambda s, b, h, q, kv: s + table[h, q - kv])
    module = import_path(write_module(kernel.source, tmp_path / "rel.py"))
    q, k, v = _qkv()
    inputs = {"Q": q, "K": k, "V": v}
    out = module.launch(inputs, {"scale": 0.25}, {"cap0": torch.randn(2, 16)})["O"]  # wraps
    assert torch.isfinite(out).all()
    with pytest.raises(IndexError, match=r"'cap0' \(shape \(2, 8\)\) takes values in \[-15, 15\]"):
        module.launch(inputs, {"scale": 0.25}, {"cap0": torch.randn(2, 8)})
    source = Path(module.__file__).read_text()
    assert "def index_ranges(V: dict, T: dict)" in source and "import attndsl" not in source


def test_block_masks_read_negative_subscripts_from_the_end() -> None:
    """A mask reading doc[kv - 1]: kv = 0 reads the last id (the analysis used to clamp it)."""
    g = torch.Generator().manual_seed(5)
    doc = torch.sort(torch.randint(0, 3, (200,), generator=g)).values

    def mask(b, h, q, kv):
        return doc[kv - 1] == doc[q]

    ours = create_block_mask(mask, 1, 1, 200, 200, BLOCK_SIZE=32)
    theirs = torch_block_mask(mask, 1, 1, 200, 200, device="cpu", BLOCK_SIZE=32)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    q, k, v = _qkv(lq=200, lkv=200)
    torch.testing.assert_close(attndsl.flex_attention(q, k, v, mask_mod=mask),
                               _torch(q, k, v, mask_mod=mask), atol=2e-5, rtol=2e-5)
    with pytest.raises(IndexError, match="'cap0'"):
        create_block_mask(lambda b, h, q, kv: doc[kv + 1] > 0, 1, 1, 200, 200)


def test_gradients_flow_to_the_wrapped_elements() -> None:
    q, k, v = (t.requires_grad_() for t in _qkv(lq=20, lkv=20))
    rel = torch.randn(2, 20, requires_grad=True)
    out = attndsl.flex_attention(q, k, v, score_mod=lambda s, b, h, qi, kv: s + rel[h, qi - kv])
    i = torch.arange(20)
    s = q @ k.transpose(-1, -2) * 0.25 + rel[:, i[:, None] - i[None, :]][None]
    ref = torch.softmax(s, -1) @ v
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, rel), g),
                    torch.autograd.grad(ref, (q, k, v, rel), g)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


# -- the interval rules -------------------------------------------------------------------------

_m, _n = E.index("m"), E.index("n")
_EXTENTS = {"m": "M", "n": "N"}


def _ints() -> st.SearchStrategy:
    leaves = st.one_of(st.just(_m), st.just(_n), st.integers(-20, 20).map(E.const))
    nonzero = st.integers(-9, 9).filter(bool).map(E.const)

    def extend(sub: st.SearchStrategy) -> st.SearchStrategy:
        two = st.tuples(sub, sub)
        cmp = st.tuples(st.sampled_from([Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE]), two).map(
            lambda t: E.binary(t[0], *t[1]))
        cond = st.one_of(cmp, st.tuples(cmp, cmp).map(lambda t: E.binary(Op.AND, *t)),
                         cmp.map(lambda c: E.unary(Op.NOT, c)))
        return st.one_of(
            st.tuples(st.sampled_from([Op.ADD, Op.SUB, Op.MUL, Op.MAX, Op.MIN]), two).map(
                lambda t: E.binary(t[0], *t[1])),
            st.tuples(st.sampled_from([Op.FLOORDIV, Op.MOD]), sub, nonzero).map(
                lambda t: E.binary(t[0], t[1], t[2])),
            sub.map(lambda x: E.unary(Op.ABS, x)), sub.map(lambda x: E.unary(Op.NEG, x)),
            st.tuples(cond, sub, sub).map(lambda t: E.where(*t)),
            sub.map(lambda x: E.unary(Op.CAST, E.binary(Op.DIV, x, 3.0), "int")),
        )
    return st.recursive(leaves, extend, max_leaves=7)


def _printed(sites: list[IndexSite], values: dict) -> list:
    """The intervals as the printed ``index_ranges`` of a generated module computes them."""
    lines = _Lines()
    _emit_index_ranges(SimpleNamespace(index_extents=tuple(_EXTENTS.items()),
                                       index_sites=tuple(sites)), lines)
    scope: dict = {"torch": torch}
    exec(rt.runtime_source() + "\n".join(lines.out), scope)  # noqa: S102 - generated here
    return [iv for _, _, iv, _, _ in scope["index_ranges"](values, {})]


@pytest.mark.filterwarnings("ignore:Generating overly large repr")
@settings(max_examples=200)
@given(e=_ints(), M=st.integers(0, 12), N=st.integers(1, 12))
def test_launch_interval_rules_are_sound_and_printed_alike(e: E.Expr, M: int, N: int) -> None:
    site = IndexSite("t", 0, e, True)
    sizes = {"M": M, "N": N}
    (_, _, iv, _), = site_intervals([site], sizes, {}, {}, _EXTENTS)
    assert _printed([site], sizes) == [iv]
    ranges = {"m": torch.arange(M), "n": torch.arange(N)}
    vals = eval_expr(e, ["m", "n"], ranges, {}).expand(M, N)
    if not vals.numel():
        return
    assert iv is not None
    assert iv[0] <= int(vals.min()) and int(vals.max()) <= iv[1], (E.render(e), iv)
    if nonneg(e, _EXTENTS):
        assert int(vals.min()) >= 0, E.render(e)


def test_interval_check_costs_no_kernel_evaluation() -> None:
    """The check reads extents and, for data in subscripts, one min/max per tensor."""
    e = E.load("bias", (E.index("h"), E.load("dist", (E.index("m"), E.index("n")), "int")))
    dist = torch.tensor([[-2, 1], [0, 3]])
    sites = [IndexSite("bias", 1, e.src[1], True)]
    (_, _, iv, _), = site_intervals(sites, {"H": 2, "M": 2, "N": 2}, {},
                                   {"dist": dist}, {"h": "H", "m": "M", "n": "N"})
    assert iv == (-2, 3)
    assert rt.index_error("bias", 1, (2, 4), iv) is None
    assert "takes values in [-2, 3]" in str(rt.index_error("bias", 1, (2, 3), iv))


def test_every_unary_and_binary_operation_has_an_interval_rule():
    """The generated modules evaluate intervals of any integer node (I32_INDICES, subscript
    checks): a missing rule was a NameError at launch (xor in a mask)."""
    import attndsl.index_check as rt
    from attndsl.ir import expr as E

    for op in E.UNARY | E.BINARY:
        for dtype in ("int", "float", "bool"):
            for arg in (("int", "float", "bool") if op is E.Op.CAST else (None,)):
                assert hasattr(rt, rt.rule_name(op.name, dtype, arg)), (op, dtype, arg)


@pytest.mark.parametrize("a, b", [((0, 5), (3, 9)), ((2, 2), (7, 7)), ((0, 40), (0, 40))])
def test_xor_and_shift_intervals_contain_every_value(a, b):
    import attndsl.index_check as rt

    for rule, fn in ((rt._iv_xor_int, lambda x, y: x ^ y), (rt._iv_rshift, lambda x, y: x >> y),
                     (rt._iv_lshift, lambda x, y: x << y)):
        lo, hi = rule(a, b)
        for x in range(a[0], a[1] + 1):
            for y in range(b[0], b[1] + 1):
                assert lo <= fn(x, y) <= hi
    lo, hi = rt._iv_invert(a)
    assert all(lo <= ~x <= hi for x in range(a[0], a[1] + 1))
