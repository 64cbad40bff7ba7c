"""The project's one tolerance rule and one peak-memory measurement, shared by the tests
and the benchmarks.

A kernel's max error against the upcast reference must be at most
``ERROR_RATIO`` times the error of plain PyTorch in the same low-precision dtype
against that reference, plus a tiny floor (``FLOOR[dtype] * max(1, max|ref|)``).

For fp16 and bf16 the floor is half an ulp of the largest reference value: the
rounding of the stored result that no kernel returning that dtype can avoid, and
that plain PyTorch may happen to dodge on its worst element (with small tensors the
2x comparison of two max errors is otherwise decided by where values round).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

ERROR_RATIO = 2.0
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _errors(x: Tensor, ref: Tensor) -> Tensor:
    x, ref = x.double(), ref.double()
    both_inf = torch.isinf(x) & torch.isinf(ref) & (torch.sign(x) == torch.sign(ref))
    err = (x - ref).abs()
    err = torch.where(both_inf, torch.zeros_like(err), err)
    return torch.nan_to_num(err, nan=float("inf"))


def error_ratio(actual: Tensor, ref: Tensor, baseline: Tensor, dtype: Optional[torch.dtype] = None) -> float:
    """max|actual - ref| / (max|baseline - ref| + floor): must be <= ERROR_RATIO."""
    dtype = dtype or actual.dtype
    finite = ref[torch.isfinite(ref)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    floor = FLOOR[dtype] * scale
    return _errors(actual, ref).max().item() / (_errors(baseline, ref).max().item() + floor / ERROR_RATIO)


def assert_close(actual: Tensor, ref: Tensor, baseline: Tensor, name: str = "output",
                 dtype: Optional[torch.dtype] = None) -> float:
    """Check ``actual`` (a kernel's result) against ``ref`` (upcast reference) under the rule.

    ``baseline`` is plain PyTorch's result in the low-precision dtype. Returns the
    error ratio; on failure says max and mean error and where the worst one is.
    """
    assert actual.shape == ref.shape, f"{name}: shape {tuple(actual.shape)} != reference {tuple(ref.shape)}"
    ratio = error_ratio(actual, ref, baseline, dtype)
    if not ratio <= ERROR_RATIO:
        err = _errors(actual, ref)
        worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        base = _errors(baseline, ref)
        raise AssertionError(
            f"{name}: max error {err.max().item():.3e} (mean {err.mean().item():.3e}) at {worst} "
            f"(value {actual[worst].item():.6g}, reference {ref[worst].item():.6g}); plain PyTorch max error "
            f"{base.max().item():.3e}; ratio {ratio:.2f} > {ERROR_RATIO}")
    return ratio


def peak_memory_bytes(run: Callable[[], None], device: str = "cpu") -> int:
    """Peak bytes allocated through PyTorch's allocator while ``run()`` executes, above what was
    held before. On the CPU, from the profiler's allocation and free events in time order (the
    CPU kernels' scratch goes through the allocator too; only the calling thread is recorded)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak
