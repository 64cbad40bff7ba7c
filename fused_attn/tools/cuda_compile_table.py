"""Compile the CUDA kernels with nvcc for real GPUs and check their resources.

Each translation unit in ``TRANSLATION_UNITS`` (the primitive probes, and every
forward and backward instantiation: flash_fwd / flash_bwd per head-dim bucket and
dtype, flash_bwd_preprocess) is compiled to a cubin for every arch in ``ARCHS`` with
``-Xptxas -v`` (nothing is run), 2 nvcc runs at a time (about 3 minutes on 2 cores):
sm_80 and sm_90a as setup.py builds them, and sm_120 the way the driver JIT-compiles
setup.py's embedded compute_80 PTX for a Blackwell GPU (``PTX_ARCH``: any arch setup.py
ships no machine code for). From ptxas's report we take,
per kernel: registers, static shared memory, stack frame and spill bytes. Kernels
that declare their launch shape (see ``manifest()``: threads per block, minimum
blocks per SM from ``__launch_bounds__``, dynamic shared memory from the traits
header) also get their dynamic shared memory and resident blocks per SM checked.

Fails (exit status 1, or ``problems`` non-empty) on any spill, a stack frame,
registers over 255 or over the launch-bounds budget, shared memory over the
arch's per-block limit (sm_80 kernels also against sm_86/89's 99 KB), or a
manifest entry (a kernel that should exist) with no compiled kernel for some arch.
Fewer resident blocks per SM than ``__launch_bounds__`` asks for fails on the archs
the traits are tuned for (``TUNED_ARCHS``) and is a note elsewhere (sm_120's 100 KB
of shared memory per SM holds one block of the larger forward kernels, as sm_86/89's).

The torch binding (``BINDING_UNITS``) is compiled too, once (sm_80), against the
installed torch's headers: it must compile; it holds no kernels.

    python -m fused_attn.tools.cuda_compile_table [--archs 80,90a,100,120] [--jobs 2]

Environment: ``NVCC`` (default: ``nvcc`` on PATH), ``MAX_JOBS`` (parallel nvcc runs).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
# Every .cu that holds kernels: the primitive probes and the kernel instantiations.
TRANSLATION_UNITS = ("csrc/emu/test_kernels.cu", "csrc/cuda/instantiations/*.cu")
BINDING_UNITS = ("csrc/cuda/binding/*.cu",)
ARCHS = ("80", "90a", "120")
# Archs setup.py builds machine code for by default; others are compiled from the compute_80 PTX it embeds.
SASS_ARCHS = ("80", "86", "89", "90a")
PTX_ARCH = "80"
TUNED_ARCHS = ("80", "90a")  # the traits' __launch_bounds__ minimum blocks/SM must hold here
NVCC_FLAGS = ("-std=c++17", "-O3", "--use_fast_math", "-Xptxas", "-v", "-cubin")

MAX_REGS_PER_THREAD = 255
REGS_PER_SM = 65536
# Shared memory per block (opt-in maximum) and per SM, in bytes.
SMEM_PER_BLOCK = {"80": 163 * 1024, "86": 99 * 1024, "89": 99 * 1024, "90a": 227 * 1024, "100": 227 * 1024,
                  "120": 99 * 1024}
SMEM_PER_SM = {"80": 164 * 1024, "86": 100 * 1024, "89": 100 * 1024, "90a": 228 * 1024, "100": 228 * 1024,
               "120": 100 * 1024}
SMEM_RESERVED_PER_BLOCK = 1024  # the driver's per-block reservation on sm_80+


@dataclass
class KernelRow:
    arch: str
    kernel: str
    registers: int = 0
    static_smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    threads: Optional[int] = None
    min_blocks: Optional[int] = None
    dynamic_smem: Optional[int] = None
    blocks_per_sm: Optional[int] = None
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # shown in the table, not failures


def nvcc_path() -> Optional[str]:
    return os.environ.get("NVCC") or shutil.which("nvcc")


def translation_units(patterns=TRANSLATION_UNITS) -> List[Path]:
    out: List[Path] = []
    for pattern in patterns:
        out += sorted(Path(p) for p in glob.glob(str(ROOT / pattern)))
    return out


def compile_binding(tu: Path, nvcc: str) -> str:
    """Compiles a torch binding source to an object file; returns an error message or ''."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    incs = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
    with tempfile.TemporaryDirectory() as d:
        cmd = [nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-c", "-gencode=arch=compute_80,code=sm_80",
               *incs, str(tu), "-o", str(Path(d) / "b.o")]
        res = subprocess.run(cmd, capture_output=True, text=True)
    return "" if res.returncode == 0 else f"nvcc failed for {tu.relative_to(ROOT)}:\n{res.stderr[-4000:]}"


def _demangle(names: List[str]) -> Dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    lines = res.stdout.splitlines()
    return dict(zip(names, lines)) if len(lines) == len(names) else {n: n for n in names}


def parse_ptxas(text: str, arch: str) -> List[KernelRow]:
    """Rows for the entry functions in ptxas ``-v`` output."""
    rows: Dict[str, KernelRow] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for 'sm_(\w+)'", line)
        if m:
            current = m.group(1)
            rows[current] = KernelRow(arch, current)
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = m.group(1) if m.group(1) in rows else None
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            r = rows[current]
            r.stack, r.spill_stores, r.spill_loads = (int(x) for x in m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            rows[current].registers = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            rows[current].static_smem = int(s.group(1)) if s else 0
    names = _demangle(list(rows))
    for mangled, r in rows.items():
        r.kernel = names[mangled]
    return list(rows.values())


def cuda_arch_macro(arch: str) -> int:
    """__CUDA_ARCH__ of the code nvcc compiles for ``arch`` (see :func:`gencode`): 800 for
    sm_80 and for an arch JIT-compiled from the compute_80 PTX, 900 for sm_90a."""
    virtual = arch if arch in SASS_ARCHS else PTX_ARCH
    return int(re.sub(r"\D", "", virtual)) * 10


def manifest(arch: str = "80") -> Dict[str, Tuple[int, int, int]]:
    """Launch shape of the kernels that declare one, as compiled for ``arch``: demangled-name
    key -> (threads, min blocks per SM, dynamic smem bytes). Read from csrc/cuda/kernel_manifest.h
    through a tiny host program (the traits are plain C++; FA_MANIFEST_ARCH stands in for
    __CUDA_ARCH__, on which the minimum blocks per SM depend)."""
    header = CSRC / "cuda" / "kernel_manifest.h"
    if not header.is_file():
        return {}
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    with tempfile.TemporaryDirectory() as d:
        src, exe = Path(d) / "m.cpp", Path(d) / "m"
        src.write_text('#include "cuda/kernel_manifest.h"\nint main() { fa::print_kernel_manifest(); }\n')
        subprocess.run([cxx, "-std=c++17", "-DFUSED_ATTN_EMULATE", f"-DFA_MANIFEST_ARCH={cuda_arch_macro(arch)}",
                        f"-I{CSRC}", str(src), "-o", str(exe)],
                       check=True, capture_output=True, text=True)
        out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    table = {}
    for line in out.splitlines():
        key, threads, min_blocks, smem = line.rsplit(" ", 3)
        table[key] = (int(threads), int(min_blocks), int(smem))
    return table


def gencode(arch: str) -> str:
    """sm_<arch> machine code from its own PTX, or, for an arch setup.py ships no machine code
    for, from the compute_80 PTX (what the driver's JIT does on that GPU)."""
    virtual = arch if arch in SASS_ARCHS else PTX_ARCH
    return f"-gencode=arch=compute_{virtual},code=sm_{arch}"


def compile_one(tu: Path, arch: str, nvcc: str) -> Tuple[List[KernelRow], str]:
    with tempfile.TemporaryDirectory() as d:
        cmd = [nvcc, *NVCC_FLAGS, gencode(arch), f"-I{CSRC}", str(tu),
               "-o", str(Path(d) / "k.cubin")]
        res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return [], f"nvcc failed for {tu.relative_to(ROOT)} sm_{arch}:\n{res.stderr[-4000:]}"
    return parse_ptxas(res.stdout + res.stderr, arch), ""


def check(row: KernelRow, shapes: Dict[str, Tuple[int, int, int]]) -> None:
    for key, (threads, min_blocks, smem) in shapes.items():
        if key in row.kernel:
            row.threads, row.min_blocks, row.dynamic_smem = threads, min_blocks, smem
    if row.spill_stores or row.spill_loads:
        row.problems.append(f"spills {row.spill_stores} B stores / {row.spill_loads} B loads")
    if row.stack:
        row.problems.append(f"{row.stack} B stack frame")
    if row.registers > MAX_REGS_PER_THREAD:
        row.problems.append(f"{row.registers} registers > {MAX_REGS_PER_THREAD}")
    smem = row.static_smem + (row.dynamic_smem or 0)
    limit = SMEM_PER_BLOCK[row.arch]
    if smem > limit:
        row.problems.append(f"{smem} B shared memory > {limit} B per block on sm_{row.arch}")
    if row.arch == "80" and smem > SMEM_PER_BLOCK["86"]:  # the same traits run on sm_86 / sm_89
        row.problems.append(f"{smem} B shared memory > {SMEM_PER_BLOCK['86']} B per block on sm_86/89")
    if row.threads:
        by_regs = REGS_PER_SM // max(1, row.registers * row.threads)
        by_smem = SMEM_PER_SM[row.arch] // (smem + SMEM_RESERVED_PER_BLOCK) if smem else 32
        row.blocks_per_sm = min(by_regs, by_smem)
        if row.min_blocks and row.blocks_per_sm < row.min_blocks:
            # The traits are tuned for sm_80 and sm_90a; on a 100 KB-per-SM arch (sm_120, like
            # sm_86/89) fewer resident blocks cost occupancy, not correctness: noted, not failed.
            short = f"{row.blocks_per_sm} blocks/SM < __launch_bounds__ minimum {row.min_blocks}"
            (row.problems if row.arch in TUNED_ARCHS else row.notes).append(short)


def compile_table(archs=ARCHS, jobs: Optional[int] = None, tus: Optional[List[Path]] = None):
    """Compile everything; returns (rows, problems)."""
    unknown = [a for a in archs if a not in SMEM_PER_BLOCK]
    if unknown:
        raise ValueError(f"unknown arch {', '.join(unknown)}; choose from {', '.join(SMEM_PER_BLOCK)}")
    nvcc = nvcc_path()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set NVCC or put it on PATH)")
    tus = tus if tus is not None else translation_units()
    jobs = jobs or int(os.environ.get("MAX_JOBS", "2"))
    by_macro = {}  # one manifest per __CUDA_ARCH__ (sm_80 and sm_120, JIT from compute_80 PTX, share 800)
    for arch in archs:
        by_macro.setdefault(cuda_arch_macro(arch), manifest(arch))
    shapes = {arch: by_macro[cuda_arch_macro(arch)] for arch in archs}
    rows: List[KernelRow] = []
    problems: List[str] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        bindings = [pool.submit(compile_binding, tu, nvcc) for tu in translation_units(BINDING_UNITS)]
        futs = [pool.submit(compile_one, tu, arch, nvcc) for tu in tus for arch in archs]
        for f in futs:
            got, err = f.result()
            if err:
                problems.append(err)
            rows += got
        problems += [e for e in (f.result() for f in bindings) if e]
    for r in rows:
        check(r, shapes[r.arch])
        problems += [f"sm_{r.arch} {r.kernel}: {p}" for p in r.problems]
    if tus == translation_units():  # the full set: every declared kernel must have been compiled
        for arch in archs:
            for key in shapes[arch]:
                if not any(r.arch == arch and key in r.kernel for r in rows):
                    problems.append(f"sm_{arch}: no compiled kernel for manifest entry {key!r}")
    rows.sort(key=lambda r: (re.sub(r"\d+", lambda m: m.group().zfill(8), r.kernel), r.arch))  # 32 before 128
    return rows, problems


def format_table(rows: List[KernelRow]) -> str:
    head = ("arch", "regs", "threads", "smem static", "smem dynamic", "stack", "spill st/ld", "blocks/SM", "kernel")
    lines = [head]
    for r in rows:
        lines.append((f"sm_{r.arch}", str(r.registers), str(r.threads or "-"), str(r.static_smem),
                      "-" if r.dynamic_smem is None else str(r.dynamic_smem), str(r.stack),
                      f"{r.spill_stores}/{r.spill_loads}", str(r.blocks_per_sm or "-"),
                      r.kernel + ("  <-- " + "; ".join(r.problems) if r.problems else "")
                      + ("  (note: " + "; ".join(r.notes) + ")" if r.notes else "")))
    widths = [max(len(l[i]) for l in lines) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(l[:-1], widths)) + "  " + l[-1] for l in lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated, of {', '.join(SMEM_PER_BLOCK)}")
    ap.add_argument("--jobs", type=int, default=None, help="parallel nvcc runs (default: MAX_JOBS or 2)")
    args = ap.parse_args(argv)
    rows, problems = compile_table(tuple(a.strip() for a in args.archs.split(",")), args.jobs)
    print(format_table(rows))
    if problems:
        print("\nFAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"\n{len(rows)} kernels: no spills, limits respected; torch binding compiles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
