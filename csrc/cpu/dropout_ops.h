// Dropout on score tiles (common/dropout.h says which elements): the keep decisions of a tile,
// drawn again wherever needed (forward: before P V; backward: on dP and on P before dV), and
// their application. Philox runs over a row's counters in compiler-vectorised clones
// (FA_CPU_VEC_VERSIONS): four keys per call, 32x32 -> 64-bit products in SIMD lanes.
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include "params.h"  // common/attn_params.h, which includes common/dropout.h
#include "tile_ops.h"

namespace fused_attn::cpu {

// Keep decisions of row i (of head bh) for counters c_begin + c, c < n: the four keys of counter c
// are the bytes of keep4[c] (1 = kept), in key order on a little-endian CPU, so that the loop stores
// one 32-bit word per SIMD lane.
FA_ALWAYS_INLINE void keep_row_impl(uint32_t k0, uint32_t k1, uint32_t thr, uint32_t i, uint32_t bh, int64_t c_begin,
                                    int64_t n, uint32_t* keep4) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    uint32_t x0 = static_cast<uint32_t>(c_begin + c), x1 = i, x2 = bh, x3 = 0;
    philox4x32_10(x0, x1, x2, x3, k0, k1);
    keep4[c] = uint32_t(x0 >= thr) | uint32_t(x1 >= thr) << 8 | uint32_t(x2 >= thr) << 16 | uint32_t(x3 >= thr) << 24;
  }
}
FA_CPU_VEC_VERSIONS(keep_row,
                    (uint32_t k0, uint32_t k1, uint32_t thr, uint32_t i, uint32_t bh, int64_t c_begin, int64_t n,
                     uint32_t* keep4),
                    (k0, k1, thr, i, bh, c_begin, n, keep4))

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
