"""The benchmark CLI runs end to end at one small shape (table, CSV, PNG)."""
import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_cli_small_shape(tmp_path):
    pytest.importorskip("matplotlib")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--device", "cpu", "--shapes", "1,2,64,32",
           "--dtypes", "float32", "--causal", "none", "causal", "--modes", "fwd", "bwd", "fwd+bwd", "--reps", "2",
           "--min-time", "0", "--out", str(tmp_path), "--name", "smoke"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fused_attn-cpu" in done.stdout and "x sdpa" in done.stdout
    with open(tmp_path / "smoke.csv") as f:
        rows = list(csv.DictReader(f))
    providers = {r["provider"] for r in rows}
    assert {"naive", "sdpa-math", "fused_attn-cpu"} <= providers, providers
    assert len(rows) == len(providers) * 2 * 3
    assert all(float(r["gflops"]) > 0 for r in rows)
    assert (tmp_path / "smoke.png").stat().st_size > 10_000
