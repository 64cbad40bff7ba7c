"""Compile the Triton kernels ahead of time exactly as the launchers launch them, no GPU needed.

``fake_gpu(arch)`` runs the real launch path on CPU tensors as if on a GPU of compute capability
``arch``: Triton's active driver becomes a FakeDriver for that target, fused_attn's device_arch
answers ``arch``, and Triton's jit_cache_hook records each launch instead of compiling it. A
record holds Triton's own specialization of the real arguments (pointer alignment, ints equal to 1,
tensor descriptors and their tile shapes, constexprs, num_warps, num_stages: the JSON Triton
uses to preload kernels) and the grid the launch would have used. ``compile_record`` compiles a
record with that same preload, as the GPU would. The autotuner runs for real: its prune hook,
key and config pre-hooks see the arguments a GPU launch passes; the FakeDriver's benchmarker
only records the call (each config benchmarked is a record) and times nothing.

The table (``python -m fused_attn.tools.triton_compile_table``) comes from public forward + backward calls on
representative shapes: every config the prune keeps for each kernel, each arch, the sm_90 TMA
path (aligned fp16/bf16) and its pointer path (misaligned inputs). Per compile: registers,
spill bytes and shared memory from the cubin (cuobjdump --dump-resource-usage, shipped inside
the triton package). Exits non-zero on a spill, shared memory over the arch limit, a missing
wgmma in the sm_90 fp16/bf16 forward, a descriptor forward without TMA instructions, or a TF32
instruction in an IEEE fp32 kernel.

Run with TRITON_INTERPRET unset:  python -m fused_attn.tools.triton_compile_table [--jobs N] [--quick]
(the CUDA kernels' counterpart: fused_attn/tools/cuda_compile_table.py)
"""
from __future__ import annotations

import argparse
import contextlib
import json
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
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import fused_attn  # noqa: E402
from fused_attn.ops import triton_attention as T  # noqa: E402

TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
DTYPE = {name: dtype for dtype, name in TYPE.items()}
KIND = {kernel.fn.__name__: kind for kind, kernel in T.KERNELS.items()}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


# ---------------------------------------------------------------------------------------------
# A GPU that is not there
# ---------------------------------------------------------------------------------------------

class Capture:
    """What one fake_gpu block recorded: launches (in order) and the benchmarker's calls."""

    def __init__(self, arch: int):
        self.arch = arch
        self.records = []
        self.bench_calls = 0
        self.benchmarking = False


_current: list = []  # the Capture of the innermost fake_gpu block


class FakeDriver:
    """Triton's driver interface for sm_<arch>: a target to specialize and compile for, a device
    name that keys Triton's per-device caches, and a benchmarker that times nothing."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_device(self):
        return f"fake-sm_{self.arch}"

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_benchmarker(self):
        return _benchmark


def _benchmark(kernel_call, quantiles=None, **kwargs):
    """The autotuner's timing function: runs the call once (a record, made by the hook) and reports
    each later config faster, so the autotuner's pick is the last config it benchmarked."""
    cap = _current[-1]
    cap.bench_calls += 1
    cap.benchmarking = True
    try:
        kernel_call()
    finally:
        cap.benchmarking = False
    t = 1000.0 - cap.bench_calls
    return [t, t, t]


def _record(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
    """Triton's jit_cache_hook: record the launch's specialization; True skips compile and launch."""
    cap = _current[-1]
    spec = json.loads(compile["specialization_data"])
    names = T.KERNELS[KIND[fn.jit_function.fn.__name__]].arg_names
    cap.records.append(dict(
        kind=KIND[fn.jit_function.fn.__name__], arch=cap.arch, phase="bench" if cap.benchmarking else "launch",
        spec=compile["specialization_data"], signature=spec["signature"],
        constexprs={names[k[0]]: v for k, v in zip(spec["constant_keys"], spec["constant_vals"])},
        attrs={names[k[0]]: v for k, v in zip(spec["attrs_keys"], spec["attrs_vals"]) if v},
        num_warps=spec["options"]["num_warps"], num_stages=spec["options"]["num_stages"]))
    return True


def _recording_run(kernel):
    """The kernel's run, which also records the launch grid (evaluated as Triton would, on the
    bound arguments) and the host types of the arguments (TensorDescriptor or Tensor)."""
    def run(*args, grid, warmup, **kwargs):
        cap = _current[-1]
        n = len(cap.records)
        JITFunction.run(kernel, *args, grid=grid, warmup=warmup, **kwargs)
        assert len(cap.records) == n + 1, "the launch was not recorded"
        bound = {**dict(zip(kernel.arg_names, args)), **kwargs}
        cap.records[-1]["grid"] = list(grid(bound) if callable(grid) else grid)
        cap.records[-1]["host_types"] = {name: type(a).__name__ for name, a in zip(kernel.arg_names, args)
                                         if hasattr(a, "data_ptr") or hasattr(a, "block_shape")}
    return run


@contextlib.contextmanager
def fake_gpu(arch: int):
    """Inside the block fused_attn's Triton launches on CPU tensors go through the real launch
    path as on sm_<arch> and end as records (yielded Capture) instead of launches."""
    cap = Capture(arch)
    previous_driver = driver._active
    previous_hook = knobs.runtime.jit_cache_hook
    device_arch, hardware_refusal = T.device_arch, T.hardware_refusal
    _current.append(cap)
    driver.set_active(FakeDriver(arch))
    knobs.runtime.jit_cache_hook = _record
    T.device_arch = lambda device: arch
    # CPU tensors stand in for GPU tensors: the launch path reads only data_ptr, strides, dtype
    T.hardware_refusal = lambda p, explicit: None if p.device.type == "cpu" else hardware_refusal(p, explicit)
    for kernel in T.KERNELS.values():
        kernel.run = _recording_run(kernel)
    try:
        yield cap
    finally:
        for kernel in T.KERNELS.values():
            del kernel.run
        T.device_arch, T.hardware_refusal = device_arch, hardware_refusal
        knobs.runtime.jit_cache_hook = previous_hook
        driver.set_active(previous_driver)
        _current.pop()


# ---------------------------------------------------------------------------------------------
# Inputs whose alignment is chosen, and the public calls
# ---------------------------------------------------------------------------------------------

LAYOUTS = ("aligned", "offset", "stride")  # 16-byte aligned; base 1 element off; rows not 16-byte multiples


def make_tensor(shape, dtype, layout):
    """Random (B, H, rows, E) tensor: "aligned" contiguous at a 16-byte aligned base; "offset" one
    element past one; "stride" rows of E + 1 elements (a slice of a wider tensor)."""
    B, H, n, E = shape
    if layout == "aligned":
        t = torch.randn(shape).to(dtype)
    elif layout == "offset":
        t = torch.randn(B * H * n * E + 1).to(dtype)[1:].view(shape)
    else:
        t = torch.randn(B, H, n, E + 1).to(dtype)[..., :E]
    assert (t.data_ptr() % 16 == 0) == (layout != "offset")
    return t


def _extras(features: dict, n_rows: int, H: int) -> dict:
    """The public arguments of ``features`` (FEATURES' keys): ALiBi slopes (n_rows, H) for "alibi"."""
    extras = {name: value for name, value in features.items() if name != "alibi"}
    if features.get("alibi"):
        extras["alibi_slopes"] = torch.rand(n_rows, H)
    return extras


def public_call(arch, B, H, HK, L, S, E, dtype, layout, causal=True, backward=True, window=(-1, -1),
                key_padding=False, mask_kind=None, features=None, mask_grad=False):
    """Forward (and backward) through fused_attn.scaled_dot_product_attention on a fake sm_<arch>
    (``window``; ``key_padding``: a mask that pads the last keys of batch 0, i.e. key bounds; ``mask_kind``
    "bool" or "float": a random (B, 1, L, S) mask tensor of that kind, ~30% hidden, a float one requiring
    grad with ``mask_grad``; ``features``: softcap, alibi, dropout_p as FEATURES); returns the Capture."""
    q = make_tensor((B, H, L, E), dtype, layout).requires_grad_()
    k = make_tensor((B, HK, S, E), dtype, layout).requires_grad_()
    v = make_tensor((B, HK, S, E), dtype, layout).requires_grad_()
    mask = None
    if key_padding:
        mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
        mask[0, ..., S // 2:] = False
    elif mask_kind is not None:
        hidden = torch.rand(B, 1, L, S) < 0.3
        mask = ~hidden if mask_kind == "bool" else torch.randn(B, 1, L, S).masked_fill(hidden, float("-inf")).to(dtype)
        mask.requires_grad_(mask_grad)
    with fake_gpu(arch) as cap:
        out = fused_attn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=H != HK,
                                                      window=window, backend="triton", **_extras(features or {}, B, H))
        if backward:
            out.backward(make_tensor(out.shape, dtype, layout))
    return cap


def varlen_call(arch, n_seq, H, HK, L, S, E, dtype, causal=True, window=(-1, -1), features=None):
    """Forward and backward through fused_attn.varlen_attention on a fake sm_<arch>: ``n_seq`` packed
    sequences, the first of L queries and S keys, the others shorter by a ragged amount (the grid
    tiles the longest); inputs (total, H, E) contiguous, 16-byte aligned. Returns the Capture."""
    lengths = [(max(1, L - 37 * i), max(1, S - 21 * i)) for i in range(n_seq)]
    cu_q, cu_k = (torch.tensor([0] + torch.tensor(n).cumsum(0).tolist()) for n in zip(*lengths))
    q = torch.randn(int(cu_q[-1]), H, E).to(dtype).requires_grad_()
    k = torch.randn(int(cu_k[-1]), HK, E).to(dtype).requires_grad_()
    v = torch.randn(int(cu_k[-1]), HK, E).to(dtype).requires_grad_()
    with fake_gpu(arch) as cap:
        out = fused_attn.varlen_attention(q, k, v, cu_q, cu_k, L, S, causal=causal, window=window, backend="triton",
                                          **_extras(features or {}, n_seq, H))
        out.backward(torch.randn(out.shape).to(dtype))
    return cap


def kvcache_call(arch, B, H, HK, S, E, dtype, window=(-1, -1), features=None):
    """A forward through fused_attn.attention_with_kvcache on a fake sm_<arch> (SEQLENS: each batch's key
    count, the pointer path): 16 new rows and keys appended to caches of ragged lengths up to S. Returns
    the Capture."""
    q = torch.randn(B, H, 16, E).to(dtype)
    k_cache, v_cache = (torch.randn(B, HK, S, E).to(dtype) for _ in range(2))
    new = [torch.randn(B, HK, 16, E).to(dtype) for _ in range(2)]
    lengths = torch.tensor([max(0, S - 16 - 37 * b) for b in range(B)])
    extras = _extras(features or {}, B, H)
    extras.pop("dropout_p", None)  # (no dropout in decoding)
    with fake_gpu(arch) as cap, torch.no_grad():
        fused_attn.attention_with_kvcache(q, k_cache, v_cache, *new, cache_seqlens=lengths, window=window,
                                          backend="triton", **extras)
    return cap


def split_call(arch, H, HK, E, dtype, causal=True):
    """A decoding step's forward (one query row per head, batch 1, 2048 keys) on a fake sm_<arch>: fewer
    programs than the faked GPU's SMs (device_sms off CUDA), so split-KV (SPLIT) cuts the keys into chunks.
    Inputs 16-byte aligned (the TMA path where the arch has it). Returns the Capture."""
    q = make_tensor((1, H, 1, E), dtype, "aligned")
    k, v = (make_tensor((1, HK, 2048, E), dtype, "aligned") for _ in range(2))
    with fake_gpu(arch) as cap, torch.no_grad():
        fused_attn.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=H != HK, backend="triton")
    return cap


# ---------------------------------------------------------------------------------------------
# Compiling a record
# ---------------------------------------------------------------------------------------------

# the table's features column (k: stored key counts, attention_with_kvcache; p: split-KV)
FEATURE_LETTERS = {"SOFTCAP": "s", "ALIBI": "a", "DROPOUT": "d", "MASK_GRAD": "g", "SEQLENS": "k", "SPLIT": "p"}


def compile_record(record: dict) -> dict:
    """Compile one record for its arch exactly as the launch would (Triton's preload of the
    specialization data); resources and instruction checks from the cubin and PTX."""
    previous = driver._active
    driver.set_active(FakeDriver(record["arch"]))
    try:
        k = T.KERNELS[record["kind"]].preload(record["spec"])
    finally:
        driver.set_active(previous)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    res = {key: int(val) for key, val in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    ptx = k.asm["ptx"]
    c = record["constexprs"]
    return dict(kind=record["kind"], arch=record["arch"], head_dim=c.get("HEAD_DIM", c.get("HEAD_DIM_V")),
                dtype=c.get("DTYPE", "-"), causal=c.get("CAUSAL", "-"), window=c.get("WINDOW", "-"),
                key_bounds=c.get("KEY_BOUNDS", "-"), mask=c.get("MASK", "-"), varlen=c.get("VARLEN", "-"),
                seqlens=bool(c.get("SEQLENS")),
                features="".join(letter for name, letter in FEATURE_LETTERS.items() if c.get(name)) or "-",
                tma=bool(c.get("TMA")),
                aligned=c.get("ALIGNED", "-"),
                config=f"M{c.get('BLOCK_M')}/N{c.get('BLOCK_N', '-')}/w{record['num_warps']}/s{record['num_stages']}",
                regs=res.get("REG", -1), spill=res.get("LOCAL", 0) + res.get("STACK", 0), smem=k.metadata.shared,
                wgmma="wgmma.mma_async" in ptx, tf32=".tf32" in ptx, tma_ptx="cp.async.bulk.tensor" in ptx)


CALIBRATED_ARCHS = (80, 86, 89, 90)  # where REGISTER_BUDGET was fitted, on 16-byte aligned inputs
SPILL_TOLERANCE = 128  # bytes of spills tolerated elsewhere (see problems)


def calibrated(row: dict) -> bool:
    """Whether the register estimates were calibrated for the row: sm_80 / sm_90, aligned inputs, not
    varlen or stored key counts (whose pointer-path forward and per-sequence offsets the estimates only
    approximate)."""
    return (row["arch"] in CALIBRATED_ARCHS and row["aligned"] is not False and row.get("varlen") is not True
            and not row.get("seqlens"))


def problems(row: dict, fp32_ieee: bool = True) -> list:
    """What is wrong with a compiled row (an empty list: nothing). Spills are problems where the
    register estimates were calibrated (calibrated()); elsewhere (sm_100 / sm_120, misaligned
    inputs, whose unvectorised loads take more registers) up to SPILL_TOLERANCE bytes are noted
    by notes() and tolerated."""
    where = f"{row['kind']}{'+tma' if row['tma'] else ''} sm_{row['arch']} D={row['head_dim']} {row['dtype']} " \
            f"{row['config']}"
    out = []
    if row["tma"] and not row["tma_ptx"]:
        out.append(f"{where}: the descriptor path does not use TMA (cp.async.bulk.tensor)")
    if row["spill"] > (0 if calibrated(row) else SPILL_TOLERANCE):
        out.append(f"{where}: {row['spill']} bytes of local memory (spills)")
    if row["smem"] > T.smem_limit(row["arch"]):
        out.append(f"{where}: {row['smem']} bytes of shared memory > {T.smem_limit(row['arch'])}")
    if row["regs"] > 255:
        out.append(f"{where}: {row['regs']} registers")
    if row["kind"] == "fwd" and row["arch"] == 90 and row["dtype"] in ("fp16", "bf16") and not row["wgmma"]:
        out.append(f"{where}: the sm_90 forward does not use wgmma")
    if fp32_ieee and row["dtype"] == "fp32" and row["tf32"]:
        out.append(f"{where}: IEEE fp32 kernel contains TF32 instructions")
    return out


def notes(rows) -> list:
    """The tolerated spills (see problems), to be printed with the table."""
    return [f"{r['kind']} sm_{r['arch']} D={r['head_dim']} {r['dtype']} aligned={r['aligned']} {r['config']}: "
            f"{r['spill']} bytes of spills (not calibrated here)" for r in rows if r["spill"] and not calibrated(r)]


def print_table(rows) -> None:
    print(f"{'kernel':8} {'arch':6} {'D':>4} {'dtype':5} {'causal':6} {'window':6} {'bounds':6} {'mask':4} "
          f"{'varlen':6} {'feat':4} {'aligned':7} {'config':16} {'regs':>4} {'spill':>5} {'smem':>7} wgmma")
    for r in rows:
        kernel = r["kind"] + ("+tma" if r["tma"] else "")
        print(f"{kernel:8} sm_{r['arch']:<3} {r['head_dim']:>4} {r['dtype']:5} {str(r['causal']):6} "
              f"{str(r['window']):6} {str(r['key_bounds']):6} {str(r['mask']):4} {str(r['varlen']):6} "
              f"{r.get('features', '-'):4} "
              f"{str(r['aligned']):7} "
              f"{r['config']:16} {r['regs']:>4} {r['spill']:>5} {r['smem']:>7} {r['wgmma']}")


def compile_all(records, jobs: int) -> list:
    unique = list({r["spec"]: r for r in records}.values())
    if jobs <= 1:
        return [compile_record(r) for r in unique]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(compile_record, unique))


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

ARCHS = (80, 90)
# (head_dim, dtype, causal, (H, HK)): the shapes that stress registers (256), the common ones, fp32 IEEE
REPRESENTATIVE = [(64, torch.float16, True, (4, 2)), (128, torch.bfloat16, False, (2, 2)),
                  (256, torch.bfloat16, True, (4, 2)), (96, torch.float32, False, (2, 2)),
                  (256, torch.float32, True, (4, 2))]
QUICK = [(128, torch.bfloat16, False, (2, 2)), (256, torch.float16, True, (4, 2))]
# The sliding window and key bounds together (their scalars, extra loops and masks) where registers are tightest;
# the same shapes with a mask tensor (MASK: its loads, the per-tile summary and the tile skip), bf16 with a
# float mask in the inputs' dtype, fp32 with a boolean one; and as varlen sequences with the window (VARLEN: the
# sequence's offsets, the early exit, the moved pointers; the forward on its pointer path)
VISIBILITY = [(256, torch.bfloat16, True, (4, 2)), (256, torch.float32, True, (4, 2))]
VISIBILITY_WINDOW = (64, 0)
# Soft-capping, ALiBi and dropout (their scalars, tanh, the ALiBi bias, the Philox keep tiles; the dK/dV kernel's
# transposed keep tile; varlen's misaligned Philox path) all at once, with the window and key bounds, and as varlen
FEATURES = dict(softcap=30.0, alibi=True, dropout_p=0.1)
NO_DROPOUT = dict(softcap=30.0, alibi=True)  # the same without dropout (whose prune differs)
# dropout's prune (triton_attention.DROPOUT_REGISTER_SHARE) is also checked at a head dim where the default
# budget keeps larger dK/dV tiles
FEATURE_SHAPES = [(64, torch.float16, True, (4, 2))]
MASK_KIND = {torch.bfloat16: "float", torch.float32: "bool"}  # the float mask requires grad (MASK_GRAD)
LENGTH = 256  # no shorter than any block, so the length rule prunes nothing


def table_records(reps, archs=ARCHS, visibility=()) -> list:
    """Every launch of a forward + backward per (arch, representative shape), every config the
    autotuner would benchmark; on sm_90 and newer fp16/bf16 also the forward of misaligned inputs
    (the pointer path, where aligned inputs take TMA), up to head dim 128: at 256 it spills with
    every config (triton_attention.MISALIGNED_REGISTER_SHARE). Each shape of ``visibility`` once more
    with a sliding window and key bounds, once with a mask tensor (MASK_KIND), and once as varlen
    sequences with the window; then both again with softcap, ALiBi and dropout (FEATURES), the first also
    without dropout (NO_DROPOUT) and at the head dims of FEATURE_SHAPES; the attention_with_kvcache forward
    (stored key counts) with the window, softcap and ALiBi; and a decoding step's split-KV forward."""
    records = []
    for arch in archs:
        for head_dim, dtype, causal, (H, HK) in visibility:
            caps = [public_call(arch, 2, H, HK, LENGTH, LENGTH, head_dim, dtype, "aligned", causal, **extra)
                    for extra in (dict(window=VISIBILITY_WINDOW, key_padding=True),
                                  dict(mask_kind=MASK_KIND[dtype], mask_grad=MASK_KIND[dtype] == "float"),
                                  dict(window=VISIBILITY_WINDOW, key_padding=True, features=FEATURES),
                                  dict(window=VISIBILITY_WINDOW, key_padding=True, features=NO_DROPOUT))]
            caps.append(varlen_call(arch, 3, H, HK, LENGTH, LENGTH, head_dim, dtype, causal, VISIBILITY_WINDOW))
            caps.append(varlen_call(arch, 3, H, HK, LENGTH, LENGTH, head_dim, dtype, causal, VISIBILITY_WINDOW,
                                    FEATURES))
            caps.append(kvcache_call(arch, 3, H, HK, LENGTH, head_dim, dtype, VISIBILITY_WINDOW, NO_DROPOUT))
            caps.append(split_call(arch, 2, 1, head_dim, dtype, causal))
            for cap in caps:  # every config benchmarked, and the launch of a kernel whose prune keeps one
                records += [r for r in cap.records if r["kind"] != "pre"]
        for head_dim, dtype, causal, (H, HK) in FEATURE_SHAPES if visibility else ():
            cap = public_call(arch, 2, H, HK, LENGTH, LENGTH, head_dim, dtype, "aligned", causal,
                              window=VISIBILITY_WINDOW, key_padding=True, features=FEATURES)
            records += [r for r in cap.records if r["kind"] != "pre"]
        for head_dim, dtype, causal, (H, HK) in reps:
            cap = public_call(arch, 2, H, HK, LENGTH, LENGTH, head_dim, dtype, "aligned", causal)
            records += [r for r in cap.records if r["phase"] == "bench" or r["kind"] == "pre"]
            if arch >= 90 and dtype != torch.float32 and head_dim <= 128:  # 256: see MISALIGNED_REGISTER_SHARE
                cap = public_call(arch, 2, H, HK, LENGTH, LENGTH, head_dim, dtype, "offset", causal, backward=False)
                records += [r for r in cap.records if r["phase"] == "bench"]
    return records


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="two representative shapes only")
    args = ap.parse_args(argv)
    rows = compile_all(table_records(QUICK if args.quick else REPRESENTATIVE, visibility=() if args.quick
                                     else VISIBILITY), args.jobs)
    print_table(rows)
    found = [p for r in rows for p in problems(r)]
    kinds = {(r["kind"], r["tma"]) for r in rows}
    for want in [("fwd", True), ("fwd", False), ("pre", False), ("dkdv", False), ("dq", False)]:
        if want not in kinds:
            found.append(f"no {want[0]}{'+tma' if want[1] else ''} kernel was compiled")
    for n in notes(rows):
        print("NOTE:", n)
    print(f"{len(rows)} compiles, {len(found)} problems")
    for p in found:
        print("PROBLEM:", p)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
