"""Block-mask construction: attndsl.create_block_mask against torch's create_block_mask.

Compares, on the CPU, for causal, sliding window 1024 (causal), prefix-LM (prefix L/4),
chunked local attention (chunks of 1024) and a 16-document mask (sorted random document
boundaries) at each length:

* ``attndsl``       -- attndsl.block_mask.create_block_mask (trace + tile analysis + what the
                       kernel reads: nothing for closed-form masks, a range table of four
                       numbers per query tile for interval-shaped ones, else the tables);
                       torch's eight tables are built only when read, and the note gives the
                       time of creation plus reading them;
* ``torch eager``   -- torch's create_block_mask (dense [L, L] mask, then block sums); skipped
                       above 16k (O(L^2) memory);
* ``torch compile`` -- torch's create_block_mask(..., _compile=True); the first call's extra
                       time is reported as compile time, the time column is the steady state
                       (dynamo is reset before each mask and length so no cache limit is hit,
                       and inductor's on-disk caches are disabled unless --warm-cache).

Time is the median of ``--repeats`` calls after the first call and ``--warmup`` more, and
"best" their minimum (the shared 2-core machine has slow phases; attndsl's millisecond calls
also speed up over their first few dozen calls as the allocator and caches warm up).  Peak
memory is measured with the torch profiler (``profile_memory=True``): the CPU allocator's
allocation and free events of one extra call are replayed in order, and the largest sum of
live bytes is reported.  It counts every tensor the call allocates (also inside compiled
kernels), not Python objects.

usage: python benchmarks/block_mask.py [--lengths 4096 16384] [--repeats 11] [--warmup 5]
       [--block 128] [--threads 1] [--warm-cache] [--masks causal ...]
       [--methods attndsl "torch eager" "torch compile"]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator

import torch
from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask

from attndsl.block_mask import create_block_mask

EAGER_LIMIT = 16384
WINDOW, CHUNK, DOCS = 1024, 1024, 16


def mask_mods(L: int) -> dict[str, Callable]:
    """The benchmarked masks for sequence length L."""
    g = torch.Generator().manual_seed(0)
    cuts = torch.sort(torch.randperm(L - 1, generator=g)[:DOCS - 1] + 1).values
    doc = torch.bucketize(torch.arange(L), cuts, right=True)  # 16 sorted document ids
    prefix = L // 4

    def causal(b, h, q, kv):
        return q >= kv

    def sliding_window(b, h, q, kv):
        return (q >= kv) & (q - kv < WINDOW)

    def prefix_lm(b, h, q, kv):
        return (kv < prefix) | (q >= kv)

    def chunked(b, h, q, kv):
        return q // CHUNK == kv // CHUNK

    def document(b, h, q, kv):
        return doc[q] == doc[kv]

    return {"causal": causal, f"sliding window {WINDOW}": sliding_window,
            "prefix-LM": prefix_lm, f"chunked {CHUNK}": chunked, f"{DOCS} documents": document}


def call_times(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's C++ start / stop log lines (written to file descriptor 2)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def peak_bytes(fn: Callable[[], object]) -> int | None:
    """Peak live bytes of CPU allocations during one call (torch profiler memory events)."""
    try:
        from torch.profiler import ProfilerActivity, profile
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU],
                                      profile_memory=True) as prof:
            fn()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:  # the private event API may change between torch versions
        return None
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if str(e.device_type()).endswith("CPU"):
            live += e.nbytes()
            peak = max(peak, live)
    return peak


def run_one(method: str, fn: Callable, L: int, block: int, repeats: int, warmup: int) -> dict:
    """Time, compile time and peak memory of one method, or a 'failed' / 'skipped' note."""
    if method == "torch eager" and L > EAGER_LIMIT:
        return {"note": "skipped: O(L^2) memory"}
    if method == "attndsl":
        def call() -> object:
            return create_block_mask(fn, None, None, L, L, device="cpu", BLOCK_SIZE=block)
    else:
        compiled = method == "torch compile"

        def call() -> object:
            return torch_create_block_mask(fn, None, None, L, L, device="cpu",
                                           BLOCK_SIZE=block, _compile=compiled)
    try:
        if method == "torch compile":
            torch._dynamo.reset()
        t0 = time.perf_counter()
        result = call()
        first = time.perf_counter() - t0
        call_times(call, warmup)
        times = call_times(call, repeats)
        steady = statistics.median(times)
        peak = peak_bytes(call)
    except Exception as err:  # compile unavailable, out of memory ...
        return {"note": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:60]}"}
    out = {"time": steady, "best": min(times), "peak": peak,
           "compile": first - steady if method == "torch compile" else None}
    if method == "attndsl":
        lazy = result.tables is None
        out["mechanism"] = result.mechanism + (
            " (range table)" if result.kv_ranges is not None else "")
        if lazy:  # what reading torch's eight tables costs on top (built on first read)
            out["with_tables"] = statistics.median(call_times(lambda: call().q_indices,
                                                              repeats))
    return out


def fmt_bytes(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.2f}"


def fmt_ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.3g}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls after the first")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--methods", nargs="+", default=["attndsl", "torch eager", "torch compile"])
    ap.add_argument("--masks", nargs="*", default=None, help="subset of mask names")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--warm-cache", action="store_true",
                    help="let inductor reuse its on-disk caches (default: cold compiles)")
    args = ap.parse_args()
    if not args.warm_cache:
        torch._inductor.config.force_disable_caches = True
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # _compile=True
    warnings.filterwarnings("ignore", message=".*force_disable_caches")
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, BLOCK_SIZE "
          f"{args.block}; time: median of {args.repeats}; peak: profiler allocator events")
    head = (f"{'mask':<22}{'L':>7}  {'method':<14}{'time ms':>10}{'best ms':>10}"
            f"{'compile s':>11}{'peak MiB':>10}{'t/attndsl':>11}{'best/best':>11}"
            f"{'mem/attndsl':>13}  note")
    print(head)
    print("-" * len(head))
    for L in args.lengths:
        for name, fn in mask_mods(L).items():
            if args.masks and name not in args.masks:
                continue
            base: dict = {}
            for method in args.methods:
                r = run_one(method, fn, L, args.block, args.repeats, args.warmup)
                if method == "attndsl":
                    base = r
                print(_row(name, L, method, r, base), flush=True)


def _row(name: str, L: int, method: str, r: dict, base: dict) -> str:
    if "note" in r:
        return f"{name:<22}{L:>7}  {method:<14}{'':>10}{'':>10}{'':>11}{'':>10}{'':>11}" \
               f"{'':>11}{'':>13}  {r['note']}"
    first = method == "attndsl"
    ratio_t = fmt_ratio(None if first or not base.get("time") else r["time"] / base["time"])
    ratio_b = fmt_ratio(None if first or not base.get("best") else r["best"] / base["best"])
    ratio_m = fmt_ratio(None if first or not base.get("peak") or r["peak"] is None
                        else r["peak"] / base["peak"])
    comp = f"{r['compile']:.2f}" if r.get("compile") is not None else "-"
    note = r.get("mechanism", "")
    if r.get("with_tables") is not None:
        note += f"; {r['with_tables'] * 1e3:.3g} ms with torch's tables read"
    return (f"{name:<22}{L:>7}  {method:<14}{r['time'] * 1e3:>10.3g}{r['best'] * 1e3:>10.3g}"
            f"{comp:>11}{fmt_bytes(r['peak']):>10}{ratio_t:>11}{ratio_b:>11}{ratio_m:>13}  "
            f"{note}")


if __name__ == "__main__":
    main()
