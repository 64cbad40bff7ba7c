// Launch shape of every kernel instantiation, printed for the compile table
// (fused_attn/tools/cuda_compile_table.py): "<name key> <threads> <min blocks/SM> <dynamic smem bytes>".
#pragma once

#include <cstdio>

#include "cuda/flash_bwd_traits.h"
#include "cuda/flash_fwd_traits.h"

namespace fa {

template <int kD, bool kBf16>
void print_fwd_manifest_entry() {
  using Kt = FwdTraits<kD, kBf16>;
  std::printf("FwdTraits<%d, %s> %d %d %d\n", kD, kBf16 ? "true" : "false", Kt::kThreads, Kt::kMinBlocksPerSm,
              Kt::kSmemBytes);
}

template <bool kBf16>
void print_fwd_manifest() {
  print_fwd_manifest_entry<32, kBf16>();
  print_fwd_manifest_entry<64, kBf16>();
  print_fwd_manifest_entry<96, kBf16>();
  print_fwd_manifest_entry<128, kBf16>();
  print_fwd_manifest_entry<160, kBf16>();
  print_fwd_manifest_entry<192, kBf16>();
  print_fwd_manifest_entry<224, kBf16>();
  print_fwd_manifest_entry<256, kBf16>();
}

// Backward: the dK/dV and dQ kernels of one bucket, keyed by the kernel name and traits.
template <int kD, bool kBf16>
void print_bwd_manifest_entry() {
  using Kv = BwdDkdvTraits<kD, kBf16>;
  using Kq = BwdDqTraits<kD, kBf16>;
  const char* b = kBf16 ? "true" : "false";
  std::printf("BwdDkdvTraits<%d, %s> %d %d %d\n", kD, b, Kv::kThreads, Kv::kMinBlocksPerSm,
              Kv::kSmemBytes);
  std::printf("BwdDqTraits<%d, %s> %d %d %d\n", kD, b, Kq::kThreads, Kq::kMinBlocksPerSm,
              Kq::kSmemBytes);
}

template <bool kBf16>
void print_bwd_manifest() {
  print_bwd_manifest_entry<32, kBf16>();
  print_bwd_manifest_entry<64, kBf16>();
  print_bwd_manifest_entry<96, kBf16>();
  print_bwd_manifest_entry<128, kBf16>();
  print_bwd_manifest_entry<160, kBf16>();
  print_bwd_manifest_entry<192, kBf16>();
  print_bwd_manifest_entry<224, kBf16>();
  print_bwd_manifest_entry<256, kBf16>();
}

inline void print_kernel_manifest() {
  print_fwd_manifest<false>();
  print_fwd_manifest<true>();
  print_bwd_manifest<false>();
  print_bwd_manifest<true>();
  std::printf("flash_bwd_preprocess_kernel %d %d %d\n", BwdPreTraits::kThreads, BwdPreTraits::kMinBlocksPerSm,
              BwdPreTraits::kSmemBytes);
}

}  // namespace fa
