// Dropout on score tiles (common/dropout.h says which elements): the keep decisions of a tile,
// drawn again wherever needed (forward: before P V; backward: on dP and on P before dV), and
// their application. Philox runs over a row's counters in compiler-vectorised clones
// (FA_CPU_VEC_VERSIONS): four keys per call, 32x32 -> 64-bit products in SIMD lanes.
#pragma once

#include <cstdint>
#include <vector>

#include "params.h"  // common/attn_params.h, which includes common/dropout.h
#include "tile_ops.h"

namespace fused_attn::cpu {

// Philox outputs of row i (of head bh) for counters c_begin + c, c < n: output t at out[t * n + c].
FA_ALWAYS_INLINE void philox_row_impl(uint32_t k0, uint32_t k1, uint32_t i, uint32_t bh, int64_t c_begin, int64_t n,
                                      uint32_t* out) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    uint32_t x0 = static_cast<uint32_t>(c_begin + c), x1 = i, x2 = bh, x3 = 0;
    philox4x32_10(x0, x1, x2, x3, k0, k1);
    out[c] = x0;
    out[n + c] = x1;
    out[2 * n + c] = x2;
    out[3 * n + c] = x3;
  }
}
FA_CPU_VEC_VERSIONS(philox_row,
                    (uint32_t k0, uint32_t k1, uint32_t i, uint32_t bh, int64_t c_begin, int64_t n, uint32_t* out),
                    (k0, k1, i, bh, c_begin, n, out))

// A tile's keep decisions: keep[r * ldk + c] = 1 where element (bh, i0 + r, j0 + c) is kept, for
// r < rows, c < cols. `scratch` holds the row's outputs (DropoutScratch).
struct DropoutTile {
  std::vector<uint32_t> outs;
  std::vector<uint8_t> keep;
  int64_t ldk = 0;

  DropoutTile(int64_t max_rows, int64_t max_cols)
      : outs(kKeysPerPhilox * (max_cols / kKeysPerPhilox + 2)), keep(max_rows * max_cols), ldk(max_cols) {}

  const uint8_t* draw(const Dropout& dr, int64_t bh, int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
    const int64_t c_begin = j0 / kKeysPerPhilox, n = (j0 + cols + kKeysPerPhilox - 1) / kKeysPerPhilox - c_begin;
    const int64_t skip = j0 - c_begin * kKeysPerPhilox;  // columns of the first call before j0
    const uint32_t thr = dr.threshold;
    for (int64_t r = 0; r < rows; ++r) {
      philox_row(dr.key_lo(), dr.key_hi(), static_cast<uint32_t>(i0 + r), static_cast<uint32_t>(bh), c_begin, n,
                 outs.data());
      uint8_t* k = keep.data() + r * ldk;
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t x = c + skip;
        k[c] = outs[(x % kKeysPerPhilox) * n + x / kKeysPerPhilox] >= thr;
      }
    }
    return keep.data();
  }
};

// Zero the dropped elements of a (rows x cols) tile (forward: P before P V; 16-bit P too).
template <typename T>
inline void drop_tile(T* t, int64_t ld, int64_t rows, int64_t cols, const uint8_t* keep, int64_t ldk) {
  for (int64_t r = 0; r < rows; ++r) {
    T* row = t + r * ld;
    const uint8_t* k = keep + r * ldk;
    for (int64_t c = 0; c < cols; ++c)
      if (!k[c]) row[c] = T(0);
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
