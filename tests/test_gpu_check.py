"""fused_attn.tools.gpu_check on a machine without a GPU: the dry run's files, the step
runner (time budgets, a failing or hanging step does not stop the others, processes
killed with their children), the summary and CSV writers, and the benchmark plan."""
import csv
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fused_attn.tools import gpu_check as gc

PY = sys.executable


def _py(code):
    return [PY, "-c", code]


def _run(steps, tmp_path, total=60.0):
    log_path = tmp_path / "log.txt"
    with open(log_path, "ab", buffering=0) as log:
        results = gc.run_steps(steps, log, total, echo=lambda s: None)
    return results, log_path.read_text()


@pytest.mark.slow  # the whole dry run in a subprocess
def test_dry_run_writes_the_plan_and_runs_the_environment_report(tmp_path):
    res = subprocess.run([PY, "-m", "fused_attn.tools.gpu_check", "--out", str(tmp_path), "--dry-run"],
                         cwd=gc.ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    log = (tmp_path / "gpu_check.log").read_text()
    # every command of the plan, with its environment
    for text in ("setup.py build_ext --inplace --force", "FUSED_ATTN_CUDA_ARCHS=native", "MAX_JOBS=",
                 "--tool memcheck", "--tool racecheck", "--sanitizer-launches", "PYTORCH_NO_CUDA_MEMORY_CACHING=1",
                 "FUSED_ATTN_TEST_DEVICE=cuda", "--junitxml=", "--bench-worker", "('bfloat16', 128, 4096, False, 16, 16)",
                 *gc.CUDA_TESTS, *gc.TRITON_TESTS):
        assert text in log, f"{text!r} missing from the plan:\n{log}"
    # the environment report ran for real
    assert "=== env: pass" in log and "torch 2." in log and ("GPU: none visible to torch" in log or "GPU 0: " in log)
    with open(tmp_path / "steps.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == list(gc.BUDGETS)
    assert rows[0]["status"] == "pass" and all(r["status"] == "planned" for r in rows[1:])
    summary = (tmp_path / "summary.md").read_text()
    assert "PLAN ONLY (dry run)" in summary and "torch 2." in summary  # the machine line from the report
    assert all(f"| {name} | planned |" in summary for name in list(gc.BUDGETS)[1:])
    assert not (tmp_path / "bench.csv").exists()


def test_failing_and_hanging_steps_do_not_stop_the_others(tmp_path):
    pid_file = tmp_path / "child.pid"
    hang = _py("import subprocess, sys, time\n"
               "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
               f"open({str(pid_file)!r}, 'w').write(str(c.pid))\n"
               "print('hanging', flush=True); time.sleep(120)")
    steps = [
        gc.Step("hang", "sleeps past its budget", [hang], budget_s=3),
        gc.Step("fail", "exits 3", [_py("print('boom'); raise SystemExit(3)")], budget_s=30),
        gc.Step("stop-early", "second command not run", [_py("raise SystemExit(1)"), _py("print('never')")], 30),
        gc.Step("pass", "prints", [_py("import os; print('budget', os.environ['FUSED_ATTN_GPU_CHECK_SECONDS'])")], 30),
    ]
    t0 = time.monotonic()
    results, log = _run(steps, tmp_path)
    assert time.monotonic() - t0 < 40
    assert [(r.step, r.status) for r in results] == [("hang", "timeout"), ("fail", "fail"), ("stop-early", "fail"),
                                                     ("pass", "pass")]
    hang_r, fail_r, stop_r, pass_r = results
    assert 2.5 < hang_r.seconds < 15 and "timed out after 3 s" in hang_r.detail and "hanging" in hang_r.output
    # the hanging command's own child was killed with it
    child = int(pid_file.read_text())
    time.sleep(0.5)
    state = Path(f"/proc/{child}/stat").read_text().split()[2] if Path(f"/proc/{child}/stat").exists() else "gone"
    assert state in ("Z", "X", "gone"), f"child {child} still alive ({state})"
    assert fail_r.returncode == 3 and fail_r.detail == "boom"
    assert "never" not in stop_r.output
    assert pass_r.detail == "budget 30" and pass_r.returncode == 0
    for name in ("hang", "fail", "stop-early", "pass"):
        assert f"=== {name}:" in log  # each step's header and result line are in the one log


def test_overall_budget_cuts_a_step_short_and_skips_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "MIN_STEP_S", 1.0)
    steps = [gc.Step("long", "sleeps", [_py("import time; time.sleep(60)")], budget_s=100),
             gc.Step("next", "never gets time", [_py("print('ran')")], budget_s=100)]
    results, log = _run(steps, tmp_path, total=3.0)
    assert results[0].status == "timeout" and 2.5 < results[0].seconds < 10
    assert results[1].status == "skipped" and "out of time" in results[1].detail and "ran" not in log


def test_a_missing_tool_fails_its_step(tmp_path):
    (r,) = _run([gc.Step("tool", "no such tool", [["/nonexistent/compute-sanitizer", "--version"]], 30)], tmp_path)[0]
    assert r.status == "fail" and r.returncode == 127


def test_dry_run_runs_only_what_needs_no_gpu(tmp_path):
    steps = [gc.Step("cpu", "no GPU needed", [_py("print('cpu ok')")], 30, needs_gpu=False),
             gc.Step("gpu", "needs a GPU", [_py("print('gpu ran')")], 30)]
    log_path = tmp_path / "log.txt"
    with open(log_path, "ab", buffering=0) as log:
        cpu, gpu = gc.run_steps(steps, log, 60, dry_run=True, echo=lambda s: None)
    assert (cpu.status, cpu.detail) == ("pass", "cpu ok")
    assert gpu.status == "planned" and "gpu ran" not in log_path.read_text()


PYTEST_OUTPUT = """\
..F.s
FAILED tests/test_triton.py::test_gqa[NONE-2] - AssertionError: dq: max error 1.2e-01 | ratio 9.1
ERROR tests/test_cuda_emu_forward.py::test_head_dims[256-256] - RuntimeError: launch failed
=========== 1 failed, 3 passed, 1 skipped, 1 error in 12.34s ===========
"""

SANITIZER_OUTPUT = """\
ok: forward + backward
========= ERROR SUMMARY: 2 errors
"""


def test_detail_parsers():
    assert gc.pytest_detail(PYTEST_OUTPUT) == "1 failed, 3 passed, 1 skipped, 1 error in 12.34s"
    assert gc.failed_tests(PYTEST_OUTPUT) == [PYTEST_OUTPUT.splitlines()[1], PYTEST_OUTPUT.splitlines()[2]]
    assert gc.sanitizer_detail(SANITIZER_OUTPUT) == "ERROR SUMMARY: 2 errors"
    assert gc.sanitizer_detail("crashed before the summary\n") == "crashed before the summary"
    assert gc.env_detail("torch 2.11\nsummary: NVIDIA H200 (9.0), torch 2.11\n") == "NVIDIA H200 (9.0), torch 2.11"


def test_summary_and_csv_writers(tmp_path):
    results = [gc.Result("env", "pass", 3.2, 30, 0, "NVIDIA H200 (9.0)"),
               gc.Result("test-triton", "fail", 40.0, 150, 1, gc.pytest_detail(PYTEST_OUTPUT), PYTEST_OUTPUT),
               gc.Result("bench", "timeout", 120.0, 120, None, "timed out after 120 s; a | b\nc")]
    gc.write_steps_csv(results, tmp_path / "steps.csv")
    with open(tmp_path / "steps.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == gc.STEPS_CSV_COLUMNS
    assert [(r["step"], r["status"], r["returncode"]) for r in rows] == [("env", "pass", "0"),
                                                                         ("test-triton", "fail", "1"),
                                                                         ("bench", "timeout", "")]
    assert rows[2]["detail"] == "timed out after 120 s; a | b\nc"  # quoted, not split
    gc.write_summary(results, tmp_path / "summary.md", "GPU check", bench_md="| B, H, L, E |\n|---|\n")
    md = (tmp_path / "summary.md").read_text()
    assert "**NOT ALL PASSED** (1 of 3 steps passed, 163 s in all)" in md
    assert "| test-triton | fail | 40.0 | 150 | 1 failed, 3 passed, 1 skipped, 1 error in 12.34s |" in md
    assert "| bench | timeout | 120.0 | 120 | timed out after 120 s; a \\| b c |" in md  # one table row
    assert "- test-triton: `FAILED tests/test_triton.py::test_gqa[NONE-2]" in md
    assert "- test-triton: `ERROR tests/test_cuda_emu_forward.py::test_head_dims[256-256]" in md
    assert md.rstrip().endswith("|---|")  # the benchmark table closes the summary
    gc.write_summary(results[:1], tmp_path / "ok.md", "GPU check")
    assert "**PASS** (1 of 1 steps passed" in (tmp_path / "ok.md").read_text()


def test_benchmark_shapes_have_equal_flops():
    bench = gc._load_bench()  # benchmarks/bench.py: its flops() and CSV columns are the ones used
    cases = gc.bench_cases()
    assert len(set(cases)) == len(cases) == 2 * 2 * 3 * 2
    assert {c[2] for c in cases} == {1024, 4096, 16384} and cases[0][:4] == ("bfloat16", 128, 4096, False)
    for dtype, E, L, causal, B, H in cases:
        assert bench.flops(B, H, L, L, E, causal, "fwd") == bench.flops(1, 16, 16384, 16384, E, causal, "fwd")
        assert B * H * L * E * 2 <= 2 ** 31  # one bf16 operand up to 2 GiB on the GPU
    assert set(gc.BENCH_PROVIDERS) >= {"sdpa-flash_attention", "sdpa-cudnn_attention", "fused_attn-cuda",
                                       "fused_attn-triton"}


def test_plan_builds_the_cpu_extension_only_when_missing(tmp_path):
    with_cpu = {s.name: s for s in gc.plan(tmp_path, need_cpu_extension=True)}
    without = {s.name: s for s in gc.plan(tmp_path, need_cpu_extension=False)}
    assert "FUSED_ATTN_SKIP_CPU_BUILD" not in with_cpu["build"].env
    assert without["build"].env["FUSED_ATTN_SKIP_CPU_BUILD"] == "1"
    assert with_cpu["build"].env["FUSED_ATTN_CUDA_ARCHS"] == "native"
    assert sum(s.budget_s for s in with_cpu.values()) >= gc.TOTAL_BUDGET_S  # the overall budget is what binds
    assert gc.TOTAL_BUDGET_S < 9 * 60


def test_unknown_step_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gc.main(["--out", str(tmp_path), "--only", "build,nope"])
    assert "unknown step nope; steps are env, build" in capsys.readouterr().err


def test_subprocess_environment_is_compiled_mode(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSED_ATTN_CUDA_EMULATE", "1")
    env = gc.base_env()
    assert "TRITON_INTERPRET" not in env and "FUSED_ATTN_CUDA_EMULATE" not in env
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(gc.ROOT)


def test_sanitizer_launches_run_every_kernel_under_the_emulator(monkeypatch, capsys):
    """The script compute-sanitizer runs, on CPU tensors through the CUDA emulator (same
    kernels, every global access bounds-checked): its shapes and arguments are valid."""
    monkeypatch.setenv("FUSED_ATTN_CUDA_EMULATE", "1")
    assert gc.sanitizer_launches("cpu") == 0
    out = capsys.readouterr().out
    assert out.count("ok: forward + backward") == 2 * len(gc.SANITIZER_CASES)


def test_bench_worker_writes_rows_as_it_goes(tmp_path, monkeypatch):
    """The benchmark step's worker on the CPU with a tiny shape and CPU providers: bench.py's
    CSV columns and markdown table; a shape started after the budget is not run."""
    monkeypatch.setenv(gc.STEP_SECONDS_ENV, str(gc.BENCH_MARGIN_S + 5))
    cases = [("float32", 32, 64, False, 1, 2), ("float32", 32, 64, True, 1, 2)]
    clock = itertools.chain([0.0, 1.0], itertools.repeat(100.0))  # start, 1st shape; then over budget
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    assert gc.bench_worker(tmp_path, "cpu", cases, ("fused_attn-cpu", "sdpa-math")) == 0
    bench = gc._load_bench()
    with open(tmp_path / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == bench.CSV_COLUMNS
    assert {(r["provider"], r["mode"], r["causal"]) for r in rows} == {
        (p, m, "0") for p in ("fused_attn-cpu", "sdpa-math") for m in ("fwd", "fwd+bwd")}
    assert all(float(r["gflops"]) > 0 and float(r["x_sdpa"]) > 0 for r in rows)
    assert "fused_attn-cpu x sdpa" in (tmp_path / "bench.md").read_text()
