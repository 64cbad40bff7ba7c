// Register-blocked fp32 tile GEMM for AVX-512, written for the attention tiles (K 32-256,
// M and N up to a few hundred), where a BLAS call spends a large share of its time
// packing operands and dispatching:
//
//   C (M x N) = alpha * op(A) (M x K) * B (K x N)  [+ rs[r] * C  if accumulate]
//
// B is row-major (ldb, unit stride along N): a pre-packed panel of K^T / V^T, or a row
// block of V, K, Q or dO read in place. op(A) is A (row-major, lda) or A^T (A stored
// K x M, lda), so P^T dO and dS^T Q need no transposed copy. rs (per-row factor on the
// old C, nullptr for 1) folds the online softmax's rescale of the output accumulator
// into the PV product.
//
// Micro-kernel: MR = 6 rows x NR = 64 columns (24 zmm accumulators, 4 B vectors and one
// broadcast: 29 of 32 registers); per step of K it issues 4 loads and 6 broadcasts for 24
// FMAs, so it runs at the FMA ports' rate while B's K x 64 panel stays in L1. Column
// tails use masked loads and stores (nothing past N is read or written); row tails use
// the MR < 6 instantiations.
//
// The register tile (micro_tile) and the sweep over a panel's rows (micro_panel) take the
// epilogue as a template argument: StoreEpilogue writes C as above; the fp32 forward's
// SoftmaxEpilogue (fwd_kernel.h) turns the score tile into P while it is in registers.
#pragma once

#include <algorithm>
#include <cstdint>

#include "tile_ops.h"

#ifdef FA_CPU_HAVE_AVX512_PATH

namespace fused_attn::cpu {

constexpr int GEMM_MR = 6;
constexpr int GEMM_NR = 64;  // four 16-float vectors

// The register tile: c[r][v] = sum over k of op(A)[r][k] * B[k][16 v .. 16 v + 15] (the
// last vector masked by `tail`). Inlined into each epilogue's caller, so c never leaves
// the registers.
template <int MR, int NV, bool A_TRANS>
FA_AVX512_TARGET FA_ALWAYS_INLINE void micro_tile(int64_t K, const float* A, int64_t lda, const float* B,
                                                  int64_t ldb, __mmask16 tail, __m512 (&c)[MR][NV]) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[r][v] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    const float* b_row = B + k * ldb;
    __m512 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      b[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(tail, b_row + 16 * v) : _mm512_loadu_ps(b_row + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(A_TRANS ? A[k * lda + r] : A[r * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]);
    }
  }
}

// One MR x (16 NV) tile: the register tile, then epi.apply<MR, NV>(m0, c, tail) (rows
// m0 .. m0 + MR - 1 of the panel).
template <int MR, int NV, bool A_TRANS, class Epi>
FA_AVX512_TARGET void micro_kernel(int64_t m0, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                                   __mmask16 tail, const Epi& epi) {
  __m512 c[MR][NV];
  micro_tile<MR, NV, A_TRANS>(K, A_TRANS ? A + m0 : A + m0 * lda, lda, B, ldb, tail, c);
  epi.template apply<MR, NV>(m0, c, tail);
}

// One column panel of at most GEMM_NR columns (nv vectors, the last masked by tail),
// swept down all M rows in GEMM_MR-row tiles (the panel of B is reused from L1 by each),
// row tails on the MR < 6 instantiations.
template <bool A_TRANS, int NV, class Epi>
FA_AVX512_TARGET void micro_panel_nv(int64_t M, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                                     __mmask16 tail, const Epi& epi) {
  int64_t m0 = 0;
  for (; m0 + GEMM_MR <= M; m0 += GEMM_MR) micro_kernel<GEMM_MR, NV, A_TRANS>(m0, K, A, lda, B, ldb, tail, epi);
  switch (M - m0) {
    case 0: return;
    case 1: return micro_kernel<1, NV, A_TRANS>(m0, K, A, lda, B, ldb, tail, epi);
    case 2: return micro_kernel<2, NV, A_TRANS>(m0, K, A, lda, B, ldb, tail, epi);
    case 3: return micro_kernel<3, NV, A_TRANS>(m0, K, A, lda, B, ldb, tail, epi);
    case 4: return micro_kernel<4, NV, A_TRANS>(m0, K, A, lda, B, ldb, tail, epi);
    default: return micro_kernel<5, NV, A_TRANS>(m0, K, A, lda, B, ldb, tail, epi);
  }
}
template <bool A_TRANS, class Epi>
FA_AVX512_TARGET void micro_panel(int64_t M, int64_t n, int64_t K, const float* A, int64_t lda, const float* B,
                                  int64_t ldb, const Epi& epi) {
  const int nv = static_cast<int>((n + 15) / 16);
  const __mmask16 tail = lane_mask(n - 16 * (nv - 1));
  switch (nv) {
    case 1: return micro_panel_nv<A_TRANS, 1>(M, K, A, lda, B, ldb, tail, epi);
    case 2: return micro_panel_nv<A_TRANS, 2>(M, K, A, lda, B, ldb, tail, epi);
    case 3: return micro_panel_nv<A_TRANS, 3>(M, K, A, lda, B, ldb, tail, epi);
    default: return micro_panel_nv<A_TRANS, 4>(M, K, A, lda, B, ldb, tail, epi);
  }
}

// The GEMM epilogue: C = alpha c (+ rs[r] * C), C the panel's first column.
struct StoreEpilogue {
  float* C;
  int64_t ldc;
  float alpha;
  bool accumulate;
  const float* rs;
  template <int MR, int NV>
  FA_AVX512_TARGET FA_ALWAYS_INLINE void apply(int64_t m0, __m512 (&c)[MR][NV], __mmask16 tail) const {
    const __m512 va = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      float* c_row = C + (m0 + r) * ldc;
      const __m512 f = _mm512_set1_ps(rs ? rs[m0 + r] : 1.0f);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const __mmask16 m = v == NV - 1 ? tail : __mmask16(0xFFFF);
        // One rounding of alpha c, never contracted into the FMA below: the backward's row
        // statistics (bwd_kernel.h) rely on scaled scores identical to ProbsEpilogue's.
        __m512 x = _mm512_mul_round_ps(c[r][v], va, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        if (accumulate) x = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, c_row + 16 * v), f, x);
        _mm512_mask_storeu_ps(c_row + 16 * v, m, x);
      }
    }
  }
};

// op(A) B in column panels of GEMM_NR, each swept down all M rows; panel n0 (B + n0) ends
// in the epilogue make_epi(n0).
template <bool A_TRANS, class MakeEpi>
FA_AVX512_TARGET void gemm_f32_panels(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                                      int64_t ldb, const MakeEpi& make_epi) {
  for (int64_t n0 = 0; n0 < N; n0 += GEMM_NR)
    micro_panel<A_TRANS>(M, std::min<int64_t>(GEMM_NR, N - n0), K, A, lda, B + n0, ldb, make_epi(n0));
}

// C = alpha op(A) B (+ rs * C).
template <bool A_TRANS>
FA_AVX512_TARGET void gemm_f32_avx512(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                                      const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate,
                                      const float* rs = nullptr) {
  gemm_f32_panels<A_TRANS>(M, N, K, A, lda, B, ldb,
                           [&](int64_t n0) { return StoreEpilogue{C + n0, ldc, alpha, accumulate, rs}; });
}

// dst (cols x rows, ld_dst) = src (rows x cols, ld_src)^T, in 16 x 16 blocks transposed in
// registers (unpack within 128-bit lanes, then lane shuffles). Reads only inside the
// rows x cols source; writes only the cols x rows destination.
FA_AVX512_TARGET inline void transpose_f32_avx512(int64_t rows, int64_t cols, const float* src, int64_t ld_src,
                                                  float* dst, int64_t ld_dst) {
  for (int64_t i0 = 0; i0 < rows; i0 += 16) {
    const int64_t ni = rows - i0 < 16 ? rows - i0 : 16;
    const __mmask16 store_mask = lane_mask(ni);
    for (int64_t j0 = 0; j0 < cols; j0 += 16) {
      const int64_t nj = cols - j0 < 16 ? cols - j0 : 16;
      const __mmask16 load_mask = lane_mask(nj);
      __m512 r[16], t[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < ni ? _mm512_maskz_loadu_ps(load_mask, src + (i0 + i) * ld_src + j0) : _mm512_setzero_ps();
      for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
      }
      // r[4g + m]: in 128-bit lane L, element 4L + m of rows 4g .. 4g + 3.
      for (int g = 0; g < 4; ++g) {
        const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 2]);
        const __m512d c = _mm512_castps_pd(t[4 * g + 1]), d = _mm512_castps_pd(t[4 * g + 3]);
        r[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
        r[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        r[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
        r[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
      }
      for (int m = 0; m < 4; ++m) {
        const __m512 v0 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x88), v1 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xDD);
        const __m512 w0 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x88);
        const __m512 w1 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xDD);
        t[m] = _mm512_shuffle_f32x4(v0, w0, 0x88);       // element m of every row
        t[4 + m] = _mm512_shuffle_f32x4(v1, w1, 0x88);   // element 4 + m
        t[8 + m] = _mm512_shuffle_f32x4(v0, w0, 0xDD);   // element 8 + m
        t[12 + m] = _mm512_shuffle_f32x4(v1, w1, 0xDD);  // element 12 + m
      }
      for (int j = 0; j < nj; ++j) _mm512_mask_storeu_ps(dst + (j0 + j) * ld_dst + i0, store_mask, t[j]);
    }
  }
}

}  // namespace fused_attn::cpu

#endif  // FA_CPU_HAVE_AVX512_PATH
