"""The autotuner drops tile configs by their static report before timing anything.

The generated launcher times every candidate config on a GPU (``_tuned``); a config whose
shared memory exceeds the device's block limit would only fail at launch, and one that spills
would be timed for nothing. ``gpu_report.install_static_pruning`` (installed on every forward
module the runtime loads) compiles the candidates ahead of time for the device's target and
passes on only those that fit. Checked here on the CPU for an sm86 target (99 KiB per block).
"""

from __future__ import annotations

import torch

import attndsl
from attndsl.runtime.gpu_report import install_static_pruning, prune_candidates

HUGE = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 4}  # ~160 KiB at D=64
SMALL = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _key(module, device: str = "cuda:0") -> tuple:
    # the launcher's tuning key: hash, device, dtype, E, F, sparsity, sparse_q/kv, segments, ..
    return (module.SPEC_HASH, device, torch.float16, 64, 64, 1, 1, 1, 1, 1024, 1024)


def test_runtime_modules_come_with_static_pruning() -> None:
    module = attndsl.compile(mask_mod=_causal).module
    assert getattr(module._tuned, "statically_pruned", False)


def test_configs_over_the_shared_memory_limit_are_dropped_before_timing(monkeypatch) -> None:
    module = attndsl.compile(mask_mod=_causal).module
    timed: list[list[dict]] = []

    def tuned(key, candidates, run):  # stands in for the launcher's timing loop
        timed.append(list(candidates))
        return candidates[0]

    monkeypatch.setattr(module, "_tuned", tuned)
    install_static_pruning(module, target_of=lambda device: "sm86")
    assert module._tuned(_key(module), [HUGE, SMALL], None) == SMALL
    assert timed == [[SMALL]]
    module._tuned(_key(module), [HUGE, SMALL], None)  # the pruning is remembered per key
    assert timed[-1] == [SMALL]
    module._tuned(_key(module, "cpu"), [HUGE, SMALL], None)  # CPU: nothing to prune
    assert timed[-1] == [HUGE, SMALL]


def test_when_nothing_fits_the_candidates_are_kept_as_given() -> None:
    module = attndsl.compile(mask_mod=_causal).module
    assert prune_candidates(module, _key(module), [HUGE], "sm86") == [HUGE]
