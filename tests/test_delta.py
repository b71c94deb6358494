"""The delta rule from the language: ``recur(n)`` state recurrences, the delta-rule pass's
decision, and the chunked (UT transform) / recurrent Triton kernels against a float64
token-by-token recurrence written here and the float64 oracle; gradients against torch
autograd of the float64 recurrence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attndsl
from attndsl.api import AttentionError
from attndsl.eager import run_cascade
from attndsl.explain import explain
from attndsl.frontend.builder import CascadeBuilder, sigmoid, sqrt
from attndsl.frontend.source import SpecError
from attndsl.frontend.text import format_cascade, parse_file, parse_text
from attndsl.passes.pipeline import compile_cascade

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# DeltaNet with beta and the log decay A given directly (beta in (0, 1], alpha = exp(A)),
# unit keys (K / |K|): the form the hypothesis tests drive at the edges (beta = 1, alpha = 1
# and alpha near 0).
DIRECT = """
spec direct {
  index b: B batch, h: H head, m: L query, n: L key, e: E qk, d: E qk, f: F v
  input Q[B, H, L, E], K[B, H, L, E], V[B, H, L, F]
  tensor beta[B, H, L]: float
  tensor A[B, H, L]: float
  param scale: float
  NK[b,h,n] = sum(e) K[b,h,n,e] * K[b,h,n,e]
  S[b,h,n,e,f] = recur(n) (exp(A[b,h,n]) * S[b,h,n-1,e,f]
      - sum(d) exp(A[b,h,n]) * beta[b,h,n] / NK[b,h,n] * K[b,h,n,e] * K[b,h,n,d] * S[b,h,n-1,d,f]
      + beta[b,h,n] / sqrt(NK[b,h,n]) * K[b,h,n,e] * V[b,h,n,f])
  O[b,h,m,f] = Q[b,h,m,e] * S[b,h,m,e,f] * scale
  output O
}
"""


def spec(name: str):
    return parse_file(EXAMPLES / f"{name}.attn")[name]


def direct():
    return parse_text(DIRECT)["direct"]


def delta_recurrence(q, k, v, beta, alpha, scale, s0=None):
    """S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T with k_t the unit key,
    o_t = scale q_t^T S_t; float64, one token at a time.  q, k [B, H, L, E], v [B, H, L, F],
    beta, alpha [B, H, L]; returns (o [B, H, L, F], S_L [B, H, E, F])."""
    q, k, v, beta, alpha = (x.double() for x in (q, k, v, beta, alpha))
    k = k / k.norm(dim=-1, keepdim=True)
    b, h, length, e = q.shape
    s = torch.zeros(b, h, e, v.shape[-1], dtype=torch.float64) if s0 is None else s0.double()
    outs = []
    for t in range(length):
        kt, bt, at = k[:, :, t], beta[:, :, t, None, None], alpha[:, :, t, None, None]
        erase = kt[..., :, None] * torch.einsum("bhe,bhef->bhf", kt, s)[..., None, :]
        s = at * (s - bt * erase) + bt * kt[..., :, None] * v[:, :, t, None, :]
        outs.append(scale * torch.einsum("bhe,bhef->bhf", q[:, :, t], s))
    o = torch.stack(outs, 2) if outs else v.new_zeros(v.shape).double()
    return o, s


def inputs(b, h, length, e, f, seed, beta_low=0.0, log_alpha=(-1.0, 0.0)):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, length, e, generator=gen) for _ in range(2))
    v = torch.randn(b, h, length, f, generator=gen)
    beta = beta_low + (1 - beta_low) * (1 - torch.rand(b, h, length, generator=gen))  # (0, 1]
    lo, hi = log_alpha
    a = lo + (hi - lo) * torch.rand(b, h, length, generator=gen)
    return q, k, v, beta, a


def close(x, y, tol=2e-4):
    x, y = x.detach(), y.detach()
    scale = max(1.0, float(y.abs().max())) if y.numel() else 1.0
    return float((x.double() - y.double()).abs().max()) <= tol * scale if x.numel() else True


# -- the language and the oracle -------------------------------------------------------------

def test_the_examples_parse_format_back_and_their_oracle_is_the_delta_recurrence():
    q, k, v, _, _ = inputs(2, 2, 9, 4, 3, 0)
    gen = torch.Generator().manual_seed(1)
    bl, al = torch.randn(2, 2, 9, generator=gen), torch.randn(2, 2, 9, generator=gen)
    for name, cap, alpha in (("deltanet", {"Bl": bl}, torch.ones(2, 2, 9)),
                             ("gated_deltanet", {"Bl": bl, "Al": al}, al.double().sigmoid())):
        c = spec(name)
        assert parse_text(format_cascade(c))[name] == c
        got = run_cascade(c, {"Q": q, "K": k, "V": v, **cap}, {"scale": 0.3})["O"]
        want, _ = delta_recurrence(q, k, v, bl.double().sigmoid(), alpha, 0.3)
        assert close(got, want, 1e-12)


def test_the_builder_writes_the_same_recurrence_as_the_text():
    bld = CascadeBuilder("deltanet")
    for name, ext, role in (("b", "B", "batch"), ("h", "H", "head"), ("m", "L", "query"),
                            ("n", "L", "key"), ("e", "E", "qk"), ("d", "E", "qk"),
                            ("f", "F", "v")):
        bld.index(name, ext, role)
    bld.input("Q", "B", "H", "L", "E").input("K", "B", "H", "L", "E")
    bld.input("V", "B", "H", "L", "F").tensor("Bl", "B", "H", "L").param("scale")
    b, h, m, n, e, d, f = (bld.idx(i) for i in "bhmnedf")
    K = lambda i: bld.read("K", b, h, n, i)  # noqa: E731
    bld.eq("NK", "b h n", K(e) * K(e))
    beta, nk = sigmoid(bld.read("Bl", b, h, n)), bld.read("NK", b, h, n)
    bld.recur("S", "b h n e f", n, lambda prev: prev(b, h, n - 1, e, f)
              - beta / nk * K(e) * K(d) * prev(b, h, n - 1, d, f)
              + beta / sqrt(nk) * K(e) * bld.read("V", b, h, n, f))
    bld.eq("O", "b h m f", bld.read("Q", b, h, m, e) * bld.read("S", b, h, m, e, f)
           * bld.var("scale"))
    bld.output("O")
    assert bld.build() == spec("deltanet")


def test_a_builder_recurrence_that_is_no_delta_rule_is_located_at_its_python_line():
    bld = CascadeBuilder("bad")
    for name, ext, role in (("m", "L", "query"), ("n", "L", "key"), ("e", "E", "qk"),
                            ("d", "E", "qk"), ("f", "F", "v")):
        bld.index(name, ext, role)
    bld.input("Q", "L", "E").input("K", "L", "E").input("V", "L", "F")
    m, n, e, d, f = (bld.idx(i) for i in "mnedf")
    line = _line() + 1
    bld.recur("S", "n e f", n, lambda prev: prev(n - 1, e, f) * prev(n - 1, e, f)
              + bld.read("K", n, e) * bld.read("V", n, f))
    bld.eq("O", "m f", bld.read("Q", m, e) * bld.read("S", m, e, f))
    bld.output("O")
    with pytest.raises(attndsl.AttnDSLError, match=rf"test_delta.py:{line}:\d+: error: the "
                                                   rf"term .* reads the state 2 times"):
        compile_cascade(bld.build())


def _line() -> int:
    import inspect

    return inspect.currentframe().f_back.f_lineno


def test_the_oracle_starts_from_a_given_initial_state():
    q, k, v, beta, a = inputs(1, 2, 6, 4, 5, 3)
    s0 = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    got = run_cascade(direct(), {"Q": q, "K": k, "V": v, "beta": beta, "A": a},
                      {"scale": 1.0}, initial_state={"S": s0})["O"]
    want, _ = delta_recurrence(q, k, v, beta, a.double().exp(), 1.0, s0)
    assert close(got, want, 1e-12)


# -- the pass ---------------------------------------------------------------------------------

def test_explain_shows_the_chunked_decision_the_state_and_the_ut_transform():
    text = explain(spec("gated_deltanet"))
    assert "form: chunked delta rule" in text and "state per (batch, head): S: E x F" in text
    assert "UT transform per chunk" in text and "a = sigmoid(Al[b, h, n])" in text
    assert "3. delta-rule:" in text and "no Triton backward" in text


def test_a_decay_that_is_not_provably_positive_runs_recurrent_exactly_and_says_why():
    c = parse_text(DIRECT.replace("exp(A[b,h,n])", "A[b,h,n]"))["direct"]
    decision = compile_cascade(c).recurrence
    assert decision.form == "recurrent"
    assert "is not provably positive" in str(decision)
    q, k, v, beta, a = inputs(1, 1, 5, 4, 4, 0)
    kern = attndsl.compile(c)
    with pytest.raises(AttentionError, match="has no chunked form"):
        kern.linear({"Q": q, "K": k, "V": v}, captured={"beta": beta, "A": a}, chunk=16)
    signed = a.exp() * torch.where(torch.arange(5) % 2 == 0, 1.0, -1.0)  # a < 0 at odd n
    leaves = [x.clone().requires_grad_() for x in (q, k, signed)]
    out, _ = kern.linear({"Q": leaves[0], "K": leaves[1], "V": v},
                         captured={"beta": beta, "A": leaves[2]})
    ref = [x.double().requires_grad_() for x in (q, k, signed)]
    want = delta_recurrence(ref[0], ref[1], v, beta, ref[2], 0.5)[0]
    assert close(out["O"], want)
    for g, w in zip(torch.autograd.grad(out["O"].sum(), leaves),
                    torch.autograd.grad(want.sum(), ref)):
        assert close(g, w, 1e-3)


BAD = [  # (replace in DIRECT, by, message, line, col)
    ("recur(n) (exp", "recur(e) (exp", "recur(e) runs along 'e' (qk)", 9, 24),
    ("S[b,h,n-1,e,f]\n", "S[b,h,n-2,e,f]\n", "reads its state at n - 2", 9, 50),
    ("K[b,h,n,d] * S", "Q[b,h,n,d] * S", "differs from", 9, 3),
    ("K[b,h,n,d] * S[b,h,n-1,d,f]", "K[b,h,n,d] * S[b,h,n-1,e,f]",
     "sums over 'd' a state read that does not use it", 9, 3),
    ("exp(A[b,h,n]) * S[b,h,n-1,e,f]\n", "exp(A[b,h,n]) * S[b,h,n-1,e,f] * S[b,h,n-1,e,f]\n",
     "reads the state 2 times", 9, 3),
    ("exp(A[b,h,n]) * S[b,h,n-1,e,f]\n", "exp(K[b,h,n,e]) * S[b,h,n-1,e,f]\n",
     "per-key-dim decay", 9, 3),
    ("param scale: float\n", "param scale: float\n  mask n <= m\n", "takes no mask", 8, 3),
    ("S[b,h,m,e,f] * scale", "S[b,h,n,e,f] * V[b,h,m,f]", "output O reads the state as", 12, 3),
    ("O[b,h,m,f] = Q[b,h,m,e] * S[b,h,m,e,f]", "O[b,h,m,f] = Q[b,h,m,e] * S[b,h,m-1,e,f]",
     "subscript 3 of the state S must be an index", 12, 35),
    ("S[b,h,n-1,d,f]", "S[b,h,n-1,e,d]", "subscript 5 of the state S must be an index of extent F",
     10, 96),
]


@pytest.mark.parametrize("old, new, message, line, col", BAD, ids=[b[2][:30] for b in BAD])
def test_recurrences_that_cannot_run_are_located_errors(old, new, message, line, col):
    assert old in DIRECT
    text = DIRECT.replace(old, new, 1)
    with pytest.raises((SpecError, attndsl.AttnDSLError)) as err:
        compile_cascade(parse_text(text, "spec.attn")["direct"])
    assert message in str(err.value)
    assert f"spec.attn:{line}:{col}: error:" in str(err.value), str(err.value)


def test_recur_inside_an_expression_is_a_syntax_error():
    text = DIRECT.replace("recur(n) (exp", "2 * recur(n) (exp")
    with pytest.raises(SpecError, match=r"spec.attn:9:31: error: unexpected '\('"):
        parse_text(text, "spec.attn")


def test_an_equation_that_reads_itself_without_recur_is_a_cycle():
    text = DIRECT.replace("recur(n) (exp", "(exp")
    with pytest.raises(SpecError, match="cycle"):
        parse_text(text, "spec.attn")


# -- the kernels ------------------------------------------------------------------------------

@settings(max_examples=10, deadline=None)
@given(length=st.integers(1, 70), chunk=st.sampled_from(["auto", 16, 32, 64, None]),
       e=st.sampled_from([4, 16, 20]), f=st.sampled_from([3, 16]),
       beta_low=st.sampled_from([0.0, 0.99]), decay=st.sampled_from([(0.0, 0.0), (-1, 0),
                                                                      (-8.0, -4.0)]),
       seed=st.integers(0, 99))
def test_chunked_and_recurrent_kernels_match_the_token_by_token_recurrence(
        length, chunk, e, f, beta_low, decay, seed):
    q, k, v, beta, a = inputs(2, 2, length, e, f, seed, beta_low, decay)
    kern = attndsl.compile(direct())
    out, state = kern.linear({"Q": q, "K": k, "V": v}, captured={"beta": beta, "A": a},
                             chunk=chunk)
    want, s_want = delta_recurrence(q, k, v, beta, a.exp(), e ** -0.5)
    assert close(out["O"], want) and close(state["S"], s_want)


def test_the_kernels_equal_the_oracle_of_both_examples_past_one_chunk():
    q, k, v, _, _ = inputs(1, 2, 45, 16, 16, 5)
    gen = torch.Generator().manual_seed(2)
    cap = {"Bl": torch.randn(1, 2, 45, generator=gen), "Al": torch.randn(1, 2, 45, generator=gen)}
    for name in ("deltanet", "gated_deltanet"):
        c = spec(name)
        use = {x: t for x, t in cap.items() if c.tensor(x) is not None}
        want = run_cascade(c, {"Q": q, "K": k, "V": v, **use}, {"scale": 0.25})["O"]
        kern = attndsl.compile(c)
        for chunk in (16, None):
            got, _ = kern.linear({"Q": q, "K": k, "V": v}, {"scale": 0.25}, use, chunk=chunk)
            assert close(got["O"], want)
        assert close(kern({"Q": q, "K": k, "V": v}, {"scale": 0.25}, use)["O"], want)


@pytest.mark.parametrize("chunk", [16, None])
def test_ragged_lengths_end_each_sequence_with_its_own_final_state(chunk):
    q, k, v, beta, a = inputs(3, 2, 37, 16, 8, 7)
    lengths = torch.tensor([37, 0, 20])
    kern = attndsl.compile(direct())
    out, state = kern.linear({"Q": q, "K": k, "V": v}, captured={"beta": beta, "A": a},
                             chunk=chunk, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        want, s_want = delta_recurrence(*(x[b:b + 1, :, :n] for x in (q, k, v, beta, a.exp())),
                                        0.25)
        assert close(out["O"][b:b + 1, :, :n], want) and close(state["S"][b:b + 1], s_want)
        assert not out["O"][b, :, n:].any()  # past the length: zeros


def test_lengths_outside_the_sequence_are_refused():
    q, k, v, beta, a = inputs(2, 1, 5, 16, 8, 7)
    kern = attndsl.compile(direct())
    with pytest.raises(AttentionError, match=r"lengths must lie in \[0, 5\]"):
        kern.linear({"Q": q, "K": k, "V": v}, captured={"beta": beta, "A": a},
                    lengths=torch.tensor([6, 1]))


@pytest.mark.parametrize("lengths", [[5, 1], (5, 1), 5])
def test_lengths_that_are_not_a_tensor_are_refused_by_name(lengths):
    q, k, v, beta, a = inputs(2, 1, 5, 16, 8, 7)
    kern = attndsl.compile(direct())
    with pytest.raises(AttentionError, match=r"lengths must be an integer tensor of shape "
                                             rf"\(2,\) .*got {type(lengths).__name__}"):
        kern.linear({"Q": q, "K": k, "V": v}, captured={"beta": beta, "A": a},
                    lengths=lengths)


def test_a_delta_rule_has_no_linear_setup_and_says_why():
    """The delta rule's state moves by a matrix per position: no decayed-sum setup (which
    context parallelism combines ranks' states with), refused by name, not an AttributeError."""
    kern = attndsl.compile(direct())
    with pytest.raises(AttentionError, match="state recurrence .* no context-parallel path"):
        kern.linear_setup({"Q": torch.zeros(1, 1, 4, 16)})


@pytest.mark.parametrize("split", [0, 17, 33])
def test_prefill_then_decode_equals_one_pass_over_the_whole_sequence(split):
    q, k, v, beta, a = inputs(2, 2, 40, 16, 16, 11)
    kern = attndsl.compile(direct())
    cap = {"beta": beta, "A": a}
    whole, s_whole = kern.linear({"Q": q, "K": k, "V": v}, captured=cap)
    pre, state = kern.linear({"Q": q[:, :, :split], "K": k[:, :, :split],
                              "V": v[:, :, :split]},
                             captured={x: t[:, :, :split] for x, t in cap.items()}, chunk=16)
    outs = [pre["O"]]
    for t in range(split, 40):  # decode: one token at a time, the recurrent kernel
        step, state = kern.linear({"Q": q[:, :, t:t + 1], "K": k[:, :, t:t + 1],
                                   "V": v[:, :, t:t + 1]},
                                  captured={x: y[:, :, t:t + 1] for x, y in cap.items()},
                                  initial_state=state, chunk=None)
        outs.append(step["O"])
    assert close(torch.cat(outs, 2), whole["O"]) and close(state["S"], s_whole["S"])


@pytest.mark.parametrize("length", [0, 1, 21])
def test_a_recurrence_without_batch_and_head_indices_runs_in_its_own_layout(length):
    c = parse_text("""spec s {
      index m: L query, n: L key, e: E qk, d: E qk, f: F v
      input Q[L, E], K[L, E], V[L, F]
      tensor beta[L]: float
      S[n,e,f] = recur(n) (S[n-1,e,f] - sum(d) beta[n] * K[n,e] * K[n,d] * S[n-1,d,f]
                           + beta[n] * K[n,e] * V[n,f])
      O[m,f] = Q[m,d] * S[m,d,f]
      output O
    }""")["s"]
    gen = torch.Generator().manual_seed(length)
    q, v = torch.randn(length, 8, generator=gen), torch.randn(length, 5, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(length, 8, generator=gen), dim=-1)
    beta = torch.rand(length, generator=gen)
    out, state = attndsl.compile(c).linear({"Q": q, "K": k, "V": v}, captured={"beta": beta})
    want, s_want = delta_recurrence(q[None, None], k[None, None], v[None, None],
                                    beta[None, None], torch.ones(1, 1, length), 1.0)
    assert out["O"].shape == (length, 5) and close(out["O"], want[0, 0])
    assert state["S"].shape == (1, 1, 8, 5) and close(state["S"], s_want)


def test_a_chunk_that_is_not_a_power_of_two_of_at_least_16_is_refused():
    q, k, v, beta, a = inputs(1, 1, 5, 16, 8, 7)
    with pytest.raises(AttentionError, match="power of two >= 16"):
        attndsl.compile(direct()).linear({"Q": q, "K": k, "V": v},
                                         captured={"beta": beta, "A": a}, chunk=24)


@pytest.mark.parametrize("chunk", [16, None])
def test_gradients_of_q_k_v_beta_and_the_decay_match_autograd_of_the_float64_recurrence(
        chunk):
    q, k, v, beta, a = inputs(1, 2, 37, 16, 8, 13, 0.0, (-2.0, 0.0))
    s0 = torch.randn(1, 2, 16, 8)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, beta, a, s0)]
    kern = attndsl.compile(direct())
    out, state = kern.linear({"Q": leaves[0], "K": leaves[1], "V": leaves[2]},
                             captured={"beta": leaves[3], "A": leaves[4]},
                             initial_state={"S": leaves[5]}, chunk=chunk)
    gen = torch.Generator().manual_seed(0)
    do, ds = torch.randn(out["O"].shape, generator=gen), torch.randn(state["S"].shape,
                                                                      generator=gen)
    got = torch.autograd.grad((out["O"], state["S"]), leaves, (do, ds))
    ref = [x.detach().double().requires_grad_() for x in (q, k, v, beta, a, s0)]
    o, s = delta_recurrence(ref[0], ref[1], ref[2], ref[3], ref[4].exp(), 0.25, ref[5])
    want = torch.autograd.grad((o, s), ref, (do.double(), ds.double()))
    for name, g, w in zip(("q", "k", "v", "beta", "A", "S0"), got, want):
        assert close(g, w, 1e-3), name


def test_the_delta_kernels_compile_for_sm90_without_spills_at_the_default_chunk():
    """The kernels are real Triton (compiled in a child process: the tests run interpreted),
    at the launch's configuration for E = 64."""
    from attndsl.runtime import delta_kernels as dk
    from attndsl.runtime.aot import compile_kernel
    from attndsl.runtime.delta import DEFAULT_CHUNK

    sig = {n: "*fp32" for n in ("Q", "K", "U", "CE", "LA", "S0")}
    sig.update({"LEN": "*i32", "Out": "*fp32", "ST": "*fp32", "L": "i32", "E": "i32",
                "F": "i32"})
    const = dict(HAS_DECAY=True, HAS_S0=True, BE=64, BF=dk.BF)
    recurrent = {("A" if n == "LA" else n): t for n, t in sig.items()}  # the decay itself
    for kernel, args, extra in ((dk.delta_chunked_kernel, sig, {"C": DEFAULT_CHUNK}),
                                (dk.delta_recurrent_kernel, recurrent, {})):
        rep = compile_kernel(kernel, args, {**const, **extra}, "sm90", dk.WARPS, 1)
        assert rep.fits, rep
