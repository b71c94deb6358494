"""attndsl.decode against the float64 oracle on the gathered sequences: dense and paged caches
(both layouts), random page tables and page sizes, ragged lengths including 0 and 1, key
splits, GQA ratios, the bundled examples' score/mask programs, sinks; decode step by step
equals prefill over the whole sequence."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attndsl
from attndsl import AttentionError
from attndsl.frontend.flex import lower_flex

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
if str(EXAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLES_DIR))
EXAMPLES = ("causal", "alibi", "softcap", "sliding_window", "document_mask",
            "softcap_causal_alibi")
D = 16


def example(name: str, b: int, h: int, length: int) -> dict:
    """The example's score_mod / mask_mod for absolute positions < length."""
    return importlib.import_module(name).make(b, h, length, length)


def oracle(q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor], lengths: list[int],
           score_mod=None, mask_mod=None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 eager attention of each sequence's new queries (rows lengths[b] - Lq + i of a
    padded prefill) over its gathered keys; rows before the sequence start see no keys."""
    b, hq, lq, _ = q.shape
    hkv = ks[0].shape[0]
    top = max(max(lengths), lq, 1)
    qf = torch.zeros(b, hq, top, q.shape[-1], dtype=torch.float64)
    kf = torch.zeros(b, hkv, top, D, dtype=torch.float64)
    vf = torch.zeros(b, hkv, top, vs[0].shape[-1], dtype=torch.float64)
    lens = torch.tensor(lengths)
    for i, n in enumerate(lengths):
        kf[i, :, :n], vf[i, :, :n] = ks[i].double(), vs[i].double()
        for j in range(lq):
            if n - lq + j >= 0:
                qf[i, :, n - lq + j] = q[i, :, j].double()

    def in_length(bb, hh, qq, kk):
        keep = kk < lens[bb]
        return keep if mask_mod is None else keep & mask_mod(bb, hh, qq, kk)
    spec = lower_flex(score_mod, in_length)
    ref = attndsl.run_cascade(spec.cascade, {"Q": qf, "K": kf, "V": vf, **spec.captured},
                              {"scale": 1 / math.sqrt(q.shape[-1]), "G": hq // hkv})
    out = torch.zeros(b, hq, lq, vf.shape[-1], dtype=torch.float64)
    lse = torch.full((b, hq, lq), -math.inf, dtype=torch.float64)
    for i, n in enumerate(lengths):
        for j in range(lq):
            if n - lq + j >= 0:
                out[i, :, j] = ref["O"][i, :, n - lq + j]
                lse[i, :, j] = ref["LSE"][i, :, n - lq + j]
    return out, lse


def random_pages(lengths: list[int], page: int, spare: int, gen: torch.Generator
                 ) -> tuple[torch.Tensor, int]:
    """A page table giving each sequence random distinct pages of a shuffled pool."""
    need = [-(-n // page) for n in lengths]
    pool = sum(need) + spare
    perm = torch.randperm(pool, generator=gen)
    table = torch.zeros(len(lengths), max(max(need), 1), dtype=torch.int32)
    at = 0
    for i, k in enumerate(need):
        table[i, :k] = perm[at:at + k]
        at += k
    return table, pool


def fill_pages(seqs: list[torch.Tensor], table: torch.Tensor, pool: int, page: int,
               layout: str) -> torch.Tensor:
    """The pool [pool, page, H, D] (NPHD) or [pool, H, page, D] (NHPD) holding ``seqs``."""
    h, d = seqs[0].shape[0], seqs[0].shape[-1]
    pages = torch.randn(pool, page, h, d) * 100  # garbage where no sequence lives
    for i, s in enumerate(seqs):
        for pos in range(s.shape[1]):
            pages[int(table[i, pos // page]), pos % page] = s[:, pos]
    return pages if layout == "NPHD" else pages.transpose(1, 2).contiguous()


def close(out: torch.Tensor, lse: torch.Tensor, ref: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.testing.assert_close(out.double(), ref[0], atol=2e-5, rtol=2e-5)
    finite = torch.isfinite(ref[1])
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse.double()[finite], ref[1][finite], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", EXAMPLES)
def test_paged_decode_with_each_examples_programs_matches_the_oracle(name: str) -> None:
    gen = torch.Generator().manual_seed(1)
    lengths, hq, hkv, lq, page = [37, 0, 1, 70], 4, 2, 2, 16
    fns = example(name, len(lengths), hq, 80)
    seqs_k = [torch.randn(hkv, n, D) for n in lengths]
    seqs_v = [torch.randn(hkv, n, D) for n in lengths]
    table, pool = random_pages(lengths, page, 3, gen)
    q = torch.randn(len(lengths), hq, lq, D)
    out, lse = attndsl.decode(q, fill_pages(seqs_k, table, pool, page, "NPHD"),
                              fill_pages(seqs_v, table, pool, page, "NPHD"),
                              torch.tensor(lengths), page_table=table, splits=2,
                              return_lse=True, **fns)
    close(out, lse, oracle(q, seqs_k, seqs_v, lengths, **fns))


@given(st.data())
def test_random_page_tables_lengths_splits_and_gqa_ratios_match_the_oracle(data) -> None:
    b = data.draw(st.integers(1, 3), "B")
    lengths = data.draw(st.lists(st.sampled_from([0, 1, 2, 15, 16, 17, 33, 64]),
                                 min_size=b, max_size=b), "lengths")
    hkv = data.draw(st.sampled_from([1, 2]), "Hkv")
    group = data.draw(st.sampled_from([1, 2, 4]), "G")
    lq = data.draw(st.sampled_from([1, 3]), "Lq")
    page = data.draw(st.sampled_from([16, 32]), "page_size")
    layout = data.draw(st.sampled_from(["NPHD", "NHPD"]), "layout")
    splits = data.draw(st.integers(1, 3), "splits")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 99), "seed"))
    seqs_k = [torch.randn(hkv, n, D, generator=gen) for n in lengths]
    seqs_v = [torch.randn(hkv, n, D, generator=gen) for n in lengths]
    table, pool = random_pages(lengths, page, 2, gen)
    q = torch.randn(b, hq := hkv * group, lq, D, generator=gen)
    fns = example("causal", b, hq, 80)
    out, lse = attndsl.decode(q, fill_pages(seqs_k, table, pool, page, layout),
                              fill_pages(seqs_v, table, pool, page, layout),
                              torch.tensor(lengths), page_table=table, layout=layout,
                              splits=splits, return_lse=True, **fns)
    close(out, lse, oracle(q, seqs_k, seqs_v, lengths, **fns))


def test_dense_cache_decode_with_splits_matches_the_oracle() -> None:
    lengths, hq, hkv, lq = [50, 1, 0], 4, 1, 1
    k, v = torch.randn(3, hkv, 64, D), torch.randn(3, hkv, 64, D)
    q = torch.randn(3, hq, lq, D)
    fns = example("alibi", 3, hq, 64)
    out, lse = attndsl.decode(q, k, v, torch.tensor(lengths), splits=3, return_lse=True, **fns)
    close(out, lse, oracle(q, [k[i, :, :n] for i, n in enumerate(lengths)],
                           [v[i, :, :n] for i, n in enumerate(lengths)], lengths, **fns))


def test_sinks_enter_each_denominator_once_whatever_the_split_count() -> None:
    lengths, hq, hkv = [40, 0], 2, 1
    k, v = torch.randn(2, hkv, 48, D), torch.randn(2, hkv, 48, D)
    q, z = torch.randn(2, hq, 1, D), torch.tensor([0.5, -1.0])
    for splits in (1, 3):
        out, lse = attndsl.decode(q, k, v, torch.tensor(lengths), sinks=z, splits=splits,
                                  return_lse=True)
        for i, n in enumerate(lengths):
            s = torch.einsum("hqd,hkd->hqk", q[i].double(),
                             k[i, :, :n].double().expand(hq, -1, -1)) / math.sqrt(D)
            s = torch.cat([s, z.double().view(hq, 1, 1)], -1)
            p = torch.softmax(s, -1)
            ref = p[..., :n] @ v[i, :, :n].double().expand(hq, -1, -1)
            torch.testing.assert_close(out[i].double(), ref, atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(lse[i].double(), torch.logsumexp(s, -1), atol=2e-5,
                                       rtol=2e-5)


def test_a_sink_of_minus_infinity_is_no_sink_and_an_empty_sequence_gives_zero() -> None:
    k, v = torch.randn(2, 1, 48, D), torch.randn(2, 1, 48, D)
    q, lengths = torch.randn(2, 2, 1, D), torch.tensor([0, 40])
    out, lse = attndsl.decode(q, k, v, lengths, sinks=torch.full((2,), -math.inf),
                              return_lse=True)
    plain, plain_lse = attndsl.decode(q, k, v, lengths, return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and bool(torch.isneginf(lse[0]).all())
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, plain_lse, atol=1e-6, rtol=1e-6)


def test_a_mask_reading_a_table_sized_to_the_cache_by_key_is_accepted() -> None:
    """The block analysis reads keys below the longest length only: a table of the cache's
    40 rows is in range (it was refused for the 64 keys of the rounded-up block)."""
    k, v, q = torch.randn(2, 1, 40, D), torch.randn(2, 1, 40, D), torch.randn(2, 2, 1, D)
    lengths, keep = torch.tensor([40, 30]), torch.rand(40) > 0.3
    keep[0] = True
    out = attndsl.decode(q, k, v, lengths, mask_mod=lambda b, h, m, n: keep[n])
    for i, n in enumerate(lengths.tolist()):
        s = torch.einsum("hqd,hkd->hqk", q[i].double(), k[i, :, :n].double().expand(2, -1, -1))
        s = (s / math.sqrt(D)).masked_fill(~keep[:n], -math.inf)
        ref = torch.softmax(s, -1) @ v[i, :, :n].double().expand(2, -1, -1)
        torch.testing.assert_close(out[i].double(), ref, atol=2e-5, rtol=2e-5)


def test_decoding_step_by_step_equals_prefill_over_the_whole_sequence() -> None:
    hq, hkv, steps = 4, 2, 5
    cache = attndsl.PagedKVCache(8, 16, hkv, D, max_batch=2, max_pages=4, layout="NHPD")
    prompt_k, prompt_v = torch.randn(2, hkv, 18, D), torch.randn(2, hkv, 18, D)
    cache.append(prompt_k, prompt_v)
    qs, ks, vs, outs = [], [prompt_k], [prompt_v], []
    for _ in range(steps):
        q, k, v = torch.randn(2, hq, 1, D), torch.randn(2, hkv, 1, D), torch.randn(2, hkv, 1, D)
        cache.append(k, v)
        qs.append(q), ks.append(k), vs.append(v)
        outs.append(cache.decode(q, mask_mod=example("causal", 2, hq, 32)["mask_mod"]))
    k, v = torch.cat(ks, 2), torch.cat(vs, 2)
    q = torch.cat([torch.zeros(2, hq, 18, D)] + qs, 2)
    full = attndsl.flex_attention(q, k, v, mask_mod=lambda b, h, m, n: n <= m, enable_gqa=True)
    torch.testing.assert_close(torch.cat(outs, 2), full[:, :, 18:], atol=2e-5, rtol=2e-5)
    gathered = cache.gather(1)
    assert torch.equal(gathered[0], k[1]) and torch.equal(gathered[1], v[1])


def test_chunked_prefill_is_bottom_right_causal_against_the_cached_prefix() -> None:
    cache = attndsl.PagedKVCache(6, 32, 1, D, max_batch=1, max_pages=6)
    k, v = torch.randn(1, 1, 50, D), torch.randn(1, 1, 50, D)
    cache.append(k, v)
    q = torch.randn(1, 2, 9, D)  # the last 9 of the 50 tokens are the new chunk
    causal = example("causal", 1, 2, 64)["mask_mod"]
    out = cache.decode(q, mask_mod=causal, splits=2)
    ref = oracle(q, [k[0]], [v[0]], [50], mask_mod=causal)
    torch.testing.assert_close(out.double(), ref[0], atol=2e-5, rtol=2e-5)


def test_flex_attention_over_the_page_table_matches_decode() -> None:
    cache = attndsl.PagedKVCache(10, 16, 2, D, max_batch=3, max_pages=4)
    cache.append(torch.randn(3, 2, 20, D), torch.randn(3, 2, 20, D))
    cache.free(1)
    cache.append(torch.randn(1, 2, 7, D), torch.randn(1, 2, 7, D), seqs=[1])
    cache.append(torch.randn(3, 2, 2, D), torch.randn(3, 2, 2, D))
    q = torch.randn(3, 4, 2, D)
    fns = example("alibi", 3, 4, 32)
    k, v = cache.flex_inputs(3)
    got = attndsl.flex_attention(q, k, v, score_mod=cache.score_mod(fns["score_mod"], 3, 2),
                                 block_mask=cache.block_mask(fns["mask_mod"], 3, 2),
                                 enable_gqa=True)
    ref = oracle(q, *zip(*[cache.gather(i) for i in range(3)]), cache.lengths.tolist(), **fns)
    torch.testing.assert_close(got.double(), ref[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(cache.decode(q, **fns).double(), ref[0], atol=2e-5, rtol=2e-5)


def test_bad_decode_inputs_say_what_was_expected() -> None:
    q, k = torch.randn(2, 3, 1, D), torch.randn(2, 2, 8, D)
    with pytest.raises(attndsl.AttnDSLError, match="not a multiple of 2 key/value heads"):
        attndsl.decode(q, k, k, torch.tensor([1, 1]))
    q = torch.randn(2, 2, 1, D)
    with pytest.raises(attndsl.AttnDSLError, match="exceeds the cache's 8 rows"):
        attndsl.decode(q, k, k, torch.tensor([9, 1]))
    pages = torch.randn(4, 16, 2, D)
    with pytest.raises(attndsl.AttnDSLError, match=r"pages outside \[0, 4\)"):
        attndsl.decode(q, pages, pages, torch.tensor([3, 20]),
                       page_table=torch.tensor([[0, 0], [1, 4]]))
    with pytest.raises(attndsl.AttnDSLError, match="multiple of 16"):
        attndsl.decode(q, pages[:, :8], pages[:, :8], torch.tensor([3, 2]),
                       page_table=torch.tensor([[0], [1]]))


def test_a_sliding_window_decode_reads_only_the_windows_key_blocks() -> None:
    from attndsl.decoding.pruning import live_blocks
    from attndsl.decoding.reindex import packed_spec

    fns = example("sliding_window", 2, 4, 1024)
    spec = packed_spec(**fns, paged=True)
    live = live_blocks(spec.mask, spec.captured, torch.tensor([1000, 10]), 4, 2, 1, 16)
    assert live.shape == (2, 2, 63)
    assert live[0].sum(-1).tolist() == [5, 5]  # keys 937..999 of 1000: blocks 58..62
    assert live[0, :, 58:].all() and live[1].sum(-1).tolist() == [1, 1]
    lengths, hkv = [300, 10], 2
    seqs_k = [torch.randn(hkv, n, D) for n in lengths]
    seqs_v = [torch.randn(hkv, n, D) for n in lengths]
    table, pool = random_pages(lengths, 16, 0, torch.Generator().manual_seed(3))
    q = torch.randn(2, 4, 1, D)
    out, lse = attndsl.decode(q, fill_pages(seqs_k, table, pool, 16, "NPHD"),
                              fill_pages(seqs_v, table, pool, 16, "NPHD"),
                              torch.tensor(lengths), page_table=table, return_lse=True, **fns)
    close(out, lse, oracle(q, seqs_k, seqs_v, lengths, **fns))


def test_a_chunk_with_more_packed_rows_than_one_query_tile_matches_the_oracle() -> None:
    lengths, hq, hkv, lq = [100, 40], 4, 2, 70  # 2 x 70 = 140 rows: two query tiles
    k, v = torch.randn(2, hkv, 112, D), torch.randn(2, hkv, 112, D)
    q = torch.randn(2, hq, lq, D)
    fns = example("softcap_causal_alibi", 2, hq, 112)
    out, lse = attndsl.decode(q, k, v, torch.tensor(lengths), splits=2, return_lse=True, **fns)
    close(out, lse, oracle(q, [k[i, :, :n] for i, n in enumerate(lengths)],
                           [v[i, :, :n] for i, n in enumerate(lengths)], lengths, **fns))


@pytest.mark.parametrize("name", ["sink", "off_by_one"])
def test_a_softmax_family_cascade_decodes_with_its_normaliser_term_added_once(name: str) -> None:
    cascade = attndsl.parse_file(EXAMPLES_DIR / f"{name}.attn")[name]
    lengths, h = [30, 1, 0], 2
    captured = {"sink": torch.tensor([0.3, -2.0])} if name == "sink" else {}
    seqs_k = [torch.randn(h, n, D) for n in lengths]
    seqs_v = [torch.randn(h, n, D) for n in lengths]
    table, pool = random_pages(lengths, 16, 1, torch.Generator().manual_seed(5))
    q = torch.randn(3, h, 1, D)
    out = attndsl.decode(q, fill_pages(seqs_k, table, pool, 16, "NHPD"),
                         fill_pages(seqs_v, table, pool, 16, "NHPD"), torch.tensor(lengths),
                         page_table=table, layout="NHPD", splits=2, cascade=cascade,
                         captured=captured)
    for i, n in enumerate(lengths):
        if n == 0:
            assert torch.equal(out[i], torch.zeros_like(out[i]))
            continue
        qf = torch.zeros(1, h, n, D, dtype=torch.float64)
        qf[0, :, -1] = q[i, :, 0].double()
        ref = attndsl.run_cascade(cascade, {"Q": qf, "K": seqs_k[i][None].double(),
                                            "V": seqs_v[i][None].double(), **captured},
                                  {"scale": 1 / math.sqrt(D)})
        torch.testing.assert_close(out[i, :, 0].double(), ref["O"][0, :, -1], atol=2e-5,
                                   rtol=2e-5)


def test_a_cascades_own_scale_parameter_is_used_when_no_scale_is_passed() -> None:
    cascade = attndsl.parse_file(EXAMPLES_DIR / "off_by_one.attn")["off_by_one"]
    k, v, q = torch.randn(1, 2, 20, D), torch.randn(1, 2, 20, D), torch.randn(1, 2, 1, D)
    lengths = torch.tensor([20])
    own = attndsl.decode(q, k, v, lengths, cascade=cascade, params={"scale": 0.5})
    given = attndsl.decode(q, k, v, lengths, cascade=cascade, scale=0.5)
    default = attndsl.decode(q, k, v, lengths, cascade=cascade)
    torch.testing.assert_close(own, given)
    assert not torch.allclose(own, default)


def _small_cache(num_pages: int = 4, max_pages: int = 4) -> attndsl.PagedKVCache:
    return attndsl.PagedKVCache(num_pages=num_pages, page_size=16, heads=2, head_dim=8,
                                max_batch=2, max_pages=max_pages)


@pytest.mark.parametrize("k_shape, v_shape", [
    ((2, 3, 4, 8), (2, 3, 4, 8)),    # more heads than the cache's
    ((2, 2, 4, 4), (2, 2, 4, 8)),    # another head dim
    ((2, 2, 4, 8), (2, 2, 5, 8)),    # k and v of different lengths
    ((2, 2, 8), (2, 2, 8)),          # not 4-d
])
def test_cache_append_of_a_wrong_shape_is_refused_with_the_expected_shape(k_shape, v_shape):
    cache = _small_cache()
    with pytest.raises(AttentionError, match=r"must be \[2, 2, L, 8\]"):
        cache.append(torch.randn(k_shape), torch.randn(v_shape))


@pytest.mark.parametrize("k_dtype, v_dtype", [
    (torch.float16, torch.float16),   # an exact widening into the fp32 cache
    (torch.float64, torch.float64),   # a lossy narrowing
    (torch.float32, torch.bfloat16),  # v alone
])
def test_cache_append_of_another_dtype_is_refused_naming_both_and_writes_nothing(
        k_dtype, v_dtype) -> None:
    cache = _small_cache()
    with pytest.raises(AttentionError, match=rf"are {k_dtype}, {v_dtype}; the cache holds "
                                             rf"torch.float32"):
        cache.append(torch.randn(2, 2, 4, 8, dtype=k_dtype), torch.randn(2, 2, 4, 8,
                                                                         dtype=v_dtype))
    assert int(cache.lengths.sum()) == 0
    half = attndsl.PagedKVCache(num_pages=4, page_size=16, heads=2, head_dim=8, max_batch=2,
                                max_pages=4, dtype=torch.float16)
    kv = torch.randn(2, 2, 4, 8, dtype=torch.float16)
    half.append(kv, kv)  # the cache's own dtype is stored as it is
    assert torch.equal(half.k_pages[half.page_table[0, 0].long(), :4], kv[0].transpose(0, 1))


def test_cache_append_that_runs_out_of_pages_writes_nothing():
    cache = _small_cache(num_pages=4)
    cache.append(torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 8))  # 2 pages each: pool full
    before = (cache.lengths.clone(), cache.page_table.clone(), cache.k_pages.clone())
    with pytest.raises(AttentionError, match="out of pages.*nothing was written"):
        cache.append(torch.randn(2, 2, 13, 8), torch.randn(2, 2, 13, 8))  # seq 0 fits, 1 not
    assert torch.equal(cache.lengths, before[0]) and torch.equal(cache.page_table, before[1])
    assert torch.equal(cache.k_pages, before[2])


def test_cache_append_to_unknown_or_repeated_sequences_is_refused():
    cache = _small_cache()
    kv = torch.randn(2, 2, 4, 8)
    for seqs in ([0, 2], [1, 1], [-1, 0]):
        with pytest.raises(AttentionError, match="distinct sequence numbers"):
            cache.append(kv, kv, seqs=seqs)


@pytest.mark.parametrize("sizes, match", [
    ({"page_size": 20}, "page_size must be a positive multiple of 16"),
    ({"page_size": 0}, "page_size must be a positive multiple of 16"),
    ({"num_pages": -1}, "num_pages must be a positive int"),
    ({"max_batch": 0}, "max_batch must be a positive int"),
])
def test_a_cache_of_unusable_sizes_is_refused_when_made(sizes: dict, match: str) -> None:
    args = {"num_pages": 4, "page_size": 16, "heads": 2, "head_dim": 8, "max_batch": 2,
            "max_pages": 4, **sizes}
    with pytest.raises(AttentionError, match=match):
        attndsl.PagedKVCache(args.pop("num_pages"), args.pop("page_size"), args.pop("heads"),
                             args.pop("head_dim"), **args)


def test_cache_bookkeeping_refuses_a_negative_sequence_rather_than_counting_from_the_end():
    cache = _small_cache()
    cache.append(torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8))
    for call in (lambda: cache.free(-1), lambda: cache.gather(-1), lambda: cache.reserve(-1, 4),
                 lambda: cache.gather(2)):
        with pytest.raises(AttentionError, match=r"the sequence must be an int in \[0, 2\)"):
            call()
    assert cache.lengths.tolist() == [4, 4]  # sequence 1 was not freed


def test_decode_names_the_page_table_row_that_lists_a_page_twice() -> None:
    pool = torch.randn(4, 16, 1, 16)
    q = torch.randn(2, 1, 1, 16)
    table = torch.tensor([[0, 1], [2, 2]])
    with pytest.raises(AttentionError, match="page_table row 1 lists a page twice"):
        attndsl.decode(q, pool, pool, torch.tensor([20, 20]), page_table=table)


def test_decode_refuses_lengths_that_are_not_a_tensor() -> None:
    cache = torch.randn(2, 1, 32, 16)
    with pytest.raises(AttentionError, match="lengths must be an integer tensor.*got list"):
        attndsl.decode(torch.randn(2, 1, 1, 16), cache, cache, [5, 3])


@pytest.mark.parametrize("arg, value, match", [
    ("key", torch.zeros(2, 8, D), r"dense key cache must be \(B, Hkv, N, D\), got \(2, 8, 16\)"),
    ("value", torch.zeros(2, 1, 8, D, 1), r"dense value cache must be \(B, Hkv, N, D\)"),
    ("query", [[0.0]], "query must be a torch.Tensor, got list"),
    ("key", None, "key must be a torch.Tensor, got NoneType"),
    ("sinks", [0.0, 0.0], "sinks must be a torch.Tensor, got list"),
    ("page_table", [[0]], "page_table must be a torch.Tensor, got list"),
])
def test_decode_refuses_arguments_of_the_wrong_kind_or_rank(arg: str, value, match: str) -> None:
    given = {"query": torch.zeros(2, 2, 1, D), "key": torch.zeros(2, 1, 8, D),
             "value": torch.zeros(2, 1, 8, D), "lengths": torch.tensor([8, 3])}
    extra = {arg: value} if arg in ("sinks", "page_table") else {}
    if arg not in extra:
        given[arg] = value
    with pytest.raises(AttentionError, match=match):
        attndsl.decode(*given.values(), **extra)


def test_a_boolean_page_table_is_refused_not_read_as_pages_0_and_1() -> None:
    pages = torch.zeros(4, 16, 1, D)
    with pytest.raises(AttentionError, match="page_table must be an integer"):
        attndsl.decode(torch.zeros(1, 1, 1, D), pages, pages, torch.tensor([20]),
                       page_table=torch.tensor([[True, False]]))


@pytest.mark.parametrize("stride_rows", [24, 32, 40])
def test_a_page_pool_whose_pages_do_not_start_on_16_row_blocks_is_refused_not_misread(
        stride_rows: int) -> None:
    """Pages of 16 rows whose starts lie ``stride_rows`` rows apart (a padded pool): at 24 or
    40 rows page 1 starts mid-block, which the block tables (one block per page) read
    wrongly; it is refused, naming the stride.  At 32 rows the pool is read exactly."""
    gen = torch.Generator().manual_seed(8)
    page, heads, d = 16, 2, 16
    store = torch.zeros(3 * stride_rows * heads * d + 1024)
    k_pool, v_pool = (store.as_strided((3, page, heads, d), (stride_rows * heads * d,
                                                             heads * d, d, 1), offset)
                      for offset in (0, page * heads * d))
    table = torch.tensor([[2, 0], [1, 1]])
    lengths = [20, 9]
    ks, vs = [], []
    for b, n in enumerate(lengths):
        k, v = (torch.randn(n, heads, d, generator=gen) for _ in range(2))
        for i in range(-(-n // page)):
            rows = slice(i * page, min(n, (i + 1) * page))
            k_pool[table[b, i], : rows.stop - rows.start] = k[rows]
            v_pool[table[b, i], : rows.stop - rows.start] = v[rows]
        ks.append(k.transpose(0, 1))
        vs.append(v.transpose(0, 1))
    q = torch.randn(2, 4, 1, d, generator=gen)
    run = lambda: attndsl.decode(q, k_pool, v_pool, torch.tensor(lengths),  # noqa: E731
                                 page_table=table)
    if stride_rows % 16:
        with pytest.raises(AttentionError, match=rf"pages start every {stride_rows} rows"):
            run()
        return
    out = run()
    for b in range(len(lengths)):
        k, v = (x.repeat_interleave(2, 0) for x in (ks[b], vs[b]))
        want = torch.softmax(q[b].double() @ k.double().transpose(-1, -2) / d ** 0.5, -1) \
            @ v.double()
        torch.testing.assert_close(out[b].double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch", [4, 0, True, 1.0])
def test_the_cache_refuses_a_batch_it_does_not_hold_for_flex_attention(batch) -> None:
    cache = attndsl.PagedKVCache(8, 16, 1, D, max_batch=3, max_pages=2)
    with pytest.raises(AttentionError, match=r"batch must be an int in \[1, 3\]"):
        cache.block_mask(None, batch, 1)
    with pytest.raises(AttentionError, match=r"batch must be an int in \[1, 3\]"):
        cache.score_mod(lambda s, b, h, q, kv: s, batch, 1)
