"""Real multi-process runs for the context-parallel tests: spawned ranks on localhost.

``spawn(world, cases)`` starts ``world`` processes (gloo or nccl, rendezvous through a file,
so no port is chosen by hand) and runs every ``(size, case)``: ``case(rank, size, group)`` on
the first ``size`` ranks, in a process group of its own when ``size < world`` (one spawn
serves several group sizes, and non-default groups are exercised).  It fails with the first
rank's traceback, and kills the ranks and fails if they run past ``timeout`` seconds.  Cases
are module-level functions (the spawned processes import them by name).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Case = tuple[int, Callable[[int, int, object], None]]


def _worker(rank: int, world: int, store: str, cases: list[Case], backend: str) -> None:
    if backend == "nccl":  # each rank on its own GPU; the cases' tensors are made there
        torch.cuda.set_device(rank)
        torch.set_default_device(f"cuda:{rank}")
    else:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("ATTNDSL_VERIFY", "1")
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank,
                            world_size=world)
    try:
        groups = {size: dist.new_group(list(range(size))) if size < world else None
                  for size in sorted({size for size, _ in cases})}
        for size, case in cases:
            torch.manual_seed(0)
            if rank < size:
                case(rank, size, groups[size])
            dist.barrier()
    finally:
        dist.destroy_process_group()
    # A rank whose cases passed leaves without the interpreter's teardown: gloo's threads can
    # still hold finished work objects then, and freeing them during finalisation can abort
    # the rank ("terminate called without an active exception", SIGABRT; seen once in CI).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(world: int, cases: list[Case], timeout: float = 600,
          backend: str = "gloo") -> None:
    """Run ``cases`` on ``world`` spawned ranks (gloo on the CPU, or nccl) within
    ``timeout`` seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        ctx = mp.start_processes(_worker, args=(world, store, cases, backend), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{world} ranks ran past {timeout} s: {cases}")
