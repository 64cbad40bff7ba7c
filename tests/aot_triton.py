"""Compile every Triton kernel config ahead of time for sm_80 and sm_90, no GPU needed.

For each kernel, each arch, each representative (head dim, dtype, causal) and every
config the prune rule keeps for it: registers, spill bytes and shared memory from
the cubin (cuobjdump --dump-resource-usage, shipped inside the triton package).
Prints the table; exits non-zero on a spill, shared memory over the arch limit, a
missing wgmma in the sm_90 forward, or a TF32 instruction in an IEEE fp32 kernel.

Run with TRITON_INTERPRET unset:  python tests/aot_triton.py [--jobs N] [--quick]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from fused_attn.ops import triton_attention as T  # noqa: E402

ARCHS = (80, 90)
# (head_dim, dtype, causal): the shapes that stress registers (256), the common ones, fp32 IEEE
REPRESENTATIVE = [(64, torch.float16, True), (128, torch.bfloat16, False), (256, torch.bfloat16, True),
                  (96, torch.float32, False), (256, torch.float32, True)]
QUICK = [(128, torch.bfloat16, False), (256, torch.float16, True)]
KERNELS = {"fwd": T._fwd_kernel, "dkdv": T._bwd_dkdv_kernel, "dq": T._bwd_dq_kernel}
TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
POINTERS = {"Q", "K", "V", "O", "LSE", "DO", "DLSE", "DELTA", "DQ", "DK", "DV"}
FP32_POINTERS = {"LSE", "DELTA", "DLSE"}
FLOAT_SCALARS = {"qk_scale", "sm_scale"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _signature(fn, dtype, constexprs, descriptors=None):
    """Triton signature and divisibility hints; ``descriptors`` maps arg names to tile shapes."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif descriptors and name in descriptors:
            sig[name] = f"tensordesc<{TYPE[dtype]}[{','.join(str(n) for n in descriptors[name])}]>"
        elif name in POINTERS:
            sig[name] = "*fp32" if name in FP32_POINTERS else "*" + TYPE[dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_one(job):
    kind, arch, head_dim, dtype, causal, cfg_index, tma = job
    fn = KERNELS[kind]
    elem = torch.tensor([], dtype=dtype).element_size()
    cfg = T.CONFIGS[kind][elem][cfg_index]
    precision = "ieee"
    bd = T.block_d(head_dim)
    constexprs = dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim, BLOCK_D=bd, BLOCK_DV=bd, CAUSAL=causal,
                      DOT_FP32=False, PRECISION=precision, ARCH=arch, DTYPE=TYPE[dtype], ALIGNED=True, **cfg.kwargs)
    descriptors = None
    if kind == "fwd":
        constexprs["TMA"] = tma
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        descriptors = {"Q": [1, 1, bm, bd], "K": [1, 1, bn, bd], "V": [1, 1, bn, bd], "O": [1, 1, bm, bd]} if tma else None
    sig, attrs = _signature(fn, dtype, constexprs, descriptors)
    src = triton.compiler.ASTSource(fn, sig, constexprs, attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    res = {key: int(val) for key, val in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    ptx = k.asm["ptx"]
    return dict(kind=kind, arch=arch, head_dim=head_dim, dtype=TYPE[dtype], causal=causal,
                config=f"M{cfg.kwargs['BLOCK_M']}/N{cfg.kwargs['BLOCK_N']}/w{cfg.num_warps}/s{cfg.num_stages}",
                regs=res.get("REG", -1), spill=res.get("LOCAL", 0) + res.get("STACK", 0),
                smem=k.metadata.shared, wgmma="wgmma.mma_async" in ptx, tf32=".tf32" in ptx, tma=tma,
                tma_ptx="cp.async.bulk.tensor" in ptx)


def jobs(reps):
    out = []
    for kind in KERNELS:
        for arch in ARCHS:
            for head_dim, dtype, causal in reps:
                elem = torch.tensor([], dtype=dtype).element_size()
                configs = T.CONFIGS[kind][elem]
                kept = T.prune_configs(kind, head_dim, head_dim, elem, arch)
                # the sm_90 forward also runs on tensor descriptors (TMA) when inputs are aligned
                for tma in (False, True) if kind == "fwd" and arch >= 90 and elem == 2 else (False,):
                    out += [(kind, arch, head_dim, dtype, causal, configs.index(c), tma) for c in kept]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="two representative shapes only")
    args = ap.parse_args(argv)
    todo = jobs(QUICK if args.quick else REPRESENTATIVE)
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(compile_one, todo))
    problems = []
    print(f"{'kernel':8} {'arch':5} {'D':>4} {'dtype':5} {'causal':6} {'config':16} {'regs':>4} {'spill':>5} "
          f"{'smem':>7} wgmma")
    for r in rows:
        kernel = r["kind"] + ("+tma" if r["tma"] else "")
        print(f"{kernel:8} sm_{r['arch']:<2} {r['head_dim']:>4} {r['dtype']:5} {str(r['causal']):6} "
              f"{r['config']:16} {r['regs']:>4} {r['spill']:>5} {r['smem']:>7} {r['wgmma']}")
        where = f"{kernel} sm_{r['arch']} D={r['head_dim']} {r['dtype']} {r['config']}"
        if r["tma"] and not r["tma_ptx"]:
            problems.append(f"{where}: the descriptor path does not use TMA (cp.async.bulk.tensor)")
        if r["spill"]:
            problems.append(f"{where}: {r['spill']} bytes of local memory (spills)")
        if r["smem"] > T.SMEM_LIMIT[r["arch"]]:
            problems.append(f"{where}: {r['smem']} bytes of shared memory > {T.SMEM_LIMIT[r['arch']]}")
        if r["regs"] > 255:
            problems.append(f"{where}: {r['regs']} registers")
        if r["kind"] == "fwd" and r["arch"] == 90 and r["dtype"] != "fp32" and not r["wgmma"]:
            problems.append(f"{where}: the sm_90 forward does not use wgmma")
        if r["dtype"] == "fp32" and r["tf32"]:
            problems.append(f"{where}: IEEE fp32 kernel contains TF32 instructions")
    print(f"{len(rows)} compiles, {len(problems)} problems")
    for p in problems:
        print("PROBLEM:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
