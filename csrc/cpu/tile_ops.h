// Elementwise work on the fp32 / fp64 score tiles between the GEMMs: the online
// softmax update of the forward, the probability and dS recomputation of the
// backward, and conversions to 16-bit GEMM operands.
//
// Tiles are row-major with leading dimension ld; `iv[r]` (params.h: tile_intervals) is the
// interval [begin, end) of columns row r may see, relative to the tile (causal diagonal,
// ragged tail, a window's start; begin == end for a row that sees nothing), or iv is
// nullptr where every row sees every column (the unmasked path); the rest of the row is
// written as 0. Every exponential is an exp2. The forward takes raw scores s and subtracts
// before it scales: with t = sgn * s (sgn = the sign of scale), a row's reference m (a t
// value) and asc = |scale| log2(e), P = exp2((t - m) * asc). The difference is exact near
// the max and nothing is left for a compiler to contract into an FMA (s * sc - m as one FMA
// gives the max's exponent the rounding error of s * sc, which at |s * sc| ~ 1e10 is ~1e3,
// not 0), so any finite scale works. The backward takes P = exp2((g s - hi) a - lo) with
// per-row hi, lo: fp32 the same way from raw scores (g = sgn, a = asc), other dtypes from
// scores its GEMM already scaled by scale log2 e (g = a = 1).
//
// NaN and inf follow the math path: a NaN score makes the row's P, l, out and lse NaN;
// a -inf score gets P = 0; a +inf score (the row's max) gets P = NaN and lse = +inf.
//
// Two implementations: portable loops written for the compiler's vectoriser (`omp simd`
// reductions, a branch-free exp2; vectorised only with -fno-trapping-math, setup.py),
// compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and baseline x86-64 and picked
// per call by vec_isa(): the CPU's best, capped by set_vec_isa (FUSED_ATTN_CPU_ISA=avx2
// runs the AVX2 versions on an AVX-512 CPU, as an AVX2 CPU would); and, for the 16-bit forward's
// softmax, AVX-512 intrinsics used where the CPU has AVX-512. fp32 on AVX-512 does this
// work in the micro-kernel's epilogues instead (SoftmaxEpilogue in fwd_kernel.h,
// ProbsEpilogue / DScoresEpilogue in bwd_kernel.h), sharing exp2_avx512 from here.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "config.h"

#include "isa.h"
#include "params.h"

#define FA_ALWAYS_INLINE inline __attribute__((always_inline))

namespace fused_attn::cpu {

// Row r's visible keys of a tile: iv[r], or all cols where iv is nullptr (the unmasked path).
FA_ALWAYS_INLINE KeyInterval row_keys(const KeyInterval* iv, int64_t r, int64_t cols) {
  return iv ? iv[r] : KeyInterval{0, cols};
}

// `void name params`, one version per VecIsa of `name##_impl args` (the loop, inlined into
// each so that it is vectorised for that target), chosen per call by vec_isa().
#ifdef FA_CPU_ISA_VERSIONS
#define FA_CPU_VEC_VERSIONS(name, params, args)                                                      \
  __attribute__((target("arch=x86-64-v4"))) inline void name##_avx512 params { name##_impl args; } \
  __attribute__((target("arch=x86-64-v3"))) inline void name##_avx2 params { name##_impl args; }   \
  inline void name##_baseline params { name##_impl args; }                                         \
  inline void name params {                                                                        \
    switch (vec_isa()) {                                                                           \
      case VecIsa::AVX512: return name##_avx512 args;                                              \
      case VecIsa::AVX2: return name##_avx2 args;                                                  \
      default: return name##_baseline args;                                                        \
    }                                                                                              \
  }
#else
#define FA_CPU_VEC_VERSIONS(name, params, args) \
  inline void name params { name##_impl args; }
#endif

// 2^x for x <= 0 in fp32: 2^round(x) built in the exponent bits times a polynomial
// for 2^f, |f| <= 0.5 of degree 7 (truncation error 5e-9, below half an fp32 ulp). The
// 16-bit forward rounds P to bf16 / fp16, but its row sums (hence lse = m + log2 l) are
// fp32: a lower degree left lse 4e-5 to 7.5e-5 off, all of it where lse is near 0.
// Returns 0 below -126 (no denormals), including for -inf; NaN for NaN.
// Taylor coefficients of 2^f = e^(f ln 2): (ln 2)^n / n!.
constexpr float EXP2_C1 = 0.6931471805599453f, EXP2_C2 = 0.2402265069591007f, EXP2_C3 = 0.05550410866482158f,
                EXP2_C4 = 0.009618129107628477f, EXP2_C5 = 0.0013333558146428443f,
                EXP2_C6 = 0.00015403530393381608f, EXP2_C7 = 1.525273380405984e-05f;

// 2^f on [0, 1) for the AVX-512 softmax (f = x - floor(x), then scalef by floor(x)):
// near-minimax polynomials (relative-error least squares with Lawson reweighting),
// coefficients lowest first; max relative error 1.9e-9 (degree 6).
constexpr float EXP2_01_D6[7] = {1.0f, 0.6931470036506653f, 0.24022983014583588f, 0.055483341217041016f,
                                 0.009678840637207031f, 0.0012439694255590439f, 0.0002170222724089399f};

FA_ALWAYS_INLINE float exp2_fast(float x) {
  constexpr float ROUND_MAGIC = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  constexpr float C1 = EXP2_C1, C2 = EXP2_C2, C3 = EXP2_C3, C4 = EXP2_C4, C5 = EXP2_C5, C6 = EXP2_C6, C7 = EXP2_C7;
  const bool nan = x != x;
  const float xc = nan ? 0.0f : (x < -127.0f ? -127.0f : (x > 127.0f ? 127.0f : x));
  const float n = (xc + ROUND_MAGIC) - ROUND_MAGIC;
  const float f = xc - n;
  const float p = 1.0f + f * (C1 + f * (C2 + f * (C3 + f * (C4 + f * (C5 + f * (C6 + f * C7))))));
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  const float e = p * __builtin_bit_cast(float, bits);
  return nan ? x : e;
}

FA_ALWAYS_INLINE double exp2_fast(double x) { return std::exp2(x); }

// Online softmax, one key block (raw scores s; sgn, asc as in the header): for each row,
// new max m of t = sgn * s, P = exp2((t - m) * asc) in place,
// l = l * corr + rowsum(P) with corr = exp2((m_old - m) * asc). A row whose visible
// scores so far are all -inf (or NaN) keeps m = -inf and takes P against 0 instead: 0
// for -inf, NaN for NaN; it stays unseen (l = 0) only without NaN.
template <typename acc_t>
FA_ALWAYS_INLINE void online_softmax_impl(acc_t* s, int64_t ld, int64_t rows, int64_t cols,
                                          const KeyInterval* iv, acc_t sgn, acc_t asc, acc_t* m, acc_t* l,
                                          acc_t* corr) {
  constexpr acc_t NEG_INF = -std::numeric_limits<acc_t>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* row = s + r * ld;
    const KeyInterval keys = row_keys(iv, r, cols);
    const int64_t cb = keys.begin, ce = keys.end;
    acc_t mx = NEG_INF;
#pragma omp simd reduction(max : mx)
    for (int64_t c = cb; c < ce; ++c) {
      const acc_t t = row[c] * sgn;
      mx = t > mx ? t : mx;
    }
    const acc_t m_old = m[r], m_new = m_old > mx ? m_old : mx;
    const acc_t m_use = m_new == NEG_INF ? acc_t(0) : m_new;
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = cb; c < ce; ++c) {
      const acc_t e = exp2_fast((row[c] * sgn - m_use) * asc);
      row[c] = e;
      sum += e;
    }
    std::fill(row, row + cb, acc_t(0));
    std::fill(row + ce, row + cols, acc_t(0));
    corr[r] = m_old == m_new ? acc_t(1) : (m_old == NEG_INF ? acc_t(0) : exp2_fast((m_old - m_new) * asc));
    l[r] = l[r] * corr[r] + sum;
    m[r] = m_new;
  }
}

#ifdef FA_CPU_HAVE_AVX512_PATH
#define FA_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

// The first n of 16 lanes (n clamped to [0, 16]).
FA_ALWAYS_INLINE __mmask16 lane_mask(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// Lanes [b, e) of 16 (b, e relative to the vector's first column; any values).
FA_ALWAYS_INLINE __mmask16 lane_range(int64_t b, int64_t e) {
  return __mmask16(lane_mask(e) & ~lane_mask(b));
}

// 2^x in the lanes of kv, 0 elsewhere: 2^floor(x) (scalef) times one of the EXP2_01_D*
// polynomials at f = x - floor(x) in [0, 1) (vreduceps, round down). x needs no clamp:
// scalef of a huge negative power gives 0.
template <size_t N>
FA_AVX512_TARGET FA_ALWAYS_INLINE __m512 exp2_avx512(__m512 x, __mmask16 kv, const float (&c)[N]) {
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_set1_ps(c[N - 1]);
  for (int i = static_cast<int>(N) - 2; i >= 0; --i) p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(c[i]));
  return _mm512_maskz_scalef_ps(kv, p, x);
}

// The forward's exp2 argument (t - m) * asc with t = sgn * s (sgn = +-1: the FMA is an
// exact negation and one rounding); the scale multiplies the difference, never s.
FA_AVX512_TARGET FA_ALWAYS_INLINE __m512 softmax_exponent(__m512 s, __m512 sgn, __m512 m, __m512 asc) {
  return _mm512_mul_ps(_mm512_fmsub_ps(s, sgn, m), asc);
}

#define FA_AVX512_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16")))

// P = exp2(x) of columns [c, c + 16) of a row, 0 outside its keys [cb, ce), stored to the
// 16-bit row `out` (not past cols) as online_softmax_avx512's OUT says; returned for the
// row sum.
template <int OUT>
FA_AVX512_BF16_TARGET FA_ALWAYS_INLINE __m512 store_p16(uint16_t* out, int64_t c, int64_t cols, int64_t cb, int64_t ce,
                                                     __m512 x) {
  const __mmask16 kc = lane_mask(cols - c), kv = lane_range(cb - c, ce - c);
  const __m512 e = exp2_avx512(x, kv, EXP2_01_D6);
  if constexpr (OUT == 1) {
    _mm256_mask_storeu_epi16(out + c, kc, (__m256i)_mm512_cvtneps_pbh(e));
  } else if constexpr (OUT == 3) {  // round to nearest even (a quiet NaN stays NaN)
    const __m512i u = _mm512_castps_si512(e);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
    _mm256_mask_storeu_epi16(out + c, kc, _mm512_cvtepi32_epi16(rounded));
  } else {
    _mm256_mask_storeu_epi16(out + c, kc, _mm512_cvtps_ph(e, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  return e;
}

// The 16-bit forward's online softmax hand-vectorised for AVX-512, in one pass over the
// score tile: masked 16-lane loops, exp2 by vreduceps + polynomial + scalef, and P goes
// straight to the bf16 / fp16 GEMM operand `p16` (ld16) instead of back into s.
// m[r] (a t value, as in online_softmax_impl) is a lazy reference as in the fp32
// forward's SoftmaxEpilogue (fwd_kernel.h): it moves only when a score passes it by more
// than LAZY_MAX_SLACK (P <= 2^8, inside bf16's and fp16's range), and then to the max of
// the row's remaining visible scores, after which the row's P so far is recomputed from
// the fp32 scores (no double rounding). A row with no visible key yet (m = -inf) always
// moves at its first one (where they are all -inf or NaN, m stays -inf and P is taken
// against 0). corr = 1 wherever the reference stayed put, which lets the caller skip
// rescaling those rows of acc.
// OUT: 1 = bf16 P (AVX512-BF16 conversion), 3 = the same rounded with integer ops (CPUs
// without AVX512-BF16); 2 = fp16 P.
template <int OUT>
FA_AVX512_BF16_TARGET void online_softmax_avx512(
    float* s, int64_t ld, int64_t rows, int64_t cols, const KeyInterval* iv, float sgn, float asc, float* m,
    float* l, float* corr, uint16_t* p16, int64_t ld16) {
  constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
  const __m512 vsgn = _mm512_set1_ps(sgn), vasc = _mm512_set1_ps(asc), slack = _mm512_set1_ps(LAZY_MAX_SLACK);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = s + r * ld;
    uint16_t* out = p16 + r * ld16;
    const KeyInterval keys = row_keys(iv, r, cols);
    const int64_t cb = keys.begin, ce = keys.end;
    const float m_start = m[r];
    float m_ref = m_start;
    bool moved = false;  // after a move m_ref is the max of the row's remaining scores
    __m512 vm = _mm512_set1_ps(m_ref);
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 kv = lane_range(cb - c, ce - c);
      __m512 x = softmax_exponent(_mm512_maskz_loadu_ps(kv, row + c), vsgn, vm, vasc);
      if (__builtin_expect(!moved && kv != 0 &&
                               (m_ref == NEG_INF || _mm512_mask_cmp_ps_mask(kv, x, slack, _CMP_GT_OQ) != 0), 0)) {
        __m512 y_max = _mm512_set1_ps(NEG_INF);
        for (int64_t c2 = c; c2 < ce; c2 += 16) {
          const __mmask16 k2 = lane_range(cb - c2, ce - c2);
          y_max = _mm512_mask_max_ps(y_max, k2, y_max, _mm512_mul_ps(_mm512_maskz_loadu_ps(k2, row + c2), vsgn));
        }
        m_ref = _mm512_reduce_max_ps(y_max);
        moved = true;
        vm = _mm512_set1_ps(m_ref == NEG_INF ? 0.0f : m_ref);
        vsum = _mm512_setzero_ps();
        for (int64_t c2 = 0; c2 < c; c2 += 16)
          vsum = _mm512_add_ps(
              vsum, store_p16<OUT>(out, c2, cols, cb, ce,
                                   softmax_exponent(_mm512_maskz_loadu_ps(lane_range(cb - c2, ce - c2), row + c2),
                                                    vsgn, vm, vasc)));
        x = softmax_exponent(_mm512_maskz_loadu_ps(kv, row + c), vsgn, vm, vasc);
      }
      vsum = _mm512_add_ps(vsum, store_p16<OUT>(out, c, cols, cb, ce, x));
    }
    corr[r] = m_ref == m_start ? 1.0f : (m_start == NEG_INF ? 0.0f : exp2_fast((m_start - m_ref) * asc));
    l[r] = l[r] * corr[r] + _mm512_reduce_add_ps(vsum);
    m[r] = m_ref;
  }
}

#endif

// Backward: P = exp2((g s - hi[r]) a - lo[r]) in place, 0 outside iv[r]. fp32 inputs: s the
// raw scores, g = sign(scale), a = |scale| log2 e, hi a t value near the row's max (the
// subtraction exact there) and hi a + lo = lse log2 e; otherwise s already scaled by
// scale log2 e, g = a = 1 and hi + lo = lse log2 e (bwd_kernel.h, step 1).
template <typename acc_t>
FA_ALWAYS_INLINE void probs_impl(acc_t* s, int64_t ld, int64_t rows, int64_t cols, const KeyInterval* iv,
                                 acc_t g, acc_t a, const acc_t* hi, const acc_t* lo) {
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* row = s + r * ld;
    const KeyInterval keys = row_keys(iv, r, cols);
    const int64_t cb = keys.begin, ce = keys.end;
    const acc_t h = hi[r], o = lo[r];
#pragma omp simd
    for (int64_t c = cb; c < ce; ++c) row[c] = exp2_fast((row[c] * g - h) * a - o);
    std::fill(row, row + cb, acc_t(0));
    std::fill(row + ce, row + cols, acc_t(0));
  }
}

// Backward: dS = P * ((dP - delta) + dlse) in place in dp (delta = rowsum(dO * O); dlse
// apart, so that where delta equals dP bitwise, a row whose P is one-hot, dS is exactly
// P dlse, as the math path's softmax backward gives).
template <typename acc_t>
FA_ALWAYS_INLINE void dscores_impl(acc_t* dp, const acc_t* p, int64_t ld, int64_t rows, int64_t cols,
                                   const acc_t* delta, const acc_t* dlse) {
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* d = dp + r * ld;
    const acc_t* pr = p + r * ld;
    const acc_t dr = delta[r], dl = dlse[r];
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) d[c] = pr[c] * ((d[c] - dr) + dl);
  }
}

// Backward, fp32: dS of a key that holds most of its row's probability (P > DS_EXACT_ABOVE),
// P ((dP - delta) + dlse) with dP = dO . v and the difference in double (delta64: rowsum(dO * O)
// in double). There dP - delta is a small difference of two values of size |dO| |v|: in fp32
// both sides' rounding (~sqrt(Ev) ulps) would swamp it, which the math path avoids by
// reusing its dP inside delta. One key per row at most, O(L Ev) in all.
constexpr float DS_EXACT_ABOVE = 0.5f;
inline double dot_f64(const float* a, const float* b, int64_t n) {
  double sum = 0.0;
  for (int64_t e = 0; e < n; ++e) sum += double(a[e]) * double(b[e]);
  return sum;
}
// dp_mult: what dropout multiplies this element's dP by (keep_scale or 0; 1 without dropout).
inline float exact_dscore(const float* dout_row, const float* v_row, int64_t Ev, double delta64, float p, float dl,
                          double dp_mult = 1.0) {
  return static_cast<float>(double(p) * ((dot_f64(dout_row, v_row, Ev) * dp_mult - delta64) + double(dl)));
}

FA_CPU_VEC_VERSIONS(online_softmax,
                    (float* s, int64_t ld, int64_t rows, int64_t cols, const KeyInterval* iv, float sgn, float asc,
                     float* m, float* l, float* corr),
                    (s, ld, rows, cols, iv, sgn, asc, m, l, corr))
inline void online_softmax(double* s, int64_t ld, int64_t rows, int64_t cols, const KeyInterval* iv,
                           double sgn, double asc, double* m, double* l, double* corr) {
  online_softmax_impl(s, ld, rows, cols, iv, sgn, asc, m, l, corr);
}

FA_CPU_VEC_VERSIONS(probs,
                    (float* s, int64_t ld, int64_t rows, int64_t cols, const KeyInterval* iv, float g, float a,
                     const float* hi, const float* lo),
                    (s, ld, rows, cols, iv, g, a, hi, lo))
inline void probs(double* s, int64_t ld, int64_t rows, int64_t cols, const KeyInterval* iv, double g, double a,
                  const double* hi, const double* lo) {
  probs_impl(s, ld, rows, cols, iv, g, a, hi, lo);
}

FA_CPU_VEC_VERSIONS(dscores,
                    (float* dp, const float* p, int64_t ld, int64_t rows, int64_t cols, const float* delta,
                     const float* dlse),
                    (dp, p, ld, rows, cols, delta, dlse))
inline void dscores(double* dp, const double* p, int64_t ld, int64_t rows, int64_t cols, const double* delta,
                    const double* dlse) {
  dscores_impl(dp, p, ld, rows, cols, delta, dlse);
}

// Multiply row r of a (rows x cols) tile by f[r] (skipped where f[r] == 1).
template <typename acc_t>
inline void scale_rows(acc_t* x, int64_t ld, int64_t rows, int64_t cols, const acc_t* f) {
  for (int64_t r = 0; r < rows; ++r) {
    if (f[r] == acc_t(1)) continue;
    acc_t* row = x + r * ld;
    const acc_t fr = f[r];
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) row[c] *= fr;
  }
}

// fp32 -> bf16 bits, round to nearest even (NaN stays NaN).
FA_ALWAYS_INLINE uint16_t bf16_bits(float x) {
  const uint32_t u = __builtin_bit_cast(uint32_t, x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return x != x ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
}

// fp32 tile -> 16-bit GEMM operand (the same layout).
FA_ALWAYS_INLINE void convert_tile_impl(const float* src, int64_t ld_src, c10::BFloat16* dst, int64_t ld_dst,
                                        int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* d = reinterpret_cast<uint16_t*>(dst + r * ld_dst);
    const float* s = src + r * ld_src;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) d[c] = bf16_bits(s[c]);
  }
}
FA_CPU_VEC_VERSIONS(convert_tile,
                    (const float* src, int64_t ld_src, c10::BFloat16* dst, int64_t ld_dst, int64_t rows, int64_t cols),
                    (src, ld_src, dst, ld_dst, rows, cols))
inline void convert_tile(const float* src, int64_t ld_src, c10::Half* dst, int64_t ld_dst,
                         int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * ld_dst + c] = c10::Half(src[r * ld_src + c]);
}

}  // namespace fused_attn::cpu
