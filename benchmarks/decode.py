"""Decode: the bandwidth model of attndsl.decode's launch, and the decode kernel's static GPU
resources compiled on the CPU.

* model -- for GQA decode (Llama-3-8B shapes: 32 query heads, 8 key/value heads, head dim
  128, fp16, batch 8, one new query) at 8k-128k context, page sizes 16 and 64, the split
  count attndsl chooses for a 132-SM GPU: bytes moved / bytes of K/V once
  (:mod:`attndsl.decoding.traffic`), packed (attndsl) and unpacked (one program per query
  head, for comparison); target <= 1.05 packed.
* static -- the packed paged decode kernel (causal mask) compiled for ``--target`` in a child
  process (no TRITON_INTERPRET): registers, spills, shared memory, tensor-core instructions
  per config (attndsl.runtime.gpu_report).

usage: python benchmarks/decode.py [--static] [--target sm90] [--out FILE]
"""

from __future__ import annotations

import argparse
import json

import torch

from attndsl.decoding.reindex import packed_spec
from attndsl.decoding.split import choose_splits
from attndsl.decoding.traffic import decode_traffic
from attndsl.passes.pipeline import compile_cascade
from attndsl.runtime.gpu_report import format_reports, kernel_path, run_jobs

SMS = 132  # H100 / H200 SXM
SHAPES = {"q_heads": 32, "kv_heads": 8, "q_len": 1, "head_dim": 128, "v_dim": 128, "elem": 2}
BATCH = 8
CONFIGS = [(16, 16, 4, 3), (16, 32, 4, 3), (16, 64, 4, 3), (16, 64, 4, 4), (16, 64, 8, 3),
           (16, 128, 4, 3)]  # BLOCK_N = the page (up to 128) in a launch


def model_rows() -> list[dict]:
    rows = []
    for context in (8192, 32768, 131072):
        for page in (16, 64):
            lengths = torch.full((BATCH,), context)
            kv_block = page
            splits = choose_splits(BATCH * SHAPES["kv_heads"], -(-context // kv_block), SMS)
            packed = decode_traffic(lengths, page=page, kv_block=kv_block, splits=splits,
                                    **SHAPES)
            unpacked = decode_traffic(lengths, page=page, kv_block=kv_block, splits=splits,
                                      packed=False, **SHAPES)
            rows.append({"context": context, "page": page, "splits": splits,
                         "moved_MB": packed.moved / 2**20, "kv_once_MB": packed.kv_once / 2**20,
                         "ratio": packed.ratio, "unpacked_ratio": unpacked.ratio})
    return rows


def static_reports(target: str) -> list[dict]:
    spec = packed_spec(mask_mod=lambda b, h, q, kv: kv <= q, paged=True)
    path = kernel_path(compile_cascade(spec.cascade).kernel)
    jobs = [{"path": path, "target": target, "dtype": "fp16", "e": 128, "f": 128,
             "sparsity": 2, "config": list(c), "default": False} for c in CONFIGS]
    return run_jobs(jobs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--static", action="store_true")
    ap.add_argument("--target", default="sm90")
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = model_rows()
    print("| context | page | splits | moved MiB | K/V once MiB | ratio | unpacked ratio |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['context']} | {r['page']} | {r['splits']} | {r['moved_MB']:.1f} | "
              f"{r['kv_once_MB']:.1f} | {r['ratio']:.4f} | {r['unpacked_ratio']:.3f} |")
    result = {"model": rows}
    if args.static:
        reports = static_reports(args.target)
        print(format_reports(reports))
        result["static"] = [{k: v for k, v in r.items() if k != "path"} for r in reports]
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
