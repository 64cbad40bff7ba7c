"""The benchmark CLI runs end to end at one small shape (table, CSV, PNG)."""
import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # the benchmark CLI in a subprocess
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


@pytest.mark.slow
def test_bench_cli_cpu_isa_avx2(tmp_path):
    """--cpu-isa avx2 reruns the benchmark in a child pinned to AVX2: fused_attn's portable path, torch's AVX2."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--device", "cpu", "--cpu-isa", "avx2",
           "--shapes", "1,2,64,32", "--dtypes", "float32", "--causal", "causal", "--modes", "fwd", "--providers",
           "sdpa-math", "fused_attn-cpu", "--reps", "2", "--min-time", "0", "--no-plot", "--out", str(tmp_path),
           "--name", "isa"]
    env = {k: v for k, v in os.environ.items() if k not in ("FUSED_ATTN_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "# --cpu-isa avx2: child process with FUSED_ATTN_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2" in done.stdout
    assert "torch CPU capability AVX2; fused_attn FUSED_ATTN_CPU_ISA=avx2: portable" in done.stdout, done.stdout
    assert "loops at avx2" in done.stdout, done.stdout
    with open(tmp_path / "isa.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["provider"] for r in rows} == {"sdpa-math", "fused_attn-cpu"}
    assert all(float(r["gflops"]) > 0 for r in rows)


def test_per_call_cli(tmp_path):
    """benchmarks/per_call.py runs its three rows and the GQA decoding rows (few calls) and writes its markdown
    table."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "per_call.py"), "--calls", "5", "--rounds", "2",
           "--threads", "1", "--gqa-decode", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "per_call.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table[2:5]] == ["tiny fwd", "decode", "tiny fwd+bwd"]
    assert len(table) == 2 + 3 + 8 and "bfloat16 (8, 32/8, 1, 1024, 128)" in table[-2]
    for line in table[2:]:
        fused, torch_us, ratio = (float(c.split()[0]) for c in line.split("|")[2:5])
        assert fused > 0 and torch_us > 0 and abs(ratio - fused / torch_us) < 0.02 * ratio


def test_decode_cli(tmp_path):
    """benchmarks/decode.py runs its three sides on a short cache (both dtypes, both batch sizes) and writes its
    markdown table, speedups consistent with the times."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "decode.py"), "--lengths", "256", "--rounds", "1",
           "--threads", "1", "--gpt", "--gpt-prompt", "12", "--gpt-tokens", "5", "--gpt-rounds", "1",
           "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table, gpt = (tmp_path / "decode.md").read_text().split("\n\n")
    table, gpt = table.splitlines(), gpt.splitlines()
    assert len(table) == 2 + 4 and [line.split("|")[1:4] for line in table[2:]] == [
        [f" {dtype} ", f" {B} ", " 256 "] for dtype in ("float32", "bfloat16") for B in (1, 8)]
    assert [line.split("|")[1].strip() for line in gpt[2:]] == [
        "fused_attn (preallocated cache)", "fused_attn (concatenated cache)", "reference backend",
        "torch SDPA (concatenated cache)"]
    for line in gpt[2:]:
        seconds, tokens_per_s = (float(c) for c in line.split("|")[2:4])
        assert seconds > 0 and abs(tokens_per_s * seconds - 5) < 0.25  # 5 tokens (rounded figures)
    for line in table[2:]:
        fused, concat, slice_, vs_concat, vs_slice = (float(c) for c in line.split("|")[4:9])
        assert min(fused, concat, slice_) > 0
        assert abs(vs_concat - concat / fused) < 0.02 * vs_concat and abs(vs_slice - slice_ / fused) < 0.02 * vs_slice
