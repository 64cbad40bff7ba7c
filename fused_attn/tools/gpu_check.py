"""One command on a GPU machine: build, compiled tests, compute-sanitizer, benchmarks.

    python -m fused_attn.tools.gpu_check --out DIR [--budget 510] [--only build,test-cuda] [--dry-run]

Run from the repository root; nothing needs to be installed (the extensions are built in
place) or downloaded. Each step is a subprocess with its own time budget (``BUDGETS``),
and the whole run stays inside ``--budget`` seconds (a step gets what is left when
that is less; a step left with under ``MIN_STEP_S`` (or its own budget) is skipped). A failing or timed-out
step does not stop the next. Steps:

1. ``env``: GPU, compute capability, driver, torch / CUDA / Triton / nvcc /
   compute-sanitizer versions, ninja, flash-attn, what the extensions were built for.
2. ``build``: ``python setup.py build_ext --inplace --force`` with
   ``FUSED_ATTN_CUDA_ARCHS=native`` (this GPU's arch only) and ``MAX_JOBS`` (default: every
   core); the CPU extension too when ``fused_attn._C_cpu`` does not import. Then checks
   that ``fused_attn._C_cuda`` imports and accepts this GPU.
3. ``test-cuda``, ``test-triton``: ``FUSED_ATTN_TEST_DEVICE=cuda python -m pytest`` on the
   CUDA tests (``CUDA_TESTS``: the emulated tests' cases on CUDA tensors through the built
   extension) and the Triton tests (``TRITON_TESTS``, compiled, no interpreter); no -x,
   failures listed (-rfE and a JUnit XML per step), pytest-timeout's per-test limit when
   that plugin is installed.
4. ``memcheck``, ``racecheck``: ``compute-sanitizer --tool memcheck|racecheck`` on
   ``--sanitizer-launches``: a few tiny launches of every CUDA kernel (forward, backward
   preprocess, dK/dV, dQ; fp16 and bf16; head dims 40, 128, 256; ragged L != S, GQA,
   causal and not), with torch's caching allocator off so every tensor is its own
   allocation and an overrun is caught.
5. ``bench``: forward and forward+backward, bf16 and fp16, head dims 64 and 128, causal
   and not, L = S in 1k, 4k, 16k with batch x heads chosen so every shape has the same
   FLOPs (``bench_cases``), for fused_attn's triton and cuda backends, torch SDPA's flash
   and cuDNN backends and flash-attn when importable, through ``benchmarks/bench.py``
   (its flops(), providers, timing and CSV columns): TFLOP/s, % of peak and the ratio to
   the fastest SDPA backend per row. Rows are written as they come, so a timeout keeps
   the ones done; the most telling shapes go first.

Writes to DIR: ``gpu_check.log`` (the plan, then every step's command and full output),
``steps.csv`` (step, status, seconds, budget, exit status, detail), ``summary.md`` (the
step table, failed tests, the benchmark table), ``bench.csv`` / ``bench.md``, and the
JUnit XML of the test steps. Exit status 0 when every step passed.

``--dry-run`` (any machine, no GPU needed): writes the same files with the plan (every
command, its environment and budget, the tests and benchmark shapes), runs the steps
that need no GPU (the environment report) and marks the others "planned". CI runs it
(tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
TOTAL_BUDGET_S = 510  # 8.5 minutes: the check must finish in under 9
MIN_STEP_S = 10
BUDGETS = {"env": 30, "build": 200, "test-cuda": 75, "memcheck": 60, "racecheck": 75, "test-triton": 150,
           "bench": 120}
PER_TEST_TIMEOUT_S = 60  # pytest-timeout's limit per test, when the plugin is there
CUDA_TESTS = ("tests/test_cuda_emu_forward.py", "tests/test_cuda_emu_backward.py", "tests/test_cuda_arch.py")
TRITON_TESTS = ("tests/test_triton.py", "tests/test_kvcache.py")  # (test_kvcache: the SEQLENS forward, compiled)
BENCH_PROVIDERS = ("fused_attn-cuda", "fused_attn-triton", "sdpa-flash_attention", "sdpa-cudnn_attention", "flash-attn")
BENCH_HEADS = 16
BENCH_BATCH_L2 = 16384 ** 2  # batch * L^2 of every shape: batch 256 at L = 1k, 16 at 4k, 1 at 16k (16 heads)
BENCH_MARGIN_S = 25  # the benchmark starts no new shape this close to its step's end
STEP_SECONDS_ENV = "FUSED_ATTN_GPU_CHECK_SECONDS"  # each step's command learns its budget from this
SANITIZER_CASES = ((40, 2), (128, 0), (256, 1))  # (head dim, causal: 0 none, 1 upper-left, 2 lower-right)
STEPS_CSV_COLUMNS = ("step", "status", "seconds", "budget_s", "returncode", "detail")
# Variables that would turn the compiled runs back into interpreted / emulated ones.
CLEARED_ENV = ("TRITON_INTERPRET", "FUSED_ATTN_CUDA_EMULATE", "FUSED_ATTN_BACKEND", "FUSED_ATTN_TEST_DEVICE")


@dataclass
class Step:
    name: str
    title: str
    commands: List[List[str]]  # run in order; the step fails at the first non-zero exit
    budget_s: float
    env: Dict[str, str] = field(default_factory=dict)  # set on top of the cleaned environment
    needs_gpu: bool = True
    detail: Optional[Callable[[str], str]] = None  # the step's output -> one line for the summary


@dataclass
class Result:
    step: str
    status: str  # pass, fail, timeout, skipped, planned
    seconds: float = 0.0
    budget_s: float = 0.0
    returncode: Optional[int] = None
    detail: str = ""
    output: str = ""


# ---- what each step's output says, in one line -------------------------------------------

def last_line(text: str) -> str:
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return lines[-1][:300] if lines else ""


def pytest_detail(text: str) -> str:
    """pytest's closing line: '3 failed, 150 passed, 4 skipped in 61.2s'."""
    found = re.findall(r"^=+ (.+? in [\d.]+s(?: \([\d:]+\))?) =+$", text, re.MULTILINE)
    return found[-1] if found else last_line(text)


def failed_tests(text: str) -> List[str]:
    """The 'FAILED tests/x.py::name - reason' and 'ERROR ...' lines of pytest's -rfE summary."""
    return [l.strip() for l in text.splitlines() if re.match(r"^(FAILED|ERROR) \S+::", l.strip())]


def env_detail(text: str) -> str:
    """The report's closing 'summary: GPU (capability), torch version' line."""
    found = re.findall(r"^summary: (.*)$", text, re.MULTILINE)
    return found[-1] if found else last_line(text)


def sanitizer_detail(text: str) -> str:
    """compute-sanitizer's summary lines ('ERROR SUMMARY: 0 errors', 'RACECHECK SUMMARY: ...')."""
    found = re.findall(r"=========\s+((?:ERROR|RACECHECK) SUMMARY: .*)", text)
    return "; ".join(dict.fromkeys(found)) or last_line(text)


# ---- the step runner ------------------------------------------------------------------------

def base_env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"  # output reaches the log in order
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the command and everything it started
    except ProcessLookupError:
        pass
    proc.wait()


def run_step(step: Step, log, seconds_left: float, dry_run: bool = False) -> Result:
    """Runs one step with its output appended to ``log`` (a file opened "ab" unbuffered,
    which the commands write to directly), within min(its budget, seconds_left). Never
    raises for a failing command; a command still running at the end is killed with
    everything it started."""
    budget = min(step.budget_s, seconds_left)
    res = Result(step.name, "planned", budget_s=round(budget, 1))
    if dry_run and step.needs_gpu:
        res.detail = "dry run: not executed"
        return res
    if budget < min(MIN_STEP_S, step.budget_s):
        res.status, res.detail = "skipped", f"out of time: {seconds_left:.0f} s left of the overall budget"
        _write(log, f"\n=== {step.name}: skipped ({res.detail})\n")
        return res
    _write(log, f"\n=== {step.name}: {step.title} (budget {budget:.0f} s)\n")
    env = base_env()
    env.update(step.env)
    env[STEP_SECONDS_ENV] = f"{budget:.0f}"
    start = os.fstat(log.fileno()).st_size
    t0 = time.monotonic()
    res.status = "pass"
    for cmd in step.commands:
        left = budget - (time.monotonic() - t0)
        _write(log, f"$ {_shell(cmd)}\n")
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        except OSError as e:  # the tool is not installed
            _write(log, f"cannot run {cmd[0]}: {e}\n")
            res.status, res.returncode = "fail", 127
            break
        try:
            res.returncode = proc.wait(timeout=max(left, 0.1))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            res.status = "timeout"
            _write(log, f"\n--- {step.name}: killed after its budget of {budget:.0f} s\n")
            break
        if res.returncode != 0:
            res.status = "fail"
            break
    res.seconds = round(time.monotonic() - t0, 1)
    with open(log.name, "rb") as f:
        f.seek(start)
        res.output = f.read().decode("utf-8", "replace")
    res.detail = (step.detail or last_line)(res.output)
    if res.status == "timeout":
        res.detail = f"timed out after {budget:.0f} s; {res.detail}"
    _write(log, f"=== {step.name}: {res.status} in {res.seconds:.1f} s (exit status {res.returncode})\n")
    return res


def run_steps(steps: Sequence[Step], log, total_budget_s: float, dry_run: bool = False,
              echo: Callable[[str], None] = print) -> List[Result]:
    """Every step in order, whatever the earlier ones did, inside ``total_budget_s``."""
    t0 = time.monotonic()
    results = []
    for step in steps:
        res = run_step(step, log, total_budget_s - (time.monotonic() - t0), dry_run)
        echo(f"[gpu_check] {step.name}: {res.status} ({res.seconds:.0f} s) {res.detail}")
        results.append(res)
    return results


def _write(log, text: str) -> None:
    log.write(text.encode())


def _shell(cmd: Sequence[str]) -> str:
    import shlex

    return " ".join(shlex.quote(c) for c in cmd)


# ---- the files it writes ----------------------------------------------------------------------

def write_steps_csv(results: Sequence[Result], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(STEPS_CSV_COLUMNS)
        for r in results:
            w.writerow([r.step, r.status, f"{r.seconds:.1f}", f"{r.budget_s:.0f}",
                        "" if r.returncode is None else r.returncode, r.detail])


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_summary(results: Sequence[Result], path: Path, title: str, bench_md: str = "") -> None:
    passed = sum(r.status == "pass" for r in results)
    planned = sum(r.status == "planned" for r in results)
    verdict = ("PASS" if passed == len(results) else "PLAN ONLY (dry run)" if passed + planned == len(results)
               else "NOT ALL PASSED")
    lines = [f"# {title}", "",
             f"Overall: **{verdict}** ({passed} of {len(results)} steps passed, "
             f"{sum(r.seconds for r in results):.0f} s in all)", "",
             "| step | status | seconds | budget s | detail |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.step} | {r.status} | {r.seconds:.1f} | {r.budget_s:.0f} | {_cell(r.detail)} |")
    failures = [(r.step, f) for r in results for f in failed_tests(r.output)]
    if failures:
        lines += ["", "## Failed tests", ""] + [f"- {step}: `{f}`" for step, f in failures]
    if bench_md:
        lines += ["", "## Benchmarks (TFLOP/s; x sdpa = the fastest torch SDPA backend's time / this one's)", "",
                  bench_md.rstrip()]
    path.write_text("\n".join(lines) + "\n")


# ---- the plan -------------------------------------------------------------------------------

def bench_cases():
    """(dtype, E, L, causal, B, H), most telling first; B * L^2 is the same for every L."""
    cases = []
    for dtype in ("bfloat16", "float16"):
        for E in (128, 64):
            for L in (4096, 16384, 1024):
                for causal in (False, True):
                    cases.append((dtype, E, L, causal, BENCH_BATCH_L2 // (L * L), BENCH_HEADS))
    return cases


def _module_cmd(*args: str) -> List[str]:
    return [sys.executable, "-m", "fused_attn.tools.gpu_check", *args]


def _imports(module: str) -> bool:
    """Whether ``module`` imports in a fresh interpreter (an extension built for another torch does not)."""
    res = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, env=base_env(),
                         capture_output=True, timeout=120)
    return res.returncode == 0


def sanitizer_path() -> Optional[str]:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in filter(None, homes):
        for sub in ("bin", "compute-sanitizer"):
            p = Path(home) / sub / "compute-sanitizer"
            if p.is_file():
                return str(p)
    return None


def plan(out: Path, need_cpu_extension: bool) -> List[Step]:
    jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
    build_env = {"FUSED_ATTN_CUDA_ARCHS": "native", "MAX_JOBS": jobs}
    if not need_cpu_extension:
        build_env["FUSED_ATTN_SKIP_CPU_BUILD"] = "1"
    test_env = {"FUSED_ATTN_TEST_DEVICE": "cuda"}
    timeout = [f"--timeout={PER_TEST_TIMEOUT_S}"] if importlib.util.find_spec("pytest_timeout") else []

    def pytest_cmd(name, files):
        files = [f for f in files if (ROOT / f).is_file()]
        return [sys.executable, "-m", "pytest", "-q", "-rfE", "--durations=5", "-p", "no:cacheprovider", *timeout,
                f"--junitxml={out / f'junit_{name}.xml'}", *files]

    sanitizer = sanitizer_path() or "compute-sanitizer"
    # one allocation per tensor, so memcheck sees the end of each
    sanitizer_env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    return [
        Step("env", "environment report", [_module_cmd("--env-report")], BUDGETS["env"], needs_gpu=False,
             detail=env_detail),
        Step("build", f"build the extensions in place for this GPU (MAX_JOBS={jobs}"
             f"{', CPU extension too' if need_cpu_extension else ''})",
             [[sys.executable, "setup.py", "build_ext", "--inplace", "--force"], _module_cmd("--verify-build")],
             BUDGETS["build"], build_env),
        Step("test-cuda", "CUDA kernel tests, compiled", [pytest_cmd("test-cuda", CUDA_TESTS)], BUDGETS["test-cuda"],
             test_env, detail=pytest_detail),
        Step("memcheck", "compute-sanitizer memcheck on tiny launches of every CUDA kernel",
             [[sanitizer, "--tool", "memcheck", "--error-exitcode", "1", *_module_cmd("--sanitizer-launches")]],
             BUDGETS["memcheck"], sanitizer_env, detail=sanitizer_detail),
        Step("racecheck", "compute-sanitizer racecheck (shared memory hazards) on the same launches",
             [[sanitizer, "--tool", "racecheck", "--error-exitcode", "1", *_module_cmd("--sanitizer-launches")]],
             BUDGETS["racecheck"], sanitizer_env, detail=sanitizer_detail),
        Step("test-triton", "Triton kernel tests, compiled", [pytest_cmd("test-triton", TRITON_TESTS)],
             BUDGETS["test-triton"], test_env, detail=pytest_detail),
        Step("bench", "benchmarks against torch SDPA (flash, cuDNN) and flash-attn",
             [_module_cmd("--bench-worker", "--out", str(out))], BUDGETS["bench"]),
    ]


def describe(steps: Sequence[Step], total_budget_s: float) -> str:
    lines = [f"Plan: {len(steps)} steps within {total_budget_s:.0f} s in all (a step gets min(its budget, what is left))"]
    for s in steps:
        lines.append(f"- {s.name} (budget {s.budget_s:.0f} s{'' if s.needs_gpu else ', runs without a GPU'}): {s.title}")
        if s.env:
            lines.append("    env: " + " ".join(f"{k}={v}" for k, v in sorted(s.env.items())))
        lines += [f"    $ {_shell(c)}" for c in s.commands]
    lines.append("Benchmark shapes (dtype, E, L = S, causal, B, H; same FLOPs per E and causal), most telling first:")
    lines += [f"    {c}" for c in bench_cases()]
    lines.append(f"Benchmark providers, where they can run: {', '.join(BENCH_PROVIDERS)}")
    lines.append(f"Environment cleared for every step: {', '.join(CLEARED_ENV)}; PYTHONPATH={ROOT}")
    return "\n".join(lines)


# ---- the subcommands the steps run (each in its own process) --------------------------------

def env_report() -> int:
    import platform

    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; host {platform.node()}; "
          f"python {platform.python_version()}; {os.cpu_count()} CPUs")
    import torch

    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError as e:
        print(f"triton: not importable ({e})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"GPU {i}: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                  f"{p.multi_processor_count} SMs")
    else:
        print("GPU: none visible to torch")
    for tool, args in (("nvidia-smi", ["--query-gpu=driver_version,name", "--format=csv,noheader"]),
                       ("nvcc", ["--version"]), (sanitizer_path() or "compute-sanitizer", ["--version"]),
                       ("ninja", ["--version"])):
        try:
            res = subprocess.run([tool, *args], capture_output=True, text=True, timeout=20)
            print(f"{Path(tool).name}: {last_line(res.stdout + res.stderr)}")
        except (OSError, subprocess.TimeoutExpired) as e:
            print(f"{Path(tool).name}: not available ({e.__class__.__name__})")
    for mod in ("flash_attn", "pytest_timeout"):
        spec = importlib.util.find_spec(mod)
        print(f"{mod}: {'installed' if spec else 'not installed'}")
    from fused_attn.ops import cuda

    built = "built for " + "+".join(cuda.built_archs() or ("unknown archs",))
    print(f"fused_attn._C_cuda: {built if cuda._C_cuda is not None else cuda._IMPORT_ERROR}")
    try:
        import fused_attn._C_cpu  # noqa: F401
        print("fused_attn._C_cpu: imports")
    except ImportError as e:
        print(f"fused_attn._C_cpu: does not import ({e})")
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    cap = ".".join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available() else "-"
    print(f"summary: {name} ({cap}), torch {torch.__version__}")
    return 0


def verify_build() -> int:
    import torch
    from fused_attn.ops import cuda

    if cuda._C_cuda is None:
        print(cuda._IMPORT_ERROR)
        return 1
    cap = torch.cuda.get_device_capability()
    why = cuda.arch_refusal(cap, cuda.built_archs())
    print(f"fused_attn._C_cuda built for {cuda.built_archs()}; this GPU {cap[0]}.{cap[1]}: "
          f"{'accepted' if why is None else 'REFUSED: ' + why}")
    return 0 if why is None else 1


def sanitizer_launches(device: str = "cuda") -> int:
    """Tiny launches of every CUDA kernel, for compute-sanitizer: ragged L != S, GQA, causal
    and not, head dims 40 (in the 64 bucket), 128, 256 (the largest shared memory).
    (device "cpu" runs the same launches through the emulator, for tests/test_gpu_check.py.)"""
    import torch

    from fused_attn.ops import cuda

    torch.manual_seed(0)
    n = 0
    for dtype in (torch.float16, torch.bfloat16):
        for E, causal in SANITIZER_CASES:
            B, Hq, Hk, L, S = 1, 4, 2, 77, 133
            q = torch.randn(B, Hq, L, E, device=device, dtype=dtype)
            k, v = (torch.randn(B, Hk, S, E, device=device, dtype=dtype) for _ in range(2))
            out, lse = cuda.forward(q, k, v, causal, E ** -0.5)
            dout = torch.randn_like(out)
            dq, dk, dv, _ = cuda.backward(dout, torch.randn_like(lse), q, k, v, out, lse, causal, E ** -0.5)
            if device == "cuda":
                torch.cuda.synchronize()
            assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv)), f"non-finite result at E={E} {dtype}"
            n += 1
            print(f"ok: forward + backward (preprocess, dK/dV, dQ), {dtype}, E={E}, causal={causal}", flush=True)
    print(f"{n} forward + backward launches done")
    return 0


def _load_bench():
    """benchmarks/bench.py as a module (it is a script, not part of the package)."""
    name = "fused_attn_benchmarks_bench"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "bench.py")
        bench = importlib.util.module_from_spec(spec)
        sys.modules[name] = bench  # its dataclasses look their module up while being defined
        try:
            spec.loader.exec_module(bench)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def bench_worker(out: Path, device: str = "cuda", cases=None, provider_names=BENCH_PROVIDERS) -> int:
    """Runs ``cases`` (default bench_cases()) in order while its step's budget lasts (less
    BENCH_MARGIN_S), appending rows to out/bench.csv and re-rendering out/bench.md after each
    shape. (Other devices, cases and providers: for tests/test_gpu_check.py on the CPU.)"""
    import torch

    seconds = float(os.environ.get(STEP_SECONDS_ENV, BUDGETS["bench"])) - BENCH_MARGIN_S
    cases = bench_cases() if cases is None else cases
    bench = _load_bench()
    t0 = time.monotonic()
    provs = [p for p in bench.providers(device) if p.name in provider_names]
    print(f"{bench.machine_description(device)}; providers: {', '.join(p.name for p in provs)}", flush=True)
    rows: List[dict] = []
    csv_path, md_path = out / "bench.csv", out / "bench.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=bench.CSV_COLUMNS)
        writer.writeheader()
        for i, (dtype_name, E, L, causal, B, H) in enumerate(cases):
            if time.monotonic() - t0 > seconds:
                print(f"stopping: {seconds:.0f} s used, {len(cases) - i} shapes not run", flush=True)
                break
            dtype = getattr(torch, dtype_name)
            got = bench.bench_case(device, dtype, B, H, L, E, causal, ("fwd", "fwd+bwd"), provs, reps=5, warmup=1,
                                   min_time=0.02, peak_tflops=bench._peak_for(device, dtype))
            writer.writerows(got)
            f.flush()
            rows += got
            md_path.write_text(bench.markdown(rows))
            bench.print_table(got, device)
            if device == "cuda":
                torch.cuda.empty_cache()
    print(f"{len(rows)} benchmark rows in {csv_path}")
    return 0 if rows else 1


# ---- main --------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Steps: " + ", ".join(BUDGETS))
    ap.add_argument("--out", type=Path, help="directory for the log, CSVs and summary (created)")
    ap.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="seconds for all steps together")
    ap.add_argument("--only", default=None, help="comma-separated step names to run (default: all)")
    ap.add_argument("--dry-run", action="store_true", help="write the plan; run only what needs no GPU")
    sub = ap.add_mutually_exclusive_group()  # what the steps run, in their own processes
    sub.add_argument("--env-report", action="store_true", help=argparse.SUPPRESS)
    sub.add_argument("--verify-build", action="store_true", help=argparse.SUPPRESS)
    sub.add_argument("--sanitizer-launches", action="store_true", help=argparse.SUPPRESS)
    sub.add_argument("--bench-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.env_report:
        return env_report()
    if args.verify_build:
        return verify_build()
    if args.sanitizer_launches:
        return sanitizer_launches()
    if args.out is None:
        ap.error("--out DIR is required")
    out = args.out.resolve()
    if args.bench_worker:
        out.mkdir(parents=True, exist_ok=True)
        return bench_worker(out)
    wanted = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else list(BUDGETS)
    unknown = [s for s in wanted if s not in BUDGETS]
    if unknown:
        ap.error(f"--only: unknown step {', '.join(unknown)}; steps are {', '.join(BUDGETS)}")
    out.mkdir(parents=True, exist_ok=True)
    steps = [s for s in plan(out, need_cpu_extension=not _imports("fused_attn._C_cpu")) if s.name in wanted]
    stamp = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"
    text = describe(steps, args.budget)
    print(text)
    for old in ("gpu_check.log", "bench.csv", "bench.md"):  # nothing from an earlier run is reported as this one's
        (out / old).unlink(missing_ok=True)
    with open(out / "gpu_check.log", "ab", buffering=0) as log:
        _write(log, f"fused_attn GPU check, {stamp}{' (dry run)' if args.dry_run else ''}; repository {ROOT}\n{text}\n")
        results = run_steps(steps, log, args.budget, args.dry_run)
    env = next((r for r in results if r.step == "env" and r.status == "pass"), None)
    machine = env.detail if env else "machine unknown"
    bench_md = (out / "bench.md").read_text() if (out / "bench.md").is_file() else ""
    write_steps_csv(results, out / "steps.csv")
    write_summary(results, out / "summary.md", f"fused_attn GPU check, {stamp}: {machine}"
                  + (" (dry run: the plan only)" if args.dry_run else ""), bench_md)
    print(f"[gpu_check] wrote {out / 'summary.md'}, {out / 'steps.csv'}, {out / 'gpu_check.log'}")
    if args.dry_run:
        return 0 if all(r.status in ("pass", "planned") for r in results) else 1
    return 0 if all(r.status == "pass" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
