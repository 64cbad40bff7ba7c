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

from fused_attn import _emu


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
    code = "from fused_attn import _emu; _emu.load().run_smem_race(9)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(),
                       timeout=300)
    assert r.returncode == -11, (r.returncode, r.stderr[-2000:])
    assert ("fused_attn emulator: kernel 'probe_smem_race' block (0,0,0) thread (0,0,0): raw dereference of shared "
            "memory at byte offset 0") in r.stderr


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
