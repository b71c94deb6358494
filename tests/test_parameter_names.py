"""Every entry point that takes ``params`` by name refuses a name the spec does not declare and
a value of the wrong type, naming what it accepts: a misspelt name used to run the default
silently in standalone modules, linear and delta-rule runs, decode and context parallelism,
and a float for an int parameter failed inside Triton's interpreter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import attndsl
from attndsl.autograd import load_backward_module
from attndsl.frontend.flex import lower_flex
from attndsl.runtime.modules import import_path, write_module

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
AttentionInputError = ValueError  # the modules' own error class derives from it

WIDTH = attndsl.cascade("""
spec width {
  index b: B batch, h: H head, m: M query, n: N key, e: E qk, f: F v
  input Q[B, H, M, E], K[B, H, N, E], V[B, H, N, F]
  param scale: float
  param w: int = 2
  param unused: float
  S[b,h,m,n] = Q[b,h,m,e] * K[b,h,n,e] * scale + (m - n) // w
  O[b,h,m,f] = softmax(n) S[b,h,m,n] * V[b,h,n,f]
  output O
}""")


def _causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def _qkv(h: int = 2, length: int = 24) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {n: torch.randn(1, h, length, 16, generator=gen) for n in "QKV"}


@pytest.fixture(scope="module")
def width_module(tmp_path_factory: pytest.TempPathFactory):
    """The standalone module ``attndsl compile`` would write for WIDTH, imported directly."""
    source = attndsl.compile(WIDTH).source
    return import_path(write_module(source, tmp_path_factory.mktemp("m") / "width.py"))


STANDALONE_FAULTS = {
    "a misspelt name": ({"sclae": 0.5}, r"params names 'sclae', which is not a parameter of "
                                        r"this kernel; its parameters are \['scale', 'unused', "
                                        r"'w'\]"),
    "an extent, read off the tensors": ({"N": 1000}, r"params names 'N'"),
    "a float for an int parameter": ({"w": 2.0}, r"parameter 'w' is 2.0 \(float\); expected "
                                                 r"an int"),
    "a fraction for an int parameter": ({"w": 2.5}, r"parameter 'w' is 2.5"),
    "a string scale": ({"scale": "0.5"}, r"parameter 'scale' is '0.5' \(str\); expected a "
                                         r"real number"),
    "a bool": ({"w": True}, r"parameter 'w' is True"),
    "not a dict": ([("scale", 0.5)], r"params must be a dict"),
    "an int past int64": ({"w": 2**63}, r"parameter 'w' is 9223372036854775808; expected an "
                                        r"int in \[-2\*\*63, 2\*\*63\)"),
    "an int below int64": ({"w": -2**63 - 1}, r"parameter 'w' is -9223372036854775809"),
}


@pytest.mark.parametrize("fault", sorted(STANDALONE_FAULTS))
def test_a_standalone_module_refuses_params_it_does_not_declare_or_of_the_wrong_type(
        width_module, fault: str) -> None:
    params, match = STANDALONE_FAULTS[fault]
    with pytest.raises(AttentionInputError, match=match):
        width_module.launch(_qkv(), params)


def test_a_standalone_module_takes_every_declared_parameter_even_an_unused_one(
        width_module) -> None:
    """``attndsl check`` binds every declared parameter, used by the kernel or not; numpy
    integers are integers."""
    import numpy as np

    inputs = _qkv()
    params = {"scale": 0.25, "w": np.int64(3), "unused": 1}
    out = width_module.launch(inputs, params)["O"]
    ref = attndsl.run_cascade(WIDTH, inputs, {"scale": 0.25, "w": 3, "unused": 1.0})["O"]
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_a_kernel_call_refuses_a_float_for_an_int_parameter() -> None:
    """It used to reach Triton's interpreter (an InterpreterError about fp32)."""
    kernel = attndsl.compile(WIDTH)
    with pytest.raises(attndsl.AttentionError, match=r"parameter 'w' must be an int, got 2.5"):
        kernel(_qkv(), {"w": 2.5})


@pytest.mark.parametrize("value", [2**63, -2**63 - 1, 2**70])
def test_a_kernel_call_refuses_an_int_parameter_that_int64_does_not_hold(value: int) -> None:
    """It used to reach Triton's launcher (an OverflowError about specialisation)."""
    kernel = attndsl.compile(WIDTH)
    with pytest.raises(attndsl.AttentionError, match=rf"parameter 'w' is {value}; expected an "
                                                     r"int in \[-2\*\*63, 2\*\*63\)"):
        kernel(_qkv(), {"w": value})


def test_the_oracle_refuses_an_int_parameter_that_int64_does_not_hold() -> None:
    """It used to fail inside torch ("Overflow when unpacking long long")."""
    with pytest.raises(ValueError, match=r"parameter 'w' of width is 9223372036854775808; "
                                         r"expected an int in \[-2\*\*63, 2\*\*63\)"):
        attndsl.run_cascade(WIDTH, _qkv(), {"scale": 0.25, "w": 2**63, "unused": 1.0})


def test_a_group_size_outside_int32_is_refused_by_the_forward_and_fused_backward() -> None:
    """The GQA group size is a constexpr of the kernels' int32 head arithmetic: 2**40 used to
    fail inside Triton ("Scalar 1099511627776 is out of range for type int32")."""
    kernel = attndsl.compile(attndsl.frontend.text.parse_file(EXAMPLES / "gqa_causal.attn")[
        "gqa_causal"])
    gen = torch.Generator().manual_seed(0)
    inputs = {"Q": torch.randn(1, 4, 5, 16, generator=gen),
              "K": torch.randn(1, 2, 5, 16, generator=gen),
              "V": torch.randn(1, 2, 5, 16, generator=gen)}
    match = r"parameter 'G' is 1099511627776; expected an int in \[-2\*\*31, 2\*\*31\)"
    with pytest.raises(AttentionInputError, match=match):
        kernel(inputs, {"G": 2**40})
    with pytest.raises(AttentionInputError, match=match):
        kernel.fused_backward.launch_backward(inputs, {"G": 2**40}, {},
                                              {"O": torch.ones(1, 4, 5, 16)})


def test_the_fused_backward_module_refuses_a_misspelt_parameter() -> None:
    kernel = attndsl.compile(WIDTH)
    module = kernel.fused_backward
    assert module is not None
    inputs = _qkv()
    with pytest.raises(AttentionInputError, match=r"params names 'sclae'"):
        module.launch_backward(inputs, {"sclae": 0.5}, {}, {"O": torch.ones(1, 2, 24, 16)})


def test_the_flex_backward_module_refuses_a_misspelt_parameter_and_a_wrong_group() -> None:
    spec = lower_flex(None, _causal)
    forward = attndsl.compile(mask_mod=_causal).module
    module = load_backward_module(spec.cascade)
    inputs = _qkv()
    fwd = forward.launch(inputs, {"scale": 0.25})
    outputs, grads = {"O": fwd["O"], "LSE": fwd["LSE"]}, {"O": torch.ones_like(fwd["O"])}
    with pytest.raises(AttentionInputError, match=r"params names 'sclae'.*\['G', 'scale'\]"):
        module.launch_backward(inputs, outputs, grads, {"sclae": 0.25})
    with pytest.raises(AttentionInputError, match=r"G = 2, but the head counts make 1"):
        module.launch_backward(inputs, outputs, grads, {"scale": 0.25, "G": 2})
    same = module.launch_backward(inputs, outputs, grads, {"scale": 0.25, "G": 1})
    plain = module.launch_backward(inputs, outputs, grads, {"scale": 0.25})
    torch.testing.assert_close(same["Q"], plain["Q"])


@pytest.mark.parametrize("example", ["retention", "deltanet"])
def test_linear_and_delta_rule_runs_refuse_a_misspelt_parameter(example: str) -> None:
    cascade = attndsl.parse_file(EXAMPLES / f"{example}.attn")[example]
    kernel = attndsl.compile(cascade)
    inputs = _qkv(length=16)
    captured = {"c": torch.zeros(2)} if example == "retention" else {}
    if example == "deltanet":
        captured = {t.name: torch.rand(1, 2, 16) for t in cascade.tensors
                    if t.kind == "captured"}
    with pytest.raises(attndsl.AttentionError, match=r"params names 'sclae'"):
        kernel.linear(inputs, {"sclae": 0.5}, captured)


def test_decode_refuses_params_without_a_cascade_and_a_misspelt_cascade_parameter() -> None:
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 20, 16)
    lengths = torch.tensor([20])
    with pytest.raises(attndsl.AttentionError, match=r"decode: params= holds a cascade's"):
        attndsl.decode(q, k, k, lengths, mask_mod=_causal, params={"scale": 0.5})
    cascade = attndsl.parse_file(EXAMPLES / "off_by_one.attn")["off_by_one"]
    with pytest.raises(attndsl.AttentionError, match=r"params names 'sclae'"):
        attndsl.decode(q, k, k, lengths, cascade=cascade, params={"sclae": 0.5})


@pytest.mark.parametrize("scale", ["0.5", True, [0.5]], ids=["str", "bool", "list"])
def test_a_scale_that_is_not_a_real_number_is_refused(scale) -> None:
    """A string was parsed by float() and a bool read as 1.0, silently."""
    q = torch.randn(1, 2, 20, 16)
    with pytest.raises(attndsl.AttentionError, match=r"flex_attention: scale must be None or "
                                                     r"a real number"):
        attndsl.flex_attention(q, q, q, scale=scale)
    with pytest.raises(attndsl.AttentionError, match=r"decode: scale must be None"):
        attndsl.decode(q[:, :, :1], q, q, torch.tensor([20]), scale=scale)


def test_a_zero_dimensional_tensor_scale_is_read_as_its_value() -> None:
    q = torch.randn(1, 2, 20, 16)
    torch.testing.assert_close(attndsl.flex_attention(q, q, q, scale=torch.tensor(0.3)),
                               attndsl.flex_attention(q, q, q, scale=0.3))


@pytest.mark.parametrize("splits", [1.5, True, "2", 0])
def test_decode_splits_that_are_not_a_positive_int_are_refused(splits) -> None:
    """1.5 failed inside torch's expand (TypeError); True was refused as the kernel's 'S'."""
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 20, 16)
    with pytest.raises(attndsl.AttentionError, match=r"decode: splits must be None or an int "
                                                     r">= 1"):
        attndsl.decode(q, k, k, torch.tensor([20]), splits=splits)
