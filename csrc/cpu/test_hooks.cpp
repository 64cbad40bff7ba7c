// Test hooks (tests/test_cpu_kernels.py, tests/test_cpu_intervals.py): the kernels' building
// blocks on their own, on small CPU tensors.
//   _test_gemm_f32, _test_transpose_f32: the AVX-512 micro-kernel and transpose (2-D fp32
//     tensors with a unit stride on dim 1 and any row stride);
//   _test_softmax_step, _test_probs: one score tile's forward online softmax and backward P
//     with given per-row key intervals, on whichever path the kernels take now
//     (set_portable_only / set_vec_isa);
//   set_blas_ld_limit: the largest leading dim passed to BLAS as is.
#include <torch/extension.h>

#include <cmath>
#include <vector>

#include "bindings.h"
#include "bwd_kernel.h"
#include "config.h"
#include "dtype_switch.h"
#include "fwd_kernel.h"
#include "gemm.h"
#include "gemm_avx512.h"
#include "params.h"
#include "tile_ops.h"

namespace fused_attn::cpu {
namespace {

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

// One score tile's operands: q (rows, E) and k (cols, E) in the accumulation dtype acc
// (fp64 for fp64 inputs, else fp32), contiguous; the intervals begin / end (rows, int64,
// relative to the tile's first key, any values: clamped to [0, cols] as the kernels
// clamp them); the per-row vectors in acc; p (rows, cols) with a unit column stride.
struct TileArgs {
  int64_t rows, cols, E;
  std::vector<KeyInterval> iv;
  const KeyInterval* tile_iv;  // nullptr where every row sees every column (unmasked path)
};

TileArgs check_tile(const at::Tensor& q, const at::Tensor& k, const at::Tensor& begin, const at::Tensor& end,
                    const at::Tensor& p, c10::ScalarType acc, std::initializer_list<const at::Tensor*> rowvecs) {
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && q.size(1) == k.size(1) && q.is_contiguous() && k.is_contiguous(),
              "q (rows, E) and k (cols, E) must be contiguous with one E, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(q.scalar_type() == acc && k.scalar_type() == acc, "q and k must be ", acc, " for this dtype, got ",
              q.scalar_type(), " and ", k.scalar_type());
  const int64_t rows = q.size(0), cols = k.size(0);
  TORCH_CHECK(begin.scalar_type() == at::kLong && end.scalar_type() == at::kLong && begin.numel() == rows &&
                  end.numel() == rows && begin.is_contiguous() && end.is_contiguous(),
              "begin and end must be contiguous int64 vectors of q's ", rows, " rows, got ", begin.sizes(), " ",
              begin.scalar_type(), " and ", end.sizes(), " ", end.scalar_type());
  TORCH_CHECK(p.dim() == 2 && p.size(0) == rows && p.size(1) == cols && p.stride(1) == 1 && p.stride(0) >= cols,
              "p must be (", rows, ", ", cols, ") with a unit column stride, got ", p.sizes(), " ", p.strides());
  for (const at::Tensor* t : rowvecs)
    TORCH_CHECK(t->scalar_type() == acc && t->is_contiguous() && t->numel() == rows, "row vectors must be ", acc,
                " of ", rows, " elements, got ", t->scalar_type(), " ", t->sizes());
  TileArgs a{rows, cols, q.size(1), std::vector<KeyInterval>(rows), nullptr};
  for (int64_t r = 0; r < rows; ++r)
    a.iv[r] = tile_interval({begin.data_ptr<int64_t>()[r], end.data_ptr<int64_t>()[r]}, 0, cols);
  a.tile_iv = classify_tile(a.iv.data(), rows, cols) == TileMask::FULL ? nullptr : a.iv.data();
  return a;
}

// s (rows x cols, ld) = alpha q k^T, each dot product summed in double.
template <typename acc_t>
void scores(const TileArgs& a, const acc_t* q, const acc_t* k, double alpha, acc_t* s, int64_t ld) {
  for (int64_t r = 0; r < a.rows; ++r)
    for (int64_t c = 0; c < a.cols; ++c) {
      double sum = 0;
      for (int64_t e = 0; e < a.E; ++e) sum += double(q[r * a.E + e]) * double(k[c * a.E + e]);
      s[r * ld + c] = static_cast<acc_t>(alpha * sum);
    }
}

#ifdef FA_CPU_HAVE_AVX512_PATH
// k^T (E x cols) for the micro-kernel's B operand.
std::vector<float> transposed(const TileArgs& a, const float* k) {
  std::vector<float> kt(a.E * a.cols);
  for (int64_t c = 0; c < a.cols; ++c)
    for (int64_t e = 0; e < a.E; ++e) kt[e * a.cols + c] = k[c * a.E + e];
  return kt;
}
#endif

// The forward's online softmax of one tile of a key block with scores q k^T: the path the
// forward of p's dtype takes now (fp32 on AVX-512: SoftmaxEpilogue on the micro-kernel,
// fold_softmax_block; otherwise softmax_step on the score tile). m, l in and out, corr out.
void test_softmax_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& begin, const at::Tensor& end,
                       double scale, at::Tensor& m, at::Tensor& l, at::Tensor& corr, at::Tensor& p) {
  dtype_switch(p.scalar_type(), [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    const auto acc_dt = c10::CppTypeToScalarType<acc_t>::value;
    const TileArgs a = check_tile(q, k, begin, end, p, acc_dt, {&m, &l, &corr});
    const acc_t sgn = scale < 0 ? acc_t(-1) : acc_t(1);
    const acc_t asc = static_cast<acc_t>(std::abs(scale) * LOG2E);
    acc_t* mp = m.data_ptr<acc_t>();
    acc_t* lp = l.data_ptr<acc_t>();
    acc_t* cp = corr.data_ptr<acc_t>();
    const int64_t ld = p.stride(0);
#ifdef FA_CPU_HAVE_AVX512_PATH
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (avx512_enabled()) {
        const std::vector<float> kt = transposed(a, k.data_ptr<float>());
        std::vector<float> sum16(a.rows * 16, 0.0f);
        std::copy(mp, mp + a.rows, cp);
        constexpr int64_t PANEL = PackedKV<float>::PANEL;
        for (int64_t c0 = 0; c0 < a.cols; c0 += PANEL) {
          const int64_t n = std::min(PANEL, a.cols - c0);
          if (a.tile_iv)
            micro_panel<false>(a.rows, n, a.E, q.data_ptr<float>(), a.E, kt.data() + c0, a.cols,
                               SoftmaxEpilogue<true>{p.data_ptr<float>(), ld, c0, a.tile_iv, sgn, asc, mp,
                                                     sum16.data()});
          else
            micro_panel<false>(a.rows, n, a.E, q.data_ptr<float>(), a.E, kt.data() + c0, a.cols,
                               SoftmaxEpilogue<false>{p.data_ptr<float>(), ld, c0, nullptr, sgn, asc, mp,
                                                      sum16.data()});
        }
        fold_softmax_block(a.rows, mp, lp, cp, sum16.data(), asc);
        return;
      }
    }
#endif
    if constexpr (std::is_same_v<scalar_t, acc_t>) {  // P in place of the scores
      scores(a, q.data_ptr<acc_t>(), k.data_ptr<acc_t>(), 1.0, p.data_ptr<acc_t>(), ld);
      softmax_step<scalar_t>(p.data_ptr<acc_t>(), ld, a.rows, a.cols, a.tile_iv, sgn, asc, mp, lp, cp,
                             static_cast<scalar_t*>(nullptr), 0);
    } else {
      std::vector<acc_t> s(a.rows * a.cols);
      scores(a, q.data_ptr<acc_t>(), k.data_ptr<acc_t>(), 1.0, s.data(), a.cols);
      softmax_step<scalar_t>(s.data(), a.cols, a.rows, a.cols, a.tile_iv, sgn, asc, mp, lp, cp,
                             p.data_ptr<scalar_t>(), ld);
    }
  });
}

// The backward's P of one tile, P = exp2((g s - hi) a - lo) in p (acc dtype), on the path
// the backward of inputs of `dtype` takes now: fp32 raw scores (g = sign(scale),
// a = |scale| log2 e; ProbsEpilogue on the micro-kernel with AVX-512), else scores scaled
// by scale log2 e (g = a = 1) and probs().
void test_probs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& begin, const at::Tensor& end,
                double scale, const at::Tensor& hi, const at::Tensor& lo, at::Tensor& p, c10::ScalarType dtype) {
  dtype_switch(dtype, [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    constexpr bool FP32 = std::is_same_v<scalar_t, float>;
    const auto acc_dt = c10::CppTypeToScalarType<acc_t>::value;
    const TileArgs t = check_tile(q, k, begin, end, p, acc_dt, {&hi, &lo});
    const acc_t g = FP32 ? (scale < 0 ? acc_t(-1) : acc_t(1)) : acc_t(1);
    const acc_t a = FP32 ? static_cast<acc_t>(std::abs(scale) * LOG2E) : acc_t(1);
    const double alpha = FP32 ? 1.0 : scale * LOG2E;
    const int64_t ld = p.stride(0);
#ifdef FA_CPU_HAVE_AVX512_PATH
    if constexpr (FP32) {
      if (avx512_enabled()) {
        const std::vector<float> kt = transposed(t, k.data_ptr<float>());
        const float* h = hi.data_ptr<float>();
        const float* o = lo.data_ptr<float>();
        float* pp = p.data_ptr<float>();
        if (t.tile_iv)
          gemm_f32_panels<false>(t.rows, t.cols, t.E, q.data_ptr<float>(), t.E, kt.data(), t.cols, [&](int64_t c0) {
            return ProbsEpilogue<true>{pp, ld, c0, g, a, t.tile_iv, h, o};
          });
        else
          gemm_f32_panels<false>(t.rows, t.cols, t.E, q.data_ptr<float>(), t.E, kt.data(), t.cols, [&](int64_t c0) {
            return ProbsEpilogue<false>{pp, ld, c0, g, a, nullptr, h, o};
          });
        return;
      }
    }
#endif
    scores(t, q.data_ptr<acc_t>(), k.data_ptr<acc_t>(), alpha, p.data_ptr<acc_t>(), ld);
    probs(p.data_ptr<acc_t>(), ld, t.rows, t.cols, t.tile_iv, g, a, hi.data_ptr<acc_t>(), lo.data_ptr<acc_t>());
  });
}

}  // namespace

void def_test_hooks(pybind11::module& m) {
  m.def("set_blas_ld_limit", [](int64_t limit) { blas_ld_limit() = limit; },
        "tests: the largest leading dim passed to BLAS as is (default 2^31 - 1); larger ones are copied");
  m.def("_test_gemm_f32", &test_gemm_f32, "tests: c = alpha op(a) b (+ rs * c) on the micro-kernel");
  m.def("_test_transpose_f32", &test_transpose_f32, "tests: dst = src^T, AVX-512 blocks");
  m.def("_test_softmax_step", &test_softmax_step,
        "tests: the forward's online softmax of one tile (scores q k^T, row r's keys [begin[r], end[r])) into p; "
        "m, l updated, corr written");
  m.def("_test_probs", &test_probs,
        "tests: the backward's P of one tile (scores q k^T, row r's keys [begin[r], end[r])) into p, for inputs "
        "of dtype");
}

}  // namespace fused_attn::cpu
