// Host side of the forward kernel, shared by the GPU binding and the emulator's:
// input checks (messages say what was passed) and the params struct from tensors.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "cuda/flash_fwd_kernel.cuh"

namespace fa {

// Elements from t.data_ptr() to one past the furthest element t can address
// (non-negative strides): under emulation every access through a GPtr is checked
// against this span; on the GPU the extent is ignored.
inline int64_t tensor_span(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    TORCH_CHECK(t.stride(d) >= 0, "negative strides are not supported, got ", t.strides());
    last += (t.size(d) - 1) * t.stride(d);
  }
  return t.numel() == 0 ? 0 : last + 1;
}

// `name` must outlive the launch (a string literal).
template <class T>
GPtr<T> global_ptr(const at::Tensor& t, const char* name) {
  using E = typename std::remove_const<T>::type;
  return GPtr<T>(reinterpret_cast<E*>(t.data_ptr()), tensor_span(t) * t.element_size() / static_cast<int64_t>(sizeof(E)),
                 name);
}

inline void check_fwd_operand(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D (B, H, L, D), got shape ", t.sizes());
  TORCH_CHECK(t.stride(3) == 1, name, " must have unit stride on the head dim, got strides ", t.strides());
  TORCH_CHECK(t.size(3) % 8 == 0, name, ": head dim must be a multiple of 8 (16-byte rows), got ", t.size(3));
  for (int d = 0; d < 3; ++d)
    TORCH_CHECK(t.stride(d) % 8 == 0 || t.size(d) == 1, name,
                ": strides must be multiples of 8 elements (16-byte rows), got ", t.strides());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
}

// q (B, Hq, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev), out (B, Hq, L, Ev), lse (B, Hq, L) fp32 contiguous,
// all on one device; causal 0 none, 1 upper-left, 2 lower-right.
inline void check_fwd_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                             const at::Tensor& lse, int64_t causal) {
  check_fwd_operand(q, "q");
  check_fwd_operand(k, "k");
  check_fwd_operand(v, "v");
  check_fwd_operand(out, "out");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, "the CUDA kernels take float16 or bfloat16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt && out.scalar_type() == dt,
              "q, k, v and out must share one dtype, got ", dt, ", ", k.scalar_type(), ", ", v.scalar_type(), ", ",
              out.scalar_type());
  for (const at::Tensor* t : {&k, &v, &out, &lse})
    TORCH_CHECK(t->device() == q.device(), "all tensors must be on q's device ", q.device(), ", got ", t->device());
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), Hk = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hk && v.size(2) == S && k.size(3) == q.size(3),
              "shapes do not match: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(Hq % Hk == 0, "query heads (", Hq, ") must be a multiple of key/value heads (", Hk, ")");
  TORCH_CHECK(q.size(3) <= fused_attn::kMaxHeadDim && v.size(3) <= fused_attn::kMaxHeadDim, "head dims must be <= ",
              fused_attn::kMaxHeadDim, ", got E = ", q.size(3), ", Ev = ", v.size(3));
  TORCH_CHECK(out.size(0) == B && out.size(1) == Hq && out.size(2) == L && out.size(3) == v.size(3),
              "out must be (B, Hq, L, Ev) = (", B, ", ", Hq, ", ", L, ", ", v.size(3), "), got ", out.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.sizes() == at::IntArrayRef({B, Hq, L}),
              "lse must be a contiguous float32 (B, Hq, L) tensor, got ", lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK(B <= 65535 && Hq <= 65535, "batch and heads must be <= 65535 (grid z and y), got ", B, " and ", Hq);
  TORCH_CHECK(L < (int64_t(1) << 31) && S < (int64_t(1) << 31), "sequence lengths must be < 2^31, got ", L, " and ", S);
  TORCH_CHECK(fused_attn::valid_causal_mode(causal), "causal must be 0 (none), 1 (upper-left) or 2 (lower-right), got ", causal);
}

// The head dim that picks the traits bucket.
inline int fwd_head_dim(const at::Tensor& q, const at::Tensor& v) { return static_cast<int>(std::max(q.size(3), v.size(3))); }

// The (B, H, rows) strides of a 4-D operand (its head dim has unit stride: checked above).
inline fused_attn::Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// The parameters the forward and backward share, from the forward's tensors (checked by
// check_fwd_inputs: sizes fit int, causal is a CausalMode).
inline fused_attn::AttnFwdCommon<int> make_fwd_common(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const at::Tensor& out, int64_t causal, double scale) {
  fused_attn::AttnFwdCommon<int> c;
  c.dims = {static_cast<int>(q.size(0)), static_cast<int>(q.size(1)), static_cast<int>(k.size(1)),
            static_cast<int>(q.size(2)), static_cast<int>(k.size(2)), static_cast<int>(q.size(3)),
            static_cast<int>(v.size(3))};
  c.q_stride = strides_of(q), c.k_stride = strides_of(k), c.v_stride = strides_of(v), c.o_stride = strides_of(out);
  c.vis = fused_attn::make_visibility(causal, q.size(2), k.size(2));
  c.scale = scale;
  return c;
}

template <class T>
FwdParams<T> make_fwd_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                             at::Tensor& lse, int64_t causal, double scale) {
  FwdParams<T> p;
  static_cast<fused_attn::AttnFwdCommon<int>&>(p) = make_fwd_common(q, k, v, out, causal, scale);
  p.q = global_ptr<const T>(q, "q");
  p.k = global_ptr<const T>(k, "k");
  p.v = global_ptr<const T>(v, "v");
  p.o = global_ptr<T>(out, "out");
  p.lse = global_ptr<float>(lse, "lse");
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  return p;
}

}  // namespace fa
