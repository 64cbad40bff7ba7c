"""Attention benchmark: every provider that can run on the device, in one run.

    python benchmarks/bench.py --device cpu --shapes 1,8,1024,64 2,8,2048,128 \
        --dtypes float32 bfloat16 --causal none causal --modes fwd fwd+bwd

Shapes are B,H,L,E (L = S) or B,H,L,S,E. Per-call cost shows at tiny shapes:
--shapes 1,1,8,16 1,8,1,1024,64 (a tiny call; one decoding step against 1024 keys).

--masks adds which keys each query sees: ``pad25`` a boolean key-padding mask (B, 1, 1, S)
with 25% of the keys padded (right padding, each batch entry its own length averaging 75% of
S), given to every provider; ``window256`` a sliding window of 256 keys each side (fused_attn's
``window=(256, 256)``; torch SDPA and naive get the same (L, S) boolean mask, since they take
no window); ``mask30`` a random boolean (B, 1, L, S) mask hiding 30% of the pairs (a general
mask: every tile masked in part); ``drop10`` dropout_p = 0.1 (no mask; every provider drops,
torch SDPA with its own generator). GFLOP/s count the visible (query, key) pairs only.

Providers: naive PyTorch (fused_attn.reference, in the inputs' dtype), torch SDPA with
each backend torch lets you select on the device (torch.nn.attention.sdpa_kernel), every
fused_attn kernel backend that accepts the call (triton and cuda are skipped on the CPU:
their CPU paths are an interpreter and an emulation, not for timing), and flash-attn /
xformers when installed (CUDA only).

Timing: providers run interleaved, repetition by repetition, so a noisy machine hurts all
of them alike; each row reports the median and the inter-quartile range. FLOPs come from
the one flops() below; "x sdpa" is the fastest torch SDPA backend's median divided by the
provider's, from the same run. Peak memory: CUDA, torch.cuda.max_memory_allocated above
what was held before the call; CPU, the peak of bytes held through PyTorch's allocator
during one call, from the profiler's allocation events (inputs are allocated before; what
OpenMP worker threads allocate is not seen, so use --threads 1 to count everything).
Output: a table on screen, and a CSV, a markdown table and a PNG per run in --out
(default benchmarks/out/).

CPU path: --cpu-isa avx2 times what an AVX2 machine runs, on any x86 CPU with AVX2: the run
happens in a child process started with FUSED_ATTN_CPU_ISA set (fused_attn/ops/cpu.py: avx2
is the portable path with its loops at AVX2; no hand-written AVX2 kernel yet) and with
PyTorch pinned to the same ISA (CPU_ISA_PINS: ATen's kernels, MKL, oneDNN; read when torch
loads, hence the child). --cpu-isa portable pins both to baseline x86-64 (SSE). The header
says which path each side took.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler (peak CPU memory) is chatty otherwise
import torch  # noqa: E402

import fused_attn  # noqa: E402
from fused_attn import dispatch, reference  # noqa: E402
from fused_attn.problem import make_problem, make_varlen_problem  # noqa: E402
from fused_attn.spec import CausalMode  # noqa: E402
from fused_attn.testing import peak_memory_bytes  # noqa: E402

MODES = ("fwd", "bwd", "fwd+bwd")
BWD_FLOPS_FACTOR = 2.5  # backward = 2.5 x forward (two GEMMs forward, five backward)
MASKS = ("none", "pad25", "window256", "mask30", "drop10")
CSV_COLUMNS = ("device", "provider", "dtype", "B", "H", "L", "S", "E", "causal", "mask", "mode", "median_ms", "q1_ms",
               "q3_ms", "iqr_ms", "gflops", "pct_peak", "peak_mem_mb", "x_sdpa")
# Dense peak TFLOP/s by device name fragment: (bf16/fp16 tensor core, fp32 without TF32).
# --cpu-isa: environment of the child process. torch reads these when it loads.
CPU_ISAS = ("native", "avx2", "portable")
CPU_ISA_PINS = {"native": {},
                "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
                "portable": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                             "ONEDNN_MAX_CPU_ISA": "SSE41"}}
GPU_PEAK_TFLOPS = {"H200": (989.0, 67.0), "H100 SXM": (989.0, 67.0), "H100 PCIe": (756.0, 51.0),
                   "H100": (989.0, 67.0), "A100": (312.0, 19.5), "L4": (121.0, 30.3), "4090": (165.0, 82.6)}


def flops(B: int, H: int, Lq: int, Lk: int, D: int, causal: bool, mode: str) -> float:
    """Useful FLOPs of one attention call: forward 4*B*H*Lq*Lk*D (two GEMMs), halved for
    causal; backward 2.5x forward; fwd+bwd the sum."""
    fwd = 4.0 * B * H * Lq * Lk * D / (2.0 if causal else 1.0)
    return {"fwd": fwd, "bwd": BWD_FLOPS_FACTOR * fwd, "fwd+bwd": (1.0 + BWD_FLOPS_FACTOR) * fwd}[mode]


def mask_args(mask: str, B: int, L: int, S: int, device) -> dict:
    """The case's masking as fused_attn's keyword arguments: ``attn_mask`` (a tensor every provider
    takes) and ``window`` (fused_attn's only; others get ``window_mask``, its (L, S) boolean mask)."""
    if mask == "none":
        return {}
    if mask == "pad25":
        g = torch.Generator().manual_seed(1)
        lengths = (S * (0.5 + 0.5 * torch.rand(B, generator=g))).round().long().clamp(1, S)  # mean 0.75 S
        keep = torch.arange(S)[None, :] < lengths[:, None]
        return {"attn_mask": keep[:, None, None, :].to(device), "lengths": lengths.tolist()}
    if mask == "mask30":
        g = torch.Generator().manual_seed(2)
        return {"attn_mask": (torch.rand(B, 1, L, S, generator=g) > 0.3).to(device)}
    if mask == "drop10":
        return {"dropout_p": 0.1}
    if mask == "window256":
        i = torch.arange(L, device=device)[:, None] + (S - L)
        j = torch.arange(S, device=device)[None, :]
        return {"window": (256, 256), "window_mask": (j >= i - 256) & (j <= i + 256)}
    raise ValueError(mask)


def visible_fraction(extra: dict, B: int, L: int, S: int) -> float:
    """The share of (query, key) pairs a mask case leaves visible (1 without a mask)."""
    m = extra.get("attn_mask", extra.get("window_mask"))
    return 1.0 if m is None else float(m.expand(B, 1, L, S).float().mean())


def _torch_mask(causal: bool, extra: dict, L: int, S: int) -> dict:
    """SDPA's arguments for the case: the mask (a window as its boolean mask), with causal folded in
    (torch refuses is_causal with a mask in some backends)."""
    m = extra.get("attn_mask", extra.get("window_mask"))
    drop = {"dropout_p": extra["dropout_p"]} if "dropout_p" in extra else {}
    if m is None:
        return {"is_causal": causal, **drop}
    if causal:
        m = m & torch.ones(L, S, dtype=torch.bool, device=m.device).tril()
    return {"attn_mask": m, **drop}


@dataclass
class Provider:
    name: str
    # (q, k, v, causal, extra) -> forward callable returning the output, or None if it cannot run;
    # extra: mask_args' dict
    make: Callable[..., Optional[Callable[[], torch.Tensor]]]
    is_sdpa: bool = False


def _sdpa_provider(backend) -> Provider:
    from torch.nn.attention import sdpa_kernel

    def make(q, k, v, causal, extra):
        kw = _torch_mask(causal, extra, q.shape[2], k.shape[2])

        def run():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)
        try:
            with torch.no_grad():
                run()
        except RuntimeError:  # this backend cannot run this call (dtype, device, shape)
            return None
        return run
    return Provider(f"sdpa-{backend.name.lower()}", make, is_sdpa=True)


def _fused_provider(name: str) -> Provider:
    def make(q, k, v, causal, extra):
        kw = {key: val for key, val in extra.items() if key in ("attn_mask", "window", "dropout_p")}
        p = make_problem(q, k, v, kw.get("attn_mask"), kw.get("dropout_p", 0.0), is_causal=causal,
                         window=kw.get("window"))
        if dispatch.get(name).refusal(p, explicit=True) is not None:
            return None
        return lambda: fused_attn.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=name, **kw)
    return Provider(f"fused_attn-{name}", make)


def _varlen_provider(name: str) -> Provider:
    """fused_attn.varlen_attention on the pad25 case's sequences packed without their padding (queries
    and keys each cut to the sequence's length; the padded queries of the other providers' calls are
    not computed)."""
    def make(q, k, v, causal, extra):
        if "lengths" not in extra or q.shape[2] != k.shape[2]:
            return None
        lengths = extra["lengths"]
        pack = lambda t: torch.cat([t[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)])  # noqa: E731
        qp, kp, vp = (pack(t).detach().requires_grad_(t.requires_grad) for t in (q, k, v))
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=q.device)
        probe = make_varlen_problem(qp, kp, vp, cu, cu, max(lengths), max(lengths), causal=causal)
        if dispatch.get(name).refusal(probe, explicit=True) is not None:
            return None
        return lambda: fused_attn.varlen_attention(qp, kp, vp, cu, cu, max(lengths), max(lengths), causal=causal,
                                                   backend=name)
    return Provider(f"fused_attn-{name}-varlen", make)


def _naive(q, k, v, causal, extra):
    mode = CausalMode.UPPER_LEFT if causal else CausalMode.NONE
    mask = extra.get("attn_mask", extra.get("window_mask"))
    return lambda: reference.attention(q, k, v, mask, extra.get("dropout_p", 0.0), causal=mode)[0]


def _flash_attn_provider() -> Optional[Provider]:
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None

    def make(q, k, v, causal, extra):
        if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16) or extra:
            return None
        qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad) for t in (q, k, v))
        return lambda: flash_attn_func(qt, kt, vt, causal=causal)
    return Provider("flash-attn", make)


def _xformers_provider() -> Optional[Provider]:
    try:
        import xformers.ops as xops
    except ImportError:
        return None

    def make(q, k, v, causal, extra):
        if q.device.type != "cuda" or extra:
            return None
        qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad) for t in (q, k, v))
        bias = xops.LowerTriangularMask() if causal else None
        return lambda: xops.memory_efficient_attention(qt, kt, vt, attn_bias=bias)
    return Provider("xformers", make)


def providers(device: str) -> List[Provider]:
    from torch.nn.attention import SDPBackend
    sdpa = [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]
    if device == "cuda":
        sdpa += [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    found = [Provider("naive", _naive)] + [_sdpa_provider(b) for b in sdpa]
    for name in dispatch.ORDER:
        if name == "reference" or (device == "cpu" and name in ("triton", "cuda")):
            continue
        found.append(_fused_provider(name))
        found.append(_varlen_provider(name))
    found += [p for p in (_flash_attn_provider(), _xformers_provider()) if p is not None]
    return found


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _step(fwd: Callable[[], torch.Tensor], mode: str, inputs, grad_out):
    """The timed callable for a mode (bwd: backward of one prepared forward, graph kept). An output of
    another shape than grad_out's (varlen's packed rows) gets its own random gradient, drawn once."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fwd()
        return run
    out = fwd()
    if out.shape != grad_out.shape:
        grad_out = torch.randn_like(out)
    if mode == "fwd+bwd":
        return lambda: fwd().backward(grad_out)

    def run():
        for t in inputs:
            t.grad = None
        out.backward(grad_out, retain_graph=True)
    return run


def _quartiles(xs: List[float]):
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def bench_case(device, dtype, B, H, L, E, causal, modes, provs, reps, warmup, min_time, peak_tflops, S=None,
               mask="none"):
    """All providers on one shape/dtype/causal/mask, interleaved; returns CSV rows. q (B, H, L, E)
    against k, v (B, H, S, E); S defaults to L (S != L: e.g. a decoding step, L = 1)."""
    torch.manual_seed(0)
    S = L if S is None else S
    extra = mask_args(mask, B, L, S, device)
    frac = visible_fraction(extra, B, L, S)
    q = torch.randn(B, H, L, E, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, H, S, E, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    grad_out = torch.randn(B, H, L, E, device=device, dtype=dtype)
    rows = []
    for mode in modes:
        runs: Dict[str, Callable[[], None]] = {}
        for p in provs:
            fwd = p.make(q, k, v, causal, extra)
            if fwd is None:
                continue
            try:
                run = _step(fwd, mode, (q, k, v), grad_out)
                for _ in range(warmup):
                    run()
                _sync(device)
            except RuntimeError as e:  # e.g. an SDPA backend without a backward for this dtype
                print(f"  skip {p.name} {mode}: {str(e).splitlines()[0][:100]}", file=sys.stderr)
                continue
            runs[p.name] = run
        # Calls per sample so one sample lasts >= min_time (short calls are timer noise).
        inner = {}
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            _sync(device)
            inner[name] = max(1, math.ceil(min_time / max(time.perf_counter() - t0, 1e-7)))
        samples: Dict[str, List[float]] = {name: [] for name in runs}
        for _ in range(reps):
            order = list(runs)
            random.shuffle(order)
            for name in order:
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(inner[name]):
                    runs[name]()
                _sync(device)
                samples[name].append((time.perf_counter() - t0) / inner[name])
        medians = {n: _quartiles(s)[1] for n, s in samples.items()}
        sdpa_best = min((medians[p.name] for p in provs if p.is_sdpa and p.name in medians), default=float("nan"))
        fl = flops(B, H, L, S, E, causal, mode) * frac
        for name, s in samples.items():
            q1, med, q3 = _quartiles(s)
            gflops = fl / med / 1e9
            peak_mem = peak_memory_bytes(runs[name], device)
            pct = 100.0 * gflops / 1e3 / peak_tflops if peak_tflops else float("nan")
            rows.append(dict(device=device, provider=name, dtype=str(dtype).replace("torch.", ""), B=B, H=H, L=L,
                             S=S, E=E, causal=int(causal), mask=mask, mode=mode, median_ms=med * 1e3, q1_ms=q1 * 1e3,
                             q3_ms=q3 * 1e3, iqr_ms=(q3 - q1) * 1e3, gflops=gflops, pct_peak=pct,
                             peak_mem_mb=peak_mem / 2**20, x_sdpa=sdpa_best / med))
        for t in (q, k, v):
            t.grad = None
    return rows


def _shape(r) -> str:
    """"B, H, L, E", or "B, H, L, S, E" where S != L."""
    dims = (r["B"], r["H"], r["L"], r["E"]) if r["S"] == r["L"] else (r["B"], r["H"], r["L"], r["S"], r["E"])
    return ", ".join(str(d) for d in dims)


def _kind(r) -> str:
    """Which keys the case's queries see: full, causal, and the --masks case if any."""
    kind = "causal" if int(r["causal"]) else "full"
    return kind if r.get("mask", "none") == "none" else f"{kind}+{r['mask']}"


def print_table(rows, device: str) -> None:
    rate = "TFLOP/s" if device == "cuda" else "GFLOP/s"
    head = (f"{'B,H,L[,S],E':<18}{'dtype':<10}{'keys':<18}{'mode':<8}{'provider':<26}{'median ms':>10}"
            f"{'IQR ms':>9}{rate:>9}{'%peak' if device == 'cuda' else '':>7}{'peak MB':>9}{'x sdpa':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        val = r["gflops"] / 1e3 if device == "cuda" else r["gflops"]
        pct = f"{r['pct_peak']:.0f}" if device == "cuda" and not math.isnan(r["pct_peak"]) else ""
        print(f"{_shape(r):<18}{r['dtype']:<10}{_kind(r):<18}{r['mode']:<8}"
              f"{r['provider']:<26}{r['median_ms']:>10.2f}{r['iqr_ms']:>9.2f}{val:>9.1f}{pct:>7}"
              f"{r['peak_mem_mb']:>9.1f}{r['x_sdpa']:>8.2f}")


def markdown(rows) -> str:
    """One line per (shape, dtype, keys seen, mode): each provider's median rate (IQR as % of the
    median time), and the fused_attn providers' speed-up over the fastest torch SDPA backend."""
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    unit = "TFLOP/s" if rows and rows[0]["device"] == "cuda" else "GFLOP/s"
    lines = ["| B, H, L[, S], E | dtype | keys | mode | " + " | ".join(f"{p} {unit} (IQR)" for p in provs)
             + " | " + " | ".join(f"{p} x sdpa" for p in provs if p.startswith("fused_attn")) + " |"]
    lines.append("|" + "---|" * (4 + len(provs) + sum(p.startswith("fused_attn") for p in provs)))
    cases = list(dict.fromkeys((_shape(r), r["dtype"], _kind(r), r["mode"]) for r in rows))
    for case in cases:
        by = {r["provider"]: r for r in rows if (_shape(r), r["dtype"], _kind(r), r["mode"]) == case}
        rate = [f"{by[p]['gflops'] / (1e3 if unit == 'TFLOP/s' else 1):.1f} ({100 * by[p]['iqr_ms'] / by[p]['median_ms']:.0f}%)"
                if p in by else "-" for p in provs]
        ratio = [f"**{by[p]['x_sdpa']:.2f}**" if p in by else "-" for p in provs if p.startswith("fused_attn")]
        shape, dt, c, mode = case
        lines.append(f"| {shape} | {dt} | {c} | {mode} | " + " | ".join(rate + ratio) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["dtype"], r["mode"]) for r in rows})
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    n_cases = max(len({(r["B"], r["H"], r["L"], r["E"], _kind(r)) for r in rows if (r["dtype"], r["mode"]) == pn})
                  for pn in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.2 * n_cases), 3.6 * len(panels)), squeeze=False)
    unit = "TFLOP/s" if rows and rows[0]["device"] == "cuda" else "GFLOP/s"
    for ax, (dtype, mode) in zip(axes[:, 0], panels):
        sel = [r for r in rows if r["dtype"] == dtype and r["mode"] == mode]
        cases = list(dict.fromkeys((r["B"], r["H"], r["L"], r["E"], _kind(r)) for r in sel))
        width = 0.8 / len(provs)
        for i, p in enumerate(provs):
            by_case = {(r["B"], r["H"], r["L"], r["E"], _kind(r)): r for r in sel if r["provider"] == p}
            xs = [c + (i - (len(provs) - 1) / 2) * width for c in range(len(cases))]
            vals = [by_case[c]["gflops"] / (1e3 if unit == "TFLOP/s" else 1) if c in by_case else 0 for c in cases]
            ax.bar(xs, vals, width, label=p)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"B{b} H{h}\nL{l} E{e}\n{c}" for b, h, l, e, c in cases], fontsize=8)
        ax.set_ylabel(unit)
        ax.set_title(f"{dtype}, {mode}")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(ncol=min(len(provs), 4), fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_description(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    from fused_attn.ops import cpu
    return (f"{model}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}; fused_attn {cpu.ISA_ENV}={cpu.ISA}: {cpu.path()}")


def run_pinned(argv: List[str], isa: str) -> int:
    """Run this benchmark again in a child process with fused_attn and torch pinned to ``isa``."""
    env = dict(os.environ, FUSED_ATTN_CPU_ISA=isa, **CPU_ISA_PINS[isa])
    pins = " ".join(f"{k}={v}" for k, v in sorted(CPU_ISA_PINS[isa].items()))
    print(f"# --cpu-isa {isa}: child process with FUSED_ATTN_CPU_ISA={isa} {pins}", flush=True)
    return subprocess.run([sys.executable, os.path.abspath(__file__)] + argv, env=env).returncode


def _peak_for(device: str, dtype: torch.dtype) -> Optional[float]:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for frag, (tc, fp32) in GPU_PEAK_TFLOPS.items():
        if frag in name:
            return fp32 if dtype == torch.float32 else tc
    return None


def main(argv=None) -> List[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--shapes", nargs="+", default=["1,8,1024,64", "1,8,1024,128", "1,8,2048,64", "2,8,2048,128"],
                    help="B,H,L,E (L = S) or B,H,L,S,E")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--causal", nargs="+", choices=("none", "causal"), default=["none", "causal"])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=["fwd", "fwd+bwd"])
    ap.add_argument("--masks", nargs="+", choices=MASKS, default=["none"],
                    help="key-padding mask (pad25) or sliding window (window256), see the module docstring")
    ap.add_argument("--providers", nargs="+", default=None, help="only these provider names")
    ap.add_argument("--reps", type=int, default=7, help="timed samples per provider (interleaved)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--min-time", type=float, default=0.02, help="seconds per sample at least")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    ap.add_argument("--name", default=None, help="file stem of the CSV and PNG (default: timestamp)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--from-csv", default=None, help="re-render the table, markdown and plot of an earlier run")
    ap.add_argument("--cpu-isa", choices=CPU_ISAS, default=None,
                    help="CPU path of fused_attn and torch, set in a child process: avx2 pins both to AVX2 "
                         "(fused_attn: its portable path at AVX2), portable to baseline x86-64")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    if args.cpu_isa is not None and os.environ.get("FUSED_ATTN_CPU_ISA") != args.cpu_isa:
        if args.device != "cpu" or args.from_csv:
            ap.error("--cpu-isa applies to --device cpu runs only")
        args.name = args.name or f"bench_cpu_{args.cpu_isa}_{datetime.datetime.now():%Y%m%d_%H%M%S}"
        rc = run_pinned(argv + ["--name", args.name], args.cpu_isa)
        if rc != 0:
            sys.exit(rc)
        with open(os.path.join(args.out, args.name + ".csv")) as f:
            return list(csv.DictReader(f))
    if args.from_csv:
        with open(args.from_csv) as f:
            rows = [{k: (v if k in ("device", "provider", "dtype", "mode") else float(v)) for k, v in r.items()}
                    for r in csv.DictReader(f)]
        for r in rows:
            for k in ("B", "H", "L", "S", "E", "causal"):
                r[k] = int(r[k])
            r.setdefault("mask", "none")
        print_table(rows, rows[0]["device"])
        stem = os.path.splitext(args.from_csv)[0]
        with open(stem + ".md", "w") as f:
            f.write(markdown(rows))
        if not args.no_plot:
            plot(rows, stem + ".png", f"{os.path.basename(stem)}; higher is better")
        print(f"# wrote {stem}.md, {stem}.png")
        return rows
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    provs = providers(args.device)
    if args.providers:
        provs = [p for p in provs if p.name in args.providers]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {machine_description(args.device)}; torch {torch.__version__}; {stamp}")
    print(f"# providers: {', '.join(p.name for p in provs)}")
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for shape in args.shapes:
            dims = [int(x) for x in shape.split(",")]
            if len(dims) not in (4, 5):
                ap.error(f"--shapes entries are B,H,L,E or B,H,L,S,E; got {shape!r}")
            B, H, L, E = dims[0], dims[1], dims[2], dims[-1]
            S = dims[3] if len(dims) == 5 else L
            for c in args.causal:
                for mask in args.masks:
                    rows += bench_case(args.device, dtype, B, H, L, E, c == "causal", args.modes, provs, args.reps,
                                       args.warmup, args.min_time, _peak_for(args.device, dtype), S=S, mask=mask)
    print_table(rows, args.device)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name or f"bench_{args.device}_{datetime.datetime.now():%Y%m%d_%H%M%S}")
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    with open(stem + ".md", "w") as f:
        f.write(markdown(rows))
    print(f"# wrote {stem}.csv, {stem}.md")
    if not args.no_plot:
        plot(rows, stem + ".png", f"{machine_description(args.device)}; {stamp}; higher is better")
        print(f"# wrote {stem}.png")
    return rows


if __name__ == "__main__":
    main()
