"""The Triton launch path, executed on the CPU against faked GPUs: sm_80, sm_86, sm_90, sm_100, sm_120.

Everything between the public call and the kernel launch runs for real: dispatch, the autograd
function, the torch.library ops, forward_plan / backward_plan, tensor descriptors, Triton's
autotuner (its prune hook, key and config pre-hooks, with the arguments a GPU launch passes:
TensorDescriptors on the TMA path) and Triton's specialization of the real arguments (pointer
alignment, ints equal to 1). Only the launch itself is replaced by a record (fused_attn/tools/triton_compile_table.py,
fake_gpu); selected records are then compiled for their arch exactly as the launch would.

The kernels must not be interpreted here (TRITON_INTERPRET=1 gives no JITFunction and no
autotuner), so each test runs this file as a worker subprocess with TRITON_INTERPRET unset and
checks the JSON it prints.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ARCHS = (80, 86, 90, 100, 120)
DTYPES = ("fp16", "bf16", "fp32")
HEAD_DIMS = (8, 40, 64, 72, 111, 128, 256)  # padded to 16, 64, 64, 128, 128, 128, 256
LAYOUTS = ("aligned", "offset", "stride")  # see triton_compile_table.make_tensor
B, H, HK, L, S = 2, 4, 2, 200, 333
MAX_GRID_YZ = 65535


def _worker(mode: str, timeout: int = 900) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, os.path.abspath(__file__), mode], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-6000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _cdiv(a, b):
    return -(-a // b)


def _bucket(n):
    return max(16, 1 << (n - 1).bit_length())


def _block_d(e):
    return max(16, 1 << (e - 1).bit_length())


# The worker runs (one for the launch decisions, two deterministic, one compiling) take minutes
# between them: those tests are marked slow.
@pytest.fixture(scope="module")
def decisions():
    return _worker("decisions")


def _aligned(case):
    """Every base 16-byte aligned and every row a 16-byte multiple (E = 111: 222 or 444 bytes)."""
    return case["layout"] == "aligned" and case["E"] * {"fp16": 2, "bf16": 2, "fp32": 4}[case["dtype"]] % 16 == 0


def _cases(decisions):
    assert len(decisions["cases"]) == len(ARCHS) * len(DTYPES) * len(HEAD_DIMS) * len(LAYOUTS)
    for case in decisions["cases"]:
        yield case, [r for r in case["records"] if r["phase"] == "launch"], case["records"]


@pytest.mark.slow
def test_launch_order_and_paths(decisions):
    """Forward, preprocess, dQ, dK/dV (which reads the dQ kernel's top keys: TOP_KEY, fp32 only); TMA
    (descriptors through the autotuner, prune and pre-hook) exactly for aligned fp16/bf16 on sm_90 and
    newer; the pointer path's specialization follows the real arguments (a base one element off is not
    16-byte aligned, odd row strides are not 16-divisible)."""
    for case, launches, records in _cases(decisions):
        where = f"sm_{case['arch']} {case['dtype']} E={case['E']} {case['layout']}"
        assert [r["kind"] for r in launches] == ["fwd", "pre", "dq", "dkdv"], where
        tma = case["arch"] >= 90 and case["dtype"] != "fp32" and _aligned(case)
        for r in records:
            c = r["constexprs"]
            if r["kind"] != "fwd":  # fp32's exact dS at each row's top key
                assert c["TOP_KEY"] == (case["dtype"] == "fp32"), where
            if r["kind"] == "pre":
                assert c["BLOCK_M"] == 64 and c["BLOCK_DV"] == _block_d(case["E"]), where
                continue
            assert (c["ARCH"], c["DTYPE"], c["ALIGNED"]) == (case["arch"], case["dtype"], _aligned(case)), where
            assert c["HEAD_DIM"] == case["E"] and c["BLOCK_D"] == _block_d(case["E"]), where
            if r["kind"] == "fwd":
                assert c["TMA"] == tma, where
                bm, bn, bd = c["BLOCK_M"], c["BLOCK_N"], _block_d(case["E"])
                if tma:  # the config pre-hook set the descriptors' tiles before Triton specialized them
                    assert r["host_types"]["Q"] == "TensorDescriptor", where
                    for name, rows in (("Q", bm), ("K", bn), ("V", bn), ("O", bm)):
                        assert r["signature"][name] == f"tensordesc<{case['dtype']}[1, 1, {rows}, {bd}]>", where
                    continue
                assert r["host_types"]["Q"] == "Tensor", where
            assert r["signature"]["Q"] == "*" + case["dtype"], where
            assert ("Q" in r["attrs"]) == (case["layout"] != "offset"), where  # tt.divisibility 16 on the pointer
            row_stride = case["E"] + (case["layout"] == "stride")
            assert ("stride_qm" in r["attrs"]) == (row_stride % 16 == 0), where


@pytest.mark.slow
def test_autotuner_runs_the_pruned_configs(decisions):
    """The autotuner benchmarks exactly the configs the prune keeps for the arch (in their order)
    and launches its pick (the fake benchmarker makes the last one fastest); the sm_90 and sm_100
    fp16/bf16 forwards keep only warpgroup-sized query blocks."""
    for case, launches, records in _cases(decisions):
        where = f"sm_{case['arch']} {case['dtype']} E={case['E']} {case['layout']}"
        for kind in ("fwd", "dkdv", "dq"):
            kept = case["kept"][kind]
            assert kept, where
            benched = [_config(r) for r in records if r["kind"] == kind and r["phase"] == "bench"]
            launched = [_config(r) for r in launches if r["kind"] == kind]
            assert launched == [kept[-1]], where
            if not case["tuned"][kind]:  # a tuning key seen before (see test_tuning_key): its cached pick
                assert not benched, where
            elif len(kept) > 1:
                assert benched == kept, where
            else:  # Triton 3.9 takes a single config untimed, 3.6 times it
                assert benched in ([], kept), where
            if kind == "fwd" and case["arch"] in (90, 100) and case["dtype"] != "fp32":
                assert all(cfg[0] >= 64 for cfg in kept), where


def _config(r):
    return [r["constexprs"]["BLOCK_M"], r["constexprs"]["BLOCK_N"], r["num_warps"], r["num_stages"]]


@pytest.mark.slow
def test_tuning_key(decisions):
    """A new (arch, dtype, alignment, head dim) tunes anew: fp16 and bf16 descriptors (which carry
    no dtype) do not share a config, nor do aligned and misaligned inputs; misaligned layouts share
    one key (ALIGNED False), so the later reuses the earlier's pick."""
    seen = set()
    for case, _, _ in _cases(decisions):
        key = (case["arch"], case["dtype"], _aligned(case), case["E"])
        for kind in ("fwd", "dkdv", "dq"):
            assert case["tuned"][kind] == (key not in seen), (key, case["layout"], kind)
        seen.add(key)


@pytest.mark.slow
def test_grids_fit_cuda_limits(decisions):
    """Grids are (row blocks, Y, Z): every row block of every head, Y and Z within 65535; here and
    with 2**20 heads (the old grid put batch * heads on axis 1, at most 65535)."""
    for case, _, records in _cases(decisions):
        for r in records:
            length, heads, block = {"fwd": (L, B * H, "BLOCK_M"), "pre": (L, B * H, "BLOCK_M"),
                                    "dkdv": (S, B * HK, "BLOCK_N"), "dq": (L, B * H, "BLOCK_M")}[r["kind"]]
            x, y, z = r["grid"]
            assert x == _cdiv(length, r["constexprs"][block]) and y * z >= heads > y * z - z
            assert y <= MAX_GRID_YZ and z <= MAX_GRID_YZ
    for r in decisions["many_heads"]:
        x, y, z = r["grid"]
        assert y <= MAX_GRID_YZ and z <= MAX_GRID_YZ and y * z >= decisions["many_heads_count"][r["kind"]]


@pytest.mark.slow
def test_arch_limits(decisions):
    """Shared memory for every arch the dispatcher accepts (unknown: the smallest, 99 KB); GPUs
    older than sm_80 are refused with the reason."""
    assert decisions["refusals"]["75"] == "compute capability 7.5 is older than 8.0 (Ampere)"
    assert all(decisions["refusals"][str(a)] is None for a in ARCHS)
    from fused_attn.ops import triton_attention as T
    kb = 1024
    want = {80: 163, 86: 99, 87: 163, 89: 99, 90: 227, 100: 227, 103: 227, 120: 99, 121: 99, 110: 99, 130: 99}
    assert {a: T.smem_limit(a) // kb for a in want} == want


def test_triton_versions():
    """Triton 3.6 to 3.9 (and later) are accepted; older ones are refused by an ImportError, which
    the dispatcher reports as the backend's reason. (The launch path and the compiles of this file
    were also run by hand under Triton 3.6.0; CI installs 3.9.)"""
    from fused_attn.ops import triton_attention as T
    assert T.triton_version_problem("3.5.1") == "Triton 3.5.1 is older than 3.6, the oldest these kernels support"
    assert T.triton_version_problem("2.3.0") is not None
    for ok in ("3.6.0", "3.7.1", "3.9.0", "3.9.0+git1234abc", "3.10.0"):
        assert T.triton_version_problem(ok) is None, ok


@pytest.mark.slow
def test_deterministic_mode_skips_the_autotuner():
    """torch.use_deterministic_algorithms(True): no config is timed, the autotuner never runs, and
    each launch runs fixed_config (the first kept config), the same in two fresh processes."""
    first, second = _worker("deterministic"), _worker("deterministic")
    assert first == second
    assert first["bench_calls"] == 0 and first["autotuner_runs"] == 0
    assert all(c["launched"] == c["first_kept"] for c in first["cases"])
    for c in first["cases"]:  # without the autotuner, the config's pre-hook still sized the descriptors
        if c["kind"] == "fwd" and c["arch"] >= 90 and c["dtype"] != "fp32":
            assert c["q_type"] == f"tensordesc<{c['dtype']}[1, 1, {c['launched'][0]}, {c['E']}]>", c
    # the autotuned mode (fake timings: the last config wins) would have picked others
    assert any(c["launched"] != c["autotuned"] for c in first["cases"])


@pytest.mark.slow  # Triton's compiler for every arch
def test_compiles_what_the_launch_would():
    """The launched kernels compile for their arch (shared memory within the limit, TMA instructions
    on the descriptor path, wgmma in the sm_90 fp16/bf16 forward, no TF32 in IEEE fp32, no spills
    where the register estimates are calibrated, see triton_compile_table.problems): each arch x {aligned (TMA
    from sm_90 on, pointers before), misaligned} x dtype at one head dim, the backward at two of
    those per arch, and every head-dim bucket on sm_90."""
    out = _worker("compile")
    print("\n" + out["table"])
    assert not out["problems"], out["problems"]
    rows = out["rows"]
    for arch in ARCHS:
        assert {(r["dtype"], r["tma"]) for r in rows if r["arch"] == arch and r["kind"] == "fwd"} >= \
            {("fp32", False), ("fp16", False), ("bf16", False)} | ({("fp16", True), ("bf16", True)} if arch >= 90 else set())
        assert {r["kind"] for r in rows if r["arch"] == arch} == {"fwd", "pre", "dkdv", "dq"}
    assert {r["head_dim"] for r in rows if r["arch"] == 90 and r["kind"] == "fwd"} >= {8, 40, 64, 111, 256}


# ---------------------------------------------------------------------------------------------
# The worker (TRITON_INTERPRET unset)
# ---------------------------------------------------------------------------------------------

def _summary(r):
    keep = ("ARCH", "DTYPE", "ALIGNED", "TMA", "HEAD_DIM", "BLOCK_D", "BLOCK_DV", "BLOCK_M", "BLOCK_N", "TOP_KEY")
    sig = {k: v for k, v in r["signature"].items() if k in ("Q", "K", "V", "O")}
    return dict(kind=r["kind"], phase=r["phase"], grid=r["grid"], host_types=r["host_types"], signature=sig,
                constexprs={k: v for k, v in r["constexprs"].items() if k in keep},
                attrs={k: v for k, v in r["attrs"].items() if k in ("Q", "stride_qm")},
                num_warps=r["num_warps"], num_stages=r["num_stages"])


def _decisions(A, T, torch):
    from types import SimpleNamespace
    cases = []
    for arch in ARCHS:
        for E in HEAD_DIMS:
            for dtype in DTYPES:
                for layout in LAYOUTS:
                    aligned = layout == "aligned" and E * T.ELEM_BYTES[dtype] % 16 == 0
                    kept = {kind: [[c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages]
                                   for c in T.prune_configs(kind, E, E, T.ELEM_BYTES[dtype], arch,
                                                            _bucket(S if kind == "dkdv" else L), aligned)]
                            for kind in T.CONFIGS}
                    before = {kind: len(T.AUTOTUNED[kind].cache) for kind in T.CONFIGS}
                    cap = A.public_call(arch, B, H, HK, L, S, E, A.DTYPE[dtype], layout)
                    tuned = {kind: len(T.AUTOTUNED[kind].cache) > before[kind] for kind in T.CONFIGS}  # a new key
                    cases.append(dict(arch=arch, E=E, dtype=dtype, layout=layout, kept=kept, tuned=tuned,
                                      records=[_summary(r) for r in cap.records]))
    heads = 3 * MAX_GRID_YZ + 1  # q, k, v broadcast over the batch: no memory behind the heads
    q, k, v = (torch.randn(1, 1, 1, 16).to(torch.float16).requires_grad_() for _ in range(3))
    with A.fake_gpu(90) as cap:
        out = A.fused_attn.scaled_dot_product_attention(*(t.expand(heads, 1, 1, 16) for t in (q, k, v)),
                                                        backend="triton")
        out.backward(torch.randn_like(out))
    refusals = {}
    for arch in (75,) + ARCHS:
        device_arch = T.device_arch
        T.device_arch = lambda device: arch
        try:
            refusals[arch] = T.hardware_refusal(SimpleNamespace(dtype=torch.float16, device=torch.device("cuda")), True)
        finally:
            T.device_arch = device_arch
    return dict(cases=cases, many_heads=[_summary(r) for r in cap.records if r["phase"] == "launch"],
                many_heads_count={"fwd": heads, "pre": heads, "dkdv": heads, "dq": heads}, refusals=refusals)


def _deterministic(A, T, torch):
    torch.use_deterministic_algorithms(True)
    runs = []
    for tuned in T.AUTOTUNED.values():
        tuned.run = (lambda f: lambda *a, **k: (runs.append(1), f(*a, **k))[1])(tuned.run)
    cases, bench_calls = [], 0
    for arch in ARCHS:
        for dtype in DTYPES:
            for E in (64, 128):
                cap = A.public_call(arch, B, H, HK, L, S, E, A.DTYPE[dtype], "aligned")
                bench_calls += cap.bench_calls
                for kind in T.CONFIGS:
                    length = _bucket(S if kind == "dkdv" else L)
                    kept = [[c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages]
                            for c in T.prune_configs(kind, E, E, T.ELEM_BYTES[dtype], arch, length)]
                    launched = [_config(r) for r in cap.records if r["kind"] == kind]
                    q_type = [r["signature"]["Q"] for r in cap.records if r["kind"] == kind][0]
                    cases.append(dict(arch=arch, dtype=dtype, E=E, kind=kind, launched=launched[0],
                                      first_kept=kept[0], autotuned=kept[-1], q_type=q_type))
    return dict(cases=cases, bench_calls=bench_calls, autotuner_runs=len(runs))


def _compile(A, T, torch):
    records = []

    def launched(arch, E, dtype, layout, backward):
        cap = A.public_call(arch, B, H, HK, L, S, E, A.DTYPE[dtype], layout, backward=backward)
        return [r for r in cap.records if r["phase"] == "launch"]

    for arch in ARCHS:
        for dtype in DTYPES:
            for layout in ("aligned", "offset"):
                backward = (dtype, layout) in (("bf16", "aligned"), ("fp32", "offset"))
                records += launched(arch, 64, dtype, layout, backward)
    for E in (8, 40, 111, 256):  # the buckets 16, 64, 128, 256 (E = 64: above)
        records += launched(90, E, "fp16", "aligned", True)
    rows = A.compile_all(records, os.cpu_count() or 1)
    import contextlib
    import io
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        A.print_table(rows)
        for n in A.notes(rows):
            print("NOTE:", n)
    return dict(rows=rows, table=table.getvalue(), problems=[p for r in rows for p in A.problems(r)])


def main(mode: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from fused_attn.tools import triton_compile_table as A  # unsets TRITON_INTERPRET before fused_attn's kernels are defined
    import torch
    from fused_attn.ops import triton_attention as T
    assert not T.INTERPRETED
    torch.manual_seed(0)
    out = {"decisions": _decisions, "deterministic": _deterministic, "compile": _compile}[mode](A, T, torch)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
