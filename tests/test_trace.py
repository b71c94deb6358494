"""The FlexAttention tracer: traced expressions evaluate like the functions themselves, the
printed cascade is stable, and untraceable code gets an error naming function and line."""

import pytest
import torch

from attndsl.eager import eval_expr
from attndsl.frontend.flex import lower_flex
from attndsl.frontend.trace import TraceError
from attndsl.ir import expr as E
from attndsl.ir.cascade import verify
from attndsl.ir.expr import BOOL

B, H, L = 2, 3, 11
table = torch.randn(H, 2 * L - 1)
doc = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3])
bias = torch.randn(B, H, L, L)
lengths = torch.tensor([7, 11])
temperature = torch.tensor(0.7)

SCORE_MODS = {
    "relative": lambda s, b, h, q, kv: s + table[h, q - kv + L - 1],
    "softcap": lambda s, b, h, q, kv: 30 * torch.tanh(s / 30),
    "alibi": lambda s, b, h, q, kv: s - (2.0 ** (-(h + 1))) * (q - kv).abs(),
    "full_bias": lambda s, b, h, q, kv: s + bias[b, h, q, kv],
    "where": lambda s, b, h, q, kv: torch.where(q >= kv, s, s * 0.5 - 1.0),
    "clamp_log": lambda s, b, h, q, kv: s + torch.log((q - kv).abs().clamp(min=1).float()),
    "sigmoid_exp": lambda s, b, h, q, kv: torch.sigmoid(s) * torch.exp(-(q - kv) / 4.0),
    "temperature": lambda s, b, h, q, kv: s / temperature,
    "floor_mod": lambda s, b, h, q, kv: s + ((q - kv) // 3 % 2).to(torch.float32),
    "head_bias": lambda s, b, h, q, kv: s + 2 * h,
    "min_max": lambda s, b, h, q, kv: torch.minimum(torch.maximum(s, s * 0.1), s + 1),
}
MASK_MODS = {
    "causal": lambda b, h, q, kv: kv <= q,
    "document": lambda b, h, q, kv: (doc[q] == doc[kv]) & (kv <= q),
    "padding": lambda b, h, q, kv: kv < lengths[b],
    "not_or": lambda b, h, q, kv: ~((q - kv > 3) | (kv > q)),
    "dilated": lambda b, h, q, kv: ((q - kv) % 2 == 0) & (kv <= q),
    "xor": lambda b, h, q, kv: (kv < 4) ^ (q < 4),
}


def _grid():
    axes = ["b", "h", "m", "n"]
    ranges = {"b": torch.arange(B), "h": torch.arange(H), "m": torch.arange(L),
              "n": torch.arange(L)}
    direct = [ranges[a].reshape([-1 if i == j else 1 for j in range(4)])
              for i, a in enumerate(axes)]
    return axes, ranges, direct


@pytest.mark.parametrize("name", sorted(SCORE_MODS))
def test_traced_score_mod_matches_the_function(name: str) -> None:
    fn = SCORE_MODS[name]
    spec = lower_flex(fn, None)
    expr = spec.cascade.equation("T").expr
    axes, ranges, (b, h, q, kv) = _grid()
    s = torch.randn(B, H, L, L, dtype=torch.float64)
    traced = eval_expr(expr, axes, ranges, {"S": s, **spec.captured})
    direct = fn(s, b, h, q, kv)
    torch.testing.assert_close(traced.expand_as(s), direct.expand_as(s).to(torch.float64),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(MASK_MODS))
def test_traced_mask_mod_matches_the_function(name: str) -> None:
    fn = MASK_MODS[name]
    spec = lower_flex(None, fn)
    axes, ranges, (b, h, q, kv) = _grid()
    traced = eval_expr(spec.cascade.mask.expr, axes, ranges, spec.captured)
    shape = (B, H, L, L)
    assert torch.equal(traced.expand(shape), fn(b, h, q, kv).expand(shape))


def test_flex_cascade_golden_text() -> None:
    spec = lower_flex(SCORE_MODS["relative"], MASK_MODS["causal"])
    assert str(spec.cascade).splitlines()[11:] == [
        "  param scale: float",
        "  param G: int",
        "  mask Keep[b, h, m, n] = n <= m",
        "  S[b, h, m, n] = (sum(e) (Q[b, h, m, e] * K[b, h // G, n, e])) * scale",
        "  T[b, h, m, n] = S[b, h, m, n] + cap0[h, m - n + 11 - 1]",
        "  P[b, h, m, n] = softmax(n) T[b, h, m, n]",
        "  O[b, h, m, f] = sum(n) (P[b, h, m, n] * V[b, h // G, n, f])",
        "  LSE[b, h, m] = log(sum(n) exp(T[b, h, m, n]))",
        "  MAX[b, h, m] = max(n) T[b, h, m, n]",
        "  outputs O, LSE, MAX",
    ]
    verify(spec.cascade)


def _data_dependent_if(score, b, h, q, kv):
    if score > 0:
        return score
    return -score


def _in_place(score, b, h, q, kv):
    return score.add_(1)


def _cumsum(score, b, h, q, kv):
    return torch.cumsum(score, 0)


def _slice(score, b, h, q, kv):
    return score + table[h, :]


@pytest.mark.parametrize("fn, message", [
    (_data_dependent_if, "data-dependent Python control flow"),
    (_in_place, "in-place operation .add_()"),
    (_cumsum, "torch operation 'cumsum' is not supported"),
    (_slice, "slices, None and ... are not supported"),
])
def test_untraceable_functions_name_the_function_and_line(fn, message) -> None:
    with pytest.raises(TraceError) as info:
        lower_flex(fn, None)
    text = str(info.value)
    assert message in text and fn.__name__ in text and "test_trace.py:" in text


@pytest.mark.parametrize("make", [torch.tensor, torch.as_tensor, torch.is_tensor],
                         ids=["tensor", "as_tensor", "is_tensor"])
def test_torch_reading_a_symbol_as_a_tensor_is_refused_or_false(make) -> None:
    """A symbol is not a torch.Tensor to torch's C++ argument parser, which reads a tensor's
    storage once ``isinstance`` says it is one: a symbol passing as one (a ``__class__``
    property) crashed the process in ``torch.tensor(score)``.  ``torch.is_tensor`` of a symbol,
    False here and True under torch, is refused: a program branching on it would trace the
    other branch than torch runs, silently."""
    def score(s, b, h, q, kv):
        out = make(s)
        return s if out is False else out
    with pytest.raises(TraceError, match="is_tensor of a symbolic argument" if
                       make is torch.is_tensor else "cannot trace score"):
        lower_flex(score, None)


def test_is_tensor_of_a_captured_tensor_is_allowed() -> None:
    """Only a symbol is refused: a captured tensor is a tensor in both worlds."""
    bias = torch.randn(4)
    spec = lower_flex(lambda s, b, h, q, kv: s + bias[h] if torch.is_tensor(bias) else s, None)
    assert [t is bias for t in spec.captured.values()] == [True]  # its branch was traced


def test_mask_mod_must_return_bool() -> None:
    with pytest.raises(TraceError, match="mask_mod must return a boolean"):
        lower_flex(None, lambda b, h, q, kv: q - kv)


def test_bool_arithmetic_stays_boolean_as_in_torch() -> None:
    """torch: bool * bool is and, bool + bool is or, bool - bool an error."""
    mask = lower_flex(None, lambda b, h, q, kv: (q >= kv) * (kv > 3) + (kv == 0)).cascade.mask
    assert mask is not None and mask.expr.dtype == BOOL
    q = torch.arange(6)[:, None]
    kv = torch.arange(6)[None, :]
    got = eval_expr(mask.expr, ["m", "n"], {"m": torch.arange(6), "n": torch.arange(6)}, {})
    assert torch.equal(got.bool(), (q >= kv) * (kv > 3) + (kv == 0))
    with pytest.raises(TraceError, match="subtracting two booleans"):
        lower_flex(None, lambda b, h, q, kv: (q >= kv) - (kv > 3))


def test_score_mod_returning_bool_is_rejected() -> None:
    with pytest.raises(TraceError, match="did you mean to pass it as mask_mod"):
        lower_flex(lambda s, b, h, q, kv: q >= kv, None)


def test_float_subscript_is_rejected() -> None:
    with pytest.raises(TraceError, match="float expression"):
        lower_flex(lambda s, b, h, q, kv: s + table[h, (q - kv) / 2], None)


def test_render_parenthesises_comparisons_under_and() -> None:
    m, n = E.index("m"), E.index("n")
    e = E.binary(E.Op.AND, E.binary(E.Op.LE, n, m), E.binary(E.Op.LT, m - n, 8))
    assert E.render(e) == "(n <= m) & (m - n < 8)"


def test_tracing_under_a_running_profiler() -> None:
    """The tracer's return-line hook must not displace (or break on) a user's profiler."""
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        spec = lower_flex(SCORE_MODS["softcap"], MASK_MODS["causal"])
    finally:
        profiler.disable()
    assert spec.cascade.mask is not None
