"""Decays of exactly 0 (a gate logit of -inf: the state is forgotten there).

The delta rule's chunked form sums log a over a chunk, so a zero decay made every later
output NaN although the recurrence (the oracle, token by token) is finite: such a run now
takes the recurrent form, exact forward and backward.  A linear cascade's decay
exp(g(m) - g(n)) is NaN in the cascade itself once g is -inf (the oracle says so too), and
the kernels cannot recover the forgetting from a cumulative g: the gate is refused, naming
the position."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import attndsl
from attndsl.frontend.text import parse_file

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _qkv(b: int = 1, h: int = 2, length: int = 40, d: int = 16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {n: torch.randn(b, h, length, d, generator=gen) for n in "QKV"}


@pytest.mark.parametrize("chunk", [16, "auto"])
def test_a_zero_decay_in_the_gated_delta_rule_forgets_the_state_as_the_oracle_does(
        chunk: int | str) -> None:
    c = parse_file(EXAMPLES / "gated_deltanet.attn")["gated_deltanet"]
    kernel = attndsl.compile(c)
    assert kernel.compiled.recurrence.form == "chunked"
    inputs = {n: t.requires_grad_() for n, t in _qkv().items()}
    gen = torch.Generator().manual_seed(1)
    al, bl = torch.randn(1, 2, 40, generator=gen), torch.randn(1, 2, 40, generator=gen)
    al[0, 0, 5] = al[0, 1, 33] = -math.inf  # one zero decay in each head, two chunks apart
    captured = {"Al": al, "Bl": bl}
    kw = {} if chunk == "auto" else {"chunk": chunk}
    out = kernel.linear(inputs, {"scale": 0.25}, captured, **kw)[0]["O"]
    ref = attndsl.run_cascade(c, {**{n: t.double() for n, t in inputs.items()}, **captured},
                              {"scale": 0.25})["O"]
    assert not ref.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    grad = torch.autograd.grad(out.sum(), inputs["Q"])[0]
    ref_grad = torch.autograd.grad(ref.sum(), inputs["Q"])[0]
    torch.testing.assert_close(grad.double(), ref_grad.double(), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("chunk", [None, 16])
def test_a_linear_gate_of_minus_infinity_is_refused_naming_its_position(chunk) -> None:
    """It gave NaN from the position on (and a finite row at it on the recurrent path),
    where the cascade's own value is NaN too."""
    c = parse_file(EXAMPLES / "simple_gla.attn")["simple_gla"]
    kernel = attndsl.compile(c)
    a = torch.randn(1, 2, 40)
    a[0, 1, 5] = -math.inf
    with pytest.raises(attndsl.AttentionError,
                       match=r"output O: the gate g = G\[b, h, n\] .* is -inf at \(batch, "
                             r"head, position\) = \(0, 1, 5\); it must be finite"):
        kernel.linear(_qkv(), {"scale": 0.25}, {"A": a}, chunk=chunk)


def test_a_per_head_decay_of_zero_in_retention_is_refused() -> None:
    c = parse_file(EXAMPLES / "retention.attn")["retention"]
    kernel = attndsl.compile(c)
    with pytest.raises(attndsl.AttentionError, match=r"g = n \* log\(sigmoid\(c\[h\]\)\)"):
        kernel(_qkv(), {"scale": 0.25}, {"c": torch.tensor([0.5, -math.inf])})


def test_a_linear_run_whose_tensors_disagree_on_an_extent_names_both_tensors() -> None:
    """Queries of 10 rows against 20 keys in a cascade with one length L: it said 'extent L
    is 10 elsewhere', naming neither the tensor that set it nor the shapes."""
    c = parse_file(EXAMPLES / "simple_gla.attn")["simple_gla"]
    inputs = {**_qkv(length=20), "Q": torch.randn(1, 2, 10, 16)}
    with pytest.raises(attndsl.AttnDSLError, match=r"extent L is 10 \(dim 2 of Q, shape \(1, 2, "
                                                   r"10, 16\)\) but dim 2 of K .* is 20"):
        attndsl.compile(c).linear(inputs, {"scale": 0.25}, {"A": torch.randn(1, 2, 20)})
