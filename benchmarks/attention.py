"""Forward attention benchmark: attndsl vs torch.compile(flex_attention) vs SDPA, in one run.

On a GPU: B * L = 16k tokens, H = 16, L in 1k..16k, D in 64/128, fp16/bf16; prints TFLOP/s,
ratios, and the analytic lower bound of each case (FLOPs of the non-empty tiles only, bytes of
Q, K, V and O once) so efficiency = bound / measured is visible.  FLOPs: 4 * B * H * Lq * Lkv * D
times the fraction of (q, kv) pairs the mask keeps (FlashAttention's convention for causal).

On a CPU: the codegen time per example (spec -> module source; Triton's own JIT excluded; the
target is < 100 ms) and one tiny interpreter run of each case next to torch's eager flex.

    python benchmarks/attention.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

import attndsl
from attndsl.frontend.flex import lower_flex
from attndsl.frontend.load import import_spec_file
from attndsl.passes.pipeline import compile_cascade
from attndsl.runtime.modules import module_source

ROOT = Path(__file__).resolve().parent.parent


def _causal(b, h, q, kv):
    return kv <= q


def _sliding(window: int):
    def sliding_window(b, h, q, kv):
        return (kv <= q) & (q - kv < window)
    return sliding_window


def _prefix(n: int):
    def prefix_lm(b, h, q, kv):
        return (kv < n) | (kv <= q)
    return prefix_lm


def _softcap(score, b, h, q, kv):
    return 30 * torch.tanh(score / 30)


def cases(L: int, H: int, device: str) -> dict[str, dict]:
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / H) for i in range(H)], device=device)
    docs = (torch.arange(L, device=device) * 16 // L).to(torch.int32)

    def alibi(score, b, h, q, kv):
        return score - slopes[h] * (q - kv)

    def document(b, h, q, kv):
        return (docs[q] == docs[kv]) & (kv <= q)

    return {"dense": {}, "causal": {"mask_mod": _causal},
            "alibi": {"score_mod": alibi, "mask_mod": _causal},
            "sliding_window": {"mask_mod": _sliding(1024 if L > 2048 else max(16, L // 4))},
            "document": {"mask_mod": document}, "prefix_lm": {"mask_mod": _prefix(L // 4)},
            "softcap": {"score_mod": _softcap, "mask_mod": _causal}}


def kept_fraction(mask_mod, L: int, device: str = "cpu") -> float:
    """Fraction of (q, kv) pairs the mask keeps, on an evenly strided 1024 x 1024 sample."""
    if mask_mod is None:
        return 1.0
    idx = torch.linspace(0, L - 1, min(L, 1024), device=device).long()
    zero = torch.zeros((), dtype=torch.long, device=device)
    keep = mask_mod(zero, zero, idx[:, None], idx[None, :])
    return float(keep.float().mean())


def _fwd_bwd(fn, q, k, v):
    """Forward plus backward of one attention call (gradients of q, k, v)."""
    def run():
        for t in (q, k, v):
            t.grad = None
        fn().sum().backward()
    return run


def _time_case(flex, q, k, v, score_mod, bm, name: str, flops: float,
               backward: bool = False) -> dict:
    import triton

    fns = {"attndsl": lambda: attndsl.flex_attention(q, k, v, score_mod=score_mod,
                                                      block_mask=bm),
           "flex": lambda: flex(q, k, v, score_mod=score_mod, block_mask=bm)}
    if backward:  # forward + backward, FLOPs counted as 3.5x forward (backward = 2.5x)
        for t in (q, k, v):
            t.requires_grad_(True)
        fns = {impl: _fwd_bwd(fn, q, k, v) for impl, fn in fns.items()}
        flops *= 3.5
    elif name in ("dense", "causal"):
        fns["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=name == "causal")
    row = {}
    for impl, fn in fns.items():
        ms = triton.testing.do_bench(fn, warmup=25, rep=100)
        row[f"{impl}_ms"] = ms
        row[f"{impl}_tflops"] = flops / ms / 1e9
    return row


def bench_gpu(args: argparse.Namespace) -> list[dict]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attndsl.runtime.aot import attention_bound

    flex = torch.compile(flex_attention)
    rows = []
    lengths = [1024, 4096, 16384] if args.quick else [1024, 2048, 4096, 8192, 16384]
    for dtype in (torch.float16, torch.bfloat16):
        for D in (64, 128):
            for L in lengths:
                B, H = max(1, 16384 // L), 16
                q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=dtype) for _ in range(3))
                for name, mods in cases(L, H, "cuda").items():
                    mask = mods.get("mask_mod")
                    bm = create_block_mask(mask, None, None, L, L) if mask else None
                    frac = kept_fraction(mask, L, "cuda")
                    flops = 4 * B * H * L * L * D * frac
                    row = {"case": name, "dtype": str(dtype), "L": L, "B": B, "H": H, "D": D}
                    row.update(_time_case(flex, q, k, v, mods.get("score_mod"), bm, name, flops,
                                          args.backward))
                    row["vs_flex"] = row["flex_ms"] / row["attndsl_ms"]
                    if "sdpa_ms" in row:
                        row["vs_sdpa"] = row["sdpa_ms"] / row["attndsl_ms"]
                    nbytes = 4 * B * H * L * D * q.element_size()
                    row["bound_ms"] = attention_bound(flops, nbytes, "sm90") * 1e3
                    row["efficiency"] = row["bound_ms"] / row["attndsl_ms"]
                    rows.append(row)
                    print(json.dumps(row))
    return rows


def _example_modules() -> list[tuple[str, object]]:
    out = []
    for path in sorted((ROOT / "examples").glob("*.py")):
        if path.name.startswith("_"):
            continue
        out.append((path.stem, import_spec_file(path)))
    return out


def bench_cpu(args: argparse.Namespace) -> list[dict]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    rows = []
    print(f"{'example':28s} {'codegen ms':>10s}")
    for name, module in _example_modules():
        fns = module.make(1, 2, 64, 64, "cpu")
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            spec = lower_flex(fns.get("score_mod"), fns.get("mask_mod"))
            module_source(compile_cascade(spec.cascade).kernel)
            times.append((time.perf_counter() - t0) * 1e3)
        ms = statistics.median(times)
        rows.append({"example": name, "codegen_ms": ms})
        print(f"{name:28s} {ms:10.1f}")
    L, H, D = (64, 2, 32) if args.quick else (128, 4, 64)
    print(f"\ninterpreter run, B=1 H={H} L={L} D={D} fp32 (torch eager flex for reference)")
    print(f"{'case':16s} {'attndsl s':>10s} {'torch eager s':>14s} {'max err':>9s}")
    q, k, v = (torch.randn(1, H, L, D) for _ in range(3))
    for name, mods in cases(L, H, "cpu").items():
        mask = mods.get("mask_mod")
        t0 = time.perf_counter()
        out = attndsl.flex_attention(q, k, v, score_mod=mods.get("score_mod"), mask_mod=mask)
        ours = time.perf_counter() - t0
        bm = create_block_mask(mask, None, None, L, L, device="cpu") if mask else None
        t0 = time.perf_counter()
        ref = flex_attention(q, k, v, score_mod=mods.get("score_mod"), block_mask=bm)
        theirs = time.perf_counter() - t0
        err = float((out - ref).abs().max())
        rows.append({"case": name, "attndsl_interpreter_s": ours, "torch_eager_s": theirs,
                     "max_abs_err": err})
        print(f"{name:16s} {ours:10.3f} {theirs:14.3f} {err:9.1e}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer sizes")
    p.add_argument("--backward", action="store_true",
                   help="GPU: time forward + backward instead of forward only")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    gpu = torch.cuda.is_available()
    rows = bench_gpu(args) if gpu else bench_cpu(args)
    device = torch.cuda.get_device_name() if gpu else "cpu (Triton interpreter)"
    result = {"date": datetime.date.today().isoformat(), "device": device,
              "torch": torch.__version__, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    main()
