// CPU emulation of the CUDA execution model for fused_attn's kernels.
//
// A launch runs every block of the grid; the threads of one block run as
// cooperative fibers on one OS thread (blocks are spread over a few OS worker
// threads). A fiber runs until it reaches a synchronisation point:
//   * __syncthreads(): waits until every live thread of the block arrived;
//   * a warp collective (shuffle, mma.sync, ldmatrix): waits until every lane
//     named in its mask executed the same collective with the same mask; the
//     last lane to arrive computes the result of every lane.
// A lane named in a mask that exits, or a block whose threads all wait on each
// other, is reported as a deadlock. Errors (bounds violations, misuse of a
// primitive) carry the kernel name, block and thread, and abort the launch
// with a std::runtime_error.
//
// Only csrc/cuda/primitives.cuh includes this header (under FUSED_ATTN_EMULATE).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace fa_emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
  Dim3() = default;
  Dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ---- what a running thread can ask about itself --------------------------------
const Dim3& thread_idx();
const Dim3& block_idx();
const Dim3& block_dim();
const Dim3& grid_dim();
char* dynamic_smem();
std::size_t dynamic_smem_bytes();

// Throws the launch-aborting error, prefixed with kernel / block / thread.
[[noreturn]] void fail(const std::string& what);

// ---- synchronisation ------------------------------------------------------------
void syncthreads();

// One lane's contribution to a warp collective, and what it gets back.
struct LaneIn {
  uint32_t w[12];
  const void* p;
  int32_t arg;
};
struct LaneOut {
  uint32_t w[4];
};
// Computes out[l] for every lane l in mask from in[] (indexed by lane).
using CombineFn = void (*)(const LaneIn* in, LaneOut* out, unsigned mask);
LaneOut warp_collective(const char* op, CombineFn fn, unsigned mask, const LaneIn& in);
void syncwarp(unsigned mask);
int lane_id();

// ---- cp.async: copies complete (land in shared memory) at wait_group ------------
void cp_async(void* smem_dst, const void* gmem_src, int cp_size, int src_size);
void cp_async_commit();
void cp_async_wait(int n);

// ---- launching -------------------------------------------------------------------
struct LaunchStats {
  double seconds = 0;
  uint64_t blocks = 0, threads = 0, switches = 0;
};
// Runs body() once per thread of every block. Throws std::runtime_error on a
// kernel error. Worker OS threads: FUSED_ATTN_EMU_THREADS (default: up to 4).
LaunchStats launch(const char* kernel_name, Dim3 grid, Dim3 block, std::size_t smem_bytes,
                   const std::function<void()>& body);

}  // namespace fa_emu
