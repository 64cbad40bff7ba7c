// Tile traits of the forward kernel, one per head-dim bucket (plain C++: also read
// by the compile table's manifest). Numbers are chosen so that the shared memory of
// every bucket fits sm_86/89's 99 KB per block, and two blocks share an sm_80 SM
// where the head dim allows (kMinBlocksPerSm = 2, enforced by __launch_bounds__).
#pragma once

#include <type_traits>

#include "cuda/primitives.cuh"

namespace fa {

// Head dims the kernel is instantiated for; a smaller head dim runs in the next bucket
// up (its missing columns are zero-filled in shared memory and never stored).
constexpr int kHeadDimBuckets[] = {32, 64, 96, 128, 160, 192, 224, 256};

template <int kHeadDim_, bool kIsBf16_>
struct FwdTraits {
  using Elem = typename std::conditional<kIsBf16_, bf16_t, half_t>::type;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kIsBf16 = kIsBf16_;
  // Each warp owns 16 query rows; kBlockM = 16 * kWarps.
  static constexpr int kWarps = kHeadDim <= 128 ? 8 : 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;
  static constexpr int kBlockN = kHeadDim <= 64 ? 64 : 32;
  static constexpr int kStages = 2;  // K/V tiles in flight (cp.async groups)
  // Shared rows padded by one 16-byte chunk: kHeadDim / 8 is even for every bucket, so
  // the row stride is an odd number of chunks and the 8 row addresses of an ldmatrix
  // (and of a cp.async phase) fall into 8 different 4-bank groups: no bank conflicts.
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  static constexpr int kRowStride = kHeadDim + 8;  // elements
  static constexpr int kSmemQ = kBlockM * kRowStride * 2;
  static constexpr int kSmemKVStage = kBlockN * kRowStride * 2;
  static constexpr int kSmemBytes = kSmemQ + 2 * kStages * kSmemKVStage;
  static constexpr int kMinBlocksPerSm = 2 * (kSmemBytes + 1024) <= 164 * 1024 ? 2 : 1;

  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "head-dim buckets are multiples of 32 up to 256");
  static_assert(kBlockN % 16 == 0, "key tiles are whole mma k-steps");
  static_assert(kSmemBytes <= 99 * 1024, "every bucket must fit sm_86/89's 99 KB of shared memory per block");
};

}  // namespace fa
