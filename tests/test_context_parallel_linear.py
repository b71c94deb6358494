"""Context-parallel linear attention (attndsl.distributed.linear): spawned gloo ranks against
one process's ``Kernel.linear`` over the whole sequence, and the state combination alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import attndsl
from attndsl.distributed import context_parallel_linear, shard
from attndsl.distributed.linear import combine_states
from attndsl.frontend.text import parse_file
from attndsl.runtime.checks import AttentionError
from tests.cp_harness import spawn

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TOL = dict(atol=1e-4, rtol=1e-4)
REFUSAL_TIMEOUT = 180  # s: far above a refusal's run, so a hang fails the test


def _spec(name: str):
    return parse_file(str(EXAMPLES / f"{name}.attn"))[name]


def _check(rank: int, world: int, group, spec, length: int, gates: dict,
           per_position: tuple[str, ...]) -> None:
    """This rank's rows of every output and of dQ, dK, dV and the per-position gate
    gradients equal one process's; the gradient of a replicated gate summed over ranks."""
    kern = attndsl.compile(_spec(spec) if isinstance(spec, str) else spec)
    q, k, v = (torch.randn(1, 2, length, 16) for _ in range(3))
    leaves = [t.requires_grad_() for t in (q, k, v, *gates.values())]
    ref = kern.linear(dict(zip("QKV", leaves[:3])), captured=dict(zip(gates, leaves[3:])),
                      chunk=16)[0]
    weights = {n: torch.randn(o.shape) for n, o in ref.items()}
    sum((o * weights[n]).sum() for n, o in ref.items()).backward()
    mine = lambda t: shard(t, "contiguous", world, rank)  # noqa: E731
    parts = [mine(t.detach()).requires_grad_() for t in leaves[:3]]
    caps = {n: (mine(t.detach()) if n in per_position else t.detach().clone())
            .requires_grad_() for n, t in gates.items()}
    out = context_parallel_linear(kern, dict(zip("QKV", parts)), captured=caps, group=group,
                                  chunk=16)
    assert out.keys() == ref.keys()
    for n, o in out.items():
        torch.testing.assert_close(o, mine(ref[n].detach()), **TOL)
    sum((o * mine(weights[n])).sum() for n, o in out.items()).backward()
    for got, full in zip(parts, leaves[:3]):
        torch.testing.assert_close(got.grad, mine(full.grad), **TOL)
    for (n, got), full in zip(caps.items(), leaves[3:]):
        want = mine(full.grad) if n in per_position else full.grad
        torch.testing.assert_close(got.grad, want, **TOL)


# -- the cases (module level: the spawned ranks import them) -----------------------------------

def retention_matches_one_process(rank: int, world: int, group) -> None:
    """A per-head decay (replicated, its gradient summed over the ranks); 37 rows do not
    split evenly over 2 or 4 ranks."""
    _check(rank, world, group, "retention", 37, {"c": torch.tensor([0.5, 2.0])}, ())


def simple_gla_matches_one_process(rank: int, world: int, group) -> None:
    """Per-position scalar gates: each rank holds its shard of the gate logits."""
    _check(rank, world, group, "simple_gla", 40, {"A": torch.randn(1, 2, 40)}, ("A",))


def gla_matches_one_process(rank: int, world: int, group) -> None:
    """Per key-dim vector gates: the total decay is a vector per (batch, head)."""
    _check(rank, world, group, "gla", 24, {"A": torch.randn(1, 2, 24, 16)}, ("A",))


def normalised_linear_attention_matches_one_process(rank: int, world: int, group) -> None:
    """No gate, a normaliser z carried as the state's extra column."""
    _check(rank, world, group, "linear_attention", 21, {}, ())


def a_rank_without_rows_passes_the_state_on(rank: int, world: int, group) -> None:
    """3 rows over 4 ranks: the last rank's shard is empty (its state is zero, its decay 1)."""
    _check(rank, world, group, "simple_gla", world - 1, {"A": torch.randn(1, 2, world - 1)},
           ("A",))


def two_outputs_share_one_all_gather(rank: int, world: int, group) -> None:
    """A gated output and an ungated one: both states and decays travel in one collective."""
    text = (EXAMPLES / "simple_gla.attn").read_text().replace(
        "  output O", "  P[b,h,m,f] = S[b,h,m,n] * V[b,h,n,f]\n  output O, P")
    spec = attndsl.frontend.text.parse_text(text)["simple_gla"]
    _check(rank, world, group, spec, 19, {"A": torch.randn(1, 2, 19)}, ("A",))


def other_layouts_are_refused(rank: int, world: int, group) -> None:
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(AttentionError, match="needs the contiguous layout"):
        context_parallel_linear(attndsl.compile(_spec("linear_attention")),
                                {"Q": q, "K": q, "V": q}, group=group, layout="striped")


def _refused_on_every_rank(rank: int, world: int, group, inputs: dict, captured: dict,
                           match: str) -> None:
    """Every rank raises the same refusal (a rank refusing alone would leave the others in
    the all-gather: the spawn's timeout turns that hang into a failure)."""
    kern = attndsl.compile(_spec("simple_gla"))
    with pytest.raises(AttentionError, match=match):
        context_parallel_linear(kern, inputs, captured=captured, group=group, chunk=16)


def a_non_finite_gate_on_the_last_rank_only(rank: int, world: int, group) -> None:
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    gate = torch.randn(1, 2, 8)
    if rank == world - 1:
        gate[0, 1, 3] = float("nan")
    _refused_on_every_rank(rank, world, group, {"Q": q, "K": k, "V": v}, {"A": gate},
                           rf"rank {world - 1} of {world} refused: .*gate .* must be finite")


def a_gate_of_the_wrong_shape_on_the_first_rank_only(rank: int, world: int, group) -> None:
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    gate = torch.randn(1, 2, 8 + (rank == 0))
    _refused_on_every_rank(rank, world, group, {"Q": q, "K": k, "V": v}, {"A": gate},
                           rf"rank 0 of {world} refused: ")


def more_heads_on_one_rank_than_on_the_others(rank: int, world: int, group) -> None:
    heads = 2 + (rank == 1)
    q, k, v = (torch.randn(1, heads, 8, 16) for _ in range(3))
    _refused_on_every_rank(rank, world, group, {"Q": q, "K": k, "V": v},
                           {"A": torch.randn(1, heads, 8)},
                           r"rank 1 has state size 771 but rank 0 has 514; every rank must "
                           r"hold the same batch, heads")  # 2 heads x (16 x 16 + 1) values


def _refusal_test(case) -> None:
    spawn(2, [(2, case)], timeout=REFUSAL_TIMEOUT)


TWO = [retention_matches_one_process, simple_gla_matches_one_process,
       gla_matches_one_process, two_outputs_share_one_all_gather, other_layouts_are_refused]
FOUR = [retention_matches_one_process, simple_gla_matches_one_process,
        normalised_linear_attention_matches_one_process, a_rank_without_rows_passes_the_state_on]


def test_two_and_four_ranks_match_one_process_forward_and_backward():
    """One spawn of four ranks: the two-rank cases run in a group of ranks 0 and 1."""
    spawn(4, [(2, case) for case in TWO] + [(4, case) for case in FOUR])


@pytest.mark.parametrize("vector", [False, True])
def test_combined_states_equal_the_states_chained_rank_after_rank(vector):
    """S0_r = sum_{j<r} exp(sum_{j<i<r} d_i) S_j equals S0_{r+1} = exp(d_r) S0_r + S_r."""
    torch.manual_seed(0)
    world, bh, e, f = 4, 3, 5, 2
    states = torch.randn(world, bh, e, f)
    decays = -torch.rand(world, bh, e) * 3 if vector else -torch.rand(world, bh) * 3
    chained = torch.zeros(bh, e, f)
    for rank in range(world):
        torch.testing.assert_close(combine_states(states, decays, rank), chained)
        factor = decays[rank].exp()
        chained = factor.view(bh, -1, 1) * chained + states[rank]


def test_the_first_rank_starts_from_zero_yet_its_gathered_states_get_a_gradient():
    """Rank 0 uses no state, but the all-gather's backward must run on every rank."""
    states = torch.randn(2, 1, 2, 2, requires_grad=True)
    combine_states(states, torch.zeros(2, 1), 0).sum().backward()
    assert states.grad is not None and not states.grad.any()


def test_a_gate_that_is_not_affine_in_the_position_is_refused():
    """g(n) = n * n * c: shifting positions to count from 0 in each shard would change the
    decays, so context parallelism refuses it (without starting any process)."""
    from attndsl.distributed.linear import _check_shardable

    text = (EXAMPLES / "retention.attn").read_text().replace(
        "exp((m - n) * log(sigmoid(c[h])))",
        "exp((m * m - n * n) * log(sigmoid(c[h])))")
    spec = attndsl.frontend.text.parse_text(text)["retention"]
    kern = attndsl.compile(spec)
    assert kern.compiled.linear.form == "chunked"
    with pytest.raises(AttentionError, match="not a prefix sum or affine"):
        _check_shardable(kern.compiled.stage("materialise-scans"),
                         kern.compiled.linear.outputs[0])


def test_a_feature_reading_the_position_as_a_value_is_refused():
    """q(m) = (m + 1) Q[m]: a shard counts m from 0, so its features would differ from the
    whole sequence's; refused with the output, feature and index named."""
    from attndsl.distributed.linear import _check_shardable

    text = (EXAMPLES / "retention.attn").read_text().replace(
        "* K[b,h,n,e] * scale", "* K[b,h,n,e] * scale * (m + 1)")
    kern = attndsl.compile(attndsl.frontend.text.parse_text(text)["retention"])
    assert kern.compiled.linear.form == "chunked"
    with pytest.raises(AttentionError, match="O's query feature uses the position m"):
        _check_shardable(kern.compiled.stage("materialise-scans"),
                         kern.compiled.linear.outputs[0])


def test_a_non_finite_gate_on_one_rank_only_is_refused_on_every_rank_not_left_hanging():
    _refusal_test(a_non_finite_gate_on_the_last_rank_only)


def test_a_gate_of_the_wrong_shape_on_one_rank_only_is_refused_on_every_rank():
    _refusal_test(a_gate_of_the_wrong_shape_on_the_first_rank_only)


def test_ranks_holding_different_head_counts_are_refused_before_the_all_gather():
    _refusal_test(more_heads_on_one_rank_than_on_the_others)
