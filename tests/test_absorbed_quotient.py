"""The printer's fast division (``absorbed-quotient`` in codegen/expr.py): ``a - b / z`` with
constants a, b and a divisor bounded away from zero is printed with ``_absorbed_div``, the
reciprocal-and-multiply division that equals Triton's full-range ``/`` except for |z| > 2**126,
where a absorbs the quotient either way.  Tanh (softcap) is the form that has it."""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch
import triton.language as tl
from attndsl.codegen.expr import HELPERS, lower_for_print

from attndsl.frontend.flex import lower_flex
from attndsl.ir import expr as E
from attndsl.ir.expr import Op
from attndsl.passes.pipeline import compile_cascade
from attndsl.runtime.aot import compile_kernel
from attndsl.runtime.modules import load_source, module_source

X = E.row("x")  # a value a launch decides: any float


def _absorbed(e: E.Expr) -> list[E.Expr]:
    """The divisions of ``e`` in printed form that are marked for the fast division."""
    return [n for n in lower_for_print(e).walk() if n.op is Op.TRUEDIV and n.arg == "absorbed"]


def _exp2_plus(c: float) -> E.Expr:
    return E.binary(Op.ADD, E.unary(Op.EXP2, X), E.const(c))


def test_a_capped_tanh_divides_with_the_fast_division() -> None:
    """30 tanh(x / 30) lowers to A - B / (2^(x c) + 1): the divisor is >= 1, A and B are
    constants, so its one division is the fast one."""
    capped = E.binary(Op.MUL, E.const(30.0),
                      E.unary(Op.TANH, E.binary(Op.MUL, X, E.const(1 / 30))))
    (q,) = _absorbed(capped)
    assert q.src[0].op is Op.CONST and q.src[1].op is Op.ADD
    assert _absorbed(E.unary(Op.TANH, X))  # tanh alone: 1 - 2 / (2^(2 x log2 e) + 1)


DIVISIONS_KEPT = {
    # the divisor may be 0 or subnormal
    "any divisor": E.binary(Op.SUB, E.const(1.0), E.binary(Op.TRUEDIV, E.const(2.0), X)),
    "divisor >= 1e-40": E.binary(Op.SUB, E.const(1.0),
                                 E.binary(Op.TRUEDIV, E.const(2.0), _exp2_plus(1e-40))),
    # the addend is not a constant, or is 0: the quotient is (part of) the value
    "row addend": E.binary(Op.SUB, X, E.binary(Op.TRUEDIV, E.const(2.0), _exp2_plus(1.0))),
    "no addend": E.binary(Op.SUB, E.const(0.0),
                          E.binary(Op.TRUEDIV, E.const(2.0), _exp2_plus(1.0))),
    # a quotient of 1e30 / 2**127 is not below a quarter ulp of 1
    "numerator 2**90 times the addend": E.binary(
        Op.SUB, E.const(1.0), E.binary(Op.TRUEDIV, E.const(1e30), _exp2_plus(1.0))),
    "a row numerator": E.binary(Op.SUB, E.const(1.0), E.binary(Op.TRUEDIV, X, _exp2_plus(1.0))),
}


@pytest.mark.parametrize("name", sorted(DIVISIONS_KEPT))
def test_a_quotient_the_addend_may_not_absorb_keeps_the_full_range_division(name: str) -> None:
    assert not _absorbed(DIVISIONS_KEPT[name])


def test_a_softcap_kernel_prints_its_division_as_the_fast_one() -> None:
    """The literal cap's score is A - _absorbed_div(B, 2^(qk c) + 1) in the key-tile step,
    and the module defines the helper."""
    def softcap(score, b, h, q_idx, kv_idx):
        return 20 * torch.tanh(score / 20)

    source = module_source(compile_cascade(lower_flex(softcap).cascade).kernel)
    score = re.search(r"^\s*y_m_i = (.*)$", source, re.M).group(1)
    assert re.fullmatch(r"\([\d.]+ - _absorbed_div\([\d.]+, \(tl\.exp2\(\(qk \* c\d+\)\) "
                        r"\+ 1\.0\)\)\)", score), score
    assert "def _absorbed_div(a, b):" in source


_DIV_PROBE = """
import triton
import triton.language as tl
""" + HELPERS + """

@triton.jit
def _div_probe(z_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    z = tl.load(z_ptr + offs)
    tl.store(out_ptr + offs, 43.2808512266689 - _absorbed_div(86.5617024533378, z))
"""


def test_the_fast_division_gives_the_full_range_value_on_every_kind_of_divisor() -> None:
    """43.28 - 86.56 / z on z in [1, 2**126], past it, +-inf, +-0 and NaN (where Triton has
    tl.fdiv(approx=True) the helper uses it, elsewhere /): the fp32 quotient subtracted as
    torch does it."""
    special = [1.0, 3.0, 2.0 ** 60, 2.0 ** 126, 2.0 ** 126 * 1.5, 2.0 ** 127, 3e38, math.inf,
               -math.inf, 0.0, -0.0, math.nan, -7.0, 1e-30, 2.0 ** -120, 0.5]
    z = torch.tensor(special, dtype=torch.float32)
    out = torch.empty_like(z)
    module = load_source(_DIV_PROBE, prefix="div_probe")
    module._div_probe[(1,)](z, out, N=len(special))
    want = torch.tensor(43.2808512266689) - torch.tensor(86.5617024533378) / z
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out[~want.isnan()], want[~want.isnan()])
    approx = "approx" in inspect.signature(tl.fdiv).parameters
    assert module._DIV_PATH == ("approx" if approx else "slash")  # the tests interpret


def _fdiv_without_approx(x, y, ieee_rounding=False):  # triton < 3.9's tl.fdiv signature
    raise AssertionError("only the signature is read")


def _fdiv_with_approx(x, y, ieee_rounding=False, approx=False):  # triton >= 3.9's
    raise AssertionError("only the signature is read")


@pytest.mark.parametrize(("fdiv", "interpret", "path"), [
    (_fdiv_with_approx, False, "approx"), (_fdiv_with_approx, True, "approx"),
    (_fdiv_without_approx, False, "asm"), (_fdiv_without_approx, True, "slash"),
])
def test_the_printed_helper_divides_with_approx_inline_ptx_or_slash_as_triton_allows(
        fdiv, interpret: bool, path: str) -> None:
    """The module's ``_DIV_PATH``, as printed, against the triton it is imported with:
    tl.fdiv(approx=True) where tl.fdiv takes ``approx``; else div.approx.f32 as inline PTX when
    triton.jit compiles (TRITON_INTERPRET off), / under the interpreter (no PTX there)."""
    (stmt,) = re.findall(r"^_DIV_PATH = .*?(?=\n\n)", HELPERS, re.M | re.S)
    fake_tl = type("tl", (), {"constexpr": tl.constexpr, "fdiv": staticmethod(fdiv)})
    fake_runtime = type("runtime", (), {"interpret": interpret})
    fake_triton = type("triton", (), {"knobs": type("knobs", (), {"runtime": fake_runtime})})
    scope = {"inspect": inspect, "tl": fake_tl, "triton": fake_triton}
    exec(stmt, scope)
    assert scope["_DIV_PATH"] == tl.constexpr(path)
    # the helper has a branch for it (/ is the last one)
    assert f'_DIV_PATH == "{path}"' in HELPERS if path != "slash" else "return a / b" in HELPERS


_DIV_LOOP = """

@triton.jit
def _div_loop(q_ptr, k_ptr, out_ptr, n_tiles):
    offs = tl.arange(0, 16)
    tile = offs[:, None] * 16 + offs[None, :]
    q = tl.load(q_ptr + tile)
    acc = tl.zeros([16, 16], tl.float32)
    for i in range(n_tiles):
        s = tl.dot(q, tl.load(k_ptr + i * 256 + tile))
        acc += 43.2808512266689 - _absorbed_div(86.5617024533378, tl.exp2(s) + 1.0)
    tl.store(out_ptr + tile, acc)
"""


@pytest.mark.parametrize("path", ["approx", "asm", "slash"])
def test_the_compiled_fast_division_has_no_compare_or_select_of_the_full_range_one(
        path: str) -> None:
    """A score loop compiled for sm80 with ``_DIV_PATH`` set to each path: the fast ones
    (tl.fdiv(approx=True), the inline div.approx.f32) have no FSETP or FSEL in the loop; /
    (div.full.f32) has its compare and select, one per element."""
    if path == "approx" and "approx" not in inspect.signature(tl.fdiv).parameters:
        pytest.skip("this triton has no tl.fdiv(approx=True)")
    helpers = re.sub(r"^_DIV_PATH = .*?(?=\n\n)", f'_DIV_PATH = tl.constexpr("{path}")', HELPERS,
                     flags=re.M | re.S)
    source = "import triton\nimport triton.language as tl\n" + helpers + _DIV_LOOP
    module = load_source(source, prefix=f"div_loop_{path}")
    report = compile_kernel(module._div_loop, {"q_ptr": "*fp16", "k_ptr": "*fp16",
                                               "out_ptr": "*fp32", "n_tiles": "i32"},
                            {}, "sm80", 4, 1)
    (loop,) = report.loops
    compares = sum(n for op, n in loop.opcodes.items() if op.startswith(("FSETP", "FSEL")))
    assert (compares == 0) == (path != "slash"), loop.opcodes
