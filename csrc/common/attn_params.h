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

// Which keys each query row sees, computed (never read from memory): all, or a causal
// diagonal. A feature that bounds a row's keys (a sliding window) adds its field here and
// narrows `keys`.
struct Visibility {
  int causal;              // CausalMode
  int64_t causal_offset;   // see causal_offset(); 0 when not causal

  // Keys [begin, end) of [0, len_k) that query row i sees.
  template <class Index>
  FA_COMMON_FN KeyInterval<Index> keys(Index i, Index len_k) const {
    if (causal == kCausalNone) return {Index(0), len_k};
    const int64_t end = static_cast<int64_t>(i) + causal_offset + 1;
    return {Index(0), static_cast<Index>(end < 0 ? 0 : (end > len_k ? len_k : end))};
  }
};

FA_COMMON_FN Visibility make_visibility(int64_t mode, int64_t len_q, int64_t len_k) {
  return Visibility{static_cast<int>(mode), mode == kCausalNone ? 0 : causal_offset(mode, len_q, len_k)};
}

// Forward: q, k, v in, out and lse out.
template <class Index>
struct AttnFwdCommon {
  Dims<Index> dims;
  Strides q_stride, k_stride, v_stride, o_stride;
  Visibility vis;
  double scale;  // softmax scale (the spec's), applied to q . k
};

// Backward: the forward's plus dout in, dq / dk / dv out.
template <class Index>
struct AttnBwdCommon : AttnFwdCommon<Index> {
  Strides do_stride, dq_stride, dk_stride, dv_stride;
  bool has_dlse;  // the lse's own gradient is given (delta = rowsum(dO * O) - dlse)
};

}  // namespace fused_attn
