// Host side of the backward kernels, shared by the GPU binding and the emulator's: input
// checks (messages say what was passed) and the params struct from tensors.
#pragma once

#include "cuda/flash_bwd_kernel.cuh"
#include "cuda/flash_fwd_api.h"

namespace fa {

// The forward's tensors plus dout (like out), dq / dk / dv (like q / k / v), delta
// (B, Hq, L) fp32 contiguous scratch, and dlse (B, Hq, L) fp32 contiguous or undefined.
inline void check_bwd_inputs(const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dq,
                             const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& delta, int64_t causal) {
  check_fwd_inputs(q, k, v, out, lse, causal);
  const std::pair<const at::Tensor*, const at::Tensor*> like[] = {{&dout, &out}, {&dq, &q}, {&dk, &k}, {&dv, &v}};
  const char* names[] = {"dout", "dq", "dk", "dv"};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& t = *like[i].first;
    check_fwd_operand(t, names[i]);
    TORCH_CHECK(t.sizes() == like[i].second->sizes() && t.scalar_type() == q.scalar_type() && t.device() == q.device(),
                names[i], " must match the shape, dtype and device of its forward tensor ", like[i].second->sizes(),
                " ", q.scalar_type(), ", got ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
  }
  for (const at::Tensor* t : {&delta, &dlse}) {
    if (t == &dlse && !dlse.defined()) continue;
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->sizes() == lse.sizes() &&
                    t->device() == q.device(),
                t == &delta ? "delta" : "dlse", " must be a contiguous float32 tensor shaped like lse ", lse.sizes(),
                ", got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
  }
}

template <class T>
BwdParams<T> make_bwd_params(const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq,
                             at::Tensor& dk, at::Tensor& dv, at::Tensor& delta, int64_t causal, double scale) {
  BwdParams<T> p;
  static_cast<fused_attn::AttnFwdCommon<int>&>(p) = make_fwd_common(q, k, v, out, causal, scale);
  p.do_stride = strides_of(dout), p.dq_stride = strides_of(dq), p.dk_stride = strides_of(dk), p.dv_stride = strides_of(dv);
  p.has_dlse = dlse.defined();
  p.q = global_ptr<const T>(q, "q");
  p.k = global_ptr<const T>(k, "k");
  p.v = global_ptr<const T>(v, "v");
  p.o = global_ptr<const T>(out, "out");
  p.dout = global_ptr<const T>(dout, "dout");
  p.lse = global_ptr<const float>(lse, "lse");
  if (p.has_dlse) p.dlse = global_ptr<const float>(dlse, "dlse");
  p.delta = global_ptr<float>(delta, "delta");
  p.dq = global_ptr<T>(dq, "dq");
  p.dk = global_ptr<T>(dk, "dk");
  p.dv = global_ptr<T>(dv, "dv");
  p.scale_f32 = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  return p;
}

}  // namespace fa
