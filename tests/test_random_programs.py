"""Random score and mask programs (hypothesis builds expression trees of the ops a score_mod or
mask_mod may use), compiled and run, against the float64 oracle and against calling the
functions directly on broadcast index tensors."""

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

import attndsl

# An expression is a function of (score, b, h, q, kv) built from these pieces.
INT_LEAVES = [lambda s, b, h, q, kv: q, lambda s, b, h, q, kv: kv,
              lambda s, b, h, q, kv: h, lambda s, b, h, q, kv: q - kv]


def _int_expr(depth: int):
    leaf = st.sampled_from(INT_LEAVES)
    if depth == 0:
        return leaf
    sub = _int_expr(depth - 1)
    const = st.integers(1, 7)
    return st.one_of(
        leaf,
        st.builds(lambda f, c: lambda *a: f(*a) // c, sub, const),
        st.builds(lambda f, c: lambda *a: f(*a) % c, sub, const),
        st.builds(lambda f, g: lambda *a: f(*a) + g(*a), sub, sub),
        st.builds(lambda f, g: lambda *a: f(*a) - g(*a), sub, sub),
        st.builds(lambda f: lambda *a: f(*a).abs(), sub),
    )


def _bool_expr(depth: int):
    ints = _int_expr(2)
    cmp = st.sampled_from(["lt", "le", "ge", "eq", "ne"])
    atom = st.builds(lambda f, g, c: lambda *a: getattr(f(*a), c)(g(*a)), ints, ints, cmp)
    if depth == 0:
        return atom
    sub = _bool_expr(depth - 1)
    return st.one_of(atom, st.builds(lambda f, g: lambda *a: f(*a) & g(*a), sub, sub),
                     st.builds(lambda f, g: lambda *a: f(*a) | g(*a), sub, sub),
                     st.builds(lambda f: lambda *a: ~f(*a), sub))


def _float_expr(depth: int):
    leaf = st.one_of(st.just(lambda s, b, h, q, kv: s),
                     st.builds(lambda f: lambda *a: f(*a).float() * 0.1, _int_expr(1)))
    if depth == 0:
        return leaf
    sub = _float_expr(depth - 1)
    c = st.floats(-2, 2, allow_nan=False).filter(lambda x: abs(x) > 0.05)
    return st.one_of(
        leaf,
        st.builds(lambda f, g: lambda *a: f(*a) + g(*a), sub, sub),
        st.builds(lambda f, k: lambda *a: f(*a) * k, sub, c),
        st.builds(lambda f: lambda *a: torch.tanh(f(*a)), sub),
        st.builds(lambda f: lambda *a: torch.sigmoid(f(*a)) * 3, sub),
        st.builds(lambda f, g: lambda *a: torch.maximum(f(*a), g(*a)), sub, sub),
        st.builds(lambda f, m, g: lambda *a: torch.where(m(*a), f(*a), g(*a)), sub,
                  _bool_expr(0), sub),
        st.builds(lambda f: lambda *a: f(*a).abs().clamp(max=3.0), sub),
    )


def _direct(fn, *shape_args):
    """Call the function on broadcast index tensors, as torch's eager flex does."""
    return fn(*shape_args)


@given(score=_float_expr(3), mask=st.one_of(st.none(), _bool_expr(2)),
       lq=st.integers(1, 40), lkv=st.integers(1, 40), seed=st.integers(0, 5))
def test_random_programs_match_oracle_and_direct_evaluation(score, mask, lq, lkv, seed):
    def score_mod(s, b, h, q, kv):
        return score(s, b, h, q, kv)

    mask_mod = None if mask is None else (lambda b, h, q, kv: mask(None, b, h, q, kv))
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen) for n in (lq, lkv, lkv))
    out, lse = attndsl.flex_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod,
                                      return_lse=True)
    kernel = attndsl.compile(score_mod=score_mod, mask_mod=mask_mod)
    ref = attndsl.run_cascade(kernel.compiled.cascade, {"Q": q, "K": k, "V": v,
                                                        **kernel.captured},
                              {"scale": 0.25, "G": 1})
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.double(), ref["O"], atol=1e-4, rtol=1e-4)
    finite = torch.isfinite(ref["LSE"])
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse.double()[finite], ref["LSE"][finite], atol=1e-4, rtol=1e-4)
    # the oracle agrees with the functions evaluated directly on index tensors
    bi, hi = torch.arange(1).view(-1, 1, 1, 1), torch.arange(2).view(1, -1, 1, 1)
    qi, ki = torch.arange(lq).view(1, 1, -1, 1), torch.arange(lkv).view(1, 1, 1, -1)
    s = torch.einsum("bhme,bhne->bhmn", q.double(), k.double()) * 0.25
    scores = score_mod(s, bi, hi, qi, ki).double().expand(1, 2, lq, lkv)
    if mask_mod is not None:
        keep = mask_mod(bi, hi, qi, ki).expand(1, 2, lq, lkv)
        scores = torch.where(keep, scores, torch.tensor(-math.inf, dtype=scores.dtype))
    direct_lse = torch.logsumexp(scores, -1)
    torch.testing.assert_close(direct_lse[finite], ref["LSE"][finite], atol=1e-6, rtol=1e-6)
