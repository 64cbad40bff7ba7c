// The CPU emulator's scheduler: blocks of fibers, barriers, warp collectives,
// deferred cp.async, and the shared-memory tracker. See runtime.h for the model.
#include "emu/runtime.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

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
constexpr std::size_t kPageBytes = 4096;
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

constexpr int16_t kNoThread = -1;

// What the tracker knows about one byte of shared memory (runtime.h explains the rules).
struct Shadow {
  uint32_t w_epoch = 0;    // barrier epoch of the last write (0: never written in this block)
  uint32_t r_epoch = 0;    // barrier epoch of the readers below
  uint32_t w_sc = 0;       // the writer's __syncwarp count at the write
  uint32_t r_sc[2] = {0, 0};
  int16_t writer = kNoThread;
  int16_t pending = kNoThread;  // the thread whose cp.async to this byte is in flight
  int16_t reader[2] = {kNoThread, kNoThread};
  SmemOp w_op = SmemOp::Store;
  SmemOp r_op[2] = {SmemOp::Load, SmemOp::Load};
  bool more_readers = false;  // a third distinct reader in r_epoch
};

const char* op_name(SmemOp op) {
  switch (op) {
    case SmemOp::Load: return "shared load";
    case SmemOp::Store: return "shared store";
    case SmemOp::CpAsync: return "cp.async";
    case SmemOp::Ldmatrix: return "ldmatrix";
  }
  return "?";
}

struct Thread {
  Dim3 tid;
  int linear = 0, lane = 0, warp = 0;
  St st = St::Runnable;
  uint32_t sc = 0;               // __syncwarp()s this thread took part in
  uint32_t vc[kWarpSize] = {};   // vc[j]: the latest __syncwarp count of lane j ordered before this thread
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
  char* smem = nullptr;          // where shared memory lives
  std::vector<char> smem_store;
  char* view = nullptr;          // the address the kernel sees: PROT_NONE, translated by the primitives
  std::size_t view_bytes = 0;
  std::vector<Shadow> shadow;    // one per byte of shared memory
  uint32_t epoch = 1;            // 1 + the __syncthreads() this block passed
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
    if (view) munmap(view, view_bytes);
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
  ++w.epoch;
}

void set_error(Worker& w, const std::string& msg) {
  if (!w.failed) {
    w.failed = true;
    w.error = msg;
  }
}

// A thread finished (or failed). Never throws: errors are recorded on the worker.
void thread_exit(Worker& w, Thread& t) {
  std::size_t in_flight = t.uncommitted.size();
  for (const auto& g : t.groups) in_flight += g.size();
  if (in_flight)
    set_error(w, where(w, &t) + "exited with " + std::to_string(in_flight) +
                     " cp.async copies in flight (cp.async.wait_group 0 must cover every copy before the thread exits)");
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
    t.sc = 0;
    std::fill(std::begin(t.vc), std::end(t.vc), 0u);
    start_fiber(w, t);
  }
  std::memset(w.smem, kUninitSmemByte, w.smem_bytes);
  std::fill(w.shadow.begin(), w.shadow.end(), Shadow{});
  w.epoch = 1;
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
  w.smem_store.assign(smem_bytes + 128, 0);
  auto base = reinterpret_cast<uintptr_t>(w.smem_store.data());
  w.smem = reinterpret_cast<char*>((base + 127) & ~uintptr_t(127));
  w.shadow.assign(smem_bytes, Shadow{});
  // One PROT_NONE page past the end too, so that a raw access just past shared memory faults.
  w.view_bytes = (smem_bytes + kPageBytes - 1) / kPageBytes * kPageBytes + kPageBytes;
  void* v = mmap(nullptr, w.view_bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (v == MAP_FAILED) throw std::runtime_error("fused_attn emulator: cannot map the shared-memory address range");
  w.view = static_cast<char*>(v);
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

// ---- the shared-memory tracker ----------------------------------------------------------
std::string who(const Worker& w, int linear) {
  const Thread& t = w.threads[static_cast<std::size_t>(linear)];
  return "thread " + dim_str(t.tid) + " (warp " + std::to_string(t.warp) + " lane " + std::to_string(t.lane) + ")";
}

// Whether an access by thread a, made when a's __syncwarp count was a_sc, is ordered
// before the calling thread b's access by a chain of __syncwarp()s (same warp only).
bool warp_ordered(const Worker& w, int a, uint32_t a_sc, int b) {
  const Thread& ta = w.threads[static_cast<std::size_t>(a)];
  const Thread& tb = w.threads[static_cast<std::size_t>(b)];
  return ta.warp == tb.warp && tb.vc[ta.lane] > a_sc;
}

[[noreturn]] void race(const Worker& w, const char* hazard, std::size_t off, int cur, SmemOp cur_op, bool cur_writes,
                       int prev, SmemOp prev_op, const std::string& prev_did) {
  std::string s = where(w, nullptr) + "shared-memory race (" + hazard + ") at shared byte offset " + std::to_string(off) +
                  ": " + who(w, cur) + (cur_writes ? " writes it (" : " reads it (") + op_name(cur_op) + ") ";
  if (prev_did.empty()) {
    s += "while the cp.async of " + who(w, prev) +
         " to it is in flight (issued, not yet covered by that thread's cp.async.wait_group)";
  } else {
    s += "after " + who(w, prev) + " " + prev_did + " it (" + op_name(prev_op) + ") with no __syncthreads() in between";
    if (w.threads[static_cast<std::size_t>(cur)].warp == w.threads[static_cast<std::size_t>(prev)].warp)
      s += " and no __syncwarp() of both lanes";
  }
  throw KernelError{s};
}

enum class Track { Read, Write, Issue };

// Checks bytes [off, off + n) for an access by thread `tid` and records it.
void track(Worker& w, int tid, std::size_t off, std::size_t n, SmemOp op, Track how) {
  const uint32_t E = w.epoch;
  const uint32_t sc = w.threads[static_cast<std::size_t>(tid)].sc;
  const bool writes = how != Track::Read;
  for (std::size_t i = off; i < off + n; ++i) {
    Shadow& s = w.shadow[i];
    if (s.pending != kNoThread) race(w, "cp.async in flight", i, tid, op, writes, s.pending, SmemOp::CpAsync, "");
    if (s.writer != kNoThread && s.writer != tid && s.w_epoch == E && !warp_ordered(w, s.writer, s.w_sc, tid))
      race(w, writes ? "write-after-write" : "read-after-write", i, tid, op, writes, s.writer, s.w_op, "wrote");
    if (!writes) {
      if (s.r_epoch != E) {
        s.r_epoch = E;
        s.reader[0] = static_cast<int16_t>(tid);
        s.r_sc[0] = sc;
        s.r_op[0] = op;
        s.reader[1] = kNoThread;
        s.more_readers = false;
      } else if (s.reader[0] == tid || s.reader[1] == kNoThread || s.reader[1] == tid) {
        const int k = s.reader[0] == tid ? 0 : 1;
        s.reader[k] = static_cast<int16_t>(tid);
        s.r_sc[k] = sc;
        s.r_op[k] = op;
      } else {
        s.more_readers = true;
      }
      continue;
    }
    if (s.r_epoch == E) {
      for (int k = 0; k < 2; ++k) {
        const int r = s.reader[k];
        if (r != kNoThread && r != tid && (s.more_readers || !warp_ordered(w, r, s.r_sc[k], tid)))
          race(w, "write-after-read", i, tid, op, true, r, s.r_op[k], s.more_readers ? "and other threads read" : "read");
      }
    }
    s.r_epoch = 0;
    s.reader[0] = s.reader[1] = kNoThread;
    s.more_readers = false;
    if (how == Track::Issue) {
      s.pending = static_cast<int16_t>(tid);
    } else {
      s.writer = static_cast<int16_t>(tid);
      s.w_epoch = E;
      s.w_sc = sc;
      s.w_op = op;
    }
  }
}

// The bytes of a cp.async land: written by the issuing thread now (at its wait_group).
void land(Worker& w, int tid, std::size_t off, std::size_t n) {
  const uint32_t sc = w.threads[static_cast<std::size_t>(tid)].sc;
  for (std::size_t i = off; i < off + n; ++i) {
    Shadow& s = w.shadow[i];
    s.pending = kNoThread;
    s.writer = static_cast<int16_t>(tid);
    s.w_epoch = w.epoch;
    s.w_sc = sc;
    s.w_op = SmemOp::CpAsync;
  }
}

// Shared byte offset of an access of n bytes at p, after the bounds and alignment checks.
std::size_t smem_offset(const Worker& w, const Thread& t, const void* p, std::size_t n, SmemOp op, bool writes) {
  const char* a = static_cast<const char*>(p);
  const auto off = static_cast<std::ptrdiff_t>(a - w.view);
  const std::string what = std::string(op_name(op)) + (op == SmemOp::Load || op == SmemOp::Store ? "" : writes ? " write" : " read");
  if (a < w.view || off + static_cast<std::ptrdiff_t>(n) > static_cast<std::ptrdiff_t>(w.smem_bytes))
    throw KernelError{where(w, &t) + "out-of-bounds " + what + " of " + std::to_string(n) + " bytes at shared byte offset " +
                      std::to_string(off) + " (the block has " + std::to_string(w.smem_bytes) +
                      " bytes of dynamic shared memory)"};
  if (reinterpret_cast<uintptr_t>(a) % n)
    throw KernelError{where(w, &t) + "misaligned " + what + " of " + std::to_string(n) + " bytes at shared byte offset " +
                      std::to_string(off) + " (must be a multiple of " + std::to_string(n) + ")"};
  return static_cast<std::size_t>(off);
}

// Warp lanes of a completed __syncwarp(mask): each participant now knows everything any
// participant knew (vector-clock join), so their accesses before and after are ordered.
void warp_sync_clocks(Worker& w, int warp, unsigned mask) {
  uint32_t joined[kWarpSize] = {};
  Thread* lanes = &w.threads[static_cast<std::size_t>(warp) * kWarpSize];
  for (int l = 0; l < kWarpSize; ++l)
    if ((mask >> l) & 1) ++lanes[l].sc;
  for (int l = 0; l < kWarpSize; ++l) {
    if (!((mask >> l) & 1)) continue;
    for (int j = 0; j < kWarpSize; ++j) joined[j] = std::max(joined[j], lanes[l].vc[j]);
    joined[l] = std::max(joined[l], lanes[l].sc);
  }
  for (int l = 0; l < kWarpSize; ++l)
    if ((mask >> l) & 1) std::copy(std::begin(joined), std::end(joined), std::begin(lanes[l].vc));
}

// A raw dereference of the shared-memory address range (one that bypassed the primitives):
// say so, then let the previous handler see the fault when the access repeats.
struct sigaction g_previous_segv;
void on_segv(int, siginfo_t* si, void*) {
  const Worker* w = tw;
  const char* a = static_cast<const char*>(si->si_addr);
  if (w && w->view && a >= w->view && a < w->view + w->view_bytes && w->cur) {
    char buf[640];
    const int len = std::snprintf(
        buf, sizeof buf,
        "fused_attn emulator: kernel '%s' block (%u,%u,%u) thread (%u,%u,%u): raw dereference of shared memory at byte "
        "offset %ld: kernels must access shared memory through fa::smem_load / fa::smem_store / ldmatrix / cp.async "
        "(cuda/primitives.cuh) so that the emulator can check it\n",
        w->kernel, w->bidx.x, w->bidx.y, w->bidx.z, w->cur->tid.x, w->cur->tid.y, w->cur->tid.z, static_cast<long>(a - w->view));
    if (len > 0) (void)!write(2, buf, static_cast<std::size_t>(std::min<int>(len, sizeof buf - 1)));
  }
  sigaction(SIGSEGV, &g_previous_segv, nullptr);
}

void install_segv_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_previous_segv);
  });
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
char* dynamic_smem() { return worker().view; }
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

namespace {
void combine_syncwarp(const LaneIn*, LaneOut*, unsigned) {}
}  // namespace

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
    if (fn == combine_syncwarp) warp_sync_clocks(w, t.warp, mask);
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

void syncwarp(unsigned mask) { warp_collective("__syncwarp", combine_syncwarp, mask, LaneIn{}); }

// ---- shared-memory accesses ------------------------------------------------------------------
char* smem_access(const void* p, std::size_t bytes, SmemOp op) {
  Worker& w = worker();
  Thread& t = *w.cur;
  const bool writes = op == SmemOp::Store;
  const std::size_t off = smem_offset(w, t, p, bytes, op, writes);
  track(w, t.linear, off, bytes, op, writes ? Track::Write : Track::Read);
  return w.smem + off;
}

char* smem_lane_access(int lane, const void* p, std::size_t bytes, SmemOp op) {
  Worker& w = worker();
  const int linear = w.cur->warp * kWarpSize + lane;
  if (lane < 0 || lane >= kWarpSize || linear >= static_cast<int>(w.threads.size()))
    fail(std::string(op_name(op)) + ": lane " + std::to_string(lane) + " is not in this warp");
  const Thread& t = w.threads[static_cast<std::size_t>(linear)];
  const std::size_t off = smem_offset(w, t, p, bytes, op, false);
  track(w, linear, off, bytes, op, Track::Read);
  return w.smem + off;
}

// ---- cp.async ----------------------------------------------------------------------------
void cp_async(void* smem_dst, const void* gmem_src, int cp_size, int src_size) {
  Worker& w = worker();
  Thread& t = *w.cur;
  if (cp_size != 4 && cp_size != 8 && cp_size != 16) fail("cp.async: cp-size must be 4, 8 or 16, got " + std::to_string(cp_size));
  if (src_size < 0 || src_size > cp_size)
    fail("cp.async: src-size " + std::to_string(src_size) + " must be in [0, cp-size = " + std::to_string(cp_size) + "]");
  auto* dst = static_cast<char*>(smem_dst);
  if (dst < w.view || dst + cp_size > w.view + w.smem_bytes)
    fail("cp.async: shared destination at byte offset " + std::to_string(dst - w.view) + " (+" + std::to_string(cp_size) +
         ") is outside the " + std::to_string(w.smem_bytes) + "-byte dynamic shared memory");
  if (reinterpret_cast<uintptr_t>(dst) % cp_size || reinterpret_cast<uintptr_t>(gmem_src) % cp_size)
    fail("cp.async: source and destination must be aligned to cp-size " + std::to_string(cp_size));
  track(w, t.linear, static_cast<std::size_t>(dst - w.view), static_cast<std::size_t>(cp_size), SmemOp::CpAsync, Track::Issue);
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
  Worker& w = worker();
  Thread& t = *w.cur;
  if (n < 0) fail("cp.async.wait_group: N must be >= 0");
  while (t.groups.size() > static_cast<std::size_t>(n)) {
    for (const Pending& p : t.groups.front()) {
      const auto off = static_cast<std::size_t>(p.dst - w.view);
      std::memcpy(w.smem + off, p.data, static_cast<std::size_t>(p.size));
      land(w, t.linear, off, static_cast<std::size_t>(p.size));
    }
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
  install_segv_handler();
  LaunchStats stats;
  stats.kernels = kernel_name;
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
