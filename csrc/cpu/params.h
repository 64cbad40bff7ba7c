// The one parameter struct the CPU kernels take, by value.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fused_attn::cpu {

// Strides are in elements; every last (head) dim has unit stride.
struct AttnParams {
  // Inputs: q (B, Hq, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev), any strides.
  const void* q;
  const void* k;
  const void* v;
  int64_t q_sb, q_sh, q_sl;
  int64_t k_sb, k_sh, k_sl;
  int64_t v_sb, v_sh, v_sl;
  // Forward outputs / saved for backward, contiguous: out (B, Hq, L, Ev), lse (B, Hq, L)
  // (lse_t below: fp64 for fp32 and fp64 inputs, fp32 for bf16 / fp16).
  void* out;
  void* lse;
  // Backward only: dout (B, Hq, L, Ev) any strides; dq / dk / dv contiguous like q / k / v;
  // delta (B, Hq, L) in the acc dtype, rowsum(dO * O) - dlse, filled by the kernel.
  const void* dout;
  int64_t do_sb, do_sh, do_sl;
  const void* dlse;  // (B, Hq, L) contiguous in the lse dtype, or nullptr
  void* dq;
  void* dk;
  void* dv;
  int64_t B, Hq, Hk, L, S, E, Ev;
  double scale;
  bool causal;
  int64_t offset;  // causal: query i sees key j iff j <= i + offset
};

// The saved lse's type: fp64 for fp32 inputs too, so that the backward's P is exact at a
// row's largest score (bwd_kernel.h); fp32 for 16-bit inputs, whose P is rounded anyway.
template <typename scalar_t, typename acc_t>
using lse_t = std::conditional_t<std::is_same_v<scalar_t, float>, double, acc_t>;

// Keys [j0, j0 + cols) that query row i may see: a prefix of length in [0, cols].
inline int64_t visible_keys(const AttnParams& p, int64_t i, int64_t j0, int64_t cols) {
  if (!p.causal) return cols;
  const int64_t n = i + p.offset - j0 + 1;
  return n < 0 ? 0 : (n > cols ? cols : n);
}

// Dynamic scheduling: at::parallel_for over one index per worker thread, each worker taking
// tasks from a shared counter until none are left (a static split leaves one core waiting
// for the other on a shared, noisy machine, and under causal masks). When nested inside
// another parallel region the single worker runs every task.
inline int64_t worker_count(int64_t n_tasks) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_tasks));
}

}  // namespace fused_attn::cpu
