"""Every variant in examples/ through attndsl's generated kernel, against two references.

* the float64 oracle (``attndsl.run_cascade`` on the kernel's own Cascade IR), over random
  shapes: batch, heads (grouped for GQA examples), odd and unequal lengths down to 1, head
  dims, and the three input dtypes; output and log-sum-exp, fully masked rows included;
* torch's eager ``flex_attention`` (float32, CPU) with a ``create_block_mask`` block mask, on
  one fixed case per example.
"""

from __future__ import annotations

import importlib
import math
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

import attndsl

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLES_DIR))  # the examples import _common and each other by name
EXAMPLES = sorted(p.stem for p in EXAMPLES_DIR.glob("*.py") if not p.stem.startswith("_"))

# (atol, rtol) of the output per input dtype; the log-sum-exp is float32 for every dtype
# (scores accumulate in float32), so it gets one tolerance.
O_TOL = {torch.float32: (5e-5, 5e-5), torch.float16: (5e-3, 5e-3),
         torch.bfloat16: (3e-2, 3e-2)}
LSE_TOL = (5e-5, 5e-5)
DTYPES = list(O_TOL)
HEAD_DIMS = (16, 32, 48, 80)
LENGTHS = st.one_of(st.sampled_from([1, 2, 31, 32, 33, 63, 64, 65, 96]), st.integers(1, 96))

# Log-sum-exp of a fully masked row: the interpreter's numpy log(0) warns on its way to -inf.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log")


def load(name: str) -> ModuleType:
    return importlib.import_module(name)


def oracle(mods: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           scale: float) -> dict[str, torch.Tensor]:
    """O, LSE and MAX in float64, from the same (rounded) inputs the kernel reads."""
    kernel = attndsl.compile(score_mod=mods["score_mod"], mask_mod=mods["mask_mod"])
    return attndsl.run_cascade(kernel.compiled.cascade,
                               {"Q": q, "K": k, "V": v, **kernel.captured},
                               {"scale": scale, "G": q.shape[1] // k.shape[1]})


def assert_matches_oracle(out: torch.Tensor, lse: torch.Tensor, ref: dict[str, torch.Tensor],
                          dtype: torch.dtype) -> None:
    """Close where a row sees a key; exactly 0 and -inf where it sees none; never NaN."""
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not torch.isnan(out).any(), "NaN in the output"
    assert not torch.isnan(lse).any(), "NaN in the log-sum-exp"
    empty = torch.isneginf(ref["LSE"])
    assert torch.equal(torch.isneginf(lse), empty), "fully masked rows differ from the oracle's"
    assert not torch.isposinf(lse).any()
    assert (out[empty] == 0).all(), "a fully masked row is not 0"
    atol, rtol = O_TOL[dtype]
    torch.testing.assert_close(out.double(), ref["O"], atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double()[~empty], ref["LSE"][~empty], atol=LSE_TOL[0],
                               rtol=LSE_TOL[1])


@st.composite
def shapes(draw: st.DrawFn, gqa: bool) -> dict:
    """B, H, Hkv, Lq, Lkv, E (query/key head dim), F (value head dim)."""
    hkv = draw(st.integers(1, 2) if gqa else st.integers(1, 4))
    group = draw(st.sampled_from([1, 2] if hkv == 2 else [1, 2, 4])) if gqa else 1
    return {"B": draw(st.integers(1, 2)), "H": hkv * group, "Hkv": hkv, "Lq": draw(LENGTHS),
            "Lkv": draw(LENGTHS), "E": draw(st.sampled_from(HEAD_DIMS)),
            "F": draw(st.sampled_from(HEAD_DIMS))}


def random_qkv(s: dict, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(s["B"], s["H"], s["Lq"], s["E"], generator=gen)
    k = torch.randn(s["B"], s["Hkv"], s["Lkv"], s["E"], generator=gen)
    v = torch.randn(s["B"], s["Hkv"], s["Lkv"], s["F"], generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def check_example(name: str, s: dict, dtype: torch.dtype) -> None:
    module = load(name)
    gqa = getattr(module, "ENABLE_GQA", False)
    q, k, v = random_qkv(s, dtype)
    mods = module.make(s["B"], s["H"], s["Lq"], s["Lkv"])
    out, lse = attndsl.flex_attention(q, k, v, score_mod=mods["score_mod"],
                                      mask_mod=mods["mask_mod"], enable_gqa=gqa,
                                      return_lse=True)
    assert out.shape == (s["B"], s["H"], s["Lq"], s["F"])
    assert lse.shape == (s["B"], s["H"], s["Lq"])
    assert_matches_oracle(out, lse, oracle(mods, q, k, v, 1.0 / math.sqrt(s["E"])), dtype)


@pytest.mark.parametrize("name", EXAMPLES)
@given(data=st.data(), dtype=st.sampled_from(DTYPES))
def test_example_matches_oracle(name: str, data: st.DataObject, dtype: torch.dtype) -> None:
    check_example(name, data.draw(shapes(getattr(load(name), "ENABLE_GQA", False))), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_fixed_case(name: str, dtype: torch.dtype) -> None:
    """Every dtype, at odd unequal lengths (and grouped heads for GQA examples)."""
    gqa = getattr(load(name), "ENABLE_GQA", False)
    check_example(name, {"B": 2, "H": 4, "Hkv": 2 if gqa else 4, "Lq": 37, "Lkv": 91, "E": 48,
                         "F": 80}, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_fully_masked_rows(dtype: torch.dtype) -> None:
    """A causal 64-window with 96 queries over 20 keys: queries 84.. see no key at all."""
    s = {"B": 2, "H": 2, "Hkv": 2, "Lq": 96, "Lkv": 20, "E": 32, "F": 48}
    q, k, v = random_qkv(s, dtype)
    mods = load("sliding_window").make(s["B"], s["H"], s["Lq"], s["Lkv"])
    out, lse = attndsl.flex_attention(q, k, v, mask_mod=mods["mask_mod"], return_lse=True)
    ref = oracle(mods, q, k, v, 1.0 / math.sqrt(s["E"]))
    assert torch.isneginf(lse[:, :, 84:]).all() and torch.isfinite(lse[:, :, :84]).all()
    assert (out[:, :, 84:] == 0).all()
    assert_matches_oracle(out, lse, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_everything_masked(dtype: torch.dtype) -> None:
    s = {"B": 1, "H": 2, "Hkv": 2, "Lq": 40, "Lkv": 70, "E": 16, "F": 16}
    q, k, v = random_qkv(s, dtype)

    def nothing(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                kv_idx: torch.Tensor) -> torch.Tensor:
        return kv_idx < 0

    out, lse = attndsl.flex_attention(q, k, v, mask_mod=nothing, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_matches_torch(name: str) -> None:
    """attndsl against torch's eager flex_attention on rows that see at least one key."""
    module = load(name)
    gqa = getattr(module, "ENABLE_GQA", False)
    s = {"B": 2, "H": 4, "Hkv": 2 if gqa else 4, "Lq": 45, "Lkv": 77, "E": 32, "F": 48}
    q, k, v = random_qkv(s, torch.float32, seed=1)
    mods = module.make(s["B"], s["H"], s["Lq"], s["Lkv"])
    block_mask = None
    if mods["mask_mod"] is not None:
        block_mask = create_block_mask(mods["mask_mod"], s["B"], s["H"], s["Lq"], s["Lkv"],
                                       device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        ref, aux = torch_flex_attention(q, k, v, score_mod=mods["score_mod"],
                                        block_mask=block_mask, enable_gqa=gqa,
                                        return_aux=AuxRequest(lse=True))
    out, lse = attndsl.flex_attention(q, k, v, score_mod=mods["score_mod"],
                                      mask_mod=mods["mask_mod"], enable_gqa=gqa,
                                      return_lse=True)
    seen = torch.isfinite(aux.lse)  # torch's fully masked rows may be NaN or 0: skip them
    assert torch.isneginf(lse[~seen]).all() and (out[~seen] == 0).all()
    torch.testing.assert_close(out[seen], ref[seen], atol=5e-5, rtol=5e-5)
    torch.testing.assert_close(lse[seen], aux.lse[seen], atol=5e-5, rtol=5e-5)
