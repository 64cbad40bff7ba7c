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
  p.q = global_ptr<const T>(q, "q");
  p.k = global_ptr<const T>(k, "k");
  p.v = global_ptr<const T>(v, "v");
  p.o = global_ptr<const T>(out, "out");
  p.dout = global_ptr<const T>(dout, "dout");
  p.lse = global_ptr<const float>(lse, "lse");
  p.has_dlse = dlse.defined() ? 1 : 0;
  if (p.has_dlse) p.dlse = global_ptr<const float>(dlse, "dlse");
  p.delta = global_ptr<float>(delta, "delta");
  p.dq = global_ptr<T>(dq, "dq");
  p.dk = global_ptr<T>(dk, "dk");
  p.dv = global_ptr<T>(dv, "dv");
  p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_head_stride = v.stride(1), p.v_row_stride = v.stride(2);
  p.o_batch_stride = out.stride(0), p.o_head_stride = out.stride(1), p.o_row_stride = out.stride(2);
  p.do_batch_stride = dout.stride(0), p.do_head_stride = dout.stride(1), p.do_row_stride = dout.stride(2);
  p.dq_batch_stride = dq.stride(0), p.dq_head_stride = dq.stride(1), p.dq_row_stride = dq.stride(2);
  p.dk_batch_stride = dk.stride(0), p.dk_head_stride = dk.stride(1), p.dk_row_stride = dk.stride(2);
  p.dv_batch_stride = dv.stride(0), p.dv_head_stride = dv.stride(1), p.dv_row_stride = dv.stride(2);
  p.batch = static_cast<int>(q.size(0));
  p.heads_q = static_cast<int>(q.size(1));
  p.heads_kv = static_cast<int>(k.size(1));
  p.len_q = static_cast<int>(q.size(2));
  p.len_k = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(q.size(3));
  p.head_dim_v = static_cast<int>(v.size(3));
  p.causal = causal != 0;
  p.causal_offset = causal == 2 ? k.size(2) - q.size(2) : 0;
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  return p;
}

}  // namespace fa
