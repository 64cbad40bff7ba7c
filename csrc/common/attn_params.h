// The parameters every kernel family shares for one attention problem: the CPU kernels
// (csrc/cpu), the CUDA kernels (csrc/cuda) and their CPU emulator (csrc/emu). Each family's
// params struct derives from AttnFwdCommon (forward) or AttnBwdCommon (backward, which
// extends the forward's) and adds its own pointers (void*, GPtr<T>) and derived constants
// (e.g. the CUDA kernels' scale * log2 e). Mirrors fused_attn/spec.py (AttnSpec), whose
// fields the ops pass to the bindings; a feature added to the spec adds its field here.
//
// Plain C++ with host/device annotations: included by .cpp and .cu files alike.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FA_COMMON_FN __host__ __device__ __forceinline__
#else
#define FA_COMMON_FN inline
#endif

#include "dropout.h"

namespace fused_attn {

// Largest head dim (E and Ev) any kernel takes.
constexpr int kMaxHeadDim = 256;

// spec.CausalMode's values, as the ops pass them.
enum CausalMode : int { kCausalNone = 0, kCausalUpperLeft = 1, kCausalLowerRight = 2 };

FA_COMMON_FN bool valid_causal_mode(int64_t mode) { return mode >= kCausalNone && mode <= kCausalLowerRight; }

// The diagonal's offset: query i sees key j iff j <= i + offset (0 upper-left, S - L lower-right).
FA_COMMON_FN int64_t causal_offset(int64_t mode, int64_t len_q, int64_t len_k) {
  return mode == kCausalLowerRight ? len_k - len_q : 0;
}

// Element strides of one (B, H, rows, D) operand; its last (head) dim has unit stride.
struct Strides {
  int64_t batch, head, row;
};

// Sizes of the canonical problem: q (batch, heads_q, len_q, head_dim), k (batch, heads_kv, len_k,
// head_dim), v (batch, heads_kv, len_k, head_dim_v), out (batch, heads_q, len_q, head_dim_v).
// Index: int on the GPU (32-bit index arithmetic), int64_t on the CPU.
template <class Index>
struct Dims {
  Index batch, heads_q, heads_kv, len_q, len_k, head_dim, head_dim_v;
};

// The keys [begin, end) of [0, len_k) a query row sees (begin >= end: none).
template <class Index>
struct KeyInterval {
  Index begin, end;
  FA_COMMON_FN Index size() const { return end > begin ? end - begin : 0; }
};

// Which keys each query row sees, computed (never read from memory): the intersection of
// the causal diagonal (if causal), a sliding window (FlashAttention-2's: row i sees keys
// [i + window_offset - window_left, i + window_offset + window_right], window_offset = S - L;
// -1: unbounded on that side) and one batch entry's key bounds [key_begin, key_end) (a
// key-padding mask's, see AttnFwdCommon::visibility). Defaults: every key.
// Variable-length sequences packed into one problem (varlen_attention, batch 1): sequence s is
// query rows [cu_q[s], cu_q[s + 1]) against keys [cu_k[s], cu_k[s + 1]), its causal diagonal and
// window aligned within it (offsets from its own lengths); cu_q nullptr: one sequence.
struct Visibility {
  int causal;              // CausalMode
  int64_t causal_offset;   // see causal_offset(); 0 when not causal
  int64_t window_left = -1, window_right = -1, window_offset = 0;
  int64_t key_begin = 0, key_end = INT64_MAX;
  const int64_t* cu_q = nullptr;
  const int64_t* cu_k = nullptr;
  int64_t n_seq = 0;

  // Where query row i stands: its sequence (0 without varlen), its row in it, the sequence's first
  // key and key count, and its diagonals' offsets (causal, window: S - L of the sequence).
  struct Frame {
    int64_t seq, row, first, count, causal_offset, window_offset;
  };
  FA_COMMON_FN Frame frame(int64_t i, int64_t len_k) const {
    if (cu_q == nullptr) return {0, i, 0, len_k, causal_offset, window_offset};
    int64_t lo = 0, hi = n_seq;  // the sequence of row i: the last s with cu_q[s] <= i
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (cu_q[mid] <= i) lo = mid; else hi = mid;
    }
    const int64_t len_q_s = cu_q[lo + 1] - cu_q[lo], count = cu_k[lo + 1] - cu_k[lo];
    return {lo, i - cu_q[lo], cu_k[lo], count, causal == kCausalLowerRight ? count - len_q_s : 0, count - len_q_s};
  }

  // Keys [begin, end) of [0, len_k) that query row i sees (empty as end <= begin).
  template <class Index>
  FA_COMMON_FN KeyInterval<Index> keys(Index i, Index len_k) const {
    const Frame f = frame(static_cast<int64_t>(i), static_cast<int64_t>(len_k));
    const int64_t row = f.row, first = f.first, count = f.count, c_off = f.causal_offset, w_off = f.window_offset;
    // [b, e) relative to the sequence's first key
    int64_t b = key_begin - first, e = (key_end < static_cast<int64_t>(len_k) ? key_end : len_k) - first;
    if (e > count) e = count;
    if (causal != kCausalNone && row + c_off + 1 < e) e = row + c_off + 1;
    if (window_left >= 0 && row + w_off - window_left > b) b = row + w_off - window_left;
    if (window_right >= 0 && row + w_off + window_right + 1 < e) e = row + w_off + window_right + 1;
    if (b < 0) b = 0;
    if (e < b) e = b;
    return {static_cast<Index>(b + first), static_cast<Index>(e + first)};
  }
};

FA_COMMON_FN Visibility make_visibility(int64_t mode, int64_t len_q, int64_t len_k, int64_t window_left = -1,
                                        int64_t window_right = -1) {
  Visibility v;
  v.causal = static_cast<int>(mode);
  v.causal_offset = mode == kCausalNone ? 0 : causal_offset(mode, len_q, len_k);
  v.window_left = window_left;
  v.window_right = window_right;
  v.window_offset = len_k - len_q;
  return v;
}

// A mask tensor (SDPA's attn_mask), broadcast to (batch, heads_q, len_q, len_k) by its strides
// (0 on broadcast dims), read where it is stored, never expanded: boolean (True = may attend)
// or additive float. Kinds as the bindings pass them.
enum MaskKind : int { kMaskNone = 0, kMaskBool = 1, kMaskF32 = 2, kMaskF64 = 3, kMaskBF16 = 4, kMaskF16 = 5 };
struct MaskRef {
  const void* ptr = nullptr;
  int kind = kMaskNone;
  int64_t batch = 0, head = 0, row = 0, col = 1;  // element strides
};

// Forward: q, k, v in, out and lse out.
template <class Index>
struct AttnFwdCommon {
  Dims<Index> dims;
  Strides q_stride, k_stride, v_stride, o_stride;
  Visibility vis;
  double scale;  // softmax scale (the spec's), applied to q . k
  double softcap = 0.0;  // > 0: a score x = scale q . k becomes softcap tanh(x / softcap)
  // Per batch entry b, keys [key_bounds[2b], key_bounds[2b + 1]) only (a key-padding mask);
  // nullptr: every key.
  const int64_t* key_bounds = nullptr;
  MaskRef mask;  // kind kMaskNone: no mask tensor
  // ALiBi slopes, fp32 (batch or, varlen, sequences) x heads_q; nullptr: none. The score of query
  // i and key j gets -slope * |i + S - L - j| after the scale (mask_ops.h: apply_alibi_tile).
  const float* alibi = nullptr;
  Dropout dropout;  // of the probabilities (dropout.h); dropout.on false: none
  // Per batch entry b, its first seqlens_k[b] keys only (a KV cache's filled slots; the keys after them are
  // never read), its causal diagonal, window and ALiBi aligned to that count (S - L becomes
  // seqlens_k[b] - L: FlashAttention-2's cache_seqlens); nullptr: every entry has len_k keys.
  const int64_t* seqlens_k = nullptr;

  // How many of batch entry b's keys exist (seqlens_k's count, else len_k).
  FA_COMMON_FN int64_t stored_keys(int64_t b) const {
    return seqlens_k != nullptr && seqlens_k[b] < dims.len_k ? seqlens_k[b] : dims.len_k;
  }

  // What the rows of batch entry b see.
  FA_COMMON_FN Visibility visibility(int64_t b) const {
    Visibility v = vis;
    if (key_bounds != nullptr) {
      v.key_begin = key_bounds[2 * b];
      v.key_end = key_bounds[2 * b + 1];
    }
    if (seqlens_k != nullptr) {
      const int64_t n = stored_keys(b), shift = n - dims.len_k;  // the diagonals move with the entry's count
      if (n < v.key_end) v.key_end = n;
      if (v.causal == kCausalLowerRight) v.causal_offset += shift;
      v.window_offset += shift;
    }
    return v;
  }
};

// Backward: the forward's plus dout in, dq / dk / dv out.
template <class Index>
struct AttnBwdCommon : AttnFwdCommon<Index> {
  Strides do_stride, dq_stride, dk_stride, dv_stride;
  bool has_dlse;  // the lse's own gradient is given (delta = rowsum(dO * O) - dlse)
};

}  // namespace fused_attn
