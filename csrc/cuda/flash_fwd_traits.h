// Tile traits of the forward kernel, one per head-dim bucket (plain C++: also read
// by the compile table's manifest). Numbers are chosen so that the shared memory of
// every bucket fits sm_86/89's 99 KB per block, and two blocks share an SM where the
// head dim and the arch allow (kMinBlocksPerSm = 2, enforced by __launch_bounds__, which
// caps registers at 128 per thread): on sm_80 / sm_90 for head dims up to 192; never on
// the 100 KB-per-SM archs (sm_86, sm_89, sm_120), where one block fills the SM and the
// cap would be paid for nothing. The arch is the one nvcc compiles for (__CUDA_ARCH__; a
// JIT from PTX keeps the PTX's), FA_MANIFEST_ARCH for the compile table's manifest, else sm_80.
#pragma once

#include <type_traits>

#include "common/attn_params.h"
#include "cuda/primitives.cuh"

namespace fa {

// The element type of the 16-bit inputs.
template <bool kIsBf16>
using Elem = typename std::conditional<kIsBf16, bf16_t, half_t>::type;

#if defined(__CUDA_ARCH__)
#define FA_TARGET_ARCH __CUDA_ARCH__
#elif defined(FA_MANIFEST_ARCH)
#define FA_TARGET_ARCH FA_MANIFEST_ARCH
#else
#define FA_TARGET_ARCH 800
#endif

// Shared memory per SM (bytes) of __CUDA_ARCH__-style `arch`: 164 KB on sm_80 / sm_87,
// 228 KB on sm_90 / sm_100 / sm_103 / sm_110, 100 KB elsewhere (sm_86, sm_89, sm_120, sm_121).
constexpr int smem_per_sm(int arch) {
  return arch == 800 || arch == 870 ? 164 * 1024
         : arch == 900 || arch == 1000 || arch == 1030 || arch == 1100 ? 228 * 1024
                                                                           : 100 * 1024;
}

// 2 where two blocks of `smem_bytes` (plus the driver's 1 KB each) fit both the arch's SM and
// sm_80's (the register budget of 128 per thread the buckets were sized for), else 1.
constexpr int min_blocks_per_sm(int smem_bytes, int arch) {
  return 2 * (smem_bytes + 1024) <= (smem_per_sm(arch) < 164 * 1024 ? smem_per_sm(arch) : 164 * 1024) ? 2 : 1;
}

template <int kHeadDim_, bool kIsBf16_>
struct FwdTraits {
  using Elem = fa::Elem<kIsBf16_>;
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
  static constexpr int kMinBlocksPerSm = min_blocks_per_sm(kSmemBytes, FA_TARGET_ARCH);

  static_assert(kHeadDim % 32 == 0 && kHeadDim <= fused_attn::kMaxHeadDim, "head-dim buckets are multiples of 32 up to 256");
  static_assert(kBlockN % 16 == 0, "key tiles are whole mma k-steps");
  static_assert(kSmemBytes <= 99 * 1024, "every bucket must fit sm_86/89's 99 KB of shared memory per block");
};

}  // namespace fa
