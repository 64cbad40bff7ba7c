// CPU emulation of the CUDA execution model for fused_attn's kernels.
//
// A launch runs every block of the grid; the threads of one block run as
// cooperative fibers on one OS thread (blocks are spread over a few OS worker
// threads). A fiber runs until it reaches a synchronisation point:
//   * __syncthreads(): waits until every live thread of the block arrived;
//   * a warp collective (shuffle, mma.sync, ldmatrix, __syncwarp): waits until
//     every lane named in its mask executed the same collective with the same
//     mask; the last lane to arrive computes the result of every lane.
// A lane named in a mask that exits, or a block whose threads all wait on each
// other, is reported as a deadlock. Errors (bounds violations, races, misuse of
// a primitive) carry the kernel name, block and thread(s), and abort the launch
// with a std::runtime_error.
//
// Shared memory is tracked per byte, so that a race is reported whatever order
// the fibers happen to run in (the schedule above is lock-step and would hide most):
//   * Every shared access goes through a primitive (smem_load / smem_store,
//     ldmatrix, cp.async in cuda/primitives.cuh) and is bounds-checked against the
//     block's dynamic shared memory and aligned to its size. The address the
//     kernel sees (dynamic_smem()) lies in a PROT_NONE region: a raw dereference
//     that bypasses the primitives faults (SIGSEGV, with a message naming the
//     kernel and the shared byte offset) instead of going unseen.
//   * Per byte: the last writer (thread), the barrier epoch of that write (the
//     number of __syncthreads() the block has passed), up to two readers of the
//     current epoch (plus "more"), and the thread of a cp.async still in flight.
//   * Two accesses by different threads in the same epoch, at least one a write,
//     are a race unless warp-ordered (below): read-after-write, write-after-read,
//     write-after-write. A byte read by three or more threads in the epoch counts
//     as read by a thread that no later writer is ordered with (conservative).
//   * cp.async: its destination is "in flight" from the issue until the issuing
//     thread's cp.async.wait_group covers the copy; any access to it meanwhile, by
//     any thread (the issuer too), is a race. The issue is checked as a write
//     (WAR / WAW against the epoch's earlier accesses); the bytes count as written
//     by the issuer at its wait, so other threads may read them only after a
//     later __syncthreads() (PTX ISA: cp.async writes are weak writes of the
//     issuing thread, made visible to it by cp.async.wait_group).
//   * Warp-level ordering: only __syncwarp(mask) (bar.warp.sync) orders memory
//     between lanes; it orders every access a participating lane made before it
//     with every access a participating lane makes after it (transitively, through
//     chains of __syncwarp: a vector clock per lane). Shuffles, ldmatrix and
//     mma.sync synchronise execution but, as the CUDA programming guide says of
//     warp intrinsics other than __syncwarp, imply no memory ordering: accesses
//     separated only by them are treated as unordered.
//   * ldmatrix's reads are attributed to the lane that supplied the row address.
//   * A thread that exits with cp.async copies in flight is an error.
// The error names the kernel, the block, the hazard, the shared byte offset, and
// both threads with the operation each one did.
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

// ---- shared memory: bounds and race tracking (see the header comment) --------------
enum class SmemOp : uint8_t { Load, Store, CpAsync, Ldmatrix };
// Checks and records an access of `bytes` bytes at shared address p (as the kernel
// sees it) by the calling thread; returns where those bytes live in the emulator.
char* smem_access(const void* p, std::size_t bytes, SmemOp op);
// The same for an access that lane `lane` of the calling thread's warp makes inside a
// warp collective (the row of an ldmatrix).
char* smem_lane_access(int lane, const void* p, std::size_t bytes, SmemOp op);

// ---- cp.async: copies complete (land in shared memory) at wait_group ------------
void cp_async(void* smem_dst, const void* gmem_src, int cp_size, int src_size);
void cp_async_commit();
void cp_async_wait(int n);

// ---- launching -------------------------------------------------------------------
struct LaunchStats {
  double seconds = 0;
  uint64_t blocks = 0, threads = 0, switches = 0;
  std::string kernels;  // the kernel's name (";"-joined where stats of several launches are summed)
};
// Runs body() once per thread of every block. Throws std::runtime_error on a
// kernel error. Worker OS threads: FUSED_ATTN_EMU_THREADS (default: up to 4).
LaunchStats launch(const char* kernel_name, Dim3 grid, Dim3 block, std::size_t smem_bytes,
                   const std::function<void()>& body);

}  // namespace fa_emu
