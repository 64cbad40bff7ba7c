// Dropout on score tiles (common/dropout.h says which elements): the keep decisions of a tile,
// drawn again wherever needed (forward: before P V; backward: on dP and on P before dV), and
// their application. Philox runs over a row's counters 16 (AVX-512) or 8 (AVX2) at a time in
// hand-vectorised versions (four keys per counter, 32x32 -> 64-bit products in SIMD lanes),
// chosen by vec_isa() as the compiler-vectorised loops are; a portable loop elsewhere.
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include "params.h"  // common/attn_params.h, which includes common/dropout.h
#include "tile_ops.h"

namespace fused_attn::cpu {

// Keep decisions of row i (of head bh) for counters c_begin + c, c < n: the four keys of counter c
// are the bytes of keep4[c] (1 = kept), in key order on a little-endian CPU. The portable loop;
// keep_row below runs hand-vectorised versions where the CPU has AVX2 or AVX-512.
FA_ALWAYS_INLINE void keep_row_impl(uint32_t k0, uint32_t k1, uint32_t thr, uint32_t i, uint32_t bh, int64_t c_begin,
                                    int64_t n, uint32_t* keep4) {
  for (int64_t c = 0; c < n; ++c) {
    uint32_t x0 = static_cast<uint32_t>(c_begin + c), x1 = i, x2 = bh, x3 = 0;
    philox4x32_10(x0, x1, x2, x3, k0, k1);
    keep4[c] = uint32_t(x0 >= thr) | uint32_t(x1 >= thr) << 8 | uint32_t(x2 >= thr) << 16 | uint32_t(x3 >= thr) << 24;
  }
}

#ifdef FA_CPU_HAVE_AVX512_PATH
// Philox in SIMD lanes, U independent vectors of counters at a time (the rounds are a dependency
// chain: several in flight hide the multiplier's latency). The 32 x 32 -> 64-bit products: vpmuludq
// on the even lanes and on the odd lanes shifted down, their words blended back (no vpmulld).
#define FA_AVX2_TARGET __attribute__((target("avx2,fma")))

template <int U>
FA_AVX2_TARGET FA_ALWAYS_INLINE void philox_avx2(__m256i (&x0)[U], __m256i (&x1)[U], __m256i (&x2)[U],
                                                 __m256i (&x3)[U], uint32_t k0, uint32_t k1) {
  const __m256i ra = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundA)),
                rb = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundB));
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const __m256i ka = _mm256_set1_epi32(static_cast<int>(k0)), kb = _mm256_set1_epi32(static_cast<int>(k1));
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const __m256i e0 = _mm256_mul_epu32(rb, x2[u]), o0 = _mm256_mul_epu32(rb, _mm256_srli_epi64(x2[u], 32));
      const __m256i e2 = _mm256_mul_epu32(ra, x0[u]), o2 = _mm256_mul_epu32(ra, _mm256_srli_epi64(x0[u], 32));
      const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(e0, 32), o0, 0xAA);
      const __m256i hi2 = _mm256_blend_epi32(_mm256_srli_epi64(e2, 32), o2, 0xAA);
      x0[u] = _mm256_xor_si256(_mm256_xor_si256(hi0, x1[u]), ka);
      x2[u] = _mm256_xor_si256(_mm256_xor_si256(hi2, x3[u]), kb);
      x1[u] = _mm256_blend_epi32(e0, _mm256_slli_epi64(o0, 32), 0xAA);
      x3[u] = _mm256_blend_epi32(e2, _mm256_slli_epi64(o2, 32), 0xAA);
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}

// Byte `byte` of a keep word where x >= thr (unsigned: max(x, thr) == x).
FA_AVX2_TARGET FA_ALWAYS_INLINE __m256i kept_avx2(__m256i x, __m256i thr, int byte) {
  return _mm256_and_si256(_mm256_cmpeq_epi32(_mm256_max_epu32(x, thr), x), _mm256_set1_epi32(1 << (8 * byte)));
}

// The keep word of 8 counters (byte t: output t >= thr).
FA_AVX2_TARGET FA_ALWAYS_INLINE __m256i keep_word_avx2(__m256i x0, __m256i x1, __m256i x2, __m256i x3, __m256i thr) {
  return _mm256_or_si256(_mm256_or_si256(kept_avx2(x0, thr, 0), kept_avx2(x1, thr, 1)),
                         _mm256_or_si256(kept_avx2(x2, thr, 2), kept_avx2(x3, thr, 3)));
}

FA_AVX2_TARGET inline void keep_row_avx2(uint32_t k0, uint32_t k1, uint32_t thr, uint32_t i, uint32_t bh,
                                         int64_t c_begin, int64_t n, uint32_t* keep4) {
  constexpr int U = 2;
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), vthr = _mm256_set1_epi32(static_cast<int>(thr));
  int64_t c = 0;
  for (; c + 8 * U <= n; c += 8 * U) {
    __m256i x0[U], x1[U], x2[U], x3[U];
    for (int u = 0; u < U; ++u) {
      x0[u] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(c_begin + c + 8 * u)), lanes);
      x1[u] = _mm256_set1_epi32(static_cast<int>(i));
      x2[u] = _mm256_set1_epi32(static_cast<int>(bh));
      x3[u] = _mm256_setzero_si256();
    }
    philox_avx2<U>(x0, x1, x2, x3, k0, k1);
    for (int u = 0; u < U; ++u)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(keep4 + c + 8 * u),
                          keep_word_avx2(x0[u], x1[u], x2[u], x3[u], vthr));
  }
  keep_row_impl(k0, k1, thr, i, bh, c_begin + c, n - c, keep4 + c);
}

template <int U>
FA_AVX512_TARGET FA_ALWAYS_INLINE void philox_avx512(__m512i (&x0)[U], __m512i (&x1)[U], __m512i (&x2)[U],
                                                     __m512i (&x3)[U], uint32_t k0, uint32_t k1) {
  const __m512i ra = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundA)),
                rb = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundB));
  constexpr __mmask16 ODD = 0xAAAA;
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const __m512i ka = _mm512_set1_epi32(static_cast<int>(k0)), kb = _mm512_set1_epi32(static_cast<int>(k1));
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const __m512i e0 = _mm512_mul_epu32(rb, x2[u]), o0 = _mm512_mul_epu32(rb, _mm512_srli_epi64(x2[u], 32));
      const __m512i e2 = _mm512_mul_epu32(ra, x0[u]), o2 = _mm512_mul_epu32(ra, _mm512_srli_epi64(x0[u], 32));
      const __m512i hi0 = _mm512_mask_blend_epi32(ODD, _mm512_srli_epi64(e0, 32), o0);
      const __m512i hi2 = _mm512_mask_blend_epi32(ODD, _mm512_srli_epi64(e2, 32), o2);
      x0[u] = _mm512_ternarylogic_epi32(hi0, x1[u], ka, 0x96);  // three-way xor
      x2[u] = _mm512_ternarylogic_epi32(hi2, x3[u], kb, 0x96);
      x1[u] = _mm512_mask_blend_epi32(ODD, e0, _mm512_slli_epi64(o0, 32));
      x3[u] = _mm512_mask_blend_epi32(ODD, e2, _mm512_slli_epi64(o2, 32));
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}

// The keep word of 16 counters (byte t: output t >= thr, unsigned).
FA_AVX512_TARGET FA_ALWAYS_INLINE __m512i keep_word_avx512(__m512i x0, __m512i x1, __m512i x2, __m512i x3,
                                                           __m512i thr) {
  __m512i word = _mm512_maskz_mov_epi32(_mm512_cmpge_epu32_mask(x0, thr), _mm512_set1_epi32(1));
  word = _mm512_mask_or_epi32(word, _mm512_cmpge_epu32_mask(x1, thr), word, _mm512_set1_epi32(1 << 8));
  word = _mm512_mask_or_epi32(word, _mm512_cmpge_epu32_mask(x2, thr), word, _mm512_set1_epi32(1 << 16));
  return _mm512_mask_or_epi32(word, _mm512_cmpge_epu32_mask(x3, thr), word, _mm512_set1_epi32(1 << 24));
}

FA_AVX512_TARGET inline void keep_row_avx512(uint32_t k0, uint32_t k1, uint32_t thr, uint32_t i, uint32_t bh,
                                             int64_t c_begin, int64_t n, uint32_t* keep4) {
  constexpr int U = 2;
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i vthr = _mm512_set1_epi32(static_cast<int>(thr));
  for (int64_t c = 0; c < n; c += 16 * U) {  // lanes past n computed, not stored
    __m512i x0[U], x1[U], x2[U], x3[U];
    for (int u = 0; u < U; ++u) {
      x0[u] = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(c_begin + c + 16 * u)), lanes);
      x1[u] = _mm512_set1_epi32(static_cast<int>(i));
      x2[u] = _mm512_set1_epi32(static_cast<int>(bh));
      x3[u] = _mm512_setzero_si512();
    }
    philox_avx512<U>(x0, x1, x2, x3, k0, k1);
    for (int u = 0; u < U; ++u)
      _mm512_mask_storeu_epi32(keep4 + c + 16 * u, lane_mask(n - c - 16 * u),
                               keep_word_avx512(x0[u], x1[u], x2[u], x3[u], vthr));
  }
}
#endif

inline void keep_row(uint32_t k0, uint32_t k1, uint32_t thr, uint32_t i, uint32_t bh, int64_t c_begin, int64_t n,
                     uint32_t* keep4) {
#ifdef FA_CPU_HAVE_AVX512_PATH
  switch (vec_isa()) {
    case VecIsa::AVX512: return keep_row_avx512(k0, k1, thr, i, bh, c_begin, n, keep4);
    case VecIsa::AVX2: return keep_row_avx2(k0, k1, thr, i, bh, c_begin, n, keep4);
    default: break;
  }
#endif
  keep_row_impl(k0, k1, thr, i, bh, c_begin, n, keep4);
}

// A tile's keep decisions, drawn per row: draw() returns keep with keep[r * ldk + c] = 1 where
// element (bh, i0 + r, j0 + c) is kept, for r < rows, c < cols.
struct DropoutTile {
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "keep_row's words are read as bytes in key order");
  int64_t ldk;  // bytes per row: whole counters, one more for a tile not starting on one
  std::vector<uint32_t> words;

  DropoutTile(int64_t max_rows, int64_t max_cols)
      : ldk(kKeysPerPhilox * (max_cols / kKeysPerPhilox + 2)), words(max_rows * ldk / kKeysPerPhilox) {}

  const uint8_t* draw(const Dropout& dr, int64_t bh, int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
    const int64_t c_begin = j0 / kKeysPerPhilox, n = (j0 + cols + kKeysPerPhilox - 1) / kKeysPerPhilox - c_begin;
    for (int64_t r = 0; r < rows; ++r)
      keep_row(dr.key_lo(), dr.key_hi(), dr.threshold, static_cast<uint32_t>(i0 + r), static_cast<uint32_t>(bh),
               c_begin, n, words.data() + r * (ldk / kKeysPerPhilox));
    return reinterpret_cast<const uint8_t*>(words.data()) + (j0 - c_begin * kKeysPerPhilox);
  }
};

// Zero the dropped elements of a (rows x cols) tile (forward: P before P V; 16-bit P as its bits).
template <typename T>
inline void drop_tile(T* t, int64_t ld, int64_t rows, int64_t cols, const uint8_t* keep, int64_t ldk) {
  using Bits = std::conditional_t<sizeof(T) == 2, uint16_t, T>;
  for (int64_t r = 0; r < rows; ++r) {
    Bits* row = reinterpret_cast<Bits*>(t + r * ld);
    const uint8_t* k = keep + r * ldk;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) row[c] = k[c] ? row[c] : Bits(0);
  }
}

// t = t * keep_scale where kept, 0 where dropped (backward: dP = dO V^T as the forward's dropped
// P saw it, and P before dV).
template <typename acc_t>
inline void drop_scale_tile(acc_t* t, int64_t ld, int64_t rows, int64_t cols, const uint8_t* keep, int64_t ldk,
                            acc_t keep_scale) {
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* row = t + r * ld;
    const uint8_t* k = keep + r * ldk;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) row[c] = k[c] ? row[c] * keep_scale : acc_t(0);
  }
}

}  // namespace fused_attn::cpu
