// Python bindings of the CPU attention kernels: argument checks, then the kernels.
// Outputs are allocated by the caller (fused_attn/ops/cpu.py) and fully written here.
#include <torch/extension.h>

#include "bwd_kernel.h"
#include "dtype_switch.h"
#include "fwd_kernel.h"
#include "gemm.h"
#include "gemm_avx512.h"
#include "params.h"

namespace fused_attn::cpu {
namespace {

constexpr int64_t CAUSAL_NONE = 0, CAUSAL_UPPER_LEFT = 1, CAUSAL_LOWER_RIGHT = 2;

// The saved lse (lse_t in params.h): fp64 for fp32 and fp64 inputs, fp32 for bf16 / fp16.
c10::ScalarType lse_dtype(c10::ScalarType dt) {
  return dt == c10::ScalarType::Double || dt == c10::ScalarType::Float ? c10::ScalarType::Double
                                                                      : c10::ScalarType::Float;
}

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D (B, H, L, E), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " must have query's dtype ", q.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) == 1, name, " must have a unit stride on the last dim, got strides ",
              t.strides());
  TORCH_CHECK(t.size(2) == 1 || t.stride(2) >= t.size(3), name,
              " rows must not overlap (stride(2) >= size(3)), got shape ", t.sizes(), " strides ", t.strides());
}

void check_output(const at::Tensor& t, const char* name, at::IntArrayRef shape, c10::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

AttnParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t causal,
                       double scale) {
  check_operand(q, "query", q);
  check_operand(k, "key", q);
  check_operand(v, "value", q);
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), E = q.size(3);
  const int64_t Hk = k.size(1), S = k.size(2), Ev = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, "batch sizes differ: query ", q.sizes(), ", key ", k.sizes(),
              ", value ", v.sizes());
  TORCH_CHECK(k.size(3) == E, "query and key head dims differ: ", q.sizes(), " vs ", k.sizes());
  TORCH_CHECK(v.size(1) == Hk && v.size(2) == S, "key ", k.sizes(), " and value ", v.sizes(),
              " must agree in heads and length");
  TORCH_CHECK(Hk >= 1 && Hq % Hk == 0, "query heads (", Hq, ") must be a multiple of key/value heads (", Hk, ")");
  TORCH_CHECK(E <= MAX_HEAD_DIM && Ev <= MAX_HEAD_DIM, "head dims must be <= ", MAX_HEAD_DIM, ", got E = ", E,
              ", Ev = ", Ev);
  TORCH_CHECK(B > 0 && Hq > 0 && L > 0 && S > 0 && E > 0 && Ev > 0, "empty inputs: query ", q.sizes(),
              ", key ", k.sizes(), ", value ", v.sizes());
  TORCH_CHECK(causal == CAUSAL_NONE || causal == CAUSAL_UPPER_LEFT || causal == CAUSAL_LOWER_RIGHT,
              "causal must be 0 (none), 1 (upper-left) or 2 (lower-right), got ", causal);
  AttnParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sl = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sl = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sl = v.stride(2);
  p.B = B, p.Hq = Hq, p.Hk = Hk, p.L = L, p.S = S, p.E = E, p.Ev = Ev;
  p.scale = scale;
  p.causal = causal != CAUSAL_NONE;
  p.offset = causal == CAUSAL_LOWER_RIGHT ? S - L : 0;
  return p;
}

void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
             int64_t causal, double scale) {
  AttnParams p = make_params(q, k, v, causal, scale);
  check_output(out, "out", {p.B, p.Hq, p.L, p.Ev}, q.scalar_type());
  check_output(lse, "lse", {p.B, p.Hq, p.L}, lse_dtype(q.scalar_type()));
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  dtype_switch(q.scalar_type(), [&](auto scalar, auto acc) {
    attention_forward<decltype(scalar), decltype(acc)>(p);
  });
}

void backward(const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
              const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
              at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, int64_t causal, double scale) {
  AttnParams p = make_params(q, k, v, causal, scale);
  check_operand(dout, "dout", q);
  TORCH_CHECK(dout.sizes() == out.sizes(), "dout must have out's shape ", out.sizes(), ", got ", dout.sizes());
  const auto lse_dt = lse_dtype(q.scalar_type());
  check_output(out, "out", {p.B, p.Hq, p.L, p.Ev}, q.scalar_type());
  check_output(lse, "lse", {p.B, p.Hq, p.L}, lse_dt);
  if (dlse.has_value()) check_output(*dlse, "dlse", {p.B, p.Hq, p.L}, lse_dt);
  check_output(dq, "dq", {p.B, p.Hq, p.L, p.E}, q.scalar_type());
  check_output(dk, "dk", {p.B, p.Hk, p.S, p.E}, q.scalar_type());
  check_output(dv, "dv", {p.B, p.Hk, p.S, p.Ev}, q.scalar_type());
  p.out = const_cast<void*>(out.data_ptr());
  p.lse = const_cast<void*>(lse.data_ptr());
  p.dout = dout.data_ptr();
  p.do_sb = dout.stride(0), p.do_sh = dout.stride(1), p.do_sl = dout.stride(2);
  p.dlse = dlse.has_value() ? dlse->data_ptr() : nullptr;
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  dtype_switch(q.scalar_type(), [&](auto scalar, auto acc) {
    attention_backward<decltype(scalar), decltype(acc)>(p);
  });
}

// Test hooks for the AVX-512 building blocks (tests/test_cpu_kernels.py), on 2-D fp32
// tensors with a unit stride on dim 1 and any row stride.
void check_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 && t.stride(1) == 1 &&
                  t.stride(0) >= t.size(1),
              name, " must be a 2-D fp32 CPU matrix with unit column stride, got ", t.sizes(), " ", t.strides());
}

void test_gemm_f32(const at::Tensor& a, bool a_trans, const at::Tensor& b, at::Tensor& c, double alpha,
                   bool accumulate, const std::optional<at::Tensor>& rs) {
  TORCH_CHECK(avx512_enabled(), "the AVX-512 micro-kernel needs a CPU with AVX-512");
  check_matrix(a, "a");
  check_matrix(b, "b");
  check_matrix(c, "c");
  const int64_t M = c.size(0), N = c.size(1), K = b.size(0);
  TORCH_CHECK(b.size(1) == N && (a_trans ? a.size(0) == K && a.size(1) == M : a.size(0) == M && a.size(1) == K),
              "shapes do not chain: op(a) ", a.sizes(), " (trans ", a_trans, "), b ", b.sizes(), ", c ", c.sizes());
  TORCH_CHECK(!rs || (rs->scalar_type() == at::kFloat && rs->is_contiguous() && rs->numel() == M),
              "rs must be a contiguous fp32 vector of c's rows");
#ifdef FA_CPU_HAVE_AVX512_PATH
  const float* r = rs ? rs->data_ptr<float>() : nullptr;
  if (a_trans)
    gemm_f32_avx512<true>(M, N, K, float(alpha), a.data_ptr<float>(), a.stride(0), b.data_ptr<float>(), b.stride(0),
                          c.data_ptr<float>(), c.stride(0), accumulate, r);
  else
    gemm_f32_avx512<false>(M, N, K, float(alpha), a.data_ptr<float>(), a.stride(0), b.data_ptr<float>(),
                           b.stride(0), c.data_ptr<float>(), c.stride(0), accumulate, r);
#endif
}

void test_transpose_f32(const at::Tensor& src, at::Tensor& dst) {
  TORCH_CHECK(avx512_enabled(), "the AVX-512 transpose needs a CPU with AVX-512");
  check_matrix(src, "src");
  check_matrix(dst, "dst");
  TORCH_CHECK(dst.size(0) == src.size(1) && dst.size(1) == src.size(0), "dst ", dst.sizes(),
              " must be src's transpose shape, src ", src.sizes());
#ifdef FA_CPU_HAVE_AVX512_PATH
  transpose_f32_avx512(src.size(0), src.size(1), src.data_ptr<float>(), src.stride(0), dst.data_ptr<float>(),
                       dst.stride(0));
#endif
}

void set_vec_isa(const std::string& name) {
  for (int i = 0; i <= int(VecIsa::AVX512); ++i) {
    if (name == VEC_ISA_NAMES[i]) {
      vec_isa_cap() = VecIsa(i);
      return;
    }
  }
  TORCH_CHECK(false, "vec isa must be avx512, avx2 or baseline, got '", name, "'");
}

}  // namespace
}  // namespace fused_attn::cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_attn CPU kernels: fused attention forward and backward (see csrc/cpu/*_kernel.h)";
  m.def("forward", &fused_attn::cpu::forward, "attention forward into (out, lse)");
  m.def("backward", &fused_attn::cpu::backward, "attention backward into (dq, dk, dv)");
  m.def("set_portable_only", [](bool on) { fused_attn::cpu::portable_only() = on; },
        "tests: run the portable fallbacks instead of the AVX-512 softmax and oneDNN brgemm");
  m.def("set_vec_isa", &fused_attn::cpu::set_vec_isa,
        "the most the compiler-vectorised loops may use: avx512 (default: the CPU's best), avx2 or baseline");
  m.def("vec_isa", [] { return std::string(fused_attn::cpu::VEC_ISA_NAMES[int(fused_attn::cpu::vec_isa())]); },
        "which version of the compiler-vectorised loops runs: avx512, avx2 or baseline");
  m.def("set_blas_ld_limit", [](int64_t limit) { fused_attn::cpu::blas_ld_limit() = limit; },
        "tests: the largest leading dim passed to BLAS as is (default 2^31 - 1); larger ones are copied");
  m.def("has_avx512", &fused_attn::cpu::avx512_enabled, "whether the AVX-512 paths run (CPU has it, not portable-only)");
  m.def("_test_gemm_f32", &fused_attn::cpu::test_gemm_f32, "tests: c = alpha op(a) b (+ rs * c) on the micro-kernel");
  m.def("_test_transpose_f32", &fused_attn::cpu::test_transpose_f32, "tests: dst = src^T, AVX-512 blocks");
  m.def("gemm_backend",
        [] {
          return std::string("fp32 on the AVX-512 micro-kernel: ") + (fused_attn::cpu::avx512_enabled() ? "yes" : "no") +
                 " (else " + fused_attn::cpu::gemm_backend() + "); " + fused_attn::cpu::brgemm_backend();
        },
        "which GEMM library each dtype uses");
}
