// The CPU emulator's scheduler: blocks of fibers, barriers, warp collectives,
// deferred cp.async. See runtime.h for the model.
#include "emu/runtime.h"

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <vector>

#if defined(__x86_64__) && defined(__linux__)
#define FA_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

namespace fa_emu {
namespace {

constexpr std::size_t kStackBytes = 256 * 1024;  // per emulated thread (fiber)
constexpr std::size_t kGuardBytes = 4096;         // PROT_NONE page below each stack
constexpr std::size_t kRedzoneBytes = 128;        // checked canary after dynamic smem
constexpr unsigned char kRedzoneByte = 0xA5;
constexpr unsigned char kUninitSmemByte = 0xFF;   // a NaN in f16, bf16 and f32
constexpr int kWarpSize = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr std::size_t kMaxSmemBytes = 227 * 1024;  // sm_90's per-block opt-in limit

struct KernelError {
  std::string msg;
};

}  // namespace
}  // namespace fa_emu

#ifdef FA_EMU_ASM_SWITCH
// Saves the callee-saved registers of System V x86-64 on the current stack,
// stores the stack pointer to *save_sp, and resumes the stack at new_sp.
extern "C" __attribute__((visibility("hidden"))) void fa_emu_switch(void** save_sp, void* new_sp);
asm(R"(
  .text
  .p2align 4
  .globl fa_emu_switch
  .hidden fa_emu_switch
  .type fa_emu_switch,@function
fa_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fa_emu_switch, .-fa_emu_switch
)");
#endif

extern "C" void fa_emu_fiber_entry();

namespace fa_emu {
namespace {

enum class St : uint8_t { Runnable, Barrier, Collective, Done };

struct Pending {
  char* dst;
  int size;
  uint8_t data[16];
};

struct Thread {
  Dim3 tid;
  int linear = 0, lane = 0, warp = 0;
  St st = St::Runnable;
  char* stack_lo = nullptr;  // usable stack [stack_lo, stack_lo + kStackBytes)
#ifdef FA_EMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  std::vector<Pending> uncommitted;
  std::deque<std::vector<Pending>> groups;
};

struct Warp {
  LaneIn in[kWarpSize];
  LaneOut out[kWarpSize];
  unsigned mask_of[kWarpSize];
  CombineFn fn_of[kWarpSize];
  const char* op_of[kWarpSize];
  unsigned waiting = 0, present = 0, exited = 0;
};

struct Worker {
  const char* kernel = "";
  const std::function<void()>* body = nullptr;
  Dim3 grid, block, bidx;
  std::size_t smem_bytes = 0;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  char* smem = nullptr;
  std::vector<char> smem_store;
  char* stacks = nullptr;
  std::size_t stacks_bytes = 0;
#ifdef FA_EMU_ASM_SWITCH
  void* sched_sp = nullptr;
#else
  ucontext_t sched_ctx;
#endif
  Thread* cur = nullptr;
  int live = 0, at_barrier = 0;
  bool failed = false;
  std::string error;
  uint64_t switches = 0;

  ~Worker() {
    if (stacks) munmap(stacks, stacks_bytes);
  }
};

thread_local Worker* tw = nullptr;

std::string dim_str(const Dim3& d) {
  std::ostringstream s;
  s << "(" << d.x << "," << d.y << "," << d.z << ")";
  return s.str();
}

std::string where(const Worker& w, const Thread* t) {
  std::string s = "fused_attn emulator: kernel '" + std::string(w.kernel) + "' block " + dim_str(w.bidx);
  if (t) s += " thread " + dim_str(t->tid);
  return s + ": ";
}

std::string hex(unsigned m) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", m);
  return b;
}

Worker& worker() {
  if (!tw || !tw->cur) throw std::runtime_error("fused_attn emulator: a device primitive was called outside a kernel launch");
  return *tw;
}

void resume(Worker& w, Thread& t) {
  w.cur = &t;
  ++w.switches;
#ifdef FA_EMU_ASM_SWITCH
  fa_emu_switch(&w.sched_sp, t.sp);
#else
  swapcontext(&w.sched_ctx, &t.ctx);
#endif
  w.cur = nullptr;
}

void yield(Worker& w, Thread& t) {
#ifdef FA_EMU_ASM_SWITCH
  fa_emu_switch(&t.sp, w.sched_sp);
#else
  swapcontext(&t.ctx, &w.sched_ctx);
#endif
}

void start_fiber(Worker& w, Thread& t) {
#ifdef FA_EMU_ASM_SWITCH
  // Layout popped by fa_emu_switch: r15 r14 r13 r12 rbx rbp, then the return
  // address (the entry function), then a dummy slot so that the entry sees
  // rsp % 16 == 8 like any called function.
  auto top = reinterpret_cast<uintptr_t>(t.stack_lo + kStackBytes) & ~uintptr_t(15);
  auto* s = reinterpret_cast<void**>(top);
  s[-1] = nullptr;
  s[-2] = reinterpret_cast<void*>(&fa_emu_fiber_entry);
  for (int i = 3; i <= 8; ++i) s[-i] = nullptr;
  t.sp = &s[-8];
#else
  getcontext(&t.ctx);
  t.ctx.uc_stack.ss_sp = t.stack_lo;
  t.ctx.uc_stack.ss_size = kStackBytes;
  t.ctx.uc_link = nullptr;
  makecontext(&t.ctx, fa_emu_fiber_entry, 0);
#endif
  (void)w;
}

void release_barrier(Worker& w) {
  for (auto& t : w.threads)
    if (t.st == St::Barrier) t.st = St::Runnable;
  w.at_barrier = 0;
}

void set_error(Worker& w, const std::string& msg) {
  if (!w.failed) {
    w.failed = true;
    w.error = msg;
  }
}

// A thread finished (or failed). Never throws: errors are recorded on the worker.
void thread_exit(Worker& w, Thread& t) {
  t.st = St::Done;
  t.uncommitted.clear();
  t.groups.clear();
  --w.live;
  Warp& wp = w.warps[t.warp];
  wp.exited |= 1u << t.lane;
  for (int j = 0; j < kWarpSize; ++j) {
    if (((wp.waiting >> j) & 1) && ((wp.mask_of[j] >> t.lane) & 1)) {
      set_error(w, where(w, &t) + "exited while lane " + std::to_string(j) + " of its warp waits in '" +
                       wp.op_of[j] + "' with mask " + hex(wp.mask_of[j]) +
                       " that names it (every lane named in the mask must execute the collective)");
      return;
    }
  }
  if (w.at_barrier > 0 && w.at_barrier == w.live) release_barrier(w);
}

std::string describe_deadlock(const Worker& w) {
  std::ostringstream s;
  s << where(w, nullptr) << "deadlock: no thread can run.";
  int at_bar = 0;
  for (auto& t : w.threads) at_bar += t.st == St::Barrier;
  if (at_bar) s << " " << at_bar << " of " << w.live << " live threads wait at __syncthreads();";
  for (std::size_t wi = 0; wi < w.warps.size(); ++wi) {
    const Warp& wp = w.warps[wi];
    for (int j = 0; j < kWarpSize; ++j) {
      if (!((wp.waiting >> j) & 1)) continue;
      unsigned missing = wp.mask_of[j] & ~wp.waiting;
      s << " warp " << wi << " lane " << j << " waits in '" << wp.op_of[j] << "' with mask "
        << hex(wp.mask_of[j]) << " for lanes " << hex(missing) << ";";
      break;
    }
  }
  return s.str();
}

void run_block(Worker& w, Dim3 bidx) {
  w.bidx = bidx;
  w.live = static_cast<int>(w.threads.size());
  w.at_barrier = 0;
  for (auto& wp : w.warps) {
    wp.waiting = 0;
    wp.exited = 0;
  }
  for (auto& t : w.threads) {
    t.st = St::Runnable;
    t.uncommitted.clear();
    t.groups.clear();
    start_fiber(w, t);
  }
  std::memset(w.smem, kUninitSmemByte, w.smem_bytes);
  std::memset(w.smem + w.smem_bytes, kRedzoneByte, kRedzoneBytes);
  for (;;) {
    bool progress = false;
    for (auto& t : w.threads) {
      if (t.st != St::Runnable) continue;
      resume(w, t);
      progress = true;
      if (w.failed) return;
    }
    if (w.live == 0) break;
    if (!progress) {
      set_error(w, describe_deadlock(w));
      return;
    }
  }
  for (std::size_t i = 0; i < kRedzoneBytes; ++i) {
    if (static_cast<unsigned char>(w.smem[w.smem_bytes + i]) != kRedzoneByte) {
      set_error(w, where(w, nullptr) + "shared memory written past the end of the " + std::to_string(w.smem_bytes) +
                       "-byte dynamic allocation (at byte " + std::to_string(w.smem_bytes + i) + ")");
      return;
    }
  }
}

void setup_worker(Worker& w, const char* name, Dim3 grid, Dim3 block, std::size_t smem_bytes,
                  const std::function<void()>& body) {
  w.kernel = name;
  w.body = &body;
  w.grid = grid;
  w.block = block;
  w.smem_bytes = smem_bytes;
  unsigned n = block.x * block.y * block.z;
  w.threads.resize(n);
  unsigned nwarps = (n + kWarpSize - 1) / kWarpSize;
  w.warps.assign(nwarps, Warp{});
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = w.threads[i];
    t.linear = static_cast<int>(i);
    t.tid = Dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
    t.lane = static_cast<int>(i % kWarpSize);
    t.warp = static_cast<int>(i / kWarpSize);
    w.warps[t.warp].present |= 1u << t.lane;
  }
  w.smem_store.assign(smem_bytes + kRedzoneBytes + 256, 0);
  auto base = reinterpret_cast<uintptr_t>(w.smem_store.data());
  w.smem = reinterpret_cast<char*>((base + 127) & ~uintptr_t(127));
  std::size_t per = kStackBytes + kGuardBytes;
  w.stacks_bytes = per * n;
  void* m = mmap(nullptr, w.stacks_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) throw std::runtime_error("fused_attn emulator: cannot map fiber stacks");
  w.stacks = static_cast<char*>(m);
  for (unsigned i = 0; i < n; ++i) {
    char* lo = w.stacks + i * per;
    mprotect(lo, kGuardBytes, PROT_NONE);
    w.threads[i].stack_lo = lo + kGuardBytes;
  }
}

int worker_count(uint64_t nblocks) {
  int n = 0;
  if (const char* e = std::getenv("FUSED_ATTN_EMU_THREADS")) n = std::atoi(e);
  if (n <= 0) n = static_cast<int>(std::min(4u, std::max(1u, std::thread::hardware_concurrency())));
  return static_cast<int>(std::min<uint64_t>(static_cast<uint64_t>(n), nblocks));
}

}  // namespace

// ---- thread queries ----------------------------------------------------------------
const Dim3& thread_idx() { return worker().cur->tid; }
const Dim3& block_idx() { return worker().bidx; }
const Dim3& block_dim() { return worker().block; }
const Dim3& grid_dim() { return worker().grid; }
char* dynamic_smem() { return worker().smem; }
std::size_t dynamic_smem_bytes() { return worker().smem_bytes; }
int lane_id() { return worker().cur->lane; }

void fail(const std::string& what) {
  if (!tw || !tw->cur) throw std::runtime_error("fused_attn emulator: " + what);
  throw KernelError{where(*tw, tw->cur) + what};
}

// ---- synchronisation -------------------------------------------------------------------
void syncthreads() {
  Worker& w = worker();
  Thread& t = *w.cur;
  t.st = St::Barrier;
  if (++w.at_barrier == w.live) {
    release_barrier(w);
    return;
  }
  yield(w, t);
}

LaneOut warp_collective(const char* op, CombineFn fn, unsigned mask, const LaneIn& in) {
  Worker& w = worker();
  Thread& t = *w.cur;
  Warp& wp = w.warps[t.warp];
  const int l = t.lane;
  if (!((mask >> l) & 1)) fail(std::string(op) + ": mask " + hex(mask) + " does not name the calling lane " + std::to_string(l));
  if (unsigned absent = mask & ~wp.present)
    fail(std::string(op) + ": mask " + hex(mask) + " names lanes " + hex(absent) + " that this block does not have");
  if (unsigned gone = mask & wp.exited)
    fail(std::string(op) + ": mask " + hex(mask) + " names lanes " + hex(gone) +
         " that have exited (every lane named in the mask must execute the collective)");
  for (int j = 0; j < kWarpSize; ++j) {
    if (!((wp.waiting >> j) & 1)) continue;
    bool j_in_mine = (mask >> j) & 1, me_in_js = (wp.mask_of[j] >> l) & 1;
    if ((j_in_mine || me_in_js) && (wp.mask_of[j] != mask || wp.fn_of[j] != fn))
      fail(std::string(op) + " with mask " + hex(mask) + " meets lane " + std::to_string(j) + " waiting in '" +
           wp.op_of[j] + "' with mask " + hex(wp.mask_of[j]) + " (lanes must execute the same collective with the same mask)");
  }
  wp.in[l] = in;
  wp.mask_of[l] = mask;
  wp.fn_of[l] = fn;
  wp.op_of[l] = op;
  wp.waiting |= 1u << l;
  if ((wp.waiting & mask) == mask) {
    fn(wp.in, wp.out, mask);
    wp.waiting &= ~mask;
    const int base = t.warp * kWarpSize;
    for (int j = 0; j < kWarpSize; ++j)
      if (j != l && ((mask >> j) & 1)) w.threads[base + j].st = St::Runnable;
    return wp.out[l];
  }
  t.st = St::Collective;
  yield(w, t);
  return wp.out[l];
}

namespace {
void combine_syncwarp(const LaneIn*, LaneOut*, unsigned) {}
}  // namespace

void syncwarp(unsigned mask) { warp_collective("__syncwarp", combine_syncwarp, mask, LaneIn{}); }

// ---- cp.async ----------------------------------------------------------------------------
void cp_async(void* smem_dst, const void* gmem_src, int cp_size, int src_size) {
  Worker& w = worker();
  Thread& t = *w.cur;
  if (cp_size != 4 && cp_size != 8 && cp_size != 16) fail("cp.async: cp-size must be 4, 8 or 16, got " + std::to_string(cp_size));
  if (src_size < 0 || src_size > cp_size)
    fail("cp.async: src-size " + std::to_string(src_size) + " must be in [0, cp-size = " + std::to_string(cp_size) + "]");
  auto* dst = static_cast<char*>(smem_dst);
  if (dst < w.smem || dst + cp_size > w.smem + w.smem_bytes)
    fail("cp.async: shared destination at byte offset " + std::to_string(dst - w.smem) + " (+" + std::to_string(cp_size) +
         ") is outside the " + std::to_string(w.smem_bytes) + "-byte dynamic shared memory");
  if (reinterpret_cast<uintptr_t>(dst) % cp_size || reinterpret_cast<uintptr_t>(gmem_src) % cp_size)
    fail("cp.async: source and destination must be aligned to cp-size " + std::to_string(cp_size));
  Pending p;
  p.dst = dst;
  p.size = cp_size;
  std::memset(p.data, 0, sizeof p.data);
  if (src_size > 0) std::memcpy(p.data, gmem_src, static_cast<std::size_t>(src_size));
  t.uncommitted.push_back(p);
}

void cp_async_commit() {
  Thread& t = *worker().cur;
  t.groups.push_back(std::move(t.uncommitted));
  t.uncommitted.clear();
}

void cp_async_wait(int n) {
  Thread& t = *worker().cur;
  if (n < 0) fail("cp.async.wait_group: N must be >= 0");
  while (t.groups.size() > static_cast<std::size_t>(n)) {
    for (const Pending& p : t.groups.front()) std::memcpy(p.dst, p.data, static_cast<std::size_t>(p.size));
    t.groups.pop_front();
  }
}

// ---- launching -------------------------------------------------------------------------
LaunchStats launch(const char* kernel_name, Dim3 grid, Dim3 block, std::size_t smem_bytes,
                   const std::function<void()>& body) {
  auto t0 = std::chrono::steady_clock::now();
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  std::string pre = std::string("fused_attn emulator: launch of '") + kernel_name + "': ";
  if (nthreads == 0 || nthreads > kMaxThreadsPerBlock)
    throw std::runtime_error(pre + "block " + dim_str(block) + " must have 1..1024 threads");
  if (grid.y > 65535 || grid.z > 65535) throw std::runtime_error(pre + "grid " + dim_str(grid) + ": y and z must be <= 65535");
  if (smem_bytes > kMaxSmemBytes)
    throw std::runtime_error(pre + std::to_string(smem_bytes) + " bytes of dynamic shared memory exceed the " +
                             std::to_string(kMaxSmemBytes) + "-byte limit of any target GPU");
  LaunchStats stats;
  stats.blocks = nblocks;
  stats.threads = nblocks * nthreads;
  if (nblocks == 0) return stats;
  std::atomic<uint64_t> next{0}, switches{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::string error;
  auto work = [&] {
    Worker w;
    setup_worker(w, kernel_name, grid, block, smem_bytes, body);
    tw = &w;
    while (!failed.load()) {
      uint64_t i = next.fetch_add(1);
      if (i >= nblocks) break;
      Dim3 b(static_cast<unsigned>(i % grid.x), static_cast<unsigned>((i / grid.x) % grid.y),
             static_cast<unsigned>(i / (uint64_t(grid.x) * grid.y)));
      run_block(w, b);
      if (w.failed) {
        std::lock_guard<std::mutex> g(mu);
        if (!failed.exchange(true)) error = w.error;
      }
    }
    switches += w.switches;
    tw = nullptr;
  };
  int nw = worker_count(nblocks);
  if (nw <= 1) {
    work();
  } else {
    std::vector<std::thread> pool;
    for (int i = 0; i < nw; ++i) pool.emplace_back(work);
    for (auto& th : pool) th.join();
  }
  if (failed.load()) throw std::runtime_error(error);
  stats.switches = switches.load();
  stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return stats;
}

}  // namespace fa_emu

// The first frame of every fiber: runs the kernel body for the current thread,
// then hands control back to the scheduler for good.
extern "C" void fa_emu_fiber_entry() {
  using namespace fa_emu;
  Worker& w = *tw;
  Thread& t = *w.cur;
  try {
    (*w.body)();
    thread_exit(w, t);
  } catch (const KernelError& e) {
    set_error(w, e.msg);
  } catch (const std::exception& e) {
    set_error(w, where(w, &t) + e.what());
  } catch (...) {
    set_error(w, where(w, &t) + "unknown exception");
  }
  yield(w, t);
  std::abort();  // a finished fiber is never resumed
}
