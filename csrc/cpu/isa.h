// Which CPU path the kernels take: the hand-written AVX-512 paths or the portable ones, and
// which version of the compiler-vectorised loops runs. The state lives in isa.cpp (set from
// Python: fused_attn/ops/cpu.py reads FUSED_ATTN_CPU_ISA; tests switch it per case); the
// kernels only ask.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FA_CPU_HAVE_AVX512_PATH 1
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FA_CPU_ISA_VERSIONS 1
#endif

namespace fused_attn::cpu {

// The versions of the compiler-vectorised loops (FA_CPU_VEC_VERSIONS in tile_ops.h).
enum class VecIsa : int { BASELINE = 0, AVX2 = 1, AVX512 = 2 };
constexpr const char* VEC_ISA_NAMES[] = {"baseline", "avx2", "avx512"};

// The hand-written AVX-512 and oneDNN paths are off: the portable fallbacks (what CPUs
// without AVX-512 / AMX run) take every call (FUSED_ATTN_CPU_ISA=avx2 / portable, tests).
bool portable_only();
void set_portable_only(bool on);

// The version of the loops that runs: the CPU's best, capped by set_vec_isa.
VecIsa vec_isa();
// Cap the loops at `name` (avx512, avx2 or baseline); raises on another name.
void set_vec_isa(const char* name);

// Whether the CPU has AVX-512 (F, BW, VL, DQ) and the hand-written paths are not switched
// off; whether it has AVX512-BF16 (the 16-bit softmax's bf16 conversion).
bool cpu_has_avx512();
bool cpu_has_avx512_bf16();

// Whether the hand-written AVX-512 paths run: built in, the CPU has AVX-512, and the
// portable fallbacks are not forced.
inline bool avx512_enabled() {
#ifdef FA_CPU_HAVE_AVX512_PATH
  return cpu_has_avx512();
#else
  return false;
#endif
}

}  // namespace fused_attn::cpu
