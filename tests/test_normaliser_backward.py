"""Gradients of non-softmax normalisers (compiled kernels, eager recomputation backward)
against autograd through the float64 oracle, captured tensors included."""

import sys
from pathlib import Path

import pytest
import torch

import attndsl
from attndsl.checking import index_sizes, random_problem

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_passes import NORMALISERS  # noqa: E402


@pytest.mark.parametrize("name", sorted(NORMALISERS))
def test_normaliser_gradients_match_oracle(name: str) -> None:
    cascade = NORMALISERS[name][0]()
    kernel = attndsl.compile(cascade)
    gen = torch.Generator().manual_seed(0)
    prob = random_problem(cascade, index_sizes(cascade, 1, 2, 1, 21, 27, 16, 16),
                          torch.float32, gen)
    tensors = {**prob.inputs, **{k: v for k, v in prob.captured.items()
                                 if v.is_floating_point()}}
    for t in tensors.values():
        t.requires_grad_(True)
    out = kernel(prob.inputs, prob.params, prob.captured)
    weights = {o: torch.randn(v.shape, generator=gen) for o, v in out.items()}
    sum((out[o] * weights[o]).sum() for o in out).backward()
    ref_leaves = {n: t.detach().double().requires_grad_() for n, t in tensors.items()}
    all_tensors = {**prob.inputs, **prob.captured, **ref_leaves}
    ref = attndsl.run_cascade(cascade, all_tensors, prob.params)
    sum((ref[o] * weights[o].double()).sum() for o in ref).backward()
    for n, t in tensors.items():
        assert t.grad is not None and not torch.isnan(t.grad).any(), n
        torch.testing.assert_close(t.grad.double(), ref_leaves[n].grad, atol=1e-4, rtol=1e-4)
