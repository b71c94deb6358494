"""Context parallelism: bytes moved, peak K/V memory and work imbalance per layout.

For causal and sliding-window (8k, causal) self-attention at 128k-1M tokens over 4-64 ranks
(B = 1, 8 K/V heads of dim 128, bf16: 4 KiB of K and V per token), per layout:

* ``sent``      -- K/V bytes a rank sends in one forward, exactly: the pair matrix comes from
                   attndsl's mask analysis (attndsl.distributed.pairs.pair_classes, the
                   classifier the ring itself uses); a shard goes only to ranks whose pair with
                   it is not empty.  The total over ranks divided by W is shown (the busiest
                   rank in brackets);
* ``K/V peak``  -- K/V resident on the busiest rank: its own shard plus the (at most two)
                   shards it receives in flight;
* ``imbalance`` -- max / mean over the ranks of the (query, key) pairs the mask keeps (the
                   attention FLOPs; exact, from the positions);

against two baselines, both *models* of what they do (not runs of them):

* ``ring``      -- plain ring attention without skipping (torch's SDPA ring in
                   context_parallel): every rank receives every other shard, W - 1 transfers,
                   two shards in flight, work as the contiguous layout's (no skipping helps
                   nobody's critical path);
* ``torch cp``  -- torch's context_parallel for FlexAttention (all-gather of K/V, head-tail
                   load balancing): every rank receives all W - 1 shards and holds the whole
                   K/V (W shards), work as the zigzag layout's.

``--wall`` adds small wall-time runs on the CPU with gloo (Triton's interpreter, 4 ranks):
the ring with pair skipping against the same ring with every pair launched and sent.

    python benchmarks/context_parallel.py [--quick] [--wall] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from attndsl.distributed.layout import LAYOUTS, all_positions
from attndsl.distributed.pairs import imbalance, pair_classes
from attndsl.distributed.positions import positioned
from attndsl.frontend.flex import lower_flex
from attndsl.passes.mask import EMPTY

KV_BYTES_PER_TOKEN = 2 * 8 * 128 * 2  # K and V, 8 heads, dim 128, bf16
WINDOW = 8192


def causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def window(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx) & (q_idx - kv_idx < WINDOW)


MASKS = {"causal": causal, f"window {WINDOW // 1024}k": window}


def kept_pairs(name: str, qpos: torch.Tensor) -> int:
    """(query, key) pairs the mask keeps for these query rows (exact, from the positions)."""
    seen = qpos + 1
    return int(seen.sum() if name == "causal" else seen.clamp(max=WINDOW).sum())


def model(name: str, length: int, world: int, layout: str) -> dict:
    """Bytes sent, K/V peak and imbalance of one (mask, length, world, layout)."""
    spec = lower_flex(None, MASKS[name])
    mask = positioned(spec.cascade).mask.expr
    pos = all_positions(layout, length, world)
    classes = pair_classes(mask, spec.captured, 1, 1, pos, pos)
    shard = [p.numel() * KV_BYTES_PER_TOKEN for p in pos]
    sent = [sum(shard[j] for i in range(world) if i != j and classes[i][j] != EMPTY)
            for j in range(world)]
    received = [sum(1 for j in range(world) if j != i and classes[i][j] != EMPTY)
                for i in range(world)]
    peak = max(shard[i] + min(2, received[i]) * max(shard) for i in range(world))
    work = [kept_pairs(name, p) for p in pos]
    return {"sent_mean": sum(sent) / world, "sent_max": max(sent), "peak": peak,
            "imbalance": imbalance(work), "skipped_pairs": sum(
                1 for i in range(world) for j in range(world) if classes[i][j] == EMPTY)}


def baselines(name: str, length: int, world: int) -> dict:
    shard = -(-length // world) * KV_BYTES_PER_TOKEN
    work = {lay: imbalance([kept_pairs(name, p) for p in all_positions(lay, length, world)])
            for lay in ("contiguous", "zigzag")}
    return {"ring": {"sent": (world - 1) * shard, "peak": 3 * shard,
                     "imbalance": work["contiguous"]},
            "torch cp": {"sent": (world - 1) * shard, "peak": world * shard,
                         "imbalance": work["zigzag"]}}


def _gib(x: float) -> str:
    return f"{x / 2 ** 30:.2f}"


def table(lengths: list[int], worlds: list[int]) -> tuple[list[str], list[dict]]:
    rows = ["| mask | tokens | ranks | layout | sent GiB/rank (max) | K/V peak GiB | imbalance "
            "| empty pairs |", "|---|---|---|---|---|---|---|---|"]
    records = []
    for name in MASKS:
        for length in lengths:
            for world in worlds:
                for lay in LAYOUTS:
                    r = model(name, length, world, lay)
                    records.append({"mask": name, "tokens": length, "ranks": world,
                                    "layout": lay, **r})
                    rows.append(f"| {name} | {length // 1024}k | {world} | {lay} | "
                                f"{_gib(r['sent_mean'])} ({_gib(r['sent_max'])}) | "
                                f"{_gib(r['peak'])} | {r['imbalance']:.2f} | "
                                f"{r['skipped_pairs']}/{world * world} |")
                for base, r in baselines(name, length, world).items():
                    records.append({"mask": name, "tokens": length, "ranks": world,
                                    "layout": base, **r})
                    rows.append(f"| {name} | {length // 1024}k | {world} | {base} (model) | "
                                f"{_gib(r['sent'])} | {_gib(r['peak'])} | "
                                f"{r['imbalance']:.2f} | 0 |")
    return rows, records


# -- wall time on the CPU (gloo, the interpreter) -------------------------------------------

def _wall_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from attndsl.distributed.kernels import PairKernels
    from attndsl.distributed.layout import shard
    from attndsl.distributed.ring import Ring
    from attndsl.passes.mask import PARTIAL

    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    length, w = 1024, 64
    q, k, v = (shard(torch.randn(1, 2, length, 32), "contiguous", world, rank)
               for _ in range(3))
    kernels = PairKernels.of(None, lambda b, h, i, j: (j <= i) & (i - j < w))
    pos = all_positions("contiguous", length, world)
    skip = pair_classes(kernels.mask, {}, 1, 2, pos, pos)
    times = {}
    for label, classes in (("skipping", skip),
                           ("every pair", [[PARTIAL] * world for _ in range(world)])):
        ring = Ring(kernels, None, rank, world, pos, pos, classes, 32 ** -0.5)
        ring.forward(q, k, v)  # warm: compile, plans
        dist.barrier()
        t0 = time.perf_counter()
        ring.forward(q, k, v)
        dist.barrier()
        times[label] = time.perf_counter() - t0
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def wall(world: int = 4) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        mp.start_processes(_wall_worker, args=(world, os.path.join(tmp, "store"), out),
                           nprocs=world, start_method="spawn")
        return json.loads(Path(out).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128k and 256k, 4 and 16 ranks only")
    ap.add_argument("--wall", action="store_true", help="add the CPU/gloo wall-time runs")
    ap.add_argument("--out", type=Path, help="write the records as JSON")
    args = ap.parse_args()
    lengths = [128 << 10, 256 << 10] if args.quick else [128 << 10, 256 << 10, 512 << 10,
                                                         1 << 20]
    worlds = [4, 16] if args.quick else [4, 8, 16, 32, 64]
    rows, records = table(lengths, worlds)
    print("\n".join(rows))
    result = {"model": records}
    if args.wall:
        times = wall()
        result["wall"] = times
        print(f"\nwall time, 4 gloo ranks, window 64 over 1024 tokens (interpreter): "
              f"skipping {times['skipping']:.2f} s, every pair {times['every pair']:.2f} s "
              f"({times['every pair'] / times['skipping']:.2f}x)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
