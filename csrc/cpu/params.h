// The parameter structs the CPU kernels take, by value: the shared fields of
// common/attn_params.h (dims, strides, visibility, scale) and the CPU's own pointers.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/attn_params.h"

namespace fused_attn::cpu {

using Dims = fused_attn::Dims<int64_t>;
using KeyInterval = fused_attn::KeyInterval<int64_t>;

// Strides are in elements; every last (head) dim has unit stride. q, k, v, dout: any
// strides; out, lse, dq, dk, dv, dlse: contiguous (the binding checks it, and the kernels
// index them as such; their strides are filled all the same).
//
// Forward: q (batch, heads_q, len_q, head_dim), k (batch, heads_kv, len_k, head_dim),
// v (batch, heads_kv, len_k, head_dim_v) in; out (batch, heads_q, len_q, head_dim_v) and
// lse (batch, heads_q, len_q) out, lse in lse_t below.
struct AttnFwdParams : fused_attn::AttnFwdCommon<int64_t> {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  void* lse;
};

// Backward: the forward's inputs and outputs (out, lse) in, with dout (any strides) and
// dlse (the lse dtype, or nullptr: has_dlse); dq, dk, dv (and dmask) out.
struct AttnBwdParams : fused_attn::AttnBwdCommon<int64_t> {
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* lse;
  const void* dout;
  const void* dlse;
  void* dq;
  void* dk;
  void* dv;
  // The float mask's gradient dS (batch, heads_q, len_q, len_k), contiguous, acc_t, zero where no
  // tile writes it; nullptr: not asked for.
  void* dmask = nullptr;
};

// The saved lse's type: fp64 for fp32 inputs too, so that the backward's P is exact at a
// row's largest score (bwd_kernel.h); fp32 for 16-bit inputs, whose P is rounded anyway.
template <typename scalar_t, typename acc_t>
using lse_t = std::conditional_t<std::is_same_v<scalar_t, float>, double, acc_t>;

// How a tile of keys [j0, j0 + cols) looks to a block of query rows: no row sees any of
// its keys (skipped), every row sees all of them (the unmasked path), or the rows see
// intervals of it (the masked path).
enum class TileMask { NONE, FULL, PARTIAL };

// Row r's keys of the tile relative to j0, clamped to [0, cols]; empty as begin == end.
inline KeyInterval tile_interval(KeyInterval keys, int64_t j0, int64_t cols) {
  const int64_t b = std::clamp<int64_t>(keys.begin - j0, 0, cols);
  return {b, std::clamp<int64_t>(keys.end - j0, b, cols)};
}

inline TileMask classify_tile(const KeyInterval* iv, int64_t rows, int64_t cols) {
  bool any = false, all = true;
  for (int64_t r = 0; r < rows; ++r) {
    any |= iv[r].end > iv[r].begin;
    all &= iv[r].begin == 0 && iv[r].end == cols;
  }
  return all ? TileMask::FULL : any ? TileMask::PARTIAL : TileMask::NONE;
}

// iv[r] = the keys of [j0, j0 + cols) that query row i0 + r sees, relative to j0.
inline TileMask tile_intervals(const Visibility& vis, int64_t len_k, int64_t i0, int64_t rows, int64_t j0,
                               int64_t cols, KeyInterval* iv) {
  for (int64_t r = 0; r < rows; ++r) iv[r] = tile_interval(vis.keys<int64_t>(i0 + r, len_k), j0, cols);
  return classify_tile(iv, rows, cols);
}

// The keys query rows [i0, i0 + rows) see between them: [min begin, max end) of their
// intervals (empty as begin == end). Rows' intervals are assumed to overlap or touch
// (causal diagonals and sliding windows do): key tiles inside the range that no row sees are
// still found and skipped by tile_intervals.
inline KeyInterval block_keys(const Visibility& vis, int64_t len_k, int64_t i0, int64_t rows) {
  int64_t lo = len_k, hi = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const KeyInterval k = vis.keys<int64_t>(i0 + r, len_k);
    if (k.end <= k.begin) continue;
    lo = std::min(lo, k.begin);
    hi = std::max(hi, k.end);
  }
  return hi > lo ? KeyInterval{lo, hi} : KeyInterval{0, 0};
}

// The columns [0, kc) of keys [j0, j0 + cols) up to the last one query rows [i0, i0 + rows)
// see (the backward's tile width).
inline int64_t block_cols(const Visibility& vis, int64_t len_k, int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
  const KeyInterval keys = block_keys(vis, len_k, i0, rows);
  return keys.end > keys.begin ? std::clamp<int64_t>(keys.end - j0, 0, cols) : 0;
}

// The query rows [begin, end) from the first to the last that sees a key of [j0, j1)
// (empty as begin == end == len_q): a scan from either end.
struct RowRange {
  int64_t begin, end;
};
inline RowRange rows_seeing(const Visibility& vis, int64_t len_q, int64_t len_k, int64_t j0, int64_t j1) {
  const auto sees = [&](int64_t i) {
    const KeyInterval k = vis.keys<int64_t>(i, len_k);
    return k.end > k.begin && k.begin < j1 && k.end > j0;
  };
  int64_t first = 0, last = len_q;
  while (first < len_q && !sees(first)) ++first;
  if (first == len_q) return {len_q, len_q};
  while (!sees(last - 1)) --last;
  return {first, last};
}

// Dynamic scheduling: at::parallel_for over one index per worker thread, each worker taking
// tasks from a shared counter until none are left (a static split leaves one core waiting
// for the other on a shared, noisy machine, and under causal masks). When nested inside
// another parallel region the single worker runs every task.
inline int64_t worker_count(int64_t n_tasks) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_tasks));
}

}  // namespace fused_attn::cpu
