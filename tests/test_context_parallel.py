"""Context parallelism (attndsl.distributed): spawned gloo ranks against one process.

Each case runs on every rank: the rank computes the single-process result itself (same
seed), runs the context-parallel call on its shard, and compares its rows of the output, the
lse and the gradients (dQ, dK, dV of its shard; captured-tensor gradients summed over the
ranks).  Cases are grouped into one spawn per world size to keep the suite fast.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import attndsl
from attndsl.api import AttentionError
from attndsl.distributed import context_parallel_attention, shard, tree_decode
from attndsl.distributed.kernels import PairKernels
from attndsl.frontend.text import parse_file
from tests.cp_harness import spawn

ATOL = 2e-5
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _inputs(B: int, H: int, L: int, E: int, hkv: int | None = None) -> tuple:
    q = torch.randn(B, H, L, E)
    k, v = (torch.randn(B, hkv or H, L, E) for _ in range(2))
    return q, k, v


def _check(rank: int, world: int, group, layout: str, score_mod, mask_mod, q, k, v,
           captured=(), enable_gqa: bool = False, sinks: torch.Tensor | None = None) -> None:
    """Output, lse and every gradient of this rank equal the single-process ones."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    if sinks is None:
        ref, ref_lse = attndsl.flex_attention(*leaves, score_mod=score_mod, mask_mod=mask_mod,
                                              enable_gqa=enable_gqa, return_lse=True)
    else:
        ref, ref_lse = _sink_reference(*leaves, mask_mod, sinks)
    weights = torch.randn(ref.shape)
    lse_w = torch.randn(ref_lse.shape)
    finite = torch.isfinite(ref_lse)
    (ref * weights).sum().add_((ref_lse.where(finite, 0) * lse_w).sum()).backward()
    want = [t.grad for t in leaves] + [c.grad.clone() for c in captured]
    for c in captured:
        c.grad = None
    parts = [shard(t.detach(), layout, world, rank).requires_grad_() for t in (q, k, v)]
    out, lse = context_parallel_attention(*parts, score_mod, mask_mod, group=group,
                                          layout=layout, enable_gqa=enable_gqa,
                                          return_lse=True, sinks=sinks)
    mine = lambda t: shard(t, layout, world, rank)  # noqa: E731
    torch.testing.assert_close(out, mine(ref.detach()), atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(lse, mine(ref_lse.detach()), atol=ATOL, rtol=1e-4)
    fin = torch.isfinite(lse)
    ((out * mine(weights)).sum() + (lse.where(fin, 0) * mine(lse_w)).sum()).backward()
    for got, exp in zip(parts, want[:3]):
        torch.testing.assert_close(got.grad, mine(exp), atol=1e-4, rtol=1e-4)
    for c, exp in zip(captured, want[3:]):
        torch.testing.assert_close(c.grad, exp, atol=1e-4, rtol=1e-4)
        c.grad = None
    if sinks is not None:
        sinks.grad = None


def _sink_reference(q, k, v, mask_mod, sinks):
    """exp(s) / (exp(sink[h]) + sum exp(s)) written out densely (float64)."""
    s = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    L = q.shape[2]
    keep = mask_mod(0, 0, torch.arange(L)[:, None], torch.arange(L)[None, :])
    s = s.masked_fill(~keep, float("-inf"))
    z = sinks.double().view(1, -1, 1, 1)
    lse = torch.logsumexp(torch.cat([s, z.expand(*s.shape[:3], 1)], -1), -1)
    p = torch.exp(s - lse.unsqueeze(-1))
    return (p @ v.double()).float(), lse.float()


# -- the cases (module level: the spawned ranks import them) -----------------------------------

def causal_alibi_every_layout(rank: int, world: int, group) -> None:
    slopes = torch.tensor([0.5, 0.25], requires_grad=True)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    q, k, v = _inputs(1, 2, 37, 16)  # 37 rows: uneven shards
    for layout in ("contiguous", "striped", "zigzag"):
        _check(rank, world, group, layout, alibi, causal, q, k, v, captured=(slopes,))


def sliding_window_gqa(rank: int, world: int, group) -> None:
    def window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < 6)

    q, k, v = _inputs(2, 4, 40, 16, hkv=2)
    _check(rank, world, group, "contiguous", None, window, q, k, v, enable_gqa=True)


def documents(rank: int, world: int, group) -> None:
    doc = torch.tensor([0] * 9 + [1] * 14 + [2] * 3 + [3] * 10)

    def same_doc(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    q, k, v = _inputs(1, 2, 36, 16)
    _check(rank, world, group, "zigzag", None, same_doc, q, k, v)


def padded_queries(rank: int, world: int, group) -> None:
    """Rows from 25 on see no key: on 4 ranks the last rank's shard is empty for the mask
    (0 and lse -inf, zero gradients), and keys from 25 on go nowhere."""
    def padded(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx < 25) & (kv_idx < 25)

    q, k, v = _inputs(1, 2, 40, 16)
    _check(rank, world, group, "contiguous", None, padded, q, k, v)


def keys_nobody_needs_are_not_sent(rank: int, world: int, group) -> None:
    """A sliding window over 4 ranks: each rank's K/V go to its right neighbour only (plain
    ring attention would send every shard to every rank)."""
    import attndsl.distributed.ring as ring

    sent: list[int] = []
    real = ring.dist.batch_isend_irecv

    def counting(ops):
        sent.extend(dist.get_group_rank(group, op.peer) if group is not None else op.peer
                    for op in ops if op.op is dist.isend)
        return real(ops)

    def window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < 5)

    q, k, v = _inputs(1, 2, 40, 16)
    ring.dist.batch_isend_irecv = counting
    try:
        with torch.no_grad():
            context_parallel_attention(*(shard(t, "contiguous", world, rank) for t in (q, k, v)),
                                       None, window, group=group)
    finally:
        ring.dist.batch_isend_irecv = real
    want = [rank + 1] * 2 if rank + 1 < world else []  # K and V
    assert sent == want, (rank, sent)


def fewer_rows_than_ranks(rank: int, world: int, group) -> None:
    """3 rows over 4 ranks: one rank holds no row at all."""
    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    q, k, v = _inputs(1, 2, world - 1, 16)
    _check(rank, world, group, "contiguous", None, causal, q, k, v)


def sinks_causal(rank: int, world: int, group) -> None:
    sinks = torch.tensor([0.3, -1.0], requires_grad=True)

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    q, k, v = _inputs(1, 2, 30, 16)
    _check(rank, world, group, "striped", None, causal, q, k, v, captured=(sinks,), sinks=sinks)


def text_cascade_with_sinks(rank: int, world: int, group) -> None:
    """examples/sink.attn: exp(sink[h]) joins the denominator once, not once per shard."""
    spec = parse_file(str(EXAMPLES / "sink.attn"))["sink"]
    z = torch.tensor([0.5, -0.7], requires_grad=True)
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 26, 16))
    ref = attndsl.compile(spec)({"Q": q, "K": k, "V": v}, captured={"sink": z})["O"]
    weights = torch.randn(ref.shape)
    (ref * weights).sum().backward()
    want = z.grad.clone()
    z.grad = None
    parts = [shard(t.detach(), "zigzag", world, rank).requires_grad_() for t in (q, k, v)]
    out = context_parallel_attention(*parts, group=group, layout="zigzag", cascade=spec,
                                     captured={"sink": z})["O"]
    mine = lambda t: shard(t, "zigzag", world, rank)  # noqa: E731
    torch.testing.assert_close(out, mine(ref.detach()), atol=ATOL, rtol=1e-4)
    (out * mine(weights)).sum().backward()
    for got, full in zip(parts, (q, k, v)):
        torch.testing.assert_close(got.grad, mine(full.grad), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z.grad, want, atol=1e-4, rtol=1e-4)


def tree_decode_matches_one_process(rank: int, world: int, group) -> None:
    """Four new queries against a 50-key cache split over the ranks."""
    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    q = torch.randn(1, 2, 4, 16)
    k, v = (torch.randn(1, 2, 50, 16) for _ in range(2))
    lq = torch.arange(46, 50)
    ref, ref_lse = attndsl.flex_attention(q, k, v, mask_mod=lambda b, h, i, j: j <= i + 46,
                                          return_lse=True)
    with torch.no_grad():
        out, lse = tree_decode(q, shard(k, "contiguous", world, rank),
                               shard(v, "contiguous", world, rank), None, causal,
                               group=group, q_positions=lq, return_lse=True)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=1e-4)


def unshardable_lengths_are_refused(rank: int, world: int, group) -> None:
    q = torch.randn(1, 2, 5 + rank, 16)  # rank 1 holds one row too many for contiguous
    with pytest.raises(AttentionError, match="layout of 11 rows over 2 ranks"):
        context_parallel_attention(q, q, q, group=group)


def additive_cascades(rank: int, world: int, group) -> None:
    """examples/sigmoid.attn (causal, zigzag) and relu2.attn (its / N is the whole
    sequence's N): shard outputs add, and each pair's gradients are its own."""
    for name, layout in (("sigmoid", "zigzag"), ("relu2", "striped")):
        spec = parse_file(str(EXAMPLES / f"{name}.attn"))[name]
        q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 27, 16))
        ref = attndsl.compile(spec)({"Q": q, "K": k, "V": v}, {"scale": 0.25})["O"]
        weights = torch.randn(ref.shape)
        (ref * weights).sum().backward()
        mine = lambda t, lay=layout: shard(t, lay, world, rank)  # noqa: E731
        parts = [mine(t.detach()).requires_grad_() for t in (q, k, v)]
        out = context_parallel_attention(*parts, group=group, layout=layout, cascade=spec,
                                         params={"scale": 0.25})["O"]
        torch.testing.assert_close(out, mine(ref.detach()), atol=ATOL, rtol=1e-4)
        (out * mine(weights)).sum().backward()
        for got, full in zip(parts, (q, k, v)):
            torch.testing.assert_close(got.grad, mine(full.grad), atol=1e-4, rtol=1e-4)


def a_head_dim_mismatch_on_the_last_rank_only(rank: int, world: int, group) -> None:
    """The last rank's query has head dim 32 against its keys' 16: refused by that rank's
    check, raised on every rank (else the others wait in the gather of lengths)."""
    q, k, v = _inputs(1, 2, 8, 16)
    if rank == world - 1:
        q = torch.randn(1, 2, 8, 32)
    with pytest.raises(AttentionError, match=rf"rank {world - 1} of {world} refused: "
                                             r".*query head dim 32 != key head dim 16"):
        context_parallel_attention(q, k, v, group=group)


def more_heads_on_one_rank(rank: int, world: int, group) -> None:
    """Each rank's tensors agree with each other, but rank 1 has three heads: refused on
    every rank before the ring sends key shards of another shape."""
    q, k, v = _inputs(1, 2 + (rank == 1), 8, 16)
    with pytest.raises(AttentionError, match="rank 1 has query heads 3 but rank 0 has 2"):
        context_parallel_attention(q, k, v, group=group)


def a_tree_decode_refused_by_one_rank(rank: int, world: int, group) -> None:
    """kv_positions of the wrong length on rank 0 only: every rank raises."""
    q, k, v = _inputs(1, 2, 8, 16)
    with torch.no_grad(), pytest.raises(AttentionError, match=f"rank 0 of {world} refused: "
                                                              ".*kv_positions has 9 entries"):
        tree_decode(q[:, :, :1], k, v, group=group,
                    kv_positions=torch.arange(8 + (rank == 0)) + 8 * rank)


def a_table_read_out_of_bounds_in_one_pair_only(rank: int, world: int, group) -> None:
    """bias[q - kv + 7] of 16 entries: in bounds on the diagonal pairs, out of bounds only
    where rank 1's queries meet rank 0's keys (q - kv up to 15), so only rank 1's second
    ring step refuses -- raised on every rank (rank 0 had finished its ring)."""
    bias = torch.randn(16)

    def shifted(score, b, h, q_idx, kv_idx):
        return score + bias[q_idx - kv_idx + 7]

    q, k, v = (shard(t, "contiguous", world, rank).requires_grad_()
               for t in _inputs(1, 2, 16, 16))
    with pytest.raises(AttentionError, match=rf"rank 1 of {world} refused: SubscriptError: "
                                             r"index out of range: subscript 0 \(m - n \+ 7\)"
                                             r" of tensor 'cap0' \(bias, captured by "
                                             r"shifted\(\)\)"):
        context_parallel_attention(q, k, v, shifted, group=group)


def a_backward_pair_refused_on_one_rank(rank: int, world: int, group) -> None:
    """Rank 1's backward of its pair with rank 0's keys refuses (a fault injected there): rank
    0 still gets zero dK/dV back instead of waiting, and every rank raises."""
    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    q, k, v = (shard(t, "contiguous", world, rank).requires_grad_()
               for t in _inputs(1, 2, 16, 16))
    out = context_parallel_attention(q, k, v, mask_mod=causal, group=group)
    real = PairKernels.backward

    def refusing(self, q, k, v, out, lse, dout, dlse, qpos, kpos, *rest):
        if rank == 1 and int(kpos[0]) == 0:
            raise AttentionError("injected refusal")
        return real(self, q, k, v, out, lse, dout, dlse, qpos, kpos, *rest)

    PairKernels.backward = refusing
    try:
        with pytest.raises(AttentionError, match=rf"rank 1 of {world} refused: "
                                                 r"AttentionError: injected refusal"):
            out.sum().backward()
    finally:
        PairKernels.backward = real


def captured_tensors_that_differ_between_ranks(rank: int, world: int, group) -> None:
    """Document ids that differ on rank 1 would make the ranks disagree on which pairs
    exchange keys (one waits for a shard the other never sends): refused on every rank."""
    doc = torch.tensor([0] * 8 + [1] * 8) if rank == 0 else torch.zeros(16, dtype=torch.long)

    def same_doc(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    q, k, v = (shard(t, "contiguous", world, rank) for t in _inputs(1, 2, 16, 16))
    with pytest.raises(AttentionError, match="rank 1 classifies the pair of query shard 0 "
                                             "and key shard 1 differently"):
        context_parallel_attention(q, k, v, mask_mod=same_doc, group=group)


def a_tree_decode_launch_refused_on_one_rank(rank: int, world: int, group) -> None:
    """bias[kv] of 12 entries over a 16-key cache: only rank 1's shard (keys 8..15) reads
    past it; every rank raises before the all-reduce (else rank 0 waits in it)."""
    bias = torch.randn(12)

    def by_key(score, b, h, q_idx, kv_idx):
        return score + bias[kv_idx]

    q, k, v = _inputs(1, 2, 16, 16)
    with torch.no_grad(), pytest.raises(AttentionError, match=rf"rank 1 of {world} refused: "
                                                              r".*index out of range.*\(n\) "
                                                              r"of tensor 'cap0' \(bias"):
        tree_decode(q[:, :, :1], shard(k, "contiguous", world, rank),
                    shard(v, "contiguous", world, rank), by_key, group=group)


TWO = [causal_alibi_every_layout, sliding_window_gqa, documents, padded_queries, sinks_causal,
       text_cascade_with_sinks, tree_decode_matches_one_process, unshardable_lengths_are_refused]
FOUR = [documents, padded_queries, keys_nobody_needs_are_not_sent, fewer_rows_than_ranks,
        text_cascade_with_sinks, additive_cascades]


def test_two_and_four_ranks_match_one_process_forward_and_backward():
    """One spawn of four ranks: the two-rank cases run in a group of ranks 0 and 1."""
    spawn(4, [(2, case) for case in TWO] + [(4, case) for case in FOUR])


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
                    reason="NCCL needs two CUDA devices")
def test_nccl_runs_the_same_code():  # pragma: no cover - GPU machines only
    spawn(2, [(2, causal_alibi_every_layout), (2, sinks_causal)], backend="nccl")


REFUSAL_TIMEOUT = 180  # s: far above a refusal's run, so a hang fails the test


def test_a_shape_mismatch_on_one_rank_only_is_refused_on_every_rank_not_left_hanging():
    spawn(2, [(2, a_head_dim_mismatch_on_the_last_rank_only)], timeout=REFUSAL_TIMEOUT)


def test_ranks_holding_different_head_counts_are_refused_before_the_ring():
    spawn(2, [(2, more_heads_on_one_rank)], timeout=REFUSAL_TIMEOUT)


def test_a_tree_decode_argument_refused_by_one_rank_is_refused_on_every_rank():
    spawn(2, [(2, a_tree_decode_refused_by_one_rank)], timeout=REFUSAL_TIMEOUT)


def test_a_launch_refused_in_the_middle_of_the_ring_is_raised_on_every_rank():
    spawn(2, [(2, a_table_read_out_of_bounds_in_one_pair_only)], timeout=REFUSAL_TIMEOUT)


def test_a_backward_refused_on_one_rank_is_raised_on_every_rank():
    spawn(2, [(2, a_backward_pair_refused_on_one_rank)], timeout=REFUSAL_TIMEOUT)


def test_captured_tensors_that_differ_between_ranks_are_refused_before_the_ring():
    spawn(2, [(2, captured_tensors_that_differ_between_ranks)], timeout=REFUSAL_TIMEOUT)


def test_a_tree_decode_launch_refused_on_one_rank_is_raised_on_every_rank():
    spawn(2, [(2, a_tree_decode_launch_refused_on_one_rank)], timeout=REFUSAL_TIMEOUT)
