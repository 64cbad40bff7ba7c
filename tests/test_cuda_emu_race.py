"""The CPU emulator's shared-memory tracker: races and bounds (csrc/emu/runtime.h).

The emulator runs a block's threads one after another between synchronisation points,
so a racy kernel often computes the right values by luck of that schedule. The tracker
records, per shared byte, the last writer and its barrier epoch, the readers since the
last barrier and any cp.async still in flight, and reports a race whatever order the
threads ran in. Expected errors are asserted by their message: kernel, hazard, offset,
both threads.

Part 1: small probe kernels (csrc/emu/test_kernels.cuh, probe_smem_race and the cp.async
probes). Part 2: the real kernels with one barrier moved or deleted, built from copies of
their sources by a textual edit into one extra emulator module.
"""
import os
import re
import subprocess
import sys

import pytest
import torch

from fused_attn.ops import _emu


@pytest.fixture(scope="module")
def emu():
    return _emu.load()


def race_message(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg.startswith("fused_attn emulator: kernel '"), msg
    return msg


# ---- part 1: the tracker on probe kernels ---------------------------------------------------
# probe_smem_race: 64 threads (two warps), int slots s[0..64) in 256 bytes of shared memory,
# v(t) = 7t + 1. The fibers run in thread order between synchronisation points, and the thread
# that completes a barrier or collective runs on first: the messages below name the pair of
# threads that order produces; the hazard is found whatever the order.

def v(t):
    return 7 * t + 1


def test_read_after_write_without_barrier_fails(emu):
    with pytest.raises(RuntimeError) as e:
        emu.run_smem_race(0)  # s[t] = v; read s[t - 1]
    assert ("kernel 'probe_smem_race' block (0,0,0): shared-memory race (read-after-write) at shared byte offset 0: "
            "thread (1,0,0) (warp 0 lane 1) reads it (shared load) after thread (0,0,0) (warp 0 lane 0) wrote it "
            "(shared store) with no __syncthreads() in between and no __syncwarp() of both lanes") in race_message(e)


def test_read_after_write_with_barrier_is_clean(emu):
    out = emu.run_smem_race(1)
    t = torch.arange(64)
    assert torch.equal(out, v((t - 1) % 64).int())


def test_write_after_read_fails(emu):
    with pytest.raises(RuntimeError) as e:
        emu.run_smem_race(2)  # barrier; read s[t + 1]; write s[t]
    # Thread 63 completed the barrier, so it ran first: it read s[0]; thread 0 then writes s[0].
    assert ("shared-memory race (write-after-read) at shared byte offset 0: thread (0,0,0) (warp 0 lane 0) writes it "
            "(shared store) after thread (63,0,0) (warp 1 lane 31) read it (shared load) with no __syncthreads() in "
            "between") in race_message(e)


def test_write_after_write_fails(emu):
    with pytest.raises(RuntimeError) as e:
        emu.run_smem_race(3)  # every thread writes s[0]
    assert ("race (write-after-write) at shared byte offset 0: thread (1,0,0) (warp 0 lane 1) writes it (shared store) "
            "after thread (0,0,0) (warp 0 lane 0) wrote it (shared store)") in race_message(e)


def test_syncwarp_orders_lanes_of_its_warp(emu):
    out = emu.run_smem_race(4)  # s[t] = v; __syncwarp(); read s[t ^ 1]
    t = torch.arange(64)
    assert torch.equal(out, v(t ^ 1).int())


def test_syncwarp_does_not_order_other_warps(emu):
    with pytest.raises(RuntimeError) as e:
        emu.run_smem_race(5)  # s[t] = v; __syncwarp(); read s[t ^ 32]
    msg = race_message(e)
    m = re.search(r"race \((write-after-read|read-after-write)\) at shared byte offset (\d+): thread \((\d+),0,0\) "
                  r"\(warp (\d)", msg)
    assert m, msg
    offset, t = int(m.group(2)), int(m.group(3))
    assert offset in (4 * t, 4 * (t ^ 32)) and "warp 0" in msg and "warp 1" in msg


def test_shuffle_does_not_order_memory(emu):
    # A shuffle synchronises the lanes' execution, but (as every warp intrinsic but __syncwarp)
    # gives no memory ordering: the store of lane 30 and the read of lane 31 race.
    with pytest.raises(RuntimeError) as e:
        emu.run_smem_race(6)  # s[t] = v; shfl_xor; read s[t ^ 1]
    assert ("race (read-after-write) at shared byte offset 120: thread (31,0,0) (warp 0 lane 31) reads it (shared "
            "load) after thread (30,0,0) (warp 0 lane 30) wrote it (shared store) with no __syncthreads() in between "
            "and no __syncwarp() of both lanes") in race_message(e)


def test_out_of_bounds_shared_store_fails(emu):
    with pytest.raises(RuntimeError) as e:
        emu.run_smem_race(7)  # s[64 + t] = v
    assert ("kernel 'probe_smem_race' block (0,0,0) thread (0,0,0): out-of-bounds shared store of 4 bytes at shared "
            "byte offset 256 (the block has 256 bytes of dynamic shared memory)") in race_message(e)


def test_misaligned_shared_load_fails(emu):
    with pytest.raises(RuntimeError) as e:
        emu.run_smem_race(8)
    assert "thread (0,0,0): misaligned shared load of 4 bytes at shared byte offset 2 (must be a multiple of 4)" in (
        race_message(e))


def test_raw_shared_dereference_faults_with_a_message():
    # A kernel that dereferences a shared pointer itself bypasses the tracker: under emulation
    # the address range it sees is PROT_NONE, so it faults, and says why, instead of going unseen.
    code = "from fused_attn.ops import _emu; _emu.load().run_smem_race(9)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(),
                       timeout=300)
    assert r.returncode == -11, (r.returncode, r.stderr[-2000:])
    assert ("fused_attn emulator: kernel 'probe_smem_race' block (0,0,0) thread (0,0,0): raw dereference of shared "
            "memory at byte offset 0") in r.stderr


def test_thread_exiting_with_cp_async_in_flight_fails(emu):
    with pytest.raises(RuntimeError) as e:
        emu.run_smem_race(10)  # threads 0-15: cp.async, commit, return
    assert ("kernel 'probe_smem_race' block (0,0,0) thread (0,0,0): exited with 1 cp.async copies in flight "
            "(cp.async.wait_group 0 must cover every copy before the thread exits)") in race_message(e)


def test_cp_async_destination_read_by_its_thread_before_wait_fails(emu):
    src = (torch.arange(512) % 251 + 1).to(torch.uint8)
    with pytest.raises(RuntimeError) as e:
        emu.run_cp_async(src, torch.full((32,), 16, dtype=torch.int32), 16, True, peek=True)
    assert ("kernel 'probe_cp_async' block (0,0,0): shared-memory race (cp.async in flight) at shared byte offset 0: "
            "thread (0,0,0) (warp 0 lane 0) reads it (shared load) while the cp.async of thread (0,0,0) (warp 0 lane 0) "
            "to it is in flight") in race_message(e)


def test_cp_async_destination_read_by_another_thread_before_its_wait_fails(emu):
    src = (torch.arange(512) % 251 + 1).to(torch.uint8)
    with pytest.raises(RuntimeError) as e:
        emu.run_cp_async_visibility(src, 2)  # issue; barrier; read slot t - 1; wait
    msg = race_message(e)
    m = re.search(r"race \(cp.async in flight\) at shared byte offset (\d+): thread \((\d+),0,0\) \(warp 0 lane \d+\) "
                  r"reads it \(shared load\) while the cp.async of thread \((\d+),0,0\) \(warp 0 lane \d+\) to it is in "
                  r"flight \(issued, not yet covered by that thread's cp.async.wait_group\)", msg)
    assert m, msg
    offset, reader, issuer = map(int, m.groups())
    assert offset == 16 * issuer and reader == (issuer + 1) % 32


def test_cp_async_data_read_by_another_thread_after_wait_without_barrier_fails(emu):
    src = (torch.arange(512) % 251 + 1).to(torch.uint8)
    with pytest.raises(RuntimeError) as e:
        emu.run_cp_async_visibility(src, 1)  # issue; wait; read slot t - 1
    # Thread 31 completed the barrier before the copies and ran first: its copy landed at its wait.
    assert ("race (read-after-write) at shared byte offset 496: thread (0,0,0) (warp 0 lane 0) reads it (shared load) "
            "after thread (31,0,0) (warp 0 lane 31) wrote it (cp.async) with no __syncthreads() in between") in (
        race_message(e))
    out = emu.run_cp_async_visibility(src, 0)  # issue; wait; barrier; read: clean
    assert torch.equal(out, src.view(32, 16).roll(1, dims=0))


# ---- part 2: the real kernels with a barrier moved or deleted --------------------------------
# Each mutant is a copy of one kernel function from csrc/cuda with a textual edit, compiled into
# namespace fa::mutant::<name> of one extra emulator module (csrc/emu/mutants_module.cpp, built
# by fused_attn/ops/_emu.build into its own build directory; the edited copies are generated there).
# An edit that no longer matches the kernel source fails loudly: update it with the kernel.
# The "control" mutants are unedited copies: they must run clean and match the production kernel
# bit for bit, so a failing mutant fails because of its edit, not because of the copying.

CUDA = _emu.CSRC / "cuda"
FWD_H, BWD_H = CUDA / "flash_fwd_kernel.cuh", CUDA / "flash_bwd_kernel.cuh"


def _code(line: str) -> str:
    return line.split("//")[0].strip()


def kernel_function(path, name: str) -> list:
    """The lines of the kernel template `name` in `path`: from its `template <class Kt, ...>` line
    to the closing brace of its body (braces counted outside // comments)."""
    lines = path.read_text().split("\n")
    head = [i for i, l in enumerate(lines)
            if re.search(rf"\b{name}\(", _code(l)) and "__global__" in lines[i] + lines[i - 1]]
    assert len(head) == 1, f"{name} declared {len(head)} times in {path}"
    start = max(i for i in range(head[0]) if _code(lines[i]).startswith("template <class Kt"))
    depth, opened = 0, False
    for i in range(head[0], len(lines)):
        depth += _code(lines[i]).count("{") - _code(lines[i]).count("}")
        opened = opened or "{" in _code(lines[i])
        if opened and depth == 0:
            return lines[start:i + 1]
    raise AssertionError(f"no end of {name} in {path}")


def find(lines, code: str, after: str = None) -> int:
    """Index of the line whose code is `code`: the only one, or the first after the only line
    whose code contains `after`."""
    lo = 0
    if after is not None:
        anchors = [i for i, l in enumerate(lines) if after in _code(l)]
        assert len(anchors) == 1, f"anchor {after!r} found {len(anchors)} times: the kernel changed, update the mutation"
        lo = anchors[0] + 1
    hits = [i for i in range(lo, len(lines)) if _code(lines[i]) == code]
    assert hits and (after is not None or len(hits) == 1), (
        f"{code!r} found {len(hits)} times: the kernel changed, update the mutation")
    return hits[0]


def delete(code, after=None):
    def edit(lines):
        i = find(lines, code, after)
        return lines[:i] + lines[i + 1:]
    return edit


def move_above(first: str, last: str, target: str, after=None):
    """Moves the lines from the line `first` through the next line `last` to just above the line
    `target` (the first after `after`)."""
    def edit(lines):
        i = find(lines, first)
        n = find(lines[i:], last, after=first) + 1
        block = lines[i:i + n]
        rest = lines[:i] + lines[i + n:]
        j = find(rest, target, after)
        return rest[:j] + block + rest[j:]
    return edit


def replace(old: str, new: str):
    def edit(lines):
        text = "\n".join(lines)
        assert text.count(old) == 1, f"{old!r} found {text.count(old)} times: the kernel changed, update the mutation"
        return text.replace(old, new).split("\n")
    return edit


def keep(lines):
    return lines


# name: (kind, header, kernel, edit)
MUTANTS = {
    "fwd_control": ("fwd", FWD_H, "flash_fwd_kernel", keep),
    "fwd_no_loop_barrier": ("fwd", FWD_H, "flash_fwd_kernel", delete("__syncthreads();")),
    "fwd_prefetch_above_barrier": ("fwd", FWD_H, "flash_fwd_kernel",
                                   move_above("if (j + kStages - 1 < n_blocks) load_kv(j + kStages - 1);",
                                              "cp_async_commit();", "__syncthreads();")),
    "dkdv_control": ("dkdv", BWD_H, "flash_bwd_dkdv_kernel", keep),
    "dkdv_no_phase_barrier": ("dkdv", BWD_H, "flash_bwd_dkdv_kernel",
                              delete("__syncthreads();", after="smem_store(reinterpret_cast<uint32_t*>(sdS + off)")),
    "dkdv_prefetch_above_barrier": ("dkdv", BWD_H, "flash_bwd_dkdv_kernel",
                                    move_above("if (kStages == 2) {", "}", "__syncthreads();",
                                               after="for (int it = 0; it < n_iters; ++it)")),
    "dkdv_delta_store_out_of_bounds": ("dkdv", BWD_H, "flash_bwd_dkdv_kernel",
                                       replace("smem_store(sDelta + st * kM + i,", "smem_store(sDelta + (st + kStages) * kM + i,")),
    "dq_control": ("dq", BWD_H, "flash_bwd_dq_kernel", keep),
    "dq_no_loop_barrier": ("dq", BWD_H, "flash_bwd_dq_kernel", delete("__syncthreads();")),
    "dq_prefetch_above_barrier": ("dq", BWD_H, "flash_bwd_dq_kernel",
                                  move_above("if (kStages == 2) {", "}", "__syncthreads();",
                                             after="for (int j = 0; j < n_blocks; ++j)")),
}


def mutants_source() -> str:
    out = ["// Generated by tests/test_cuda_emu_race.py from csrc/cuda/flash_{fwd,bwd}_kernel.cuh: one",
           "// kernel per namespace, edited as the test's MUTANTS table says. Do not edit.",
           "#pragma once", '#include "cuda/flash_bwd_kernel.cuh"', ""]
    for name, (kind, header, kernel, edit) in MUTANTS.items():
        original = kernel_function(header, kernel)
        mutated = edit(original)
        assert (mutated == original) == (edit is keep), f"the edit of {name} changed nothing"
        out += [f"namespace fa::mutant::{name} {{", *mutated, f"}}  // namespace fa::mutant::{name}", ""]
    out.append("#define FA_MUTANTS(X) " + " ".join(f"X({kind}, {name})" for name, (kind, *_) in MUTANTS.items()))
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def mutants():
    src_dir = _emu.build_dir("fused_attn_emu_mutants") / "generated"
    src_dir.mkdir(parents=True, exist_ok=True)
    inc = src_dir / "emu_mutants.inc"
    text = mutants_source()
    if not inc.is_file() or inc.read_text() != text:  # unchanged: ninja keeps the build
        inc.write_text(text)
    m = _emu.build("fused_attn_emu_mutants", [_emu.CSRC / "emu" / "runtime.cpp", _emu.CSRC / "emu" / "mutants_module.cpp"],
                   include_dirs=[src_dir])
    assert sorted(n for _, n in m.mutants()) == sorted(MUTANTS)
    return m


def _inputs(B, H, L, S, E=64):
    return (torch.randn(B, H, L, E, dtype=torch.float16), torch.randn(B, H, S, E, dtype=torch.float16),
            torch.randn(B, H, S, E, dtype=torch.float16))


def run_fwd(module, q, k, v, *args):
    """out, lse of `module.flash_fwd(*args, q, k, v, out, lse, causal=0, scale)`, outputs NaN-poisoned."""
    B, H, L, E = q.shape
    out = torch.full((B, H, L, v.shape[-1]), float("nan"), dtype=q.dtype)
    lse = torch.full((B, H, L), float("nan"))
    module.flash_fwd(*args, q, k, v, out, lse, 0, E ** -0.5)
    return out, lse


def run_bwd(module, q, k, v, out, lse, dout, *args):
    """dq, dk, dv of `module.flash_bwd(*args, dout, q, k, v, out, lse, ...)`, outputs NaN-poisoned."""
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    delta = torch.full(lse.shape, float("nan"))
    if args:
        module.flash_bwd(*args, dout, q, k, v, out, lse, dq, dk, dv, delta, 0, q.shape[-1] ** -0.5)
    else:
        module.flash_bwd(dout, None, q, k, v, out, lse, dq, dk, dv, delta, 0, q.shape[-1] ** -0.5)
    return dq, dk, dv


# Shared-memory layout of the hdim-64 fp16 instantiations (bytes; rows of 64 + 8 halves = 144 bytes,
# csrc/cuda/flash_{fwd,bwd}_traits.h): where each mutant's race must be.
ROW = (64 + 8) * 2
FWD_K_STAGE0 = range(128 * ROW, 128 * ROW + 64 * ROW)                 # after Q (128 rows)
FWD_Q_K = range(0, 128 * ROW + 2 * 64 * ROW)                          # Q and both K stages
DKDV_P_DS = range(2 * 64 * ROW, 4 * 64 * ROW)                         # after K, V (64 rows each)
DKDV_Q_STAGE0 = range(4 * 64 * ROW, 5 * 64 * ROW)                     # after K, V, P^T, dS^T
DKDV_SMEM = 4 * 64 * ROW + 2 * (2 * 64 * ROW + 2 * 64 * 4)            # ... + 2 stages of Q, dO, lse, delta
DQ_K_STAGE0 = range(2 * 128 * ROW, 2 * 128 * ROW + 64 * ROW)          # after Q, dO (128 rows each)
DQ_Q_DO_K = range(0, 2 * 128 * ROW + 2 * 64 * ROW)

KERNEL = {"fwd": "flash_fwd_kernel", "dkdv": "flash_bwd_dkdv_kernel", "dq": "flash_bwd_dq_kernel"}
RACE = re.compile(r"^fused_attn emulator: kernel '(?P<kernel>[^']+)' block \(\d+,\d+,\d+\): shared-memory race "
                  r"\((?P<hazard>[a-z.\- ]+)\) at shared byte offset (?P<offset>\d+): thread \((?P<t1>\d+),0,0\) \(warp \d+ "
                  r"lane \d+\) (?P<verb1>reads|writes) it \((?P<op1>[a-z. ]+)\) after thread \((?P<t2>\d+),0,0\) \(warp \d+ "
                  r"lane \d+\) (and other threads )?(?P<verb2>read|wrote) it \((?P<op2>[a-z. ]+)\) with no __syncthreads\(\) in "
                  r"between")


@pytest.fixture(scope="module")
def problem(emu):
    """Inputs that take every kernel through at least three tiles of its main loop (so that a stage
    is refilled after it was read), with the production kernels' outputs."""
    torch.manual_seed(1)
    q, k, v = _inputs(1, 2, 203, 203)
    out, lse = run_fwd(emu, q, k, v)
    dout = torch.randn_like(out)
    return q, k, v, out, lse, dout, run_bwd(emu, q, k, v, out, lse, dout)


def run_mutant(mutants, problem, name):
    q, k, v, out, lse, dout, _ = problem
    if MUTANTS[name][0] == "fwd":
        return run_fwd(mutants, q, k, v, name)
    return run_bwd(mutants, q, k, v, out, lse, dout, name)


# name, hazard, (reader or writer now, its op), (the other thread, its op), where
MUTANT_RACES = [
    ("fwd_no_loop_barrier", "read-after-write", ("reads", "ldmatrix"), ("wrote", "cp.async"), FWD_Q_K),
    ("fwd_prefetch_above_barrier", "write-after-read", ("writes", "cp.async"), ("read", "ldmatrix"), FWD_K_STAGE0),
    ("dkdv_no_phase_barrier", "read-after-write", ("reads", "ldmatrix"), ("wrote", "shared store"), DKDV_P_DS),
    ("dkdv_prefetch_above_barrier", "write-after-read", ("writes", "cp.async"), ("read", "ldmatrix"), DKDV_Q_STAGE0),
    ("dq_no_loop_barrier", "read-after-write", ("reads", "ldmatrix"), ("wrote", "cp.async"), DQ_Q_DO_K),
    ("dq_prefetch_above_barrier", "write-after-read", ("writes", "cp.async"), ("read", "ldmatrix"), DQ_K_STAGE0),
]


@pytest.mark.slow  # the mutants module: its own emulator build (minutes)
@pytest.mark.parametrize("name,hazard,now,before,where", MUTANT_RACES, ids=[m[0] for m in MUTANT_RACES])
def test_moved_or_deleted_barrier_is_a_race(mutants, problem, name, hazard, now, before, where):
    with pytest.raises(RuntimeError) as e:
        run_mutant(mutants, problem, name)
    msg = str(e.value)
    m = RACE.match(msg)
    assert m, msg
    assert m["kernel"] == f"{KERNEL[MUTANTS[name][0]]}<hdim 64, fp16> [mutant {name}]", msg
    assert m["hazard"] == hazard, msg
    assert int(m["offset"]) in where, msg
    assert (m["verb1"], m["op1"]) == now and (m["verb2"], m["op2"]) == before, msg
    assert m["t1"] != m["t2"], msg


@pytest.mark.slow
def test_out_of_bounds_shared_store_in_a_kernel_fails(mutants, problem):
    # The dK/dV kernel's delta store shifted by one stage: thread 0 stores one float past the end.
    with pytest.raises(RuntimeError) as e:
        run_mutant(mutants, problem, "dkdv_delta_store_out_of_bounds")
    assert re.match(r"fused_attn emulator: kernel 'flash_bwd_dkdv_kernel<hdim 64, fp16> \[mutant "
                    r"dkdv_delta_store_out_of_bounds\]' block \(\d+,\d+,\d+\) thread \(0,0,0\): out-of-bounds shared "
                    rf"store of 4 bytes at shared byte offset {DKDV_SMEM} \(the block has {DKDV_SMEM} bytes of dynamic "
                    r"shared memory\)$", str(e.value)), str(e.value)


@pytest.mark.slow
def test_unedited_copies_run_clean_and_match_the_kernels(mutants, problem):
    """The copying machinery itself changes nothing: the control mutants give the production
    kernels' results bit for bit (and run only their own kernel: the other gradients stay NaN)."""
    out, lse = problem[3], problem[4]
    dq, dk, dv = problem[6]
    got_out, got_lse = run_mutant(mutants, problem, "fwd_control")
    assert torch.equal(got_out, out) and torch.equal(got_lse, lse)
    gq, gk, gv = run_mutant(mutants, problem, "dkdv_control")
    assert torch.equal(gk, dk) and torch.equal(gv, dv) and gq.isnan().all()
    gq, gk, gv = run_mutant(mutants, problem, "dq_control")
    assert torch.equal(gq, dq) and gk.isnan().all() and gv.isnan().all()
    assert not (out.isnan().any() or dq.isnan().any() or dk.isnan().any() or dv.isnan().any())


def test_every_mutant_is_tested():
    tested = {m[0] for m in MUTANT_RACES} | {"dkdv_delta_store_out_of_bounds", "fwd_control", "dkdv_control",
                                             "dq_control"}
    assert tested == set(MUTANTS)
