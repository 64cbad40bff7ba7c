"""The project's one tolerance rule and one peak-memory measurement, shared by the tests
and the benchmarks.

A kernel's max error against the upcast reference must be at most ``ERROR_RATIO``
times the error of plain PyTorch in the same low-precision dtype against that
reference, plus a tiny floor (``FLOOR[dtype] * max(1, max|ref|)``).

For fp16 and bf16 the floor is half an ulp of the largest reference value: the
rounding of the stored result that no kernel returning that dtype can avoid, and
that plain PyTorch may happen to dodge on its worst element (with small tensors the
2x comparison of two max errors is otherwise decided by where values round).

bf16 results meet a second clause, on the mean error: at most ``BF16_ROUNDING_RATIO``
quarter ulps of the reference values, averaged (a quarter ulp is what rounding the
exact result to bf16 leaves on average), plus ERROR_RATIO times the part of plain
PyTorch's mean error above that, plus ``FLOOR[bf16] * 2 ** -6 * mean|ref|`` (an
all-zero reference leaves the max clause alone). Plain PyTorch's bf16 max error
(1-3 ulps) is too coarse to resolve a kernel that is 1% wrong, which the max clause
then passes. Measured on the Triton interpreter's bf16 results (97x203, 203x97, 61x90,
40x40, every causal mode): a fused kernel sits at 1.6-3.1 quarter ulps, plain PyTorch
at 2.3-4.1, and the same results 1% too large at 5.0-6.4, so they fail. At large
scores, where the rounding of P and of ``delta = rowsum(dO * O)`` is amplified in
every implementation, plain PyTorch's excess is the larger term.

bf16 under the Triton interpreter (triton 3.9): the interpreter converts fp32 to bf16
by truncation toward zero, not round-to-nearest, so each stored bf16 result sits up to
one ulp below the kernel's fp32 value in magnitude (0.99976 -> 0.99609). Such results
(``truncated_bf16=True``; :func:`stores_bf16_by_truncation` says when) are measured
after moving each one half an ulp away from zero, in fp64 (values equal to the
reference stay): truncation's [0, 1) ulp loss
becomes the same +-1/2 ulp that round-to-nearest leaves, and nothing else is relaxed,
so a kernel that is 1% wrong fails as it would compiled. Truncations inside the kernel
(P and dS cast to bf16 before their dots) are not undone: at large scores they make the
interpreter's bf16 gradients much worse than a GPU's, a limit of the test vehicle only.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

ERROR_RATIO = 2.0
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
BF16_ROUNDING_RATIO = 4.0


def stores_bf16_by_truncation(backend: str, dtype: torch.dtype) -> bool:
    """Whether ``backend``'s ``dtype`` results are stored by a truncating fp32 -> bf16 conversion:
    bf16 through the Triton backend while Triton's interpreter runs it."""
    if dtype != torch.bfloat16 or backend != "triton":
        return False
    from .ops import triton_attention
    return triton_attention.INTERPRETED


def _recentre_truncated_bf16(x: Tensor) -> Tensor:
    """fp64 copy of truncated bf16 values, each moved half an ulp away from zero."""
    x = x.double()
    mag = x.abs()
    exp = torch.floor(torch.log2(torch.where(mag > 0, mag, torch.ones_like(mag))))
    half_ulp = torch.where(mag > 0, torch.exp2(torch.clamp(exp, min=-126.0) - 8), torch.zeros_like(mag))
    return torch.where(torch.isfinite(x), x + torch.sign(x) * half_ulp, x)


def _errors(x: Tensor, ref: Tensor, truncated_bf16: bool = False) -> Tensor:
    ref = ref.double()
    # a truncated value that equals the reference was exact before truncation: it is not moved
    x = torch.where(x.double() == ref, ref, _recentre_truncated_bf16(x)) if truncated_bf16 else x.double()
    both_inf = torch.isinf(x) & torch.isinf(ref) & (torch.sign(x) == torch.sign(ref))
    err = (x - ref).abs()
    err = torch.where(both_inf, torch.zeros_like(err), err)
    return torch.nan_to_num(err, nan=float("inf"))


def _quarter_ulp_bf16(ref: Tensor) -> Tensor:
    """A quarter of the bf16 ulp of each value: the mean error of rounding values near it to bf16."""
    mag = ref.double().abs()
    exp = torch.floor(torch.log2(torch.where(mag > 0, mag, torch.ones_like(mag))))
    return torch.where(mag > 0, torch.exp2(torch.clamp(exp, min=-126.0) - 9), torch.zeros_like(mag))


def error_ratios(actual: Tensor, ref: Tensor, baseline: Tensor, dtype: Optional[torch.dtype] = None,
                 truncated_bf16: bool = False) -> Tuple[float, Optional[float]]:
    """(max ratio, bf16 mean ratio): the first must be <= ERROR_RATIO, the second (None unless
    ``dtype`` is bf16; the mean error over what the clause allows) <= 1. See the module doc."""
    dtype = dtype or actual.dtype
    finite = torch.isfinite(ref)
    values = torch.where(finite, ref.double().abs(), 0.0)
    err, base = _errors(actual, ref, truncated_bf16), _errors(baseline, ref)
    floor = FLOOR[dtype] * max(1.0, values.max().item())
    ratio_max = err.max().item() / (base.max().item() + floor / ERROR_RATIO)
    if dtype != torch.bfloat16 or not bool((values > 0).any()):  # an all-zero reference: the max clause decides
        return ratio_max, None
    rounding = BF16_ROUNDING_RATIO * torch.where(finite, _quarter_ulp_bf16(values), 0.0).mean().item()
    allowed = (rounding + ERROR_RATIO * max(0.0, base.mean().item() - rounding)
               + FLOOR[dtype] * 2.0 ** -6 * values.mean().item())
    return ratio_max, err.mean().item() / allowed


def error_ratio(actual: Tensor, ref: Tensor, baseline: Tensor, dtype: Optional[torch.dtype] = None,
                truncated_bf16: bool = False) -> float:
    """The max ratio of :func:`error_ratios` (must be <= ERROR_RATIO)."""
    return error_ratios(actual, ref, baseline, dtype, truncated_bf16)[0]


def assert_close(actual: Tensor, ref: Tensor, baseline: Tensor, name: str = "output",
                 dtype: Optional[torch.dtype] = None, truncated_bf16: bool = False) -> float:
    """Check ``actual`` (a kernel's result) against ``ref`` (upcast reference) under the rule.

    ``baseline`` is plain PyTorch's result in the low-precision dtype; ``dtype`` the dtype whose
    floor applies (default: ``actual``'s); ``truncated_bf16``: ``actual`` was stored by a
    truncating fp32 -> bf16 conversion (see the module doc). Returns the max error ratio; on
    failure says max and mean error and where the worst one is.
    """
    assert actual.shape == ref.shape, f"{name}: shape {tuple(actual.shape)} != reference {tuple(ref.shape)}"
    ratio_max, ratio_bf16 = error_ratios(actual, ref, baseline, dtype, truncated_bf16)
    if not (ratio_max <= ERROR_RATIO and (ratio_bf16 is None or ratio_bf16 <= 1.0)):
        err = _errors(actual, ref, truncated_bf16)
        worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        base = _errors(baseline, ref)
        bf16 = "" if ratio_bf16 is None else (
            f"; bf16 mean error {ratio_bf16:.2f}x the allowed max({BF16_ROUNDING_RATIO:g} quarter ulps, "
            f"plain PyTorch's mean error)")
        raise AssertionError(
            f"{name}: max error {err.max().item():.3e} (mean {err.mean().item():.3e}) at {worst} "
            f"(value {actual[worst].item():.6g}, reference {ref[worst].item():.6g}); plain PyTorch max error "
            f"{base.max().item():.3e} (mean {base.mean().item():.3e}); ratio {ratio_max:.2f} (allowed "
            f"{ERROR_RATIO}){bf16}" + ("; bf16 truncation re-centred" if truncated_bf16 else ""))
    return ratio_max


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
