"""pytest-benchmark suite: the providers of bench.py at a few shapes, one test each.

Not part of the normal test run (CI runs ``pytest tests``); run it explicitly:

    python -m pytest benchmarks/test_bench.py --benchmark-columns=median,iqr,rounds \
        --benchmark-group-by=param:shape,param:dtype,param:causal,param:mode

Each benchmark's ``extra_info`` carries GFLOP/s from the shared ``flops()``. Use
``benchmarks/bench.py`` for the interleaved comparison with ratios, CSV and plots.
"""
import os
import sys

import pytest
import torch

pytest.importorskip("pytest_benchmark")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = ["1,8,1024,64", "1,8,1024,128"] if DEVICE == "cpu" else ["4,16,2048,64", "4,16,2048,128"]
PROVIDERS = {p.name: p for p in bench.providers(DEVICE) if p.name not in ("naive", "sdpa-math")}


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_attention(benchmark, provider, shape, dtype, causal, mode):
    B, H, L, E = (int(x) for x in shape.split(","))
    dt = getattr(torch, dtype)
    q, k, v = (torch.randn(B, H, L, E, device=DEVICE, dtype=dt, requires_grad=True) for _ in range(3))
    fwd = PROVIDERS[provider].make(q, k, v, causal)
    if fwd is None:
        pytest.skip(f"{provider} cannot run {dtype} on {DEVICE}")
    run = bench._step(fwd, mode, (q, k, v), torch.randn(B, H, L, E, device=DEVICE, dtype=dt))

    def timed():
        run()
        bench._sync(DEVICE)

    benchmark.pedantic(timed, rounds=5, warmup_rounds=1)
    benchmark.extra_info["gflops"] = bench.flops(B, H, L, L, E, causal, mode) / benchmark.stats.stats.median / 1e9
