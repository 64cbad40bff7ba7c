// Row-major tile GEMMs for the CPU attention kernels:
//   C (M x N, acc_t) = alpha * op(A) (M x K) * op(B) (K x N) + beta * C
// A and B are read in the inputs' dtype with any leading dimension; C accumulates in
// acc_t (float, or double for double inputs). beta == 0 never reads C.
//
// Backends: the BLAS that PyTorch itself links (MKL's sgemm_ / dgemm_, and its
// bf16 x bf16 -> fp32 and fp16 x fp16 -> fp32 GEMMs, which use AMX / AVX-512 BF16 /
// AVX512-FP16 where the CPU has them). The symbols are declared weak, so a PyTorch
// built without MKL still loads this extension and every call falls back to the
// portable loops below (correct, slow). gemm_backend() names what is in use.
#pragma once

#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
// CBLAS enums passed as int: layout 101 = row-major; trans 111 = no, 112 = yes.
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                            float* c, int ldc) __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                          const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                          float* c, int ldc) __attribute__((weak));
}

namespace fused_attn::cpu {

constexpr int CBLAS_ROW_MAJOR = 101;
constexpr int CBLAS_NO_TRANS = 111;
constexpr int CBLAS_TRANS = 112;

inline std::string gemm_backend() {
  std::string s = "fp32: ";
  s += sgemm_ ? "BLAS sgemm" : "portable loops";
  s += "; fp64: ";
  s += dgemm_ ? "BLAS dgemm" : "portable loops";
  s += "; bf16: ";
  s += cblas_gemm_bf16bf16f32 ? "MKL bf16 gemm" : "portable loops";
  s += "; fp16: ";
  s += cblas_gemm_f16f16f32 ? "MKL fp16 gemm" : "portable loops";
  return s;
}

template <typename T>
bool brgemm_available();

inline std::string brgemm_backend() {
  std::string s = "forward through oneDNN brgemm: bf16 ";
  s += brgemm_available<c10::BFloat16>() ? "yes" : "no";
  s += ", fp16 ";
  s += brgemm_available<c10::Half>() ? "yes" : "no";
  return s;
}

// Portable fallback, row-major.
template <typename T, typename acc_t>
void gemm_loops(bool ta, bool tb, int64_t M, int64_t N, int64_t K, acc_t alpha, const T* A,
                int64_t lda, const T* B, int64_t ldb, acc_t beta, acc_t* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      acc_t sum = 0;
      for (int64_t p = 0; p < K; ++p) {
        const acc_t a = static_cast<acc_t>(ta ? A[p * lda + i] : A[i * lda + p]);
        const acc_t b = static_cast<acc_t>(tb ? B[j * ldb + p] : B[p * ldb + j]);
        sum += a * b;
      }
      C[i * ldc + j] = alpha * sum + (beta == acc_t(0) ? acc_t(0) : beta * C[i * ldc + j]);
    }
  }
}

// Leading dimensions are int64 everywhere in the kernels; the BLAS interfaces take int.
// An operand stored as one row ignores its leading dimension (any stride is legal for a
// size-1 dim, 2^31 included), so it gets its row length; an operand of several rows whose
// leading dimension does not fit an int is copied to a contiguous block first (a
// correct, slower path for strides no BLAS can address).
constexpr int64_t BLAS_INT_MAX = 2147483647;

// The largest leading dimension passed to BLAS as is: BLAS_INT_MAX; tests lower it
// (set_blas_ld_limit) to run the copy path on small tensors.
inline int64_t& blas_ld_limit() {
  static int64_t limit = BLAS_INT_MAX;
  return limit;
}

inline int64_t ld_of(bool trans, int64_t rows, int64_t cols, int64_t ld) {
  const int64_t stored_rows = trans ? cols : rows, stored_cols = trans ? rows : cols;
  return stored_rows <= 1 ? std::max<int64_t>(1, stored_cols) : ld;
}

// op(X) (rows x cols) with leading dim ld, as BLAS takes it: the same pointer and an int
// leading dim, or (ld past int) a contiguous copy owned by `copy`.
template <typename T>
struct BlasOperand {
  const T* ptr;
  int ld;
  std::vector<T> copy;
  BlasOperand(bool trans, int64_t rows, int64_t cols, const T* x, int64_t ld_in) {
    const int64_t ld64 = ld_of(trans, rows, cols, ld_in);
    const int64_t stored_rows = trans ? cols : rows, stored_cols = trans ? rows : cols;
    if (ld64 <= blas_ld_limit()) {
      ptr = x;
      ld = static_cast<int>(ld64);
      return;
    }
    copy.resize(stored_rows * stored_cols);
    for (int64_t r = 0; r < stored_rows; ++r) std::copy(x + r * ld64, x + r * ld64 + stored_cols, copy.data() + r * stored_cols);
    ptr = copy.data();
    ld = static_cast<int>(stored_cols);
  }
};

// Tile sizes (M, N, K, ldc) are block sizes of config.h, far inside int.
inline int blas_int(int64_t x) {
  TORCH_CHECK(x >= 0 && x <= BLAS_INT_MAX, "fused_attn CPU GEMM: tile size ", x, " does not fit the BLAS int");
  return static_cast<int>(x);
}

inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                 int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (!sgemm_) return gemm_loops(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
  const BlasOperand<float> a(ta, M, K, A, lda), b(tb, K, N, B, ldb);
  const char a_t = ta ? 'T' : 'N', b_t = tb ? 'T' : 'N';
  const int m = blas_int(N), n = blas_int(M), k = blas_int(K), lc = blas_int(ldc);
  sgemm_(&b_t, &a_t, &m, &n, &k, &alpha, b.ptr, &b.ld, a.ptr, &a.ld, &beta, C, &lc);
}

inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
                 int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  if (!dgemm_) return gemm_loops(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  const BlasOperand<double> a(ta, M, K, A, lda), b(tb, K, N, B, ldb);
  const char a_t = ta ? 'T' : 'N', b_t = tb ? 'T' : 'N';
  const int m = blas_int(N), n = blas_int(M), k = blas_int(K), lc = blas_int(ldc);
  dgemm_(&b_t, &a_t, &m, &n, &k, &alpha, b.ptr, &b.ld, a.ptr, &a.ld, &beta, C, &lc);
}

inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                 const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B, int64_t ldb,
                 float beta, float* C, int64_t ldc) {
  if (!cblas_gemm_bf16bf16f32) return gemm_loops(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  const BlasOperand<c10::BFloat16> a(ta, M, K, A, lda), b(tb, K, N, B, ldb);
  cblas_gemm_bf16bf16f32(CBLAS_ROW_MAJOR, ta ? CBLAS_TRANS : CBLAS_NO_TRANS, tb ? CBLAS_TRANS : CBLAS_NO_TRANS,
                         blas_int(M), blas_int(N), blas_int(K), alpha, reinterpret_cast<const uint16_t*>(a.ptr), a.ld,
                         reinterpret_cast<const uint16_t*>(b.ptr), b.ld, beta, C, blas_int(ldc));
}

inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                 const c10::Half* A, int64_t lda, const c10::Half* B, int64_t ldb, float beta,
                 float* C, int64_t ldc) {
  if (!cblas_gemm_f16f16f32) return gemm_loops(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  const BlasOperand<c10::Half> a(ta, M, K, A, lda), b(tb, K, N, B, ldb);
  cblas_gemm_f16f16f32(CBLAS_ROW_MAJOR, ta ? CBLAS_TRANS : CBLAS_NO_TRANS, tb ? CBLAS_TRANS : CBLAS_NO_TRANS,
                       blas_int(M), blas_int(N), blas_int(K), alpha, reinterpret_cast<const uint16_t*>(a.ptr), a.ld,
                       reinterpret_cast<const uint16_t*>(b.ptr), b.ld, beta, C, blas_int(ldc));
}

// oneDNN's batch-reduce GEMM micro-kernel through ATen (at::native::cpublas::brgemm):
// C (M x N, fp32) (+)= A (M x K, row-major) * B (K x N), B row-major for fp32 and packed
// to VNNI pairs (at::native::cpublas::pack) for bf16 / fp16, where it runs on AMX.
// Used by the forward for the dtypes where it is available (probed once: ATen raises
// where oneDNN's micro-kernels are not built or the CPU lacks the ISA).
template <typename T>
bool brgemm_available() {
  static const bool ok = [] {
    const auto dt = c10::CppTypeToScalarType<T>::value;
    if (dt != c10::ScalarType::Float && !at::native::cpublas::could_pack(dt)) return false;
    try {
      T a[2] = {T(1), T(1)}, b[32] = {}, packed[32] = {};
      float c[16] = {};
      const bool vnni = dt != c10::ScalarType::Float;
      if (vnni) at::native::cpublas::pack(2, 16, 16, 16, dt, dt, b, packed);
      at::native::cpublas::brgemm(1, 16, 2, 2, 16, 16, false, a, vnni ? packed : b, c, vnni);
      at::native::cpublas::brgemm_release(vnni);
      return true;
    } catch (const c10::Error&) {
      return false;
    }
  }();
  return ok;
}

}  // namespace fused_attn::cpu
