// Tile traits of the backward kernels, one per head-dim bucket (plain C++: also read by
// the compile table's manifest). Same buckets, padding rule and 99 KB shared-memory
// ceiling (sm_86/89) as the forward traits (cuda/flash_fwd_traits.h).
//
//   BwdPreTraits        delta = rowsum(dO * O) - dlse: one warp per row.
//   BwdDkdvTraits<D>    one block per (key block of kBlockN keys, kv head, batch); walks
//                       query tiles of kBlockM rows. Phase A (S^T, dP^T -> P^T, dS^T in
//                       shared memory): warp w owns key slab w % kSlabs and query columns
//                       [w / kSlabs * kColsA, +kColsA). Phase B (dV += P^T dO, dK += dS^T Q):
//                       warp w owns key slab w % kSlabs and head-dim columns
//                       [w / kSlabs * kColsB, +kColsB), so the dK/dV accumulators are spread
//                       over every warp (2 * kBlockN * kHeadDim / kThreads floats per thread).
//   BwdDqTraits<D>      one block per (query block of kBlockM rows, q head, batch); walks key
//                       tiles; each warp owns 16 query rows (the forward's layout).
#pragma once

#include <type_traits>

#include "cuda/flash_fwd_traits.h"

namespace fa {

constexpr int kSmemPerBlockFloor = 99 * 1024;  // sm_86/89 opt-in maximum per block

struct BwdPreTraits {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRowsPerBlock = kWarps;  // one warp per row
  static constexpr int kSmemBytes = 0;
  static constexpr int kMinBlocksPerSm = 1;
};

template <int kHeadDim_, bool kIsBf16_>
struct BwdDkdvTraits {
  using Elem = fa::Elem<kIsBf16_>;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kIsBf16 = kIsBf16_;
  static constexpr int kWarps = kHeadDim <= 128 ? 8 : 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockN = kHeadDim <= 128 ? 64 : 32;  // keys per block (held in smem)
  static constexpr int kBlockM = kHeadDim <= 128 ? 64 : 32;  // query rows per step
  static constexpr int kSlabs = kBlockN / 16;                // 16-key slabs
  static constexpr int kGroups = kWarps / kSlabs;            // warps sharing a slab
  static constexpr int kColsA = kBlockM / kGroups;           // phase A: query columns per warp
  static constexpr int kColsB = kHeadDim / kGroups;          // phase B: head-dim columns per warp
  static constexpr int kChunks = kHeadDim / 8;
  static constexpr int kRowStride = kHeadDim + 8;  // odd number of 16-byte chunks: conflict-free
  static constexpr int kPRowStride = kBlockM + 8;  // P^T / dS^T rows (kBlockM / 8 is even)
  static constexpr int kSmemKV = 2 * kBlockN * kRowStride * 2;        // K, V tiles
  static constexpr int kSmemQdOStage = 2 * kBlockM * kRowStride * 2;  // Q, dO tiles
  static constexpr int kSmemPdS = 2 * kBlockN * kPRowStride * 2;      // P^T, dS^T
  static constexpr int kSmemRowStats = 2 * kBlockM * 4;               // lse * LOG2E, delta
  static constexpr int bytes(int stages) { return kSmemKV + kSmemPdS + stages * (kSmemQdOStage + kSmemRowStats); }
  // Double-buffer Q / dO (prefetch the next query tile) where it fits.
  static constexpr int kStages = bytes(2) <= kSmemPerBlockFloor ? 2 : 1;
  static constexpr int kSmemBytes = bytes(kStages);
  static constexpr int kMinBlocksPerSm = 1;

  static_assert(kWarps % kSlabs == 0, "the warps split evenly over the key slabs");
  static_assert(kColsA % 16 == 0 && kColsB % 16 == 0, "each warp owns whole 16-column mma tiles");
  static_assert(kSmemBytes <= kSmemPerBlockFloor, "every bucket must fit sm_86/89's 99 KB of shared memory");
};

template <int kHeadDim_, bool kIsBf16_>
struct BwdDqTraits {
  using Elem = fa::Elem<kIsBf16_>;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kIsBf16 = kIsBf16_;
  static constexpr int kWarps = kHeadDim <= 128 ? 8 : 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;  // each warp owns 16 query rows
  static constexpr int kBlockN = kHeadDim <= 64 ? 64 : 32;
  static constexpr int kChunks = kHeadDim / 8;
  static constexpr int kRowStride = kHeadDim + 8;
  static constexpr int kSmemQdO = 2 * kBlockM * kRowStride * 2;     // Q, dO tiles
  static constexpr int kSmemKVStage = 2 * kBlockN * kRowStride * 2;  // K, V tiles per stage
  static constexpr int kStages = kSmemQdO + 2 * kSmemKVStage <= kSmemPerBlockFloor ? 2 : 1;
  static constexpr int kSmemBytes = kSmemQdO + kStages * kSmemKVStage;
  static constexpr int kMinBlocksPerSm = 1;

  static_assert(kBlockN % 16 == 0, "key tiles are whole mma k-steps");
  static_assert(kSmemBytes <= kSmemPerBlockFloor, "every bucket must fit sm_86/89's 99 KB of shared memory");
};

}  // namespace fa
