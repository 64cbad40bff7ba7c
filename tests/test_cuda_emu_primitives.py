"""The CPU emulator of the CUDA device primitives, checked against the PTX ISA.

Every expectation here is written from the spec (NO_GPU.md appendix, PTX ISA
"Matrix Fragments for mma.m16n8k16 with floating point type", "ldmatrix",
"cp.async", CUDA's __shfl_xor_sync), not from the emulator: the probe kernels in
csrc/emu/test_kernels.cuh only move registers in and out.
Notation: lane L, g = L >> 2 (groupID), t = L % 4 (threadID_in_group).
"""
import re

import numpy as np
import pytest
import torch

from fused_attn.ops import _emu


@pytest.fixture(scope="module")
def emu():
    return _emu.load()


# ---- the spec's fragment tables (PTX ISA, m16n8k16, .f16/.bf16, f32 accumulators) -----

def a_pos(lane, i):
    """(row, col) of element a_i held by lane (A is 16x16, row-major)."""
    g, t = lane >> 2, lane % 4
    row = g if i in (0, 1, 4, 5) else g + 8
    col = 2 * t + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def b_pos(lane, i):
    """(k, n) of element b_i held by lane (B is 16x8)."""
    g, t = lane >> 2, lane % 4
    return 2 * t + (i & 1) + (8 if i >= 2 else 0), g


def c_pos(lane, i):
    """(row, col) of element c_i / d_i held by lane (C, D are 16x8)."""
    g, t = lane >> 2, lane % 4
    return (g if i < 2 else g + 8), 2 * t + (i & 1)


def bits16(x: torch.Tensor, dtype) -> np.ndarray:
    return x.to(dtype).view(torch.int16).numpy().astype(np.uint32) & 0xFFFF


def to_i32(u: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(u.astype(np.uint32)).view(np.int32))


def a_regs(A, dtype):
    """Registers a[lane][r] = element a_{2r} in the low 16 bits, a_{2r+1} in the high."""
    b = bits16(A, dtype)
    regs = np.zeros((32, 4), np.uint32)
    for lane in range(32):
        for r in range(4):
            regs[lane, r] = b[a_pos(lane, 2 * r)] | (b[a_pos(lane, 2 * r + 1)] << 16)
    return to_i32(regs)


def b_regs(B, dtype):
    b = bits16(B, dtype)
    regs = np.zeros((32, 2), np.uint32)
    for lane in range(32):
        for r in range(2):
            regs[lane, r] = b[b_pos(lane, 2 * r)] | (b[b_pos(lane, 2 * r + 1)] << 16)
    return to_i32(regs)


def c_regs(C):
    return torch.tensor([[float(C[c_pos(lane, i)]) for i in range(4)] for lane in range(32)], dtype=torch.float32)


def d_matrix(d):
    D = torch.full((16, 8), float("nan"), dtype=torch.float64)
    for lane in range(32):
        for i in range(4):
            D[c_pos(lane, i)] = float(d[lane, i])
    return D


DTYPES = [torch.float16, torch.bfloat16]


def mma(emu, A, B, C, dtype):
    return emu.run_mma(a_regs(A, dtype), b_regs(B, dtype), c_regs(C), dtype == torch.bfloat16)


# ---- thread model -----------------------------------------------------------------------

def test_thread_and_block_indices(emu):
    grid, block = (2, 3, 2), (4, 2, 3)
    out = emu.run_index(list(grid), list(block)).view(2, 3, 2, 3, 2, 4, 12)  # (bz, by, bx, tz, ty, tx, 12)
    for bz in range(2):
        for by in range(3):
            for bx in range(2):
                for tz in range(3):
                    for ty in range(2):
                        for tx in range(4):
                            assert out[bz, by, bx, tz, ty, tx].tolist() == [tx, ty, tz, bx, by, bz, *block, *grid]


@pytest.mark.parametrize("nthreads", [128, 80])  # 80: a partial last warp
def test_syncthreads_makes_shared_stores_visible(emu, nthreads):
    out = emu.run_barrier(3, nthreads)
    t = torch.arange(nthreads)
    for b in range(3):
        assert torch.equal(out[b], (1000 * b + 3 * ((t + 1) % nthreads) + 1).int())


# ---- mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 ----------------------

# (lane, i) -> (row, col) of A, read off the ISA's fragment table for matrix A.
A_POSITIONS = {(0, 0): (0, 0), (0, 1): (0, 1), (5, 2): (9, 2), (6, 3): (9, 5),
               (13, 4): (3, 10), (2, 6): (8, 12), (31, 7): (15, 15), (20, 5): (5, 9)}
# (lane, i) -> (k, n) of B.
B_POSITIONS = {(0, 0): (0, 0), (7, 1): (7, 1), (9, 2): (10, 2), (30, 3): (13, 7), (4, 0): (0, 1)}
# (lane, i) -> (row, col) of C / D.
C_POSITIONS = {(0, 0): (0, 0), (5, 0): (1, 2), (5, 3): (9, 3), (31, 2): (15, 6), (14, 1): (3, 5)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lane_i", sorted(A_POSITIONS))
def test_mma_a_fragment_position(emu, dtype, lane_i):
    lane, i = lane_i
    row, col = A_POSITIONS[lane_i]
    # A is zero except element a_i of `lane` (set through the registers directly);
    # B[k][n] = k + 1, so row `row` of D is col + 1 and every other row is 0.
    regs = np.zeros((32, 4), np.uint32)
    one = int(bits16(torch.tensor(1.0), dtype))
    regs[lane, i // 2] = one << (16 * (i & 1))
    B = (torch.arange(16)[:, None] + 1.0).expand(16, 8)
    d = emu.run_mma(to_i32(regs), b_regs(B, dtype), torch.zeros(32, 4), dtype == torch.bfloat16)
    expect = torch.zeros(16, 8, dtype=torch.float64)
    expect[row] = col + 1
    assert torch.equal(d_matrix(d), expect)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lane_i", sorted(B_POSITIONS))
def test_mma_b_fragment_position(emu, dtype, lane_i):
    lane, i = lane_i
    k, n = B_POSITIONS[lane_i]
    regs = np.zeros((32, 2), np.uint32)
    one = int(bits16(torch.tensor(1.0), dtype))
    regs[lane, i // 2] = one << (16 * (i & 1))
    A = (torch.arange(16)[None, :] + 1.0).expand(16, 16)  # A[m][k] = k + 1
    d = emu.run_mma(a_regs(A, dtype), to_i32(regs), torch.zeros(32, 4), dtype == torch.bfloat16)
    expect = torch.zeros(16, 8, dtype=torch.float64)
    expect[:, n] = k + 1
    assert torch.equal(d_matrix(d), expect)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mma_c_d_fragment_positions(emu, dtype):
    # A = I (16x16), B[k][n] = 16k + n (exact in bf16): D[m][n] = 16m + n names its position.
    A = torch.eye(16)
    B = 16.0 * torch.arange(16)[:, None] + torch.arange(8)[None, :]
    d = emu.run_mma(a_regs(A, dtype), b_regs(B, dtype), torch.zeros(32, 4), dtype == torch.bfloat16)
    for (lane, i), (row, col) in C_POSITIONS.items():
        assert d[lane, i].item() == 16 * row + col, (lane, i)
    # C passes through to the same positions of D: c_i of lane L adds to d_i of lane L.
    c = torch.zeros(32, 4)
    c[5, 3] = 0.5
    d2 = emu.run_mma(a_regs(A, dtype), b_regs(B, dtype), c, dtype == torch.bfloat16)
    assert d2[5, 3].item() == 16 * 9 + 3 + 0.5
    assert (d2 != d).nonzero().tolist() == [[5, 3]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_mma_random_matches_matmul(emu, dtype):
    A = torch.randn(16, 16).to(dtype)
    B = torch.randn(16, 8).to(dtype)
    C = torch.randn(16, 8)
    d = mma(emu, A, B, C, dtype)
    expect = A.double() @ B.double() + C.double()
    assert torch.allclose(d_matrix(d), expect, rtol=1e-6, atol=1e-5)


# ---- ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{,.trans}.shared.b16 ----------------------------

NROWS = 40


def ldmatrix_expect(rows, row_of_lane, num, trans):
    """Matrix j row r comes from the address of lane 8j + r; lane L's register j holds
    row L/4, cols 2(L%4), 2(L%4)+1 of matrix j (.trans: column L/4, rows 2(L%4), 2(L%4)+1)."""
    vals = rows.numpy().astype(np.uint32) & 0xFFFF
    out = np.zeros((32, num), np.uint32)
    for lane in range(32):
        for j in range(num):
            M = vals[[row_of_lane[8 * j + r] for r in range(8)]]  # (8, 8)
            q, c = lane // 4, 2 * (lane % 4)
            lo, hi = (M[c, q], M[c + 1, q]) if trans else (M[q, c], M[q, c + 1])
            out[lane, j] = lo | (hi << 16)
    return to_i32(out)


def run_ldmatrix(emu, num, trans, row_of_lane):
    rows = (100 * torch.arange(NROWS)[:, None] + torch.arange(8)[None, :]).short()  # element (row, col) = 100 row + col
    got = emu.run_ldmatrix(rows, torch.tensor(row_of_lane, dtype=torch.int32), num, trans)
    return rows, got


def lane_rows(num):
    # A permutation of rows for the lanes whose addresses are used; -1 (an invalid
    # address) for the lanes that ldmatrix ignores (x1: lanes 8-31, x2: lanes 16-31).
    return [(7 * lane + 3) % 37 if lane < 8 * num else -1 for lane in range(32)]


@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
@pytest.mark.parametrize("num", [1, 2, 4])
def test_ldmatrix_layout(emu, num, trans):
    rol = lane_rows(num)
    rows, got = run_ldmatrix(emu, num, trans, rol)
    assert torch.equal(got, ldmatrix_expect(rows, rol, num, trans))


def test_ldmatrix_specific_positions(emu):
    rol = lane_rows(4)
    _, plain = run_ldmatrix(emu, 4, False, rol)
    _, trans = run_ldmatrix(emu, 4, True, rol)

    def halves(x):
        x = int(x) & 0xFFFFFFFF
        return x & 0xFFFF, x >> 16

    # lane 0, register 0: matrix 0 row 0 (address of lane 0), columns 0 and 1.
    assert halves(plain[0, 0]) == (100 * rol[0] + 0, 100 * rol[0] + 1)
    # lane 5, register 2: matrix 2 row 1 (address of lane 17), columns 2 and 3.
    assert halves(plain[5, 2]) == (100 * rol[17] + 2, 100 * rol[17] + 3)
    # .trans, lane 5, register 2: matrix 2 column 1, rows 2 and 3 (addresses of lanes 18, 19).
    assert halves(trans[5, 2]) == (100 * rol[18] + 1, 100 * rol[19] + 1)
    # .trans, lane 31, register 3: matrix 3 column 7, rows 6 and 7 (lanes 30, 31).
    assert halves(trans[31, 3]) == (100 * rol[30] + 7, 100 * rol[31] + 7)


def test_ldmatrix_address_outside_shared_memory_fails(emu):
    rol = lane_rows(4)
    rol[3] = NROWS  # one row past the end of the shared allocation
    with pytest.raises(RuntimeError, match=r"kernel 'probe_ldmatrix'.*ldmatrix: row address of lane 3"):
        run_ldmatrix(emu, 4, False, rol)


# ---- cp.async.{ca,cg}.shared.global with src-size, commit_group, wait_group -------------

STALE = 0xEE


@pytest.mark.parametrize("cp_size,cg", [(4, False), (8, False), (16, False), (16, True)], ids=["ca4", "ca8", "ca16", "cg16"])
def test_cp_async_zero_fill(emu, cp_size, cg):
    src = (torch.arange(512) % 251 + 1).to(torch.uint8)  # no zero bytes
    src_size = torch.tensor([t % (cp_size + 1) for t in range(32)], dtype=torch.int32)
    out = emu.run_cp_async(src, src_size, cp_size, cg)
    for t in range(32):
        s = int(src_size[t])
        # After wait_group 0 + barrier: src-size bytes from global, zeros up to cp-size, rest untouched.
        expect = src[16 * t:16 * t + s].tolist() + [0] * (cp_size - s) + [STALE] * (16 - cp_size)
        assert out[t].tolist() == expect, t


def test_cp_async_destination_read_before_wait_group_fails(emu):
    # PTX ISA: the issuing thread sees the copy only after its cp.async.wait_group; reading the
    # destination earlier is a race, reported as such (thread 0's slot is shared byte offset 0).
    src = (torch.arange(512) % 251 + 1).to(torch.uint8)
    with pytest.raises(RuntimeError, match=r"kernel 'probe_cp_async' block \(0,0,0\): shared-memory race \(cp.async in "
                                           r"flight\) at shared byte offset 0: thread \(0,0,0\) \(warp 0 lane 0\) reads it "
                                           r"\(shared load\) while the cp.async of thread \(0,0,0\)"):
        emu.run_cp_async(src, torch.full((32,), 16, dtype=torch.int32), 16, True, peek=True)


def test_cp_async_src_size_above_cp_size_fails(emu):
    src = torch.zeros(512, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"kernel 'probe_cp_async' block \(0,0,0\) thread \(0,0,0\).*src-size 17"):
        emu.run_cp_async(src, torch.full((32,), 17, dtype=torch.int32), 16, True)


def test_cp_async_wait_group_semantics(emu):
    src = (torch.arange(4 * 32 * 16) % 253 + 1).to(torch.uint8)
    out = emu.run_cp_async_groups(src).view(4, 32, 4, 16)  # (snapshot, thread, region, byte)
    # Groups: {copy 0}, {copy 1}, {copy 2} committed; copy 3 uncommitted until the last commit.
    # wait_group N: at most the N most recent committed groups still pending. Each snapshot
    # reads only the regions whose copies have completed (reading the others is a race, below).
    landed = {0: 1, 1: 2, 2: 3, 3: 4}  # snapshot after wait 2, 1, 0, commit + wait 0 -> regions done
    for snap, regions in landed.items():
        for t in range(32):
            for k in range(regions):
                assert out[snap, t, k].tolist() == src[(32 * k + t) * 16:(32 * k + t + 1) * 16].tolist(), (snap, t, k)
    # After wait_group 2, copies 1 and 2 (committed later) and 3 (uncommitted) are in flight.
    assert int(emu.run_cp_async_groups(src, peek=0).view(4, 32, 64)[0, 0, 0]) == int(src[0])
    for peek in (1, 2, 3):
        with pytest.raises(RuntimeError, match=rf"race \(cp.async in flight\) at shared byte offset {16 * peek}: thread "
                                               r"\(0,0,0\) \(warp 0 lane 0\) reads it"):
            emu.run_cp_async_groups(src, peek=peek)


def test_cp_async_data_reaches_other_threads_only_through_a_barrier(emu):
    src = (torch.arange(512) % 253 + 1).to(torch.uint8)
    neighbour = src.view(32, 16).roll(1, dims=0)  # thread t reads slot (t + 31) % 32
    assert torch.equal(emu.run_cp_async_visibility(src, 0), neighbour)

    def reported_race(mode, pattern):
        """(offset, reader, writer) of the race report the probe's ``mode`` raises."""
        with pytest.raises(RuntimeError) as e:
            emu.run_cp_async_visibility(src, mode)
        m = re.search(pattern, str(e.value))
        assert m, str(e.value)
        return tuple(map(int, m.groups()))

    # Without the barrier the neighbour's copy, landed at the neighbour's wait_group, is not
    # visible yet: a race whatever the order the threads ran in (tests/test_cuda_emu_race.py).
    # Reading the neighbour's slot after a barrier but before the neighbour's wait_group: in flight.
    # Either way the report names the first byte of the reader's neighbour's slot.
    for mode, pattern in ((1, r"race \(read-after-write\) at shared byte offset (\d+): thread \((\d+),0,0\) .* reads "
                              r"it \(shared load\) after thread \((\d+),0,0\) .* wrote it \(cp.async\)"),
                          (2, r"race \(cp.async in flight\) at shared byte offset (\d+): thread \((\d+),0,0\) .* "
                              r"reads it \(shared load\) while the cp.async of thread \((\d+),0,0\)")):
        offset, reader, writer = reported_race(mode, pattern)
        assert offset == 16 * writer and reader == (writer + 1) % 32, mode


# ---- shuffles --------------------------------------------------------------------------

def test_shfl_xor_and_idx(emu):
    v = torch.randn(32)
    out = emu.run_shfl(v, "all")
    lanes = torch.arange(32)
    for s in range(5):  # lane L reads v from lane L ^ laneMask
        assert torch.equal(out[s], v[lanes ^ (1 << s)])
    assert torch.equal(out[5], v[(7 * lanes + 3) % 32])
    # width 4, laneMask 4: the source lane L ^ 4 lies in a later group of 4 for L % 8 < 4
    # (CUDA: the caller's own value is returned), an earlier one otherwise (allowed).
    expect = torch.where(lanes % 8 < 4, v, v[lanes ^ 4])
    assert torch.equal(out[6], expect)


def test_shfl_disjoint_partial_masks(emu):
    v = torch.randn(32)
    out = emu.run_shfl(v, "partial")[0]
    lanes = torch.arange(32)
    assert torch.equal(out, v[torch.where(lanes < 16, lanes ^ 1, lanes ^ 2)])


def test_shfl_lane_named_in_mask_must_execute(emu):
    with pytest.raises(RuntimeError, match=r"kernel 'probe_shfl_missing_lane' block \(0,0,0\) thread \(16,0,0\): exited "
                                           r"while lane 0 of its warp waits in '__shfl_xor_sync' with mask 0xffffffff"):
        emu.run_shfl(torch.randn(32), "missing_lane")


# ---- global-memory bounds checking ------------------------------------------------------

def test_out_of_bounds_load_is_caught(emu):
    x, y = torch.zeros(100), torch.zeros(128)
    with pytest.raises(RuntimeError) as e:
        emu.run_oob(x, y, 0, 0, 4, 32)  # 128 threads read x[0..127]; x has 100 elements
    msg = str(e.value)
    assert "kernel 'probe_oob' block (3,0,0) thread (4,0,0)" in msg  # global index 100 = 3 * 32 + 4
    assert "out-of-bounds global load of 4 bytes: tensor 'x' element offset 100, valid offsets [0, 100)" in msg


def test_out_of_bounds_negative_offset_is_caught(emu):
    with pytest.raises(RuntimeError, match=r"block \(0,0,0\) thread \(0,0,0\): out-of-bounds global load .* offset -1,"):
        emu.run_oob(torch.zeros(128), torch.zeros(128), -1, 0, 4, 32)


def test_out_of_bounds_store_is_caught(emu):
    with pytest.raises(RuntimeError, match=r"block \(1,0,0\) thread \(31,0,0\): out-of-bounds global store of 4 bytes: "
                                           r"tensor 'y' element offset 64"):
        emu.run_oob(torch.zeros(64), torch.zeros(64), 1, 1, 2, 32)  # 64 threads store y[1..64]


def test_out_of_bounds_cp_async_is_caught(emu):
    # thread i copies x[4i .. 4i+3]; x has 500 floats, so i = 125 (block 3, thread 29) reads past the end.
    with pytest.raises(RuntimeError, match=r"block \(3,0,0\) thread \(29,0,0\): out-of-bounds global load \(cp.async\) "
                                           r"of 16 bytes: tensor 'x' element offset 500"):
        emu.run_oob(torch.zeros(500), torch.zeros(128), 0, 2, 4, 32)


def test_bounds_are_the_tensors_not_its_storages(emu):
    base = torch.arange(256, dtype=torch.float32)
    y = torch.zeros(128)
    emu.run_oob(base[:128], y, 0, 0, 4, 32)  # in bounds: runs
    assert torch.equal(y, base[:128])
    with pytest.raises(RuntimeError, match=r"tensor 'x' element offset 100, valid offsets \[0, 100\)"):
        emu.run_oob(base[:100], y, 0, 0, 4, 32)  # the storage goes on, the view does not
