"""The forward kernel's specialisations (EVEN_M / EVEN_N / EVEN_E / EVEN_F, SCALE_NONNEG) are
chosen at launch from the problem: each case that turns one off still gives the oracle's
answer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attndsl.eager import run_cascade
from attndsl.frontend.load import load_spec
from attndsl.passes.pipeline import compile_cascade
from attndsl.runtime.modules import load_kernel_module, module_source

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


def _causal(m: int, n: int, e: int, f: int, scale: float) -> tuple[dict, dict]:
    cascade, _ = load_spec(str(ROOT / "examples" / "causal.attn")).build()
    module = load_kernel_module(compile_cascade(cascade).kernel)
    inputs = {"Q": torch.randn(1, 2, m, e), "K": torch.randn(1, 2, n, e),
              "V": torch.randn(1, 2, n, f)}
    out = module.launch(inputs, {"scale": scale}, {}, None, dict(CONFIG))
    return out, run_cascade(cascade, inputs, {"scale": scale})


@pytest.mark.parametrize("scale", [-30.0, -0.4, 0.0, 0.3])
def test_a_score_scale_of_any_sign_gives_the_oracles_attention(scale: float) -> None:
    """rowmax(qk * s) = rowmax(qk) * s only for s >= 0: a negative softmax scale (or 0)
    must take the general row max on unmasked tiles (with the min in its place, exp2 of
    scores far above it overflows)."""
    out, ref = _causal(256, 256, 16, 16, scale)  # the 128-key blocks below the diagonal: unmasked
    # fp32 scores of magnitude ~500 at scale -30: 1e-4 is a few ulps of them
    torch.testing.assert_close(out["O"].double(), ref["O"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["LSE"].double(), ref["LSE"], atol=1e-4, rtol=1e-4)


def test_ragged_lengths_and_head_dims_below_the_block_give_the_oracles_attention() -> None:
    """M and N not multiples of the tile, E and F below their power-of-two blocks: every
    load and the scores keep their masks."""
    out, ref = _causal(21, 27, 12, 20, 0.25)
    torch.testing.assert_close(out["O"].double(), ref["O"], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out["LSE"].double(), ref["LSE"], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 1e4])
def test_softcap_kernel_matches_the_float64_softcap_from_tiny_to_saturated_scores(
        magnitude: float) -> None:
    """The printed tanh (1 - 2 / (2^(2x log2 e) + 1), the cap folded in) is exact at both
    ends: scores of 1e4 saturate to +-cap (2^+inf and 2^-inf, no nan), scores near 0 keep
    their absolute accuracy."""
    import attndsl

    def softcap(score, b, h, q_idx, kv_idx):
        return 20 * torch.tanh(score / 20)

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=gen) for _ in range(3))
    q = q * magnitude
    out = attndsl.flex_attention(q, k, v, score_mod=softcap, kernel_options=dict(CONFIG))
    s = 20 * torch.tanh((q.double() @ k.double().transpose(-1, -2)) * 0.25 / 20)
    ref = torch.softmax(s, -1) @ v.double()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def _table_attention(subscript, length: int = 48) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """flex attention with ``score + table[h, subscript(q, kv)]`` (a [2, 2 length] table):
    the output, the float64 reference (torch's indexing: negatives wrap) and the recorded
    launch's constexprs."""
    import attndsl
    from attndsl.runtime.gpu_report import record_launches

    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, length, 16, generator=gen) for _ in range(3))
    table = torch.randn(2, 2 * length, generator=gen)

    def bias(score, b, h, q_idx, kv_idx):
        return score + table[h, subscript(q_idx, kv_idx)]

    out = attndsl.flex_attention(q, k, v, score_mod=bias, kernel_options=dict(CONFIG))
    launch, = record_launches(lambda: attndsl.flex_attention(
        q, k, v, score_mod=bias, kernel_options=dict(CONFIG)))
    m, n = torch.arange(length)[:, None], torch.arange(length)[None, :]
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.25 + \
        table.double()[torch.arange(2)[:, None, None], subscript(m, n)][None]
    return out, torch.softmax(s, -1) @ v.double(), launch.constexprs


def test_a_relative_bias_launch_drops_the_wrap_and_the_int64_subscript_math() -> None:
    """table[h, q - kv + L - 1] is never negative and fits int32 for these lengths: the
    launch sets NONNEG_SUBSCRIPTS and I32_INDICES (no select, int32 offsets per element),
    and the result is torch's."""
    out, ref, consts = _table_attention(lambda q, kv: q - kv + 47)
    assert consts["NONNEG_SUBSCRIPTS"] is True and consts["I32_INDICES"] is True
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_a_negative_table_subscript_keeps_torchs_wrap() -> None:
    """table[h, q - kv] is negative above the diagonal: the wrap stays (NONNEG_SUBSCRIPTS
    False) and the kernel reads from the end of the row, as torch does."""
    out, ref, consts = _table_attention(lambda q, kv: q - kv)
    assert consts["NONNEG_SUBSCRIPTS"] is False
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("length", [64, 48])
def test_row_masks_fold_away_under_even_m_and_stay_on_a_ragged_query_tile(length: int) -> None:
    """table[h, q - kv + L - 1] read per (query, key): with 64 queries (EVEN_M) every row of
    every tile exists and the kernel makes ``row_ok`` all-true, so the reads lose their row
    mask; with 48 the last query tile's rows 48..63 would read past the table, and their
    mask stays.  Both are torch's answer."""
    import inspect

    import attndsl
    from attndsl.runtime.gpu_report import record_launches

    out, ref, consts = _table_attention(lambda q, kv: q - kv + length - 1, length)
    assert consts["EVEN_M"] is (length % CONFIG["BLOCK_M"] == 0)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    q = torch.randn(1, 1, 32, 16)
    launch, = record_launches(lambda: attndsl.flex_attention(
        q, q, q, score_mod=lambda s, b, h, m, n: s + q[0, 0, m, 0], kernel_options=CONFIG))
    source = Path(inspect.getsourcefile(launch.fn)).read_text()
    assert "    if EVEN_M:" in source and "row_ok = tl.full([BLOCK_M], 1, tl.int1)" in source


# masks that read q and kv only as q - kv or a comparison of the two (printed on the rows
# relative to the tile's first key), next to ones that read an index alone (printed as written)
DIAGONAL_MASKS = {
    "causal": (lambda b, h, q, kv: q >= kv, "offs_m_rel = offs_m - start_n"),
    "anti-causal": (lambda b, h, q, kv: kv > q, "offs_m_rel = offs_m - start_n"),
    "window": (lambda b, h, q, kv: (q >= kv) & (q - kv <= 9), "diag = "),
    "stripes": (lambda b, h, q, kv: ((kv - q) % 3 == 0) | (q == kv), "diag = "),
    "prefix": (lambda b, h, q, kv: (kv < 5) | (q >= kv), None),
    "band of one index": (lambda b, h, q, kv: (q >= kv) & (kv % 4 != 1), None),
}


@pytest.mark.parametrize("name", DIAGONAL_MASKS)
def test_masks_of_the_index_difference_compare_relative_rows_and_give_torchs_attention(
        name: str) -> None:
    """A mask that reads q and kv only through q - kv (or compares them) is printed on the
    query rows relative to start_n against the constant columns 0..BLOCK_N-1, so no
    per-column index lives across the key tiles; a mask that reads an index alone is not.
    Either way, over ragged lengths and several key tiles, the result is torch's."""
    import attndsl
    from attndsl.frontend.flex import lower_flex

    mask, printed = DIAGONAL_MASKS[name]
    source = module_source(compile_cascade(lower_flex(mask_mod=mask).cascade).kernel)
    step = source[source.index("if MASKED:  # a partial tile"):]
    step = step[:step.index("keep = keep & col_ok")]
    if printed is None:
        assert "offs_m_rel" not in step and "diag" not in step, step
    else:
        assert printed in step and "offs_n" not in step, step
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, length, 16, generator=gen) for length in (45, 77, 77))
    out = attndsl.flex_attention(q, k, v, mask_mod=mask, kernel_options=dict(CONFIG))
    keep = mask(0, 0, torch.arange(45)[:, None], torch.arange(77)[None, :])
    s = ((q.double() @ k.double().transpose(-1, -2)) * 0.25).masked_fill(~keep, -torch.inf)
    ref = torch.nan_to_num(torch.softmax(s, -1)) @ v.double()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)



def _weighted_dots(fn) -> list:
    """The ``tl.dot(p.to(v.dtype), v)`` calls of a step function (weights times a V tile)."""
    import ast

    return [c for c in ast.walk(fn) if isinstance(c, ast.Call) and ast.unparse(c.func) == "tl.dot"
            and isinstance(c.args[0], ast.Call) and ast.unparse(c.args[0].func).endswith(".to")]


@pytest.mark.parametrize("spec", ["causal.attn", "differential.attn", "softpick.attn",
                                  "off_by_one.attn", "softmax_3pass.attn"])
def test_each_step_updates_its_row_sums_before_it_loads_the_v_tile(spec: str) -> None:
    """The tutorial's order: a step's row sums (``l_i = l_i * alpha + tl.sum(p, 1)``) come
    before the V loads and the ``p @ V`` dots, so the float32 weights are last read by their
    fp16 copy at the dot and are not live across the V tile (sm80 dense D=128: 210 -> 197
    registers).  Every step function of the spec's kernel is checked."""
    import ast

    cascade, _ = load_spec(str(ROOT / "examples" / spec)).build()
    tree = ast.parse(module_source(compile_cascade(cascade).kernel))
    steps = [f for f in tree.body if isinstance(f, ast.FunctionDef)
             and f.name.startswith("_key_tile_step_")]
    checked = 0
    for fn in steps:
        v_names = {ast.unparse(d.args[1]) for d in _weighted_dots(fn)}
        body = [ast.unparse(node) for node in fn.body]
        v_loads = [i for i, t in enumerate(body)
                   if any(f"{v} = " in t for v in v_names)]
        row_sums = [i for i, t in enumerate(body) if "tl.sum(" in t and "tl.dot(" not in t]
        if v_loads and row_sums:
            assert max(row_sums) < min(v_loads), (fn.name, body)
            checked += 1
    assert checked, "no step with both a row sum and a V tile"


@pytest.mark.parametrize("lengths", [(64, 96), (45, 77)])
def test_rows_with_no_finite_score_yet_keep_a_finite_stabiliser_and_torchs_attention(
        lengths: tuple[int, int]) -> None:
    """A score of -inf on the first key tiles of a row (and on every key of the last rows)
    would leave the running max at -inf there; it starts at -FLT_MAX instead (no compare and
    select per tile): every weight 2^(-inf + FLT_MAX) is exactly
    0, the next finite tile rescales nothing, and the result is torch's (rows of no finite
    score: output 0, lse -inf), over full tiles (EVEN_N) and ragged ones."""
    import attndsl
    from attndsl.frontend.flex import lower_flex

    def score_mod(score, b, h, q, kv):
        return torch.where(kv < 2 * q, -torch.inf, score)

    source = module_source(compile_cascade(lower_flex(score_mod=score_mod).cascade).kernel)
    # the max starts finite (codegen/triton.py _emit_kernel): no per-tile -inf replacement
    assert "m_i = tl.full([BLOCK_M], -3.4028234663852886e+38, tl.float32)" in source
    assert 'm_i_new == float("-inf")' not in source
    assert "tl.maximum(m_i_new, -3.4028234663852886e+38)" not in source
    m, n = lengths
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, length, 16, generator=gen) for length in (m, n, n))
    out, lse = attndsl.flex_attention(q, k, v, score_mod=score_mod, return_lse=True,
                                      kernel_options=dict(CONFIG))
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.25
    s = torch.where(torch.arange(n)[None, :] < 2 * torch.arange(m)[:, None], -torch.inf, s)
    ref = torch.nan_to_num(torch.softmax(s, -1)) @ v.double()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    dead = 2 * torch.arange(m) >= n  # rows of no finite score
    assert dead.any() and not dead.all()
    assert torch.isneginf(lse[..., dead]).all()
    torch.testing.assert_close(lse[..., ~dead].double(), torch.logsumexp(s, -1)[..., ~dead],
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("spec", ["sliding_window.attn", "gqa_causal.attn", "causal.attn"])
def test_each_operand_pointer_tile_adds_its_head_dim_column_before_its_rows(spec: str) -> None:
    """``base + offs_e * stride_e + offs_n * stride_n``: the column term, the same for every
    key tile, is the first addition of each Q, K and V pointer tile.  With the rows first,
    ptxas held more address registers live across the key-tile loops (the sm90 pointer
    variant of sliding window D=128: 214 registers against 189; sm80 GQA D=64: 194 vs 186)."""
    import re

    cascade, _ = load_spec(str(ROOT / "examples" / spec)).build()
    source = module_source(compile_cascade(cascade).kernel)
    tiles = re.findall(r"_load_tile\((base_\w+ \+ .+?), (?:row|col)_ok", source)
    assert len(tiles) >= 3, tiles  # Q, K and V at least
    for tile in tiles:
        terms = tile.split(" + ")
        assert terms[1].startswith(("offs_e", "offs_f")), tile
        assert terms[2].startswith(("offs_m", "offs_n")), tile
