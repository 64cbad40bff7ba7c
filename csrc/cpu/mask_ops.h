// Mask tensors (SDPA's attn_mask, common/attn_params.h: MaskRef) on the CPU kernels' tiles.
//
// A mask is read where it is stored, through its strides (stride 0 on the dims it broadcasts
// over), one tile at a time, and only inside each row's visible keys (the Visibility
// intervals, params.h). Per tile, classify_mask_tile says whether the mask hides every
// visible score (the tile is skipped), leaves them all as they are (bool all True, float all
// 0: the tile takes the unmasked path), or changes some (PARTIAL): then apply_mask_tile
// rewrites the score tile before the softmax, in the units the tile's scores are in:
// s += bias * mult for a float mask, s = -inf * sign(mult) where a boolean mask says False,
// with mult = 1 / scale for raw scores (the forward, and the fp32 backward: t = sign(scale) s
// then moves by bias / |scale|, exactly the score's bias after the softmax scales it) and
// log2(e) for scores already scaled to log2 units (the 16-bit and fp64 backward). The
// classification scans the tile's mask values (rows x cols bytes or floats against the GEMMs'
// rows x cols x E multiply-adds: a few per cent of a tile's work at most).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "params.h"
#include "tile_ops.h"

namespace fused_attn::cpu {

// f(T{}) with T the mask's element type (uint8_t for bool).
template <typename F>
decltype(auto) mask_type_switch(int kind, F&& f) {
  switch (kind) {
    case kMaskBool: return f(uint8_t{});
    case kMaskF32: return f(float{});
    case kMaskF64: return f(double{});
    case kMaskBF16: return f(c10::BFloat16{});
    default: return f(c10::Half{});
  }
}

// Row i's mask values for keys j, j + 1, ... (stride m.col) of query head h in batch entry b.
template <typename T>
inline const T* mask_row(const MaskRef& m, int64_t b, int64_t h, int64_t i, int64_t j) {
  return static_cast<const T*>(m.ptr) + b * m.batch + h * m.head + i * m.row + j * m.col;
}

// Whether any of a mask row's columns [cb, ce) (stride cs) lets its score through (seen), and
// whether all leave it unchanged (plain): bool True; float not -inf, and 0.
template <typename T>
FA_ALWAYS_INLINE void classify_row(const T* row, int64_t cb, int64_t ce, int64_t cs, bool& seen, bool& plain) {
  int any = 0, all = 1;
  if constexpr (std::is_same_v<T, uint8_t>) {
#pragma omp simd reduction(| : any) reduction(& : all)
    for (int64_t c = cb; c < ce; ++c) {
      const int x = row[c * cs] != 0;
      any |= x;
      all &= x;
    }
  } else {
    constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(| : any) reduction(& : all)
    for (int64_t c = cb; c < ce; ++c) {
      const float x = static_cast<float>(row[c * cs]);
      any |= x != NEG_INF;
      all &= x == 0.0f;
    }
  }
  seen = any != 0;
  plain = all != 0;
}

// How the mask treats the visible scores of query rows [i0, i0 + rows) and keys [j0, j0 + cols)
// (row r's visible columns iv[r], relative to j0; iv nullptr: all): NONE hides them all, FULL
// leaves them all unchanged, PARTIAL otherwise.
inline TileMask classify_mask_tile(const MaskRef& m, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                                   int64_t cols, const KeyInterval* iv) {
  return mask_type_switch(m.kind, [&](auto zero) {
    using T = decltype(zero);
    bool any_seen = false, all_plain = true;  // a score not hidden; every score unchanged
    for (int64_t r = 0; r < rows; ++r) {
      const KeyInterval keys = iv ? iv[r] : KeyInterval{0, cols};
      const T* row = mask_row<T>(m, b, h, i0 + r, j0);
      bool seen = false, plain = true;
      if (m.col == 1) {  // the usual layout: a loop the compiler vectorises
        classify_row(row, keys.begin, keys.end, 1, seen, plain);
      } else {
        classify_row(row, keys.begin, keys.end, m.col, seen, plain);
      }
      any_seen |= seen;
      all_plain &= plain;
      if (any_seen && !all_plain) return TileMask::PARTIAL;
    }
    return all_plain ? TileMask::FULL : any_seen ? TileMask::PARTIAL : TileMask::NONE;
  });
}

// One row of apply_mask_tile: scores sr[c], c in [cb, ce), against mask values row[c * cs].
template <typename T, typename acc_t>
FA_ALWAYS_INLINE void mask_row_scores(acc_t* sr, const T* row, int64_t cb, int64_t ce, int64_t cs, acc_t hidden,
                                      acc_t mult) {
  if constexpr (std::is_same_v<T, uint8_t>) {
#pragma omp simd
    for (int64_t c = cb; c < ce; ++c) sr[c] = row[c * cs] ? sr[c] : hidden;
  } else {
#pragma omp simd
    for (int64_t c = cb; c < ce; ++c) sr[c] += static_cast<acc_t>(row[c * cs]) * mult;
  }
}

// The mask on a score tile s (rows x cols, ld) of query rows i0.. and keys j0.. (see the
// header for mult), inside row r's visible columns iv[r] (nullptr: all).
template <typename acc_t>
inline void apply_mask_tile(const MaskRef& m, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                            int64_t cols, const KeyInterval* iv, acc_t* s, int64_t ld, acc_t mult) {
  const acc_t hidden = mult > 0 ? -std::numeric_limits<acc_t>::infinity() : std::numeric_limits<acc_t>::infinity();
  mask_type_switch(m.kind, [&](auto zero) {
    using T = decltype(zero);
    for (int64_t r = 0; r < rows; ++r) {
      const KeyInterval keys = iv ? iv[r] : KeyInterval{0, cols};
      const T* row = mask_row<T>(m, b, h, i0 + r, j0);
      acc_t* sr = s + r * ld;
      if (m.col == 1) {  // the usual layout: a loop the compiler vectorises
        mask_row_scores(sr, row, keys.begin, keys.end, 1, hidden, mult);
      } else {
        mask_row_scores(sr, row, keys.begin, keys.end, m.col, hidden, mult);
      }
    }
  });
}

// ALiBi on a score tile s (rows x cols, ld) of query rows i0.. and keys j0.. of query head h in
// batch entry b, inside row r's visible columns iv[r] (nullptr: all): s += -slope |i + S - L - j| mult
// (mult as for float masks; S - L, and the slope's row, those of the row's sequence for varlen).
template <typename acc_t>
inline void apply_alibi_tile(const AttnFwdCommon<int64_t>& p, const Visibility& vis, int64_t b, int64_t h, int64_t i0,
                             int64_t rows, int64_t j0, int64_t cols, const KeyInterval* iv, acc_t* s, int64_t ld,
                             acc_t mult) {
  for (int64_t r = 0; r < rows; ++r) {
    const KeyInterval keys = iv ? iv[r] : KeyInterval{0, cols};
    const Visibility::Frame f = vis.frame(i0 + r, p.dims.len_k);
    const acc_t slope = static_cast<acc_t>(p.alibi[(vis.cu_q ? f.seq : b) * p.dims.heads_q + h]);
    const acc_t step = -slope * mult;
    const int64_t diag = f.first + f.row + f.window_offset - j0;  // the column at distance 0
    acc_t* sr = s + r * ld;
#pragma omp simd
    for (int64_t c = keys.begin; c < keys.end; ++c) sr[c] += step * static_cast<acc_t>(std::abs(diag - c));
  }
}

// Logit soft-capping on a score tile s (rows x cols, ld), every column: a score x = s / mult in
// natural units (mult as for float masks) becomes softcap tanh(x / softcap), stored back times
// mult; with th, tanh(x / softcap) is kept there (ld) for the backward's factor 1 - tanh^2.
template <typename acc_t>
inline void apply_softcap_tile(acc_t* s, int64_t ld, int64_t rows, int64_t cols, acc_t softcap, acc_t mult, acc_t* th) {
  const acc_t to_x = acc_t(1) / (mult * softcap), back = softcap * mult;
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* sr = s + r * ld;
    for (int64_t c = 0; c < cols; ++c) {
      const acc_t t = std::tanh(sr[c] * to_x);
      sr[c] = t * back;
      if (th) th[r * ld + c] = t;
    }
  }
}

// The backward through soft-capping: dS (rows x cols, ld) of the capped scores times
// d capped / d x = 1 - tanh^2 (th from apply_softcap_tile).
template <typename acc_t>
inline void softcap_grad_tile(acc_t* ds, const acc_t* th, int64_t ld, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) ds[r * ld + c] *= acc_t(1) - th[r * ld + c] * th[r * ld + c];
  }
}

// Whether the mask lets query row i of head h in batch entry b see key j.
inline bool mask_admits(const MaskRef& m, int64_t b, int64_t h, int64_t i, int64_t j) {
  return mask_type_switch(m.kind, [&](auto zero) {
    using T = decltype(zero);
    const T x = *mask_row<T>(m, b, h, i, j);
    if constexpr (std::is_same_v<T, uint8_t>) {
      return x != 0;
    } else {
      return static_cast<float>(x) != -std::numeric_limits<float>::infinity();
    }
  });
}

}  // namespace fused_attn::cpu
