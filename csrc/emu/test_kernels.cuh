// Probe kernels for the device primitives: each exposes one primitive's raw
// behaviour (registers in, registers out) so that tests/test_cuda_emu_primitives.py
// can check it against the PTX ISA tables, and small racy / correct kernels for the
// emulator's shared-memory tracker (tests/test_cuda_emu_race.py). The same source is
// compiled by nvcc (csrc/emu/test_kernels.cu, for the compile table) and by the emulator.
#pragma once

#include "cuda/primitives.cuh"

namespace fa_probe {

using fa::GPtr;

// Every thread writes threadIdx, blockIdx, blockDim, gridDim (12 ints).
__global__ void probe_index(GPtr<int32_t> out) {
  const int64_t b = blockIdx.x + int64_t(gridDim.x) * (blockIdx.y + int64_t(gridDim.y) * blockIdx.z);
  const int64_t t = threadIdx.x + int64_t(blockDim.x) * (threadIdx.y + int64_t(blockDim.y) * threadIdx.z);
  const int64_t o = (b * blockDim.x * blockDim.y * blockDim.z + t) * 12;
  const unsigned v[12] = {threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z,
                          blockDim.x,  blockDim.y,  blockDim.z,  gridDim.x,  gridDim.y,  gridDim.z};
  for (int i = 0; i < 12; ++i) out.store(o + i, static_cast<int32_t>(v[i]));
}

// Thread t stores to shared slot t, then (after a barrier) reads slot t+1.
__global__ void probe_barrier(GPtr<int32_t> out) {
  FA_DYNAMIC_SMEM(smem);
  int32_t* s = reinterpret_cast<int32_t*>(smem);
  const int n = blockDim.x, t = threadIdx.x;
  fa::smem_store(s + t, 1000 * static_cast<int>(blockIdx.x) + 3 * t + 1);
  __syncthreads();
  out.store(int64_t(blockIdx.x) * n + t, fa::smem_load(s + (t + 1) % n));
}

// One warp: lane l holds a[l][0..3], b[l][0..1], c[l][0..3]; writes d[l][0..3].
template <class T>
__global__ void probe_mma(GPtr<const uint32_t> a, GPtr<const uint32_t> b, GPtr<const float> c, GPtr<float> d) {
  const int l = threadIdx.x;
  uint32_t ra[4], rb[2];
  float rc[4], rd[4];
  for (int i = 0; i < 4; ++i) ra[i] = a.load(4 * l + i);
  for (int i = 0; i < 2; ++i) rb[i] = b.load(2 * l + i);
  for (int i = 0; i < 4; ++i) rc[i] = c.load(4 * l + i);
  fa::mma_m16n8k16<T>(rd, ra, rb, rc);
  for (int i = 0; i < 4; ++i) d.store(4 * l + i, rd[i]);
}

// One warp: copies nrows 16-byte rows to shared memory; lane l passes the address
// of row row_of_lane[l] (any value for lanes whose address ldmatrix ignores); writes
// the N result registers of each lane.
template <int N, bool Trans>
__global__ void probe_ldmatrix(GPtr<const fa::u32x4> rows, int nrows, GPtr<const int32_t> row_of_lane, GPtr<uint32_t> out) {
  FA_DYNAMIC_SMEM(smem);
  fa::u32x4* s = reinterpret_cast<fa::u32x4*>(smem);
  const int l = threadIdx.x;
  for (int r = l; r < nrows; r += 32) fa::smem_store(s + r, rows.load(r));
  __syncthreads();
  uint32_t reg[N];
  fa::ldmatrix<N, Trans>(reg, smem + 16 * int64_t(row_of_lane.load(l)));
  for (int j = 0; j < N; ++j) out.store(N * l + j, reg[j]);
}

// One warp. Thread t fills shared bytes [16t, 16t+16) with 0xEE, issues one cp.async of
// kBytes from src[16t] with src_size[t] source bytes, commits, waits for all groups,
// syncs, snapshots its slot (out[t]). With peek, it first reads its slot before the wait
// (a race: the copy is in flight).
template <int kBytes, bool kCg>
__global__ void probe_cp_async(GPtr<const uint8_t> src, GPtr<const int32_t> src_size, GPtr<uint8_t> out, int peek) {
  FA_DYNAMIC_SMEM(smem);
  const int t = threadIdx.x;
  uint8_t* slot = reinterpret_cast<uint8_t*>(smem) + 16 * t;
  for (int i = 0; i < 16; ++i) fa::smem_store(slot + i, uint8_t{0xEE});
  if constexpr (kCg) {
    fa::cp_async_cg16(slot, src, 16 * t, src_size.load(t));
  } else {
    fa::cp_async_ca<kBytes>(slot, src, 16 * t, src_size.load(t));
  }
  fa::cp_async_commit();
  if (peek) out.store(16 * t, fa::smem_load(slot));
  fa::cp_async_wait<0>();
  __syncthreads();
  for (int i = 0; i < 16; ++i) out.store(16 * t + i, fa::smem_load(slot + i));
}

// One warp. Thread t issues copies k = 0..3 (16 bytes from src[(32k + t) * 16] to its
// region k), committing after k = 0, 1, 2 and leaving k = 3 uncommitted; snapshots its
// regions that wait_group 2, 1, 0, then commit + wait_group 0 completed (1, 2, 3, 4 of
// them) into out[snapshot][t]. With peek >= 0 it also reads region `peek` right after
// wait_group 2 (a race unless peek is 0: the other copies are in flight).
__global__ void probe_cp_async_groups(GPtr<const uint8_t> src, GPtr<uint8_t> out, int peek) {
  FA_DYNAMIC_SMEM(smem);
  const int t = threadIdx.x;
  uint8_t* mine = reinterpret_cast<uint8_t*>(smem) + 64 * t;
  for (int i = 0; i < 64; ++i) fa::smem_store(mine + i, uint8_t{0xEE});
  for (int k = 0; k < 4; ++k) {
    fa::cp_async_cg16(mine + 16 * k, src, (32 * k + t) * 16, 16);
    if (k < 3) fa::cp_async_commit();
  }
  auto snap = [&](int s, int regions) {
    for (int i = 0; i < 16 * regions; ++i) out.store((s * 32 + t) * 64 + i, fa::smem_load(mine + i));
  };
  fa::cp_async_wait<2>();
  if (peek >= 0) out.store(t * 64, fa::smem_load(mine + 16 * peek));
  snap(0, 1);
  fa::cp_async_wait<1>();
  snap(1, 2);
  fa::cp_async_wait<0>();
  snap(2, 3);
  fa::cp_async_commit();
  fa::cp_async_wait<0>();
  snap(3, 4);
}

// One warp. Thread t copies 16 bytes from src[16t] into shared slot t with cp.async, then
// reads its neighbour's slot (t + 31) % 32 into out[t]:
//   mode 0: wait_group, barrier, read (correct);
//   mode 1: wait_group, read (a race: the neighbour's copy is not visible without a barrier);
//   mode 2: barrier, read, wait_group (a race: the neighbour's copy is still in flight).
__global__ void probe_cp_async_visibility(GPtr<const uint8_t> src, GPtr<uint8_t> out, int mode) {
  FA_DYNAMIC_SMEM(smem);
  const int t = threadIdx.x;
  uint8_t* slot = reinterpret_cast<uint8_t*>(smem);
  for (int i = 0; i < 16; ++i) fa::smem_store(slot + 16 * t + i, uint8_t{0xEE});
  __syncthreads();
  fa::cp_async_cg16(slot + 16 * t, src, 16 * t, 16);
  fa::cp_async_commit();
  if (mode != 2) fa::cp_async_wait<0>();
  if (mode != 1) __syncthreads();
  const int n = (t + 31) % 32;
  for (int i = 0; i < 16; ++i) out.store(16 * t + i, fa::smem_load(slot + 16 * n + i));
  if (mode == 2) fa::cp_async_wait<0>();
}

// One warp: out[s][l] = shfl_xor(full, v[l], 1 << s) for s < 5; out[5][l] = shfl(full, v[l], (7l + 3) % 32);
// out[6][l] = __shfl_xor_sync(full, v[l], 4, width 4) (CUDA spelling, width segments).
__global__ void probe_shfl(GPtr<const float> v, GPtr<float> out) {
  const int l = threadIdx.x;
  const float x = v.load(l);
  for (int s = 0; s < 5; ++s) out.store(32 * s + l, fa::shfl_xor(fa::kFullMask, x, 1 << s));
  out.store(32 * 5 + l, fa::shfl(fa::kFullMask, x, (7 * l + 3) % 32));
  out.store(32 * 6 + l, __shfl_xor_sync(fa::kFullMask, x, 4, 4));
}

// Lanes 0-15 exchange with mask 0x0000ffff, lanes 16-31 with 0xffff0000 (disjoint masks).
__global__ void probe_shfl_partial(GPtr<const float> v, GPtr<float> out) {
  const int l = threadIdx.x;
  const float x = v.load(l);
  const float y = l < 16 ? fa::shfl_xor(0x0000ffffu, x, 1) : fa::shfl_xor(0xffff0000u, x, 2);
  out.store(l, y);
}

// Bug on purpose: lanes 16-31 return while lanes 0-15 shuffle with a full mask.
__global__ void probe_shfl_missing_lane(GPtr<const float> v, GPtr<float> out) {
  const int l = threadIdx.x;
  if (l >= 16) return;
  out.store(l, fa::shfl_xor(fa::kFullMask, v.load(l), 1));
}

// Out-of-bounds probes: global index i = blockIdx.x * blockDim.x + threadIdx.x.
// mode 0: y[i] = x[i + shift]; mode 1: y[i + shift] = 1; mode 2: cp.async 16 bytes from
// x[4 (i + shift)] into shared memory.
__global__ void probe_oob(GPtr<const float> x, GPtr<float> y, int64_t shift, int mode) {
  FA_DYNAMIC_SMEM(smem);
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (mode == 0) {
    y.store(i, x.load(i + shift));
  } else if (mode == 1) {
    y.store(i + shift, 1.0f);
  } else {
    fa::cp_async_cg16(smem + 16 * threadIdx.x, x, 4 * (i + shift), 16);
    fa::cp_async_commit();
    fa::cp_async_wait<0>();
  }
}

// Shared-memory tracker probes: thread t of n (two warps or more) and int slots s[0..n).
// mode 0: s[t] = v, then read s[t - 1] with no barrier (read-after-write race);
// mode 1: the same with __syncthreads() in between (correct: out[t] = value of t - 1);
// mode 2: s[t] = v, barrier, read s[t + 1], write s[t] (write-after-read race);
// mode 3: every thread writes s[0] (write-after-write race);
// mode 4: s[t] = v, __syncwarp(), read s[t ^ 1] (correct: same warp, ordered);
// mode 5: s[t] = v, __syncwarp(), read s[t ^ 32] (a race: __syncwarp orders only its warp);
// mode 6: s[t] = v, a shuffle, read s[t ^ 1] (a race: a shuffle does not order memory);
// mode 7: a store one slot past the block's shared memory (bounds error);
// mode 8: a 4-byte load at shared byte offset 2 (misaligned);
// mode 9: a raw store through the shared pointer (faults under emulation: never call it in-process);
// mode 10: threads 0-15 issue a zero-filling cp.async into their 16 bytes and exit without waiting.
__global__ void probe_smem_race(GPtr<int32_t> out, int mode) {
  FA_DYNAMIC_SMEM(smem);
  int32_t* s = reinterpret_cast<int32_t*>(smem);
  const int t = threadIdx.x, n = blockDim.x;
  const int v = 7 * t + 1;
  int r = -1;
  if (mode == 0 || mode == 1) {
    fa::smem_store(s + t, v);
    if (mode == 1) __syncthreads();
    r = fa::smem_load(s + (t + n - 1) % n);
  } else if (mode == 2) {
    fa::smem_store(s + t, v);
    __syncthreads();
    r = fa::smem_load(s + (t + 1) % n);
    fa::smem_store(s + t, r);
  } else if (mode == 3) {
    fa::smem_store(s, v);
  } else if (mode == 4 || mode == 5) {
    fa::smem_store(s + t, v);
    fa::sync_warp();
    r = fa::smem_load(s + (t ^ (mode == 4 ? 1 : 32)) % n);
  } else if (mode == 6) {
    fa::smem_store(s + t, v);
    r = fa::shfl_xor(fa::kFullMask, v, 1) - v;
    r += fa::smem_load(s + (t ^ 1));
  } else if (mode == 7) {
    fa::smem_store(s + n + t, v);
  } else if (mode == 8) {
    r = fa::smem_load(reinterpret_cast<const int32_t*>(smem + 2));
  } else if (mode == 9) {
    s[t] = v;
  } else if (mode == 10) {
    if (t < 16) fa::cp_async_cg16(s + 4 * t, out, 0, 0);
    fa::cp_async_commit();
  }
  out.store(t, r);
}

}  // namespace fa_probe
