// fused_attn device primitives: the only place where inline PTX lives.
//
// Kernels use these functions plus standard CUDA (thread/block indices,
// __syncthreads, __shfl_*_sync, dynamic shared memory through FA_DYNAMIC_SMEM).
// Shared memory is touched only through smem_load / smem_store, ldmatrix and
// cp.async, never by dereferencing a shared pointer: under emulation each of them
// is bounds-checked and race-tracked (csrc/emu/runtime.h), and a raw dereference
// faults with a message naming the kernel and the shared byte offset.
//
//   mma_m16n8k16<T>      mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32
//   ldmatrix_x{1,2,4}<Trans>  ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{,.trans}.shared.b16
//   cp_async_ca<N> / cp_async_cg16  cp.async.{ca,cg}.shared.global with src-size zero fill
//   cp_async_commit / cp_async_wait<N>  cp.async.commit_group / cp.async.wait_group N
//   shfl_xor / shfl, sync_threads / sync_warp
//   smem_load / smem_store  a plain shared-memory load / store (ld.shared / st.shared)
//   GPtr<T>              a global-memory pointer; raw on the GPU, bounds-checked
//                        against its tensor under emulation
//
// Two builds of the same source:
//   * nvcc (__CUDACC__ and not FUSED_ATTN_EMULATE): the PTX below;
//   * C++ for the CPU (FUSED_ATTN_EMULATE, or any non-CUDA compiler): the
//     emulator in csrc/emu/, which follows the PTX ISA fragment layouts:
//       lane = 0..31, g = lane >> 2, t = lane % 4;
//       A (16x16) element a_i: row g + 8*((i>>1)&1), col 2t + (i&1) + 8*(i>=4)
//       B (16x8)  element b_i: row (k) 2t + (i&1) + 8*(i>=2), col (n) g
//       C/D (16x8) element c_i: row g + 8*(i>=2), col 2t + (i&1)
//       a .b32 register holds two 16-bit elements, lower index in the low half;
//       ldmatrix matrix j takes its row r from the address given by lane 8j+r;
//       register j of lane L = row L/4, cols 2(L%4), 2(L%4)+1 (.trans: the column).
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(FUSED_ATTN_EMULATE) || !defined(__CUDACC__)
#define FA_EMULATE 1
#endif

#ifdef FA_EMULATE
#include <cmath>
#include <cstring>
#include <string>

#include "emu/runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define threadIdx (::fa_emu::thread_idx())
#define blockIdx (::fa_emu::block_idx())
#define blockDim (::fa_emu::block_dim())
#define gridDim (::fa_emu::grid_dim())
#define FA_DEVICE inline
#define FA_HOST_DEVICE inline
// Dynamic shared memory of the running block (extern __shared__ on the GPU).
#define FA_DYNAMIC_SMEM(name) char* name = ::fa_emu::dynamic_smem()
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define FA_DEVICE __device__ __forceinline__
#define FA_HOST_DEVICE __host__ __device__ __forceinline__
#define FA_DYNAMIC_SMEM(name) extern __shared__ __align__(128) char name[]
#endif

namespace fa {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;

// 16-byte vector for 128-bit global / shared accesses.
struct alignas(16) u32x4 {
  uint32_t x, y, z, w;
};

// ---------------------------------------------------------------------------------
// Element types and conversions
// ---------------------------------------------------------------------------------
#ifdef FA_EMULATE
struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

namespace detail {
inline uint16_t f32_to_f16_bits(float f) {  // round to nearest even
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: overflows to inf
  if (ax < 0x38800000u) {  // below 2^-14: subnormal half, unit 2^-24
    float a;
    std::memcpy(&a, &ax, 4);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(a * 16777216.0f)));
  }
  uint32_t h = ((((ax >> 23) - 127u + 15u) << 10) | ((ax & 0x7fffffu) >> 13));
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}
inline float f16_bits_to_f32(uint16_t h) {
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  float r;
  if (e == 0) {
    r = std::ldexp(static_cast<float>(m), -24);
  } else if (e == 31) {
    r = m ? NAN : INFINITY;
  } else {
    const uint32_t x = ((e - 15u + 127u) << 23) | (m << 13);
    std::memcpy(&r, &x, 4);
  }
  return (h & 0x8000u) ? -r : r;
}
inline uint16_t f32_to_bf16_bits(float f) {  // round to nearest even
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}
inline float bf16_bits_to_f32(uint16_t b) {
  const uint32_t x = static_cast<uint32_t>(b) << 16;
  float r;
  std::memcpy(&r, &x, 4);
  return r;
}
}  // namespace detail

FA_DEVICE float to_float(half_t h) { return detail::f16_bits_to_f32(h.bits); }
FA_DEVICE float to_float(bf16_t h) { return detail::bf16_bits_to_f32(h.bits); }
template <class T>
FA_DEVICE T from_float(float f);
template <>
FA_DEVICE half_t from_float<half_t>(float f) { return half_t{detail::f32_to_f16_bits(f)}; }
template <>
FA_DEVICE bf16_t from_float<bf16_t>(float f) { return bf16_t{detail::f32_to_bf16_bits(f)}; }
template <class T>
FA_DEVICE uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(from_float<T>(lo).bits) | (static_cast<uint32_t>(from_float<T>(hi).bits) << 16);
}
template <class T>
FA_DEVICE float unpack_lo(uint32_t r) { return to_float(T{static_cast<uint16_t>(r & 0xffffu)}); }
template <class T>
FA_DEVICE float unpack_hi(uint32_t r) { return to_float(T{static_cast<uint16_t>(r >> 16)}); }
#else
using half_t = __half;
using bf16_t = __nv_bfloat16;
FA_DEVICE float to_float(half_t h) { return __half2float(h); }
FA_DEVICE float to_float(bf16_t h) { return __bfloat162float(h); }
template <class T>
FA_DEVICE T from_float(float f);
template <>
FA_DEVICE half_t from_float<half_t>(float f) { return __float2half_rn(f); }
template <>
FA_DEVICE bf16_t from_float<bf16_t>(float f) { return __float2bfloat16_rn(f); }
template <class T>
FA_DEVICE uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same<T, half_t>::value) {
    __half2 h = __floats2half2_rn(lo, hi);  // .x (low half) = lo
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}
template <class T>
FA_DEVICE float unpack_lo(uint32_t r) {
  uint16_t b = static_cast<uint16_t>(r & 0xffffu);
  return to_float(*reinterpret_cast<T*>(&b));
}
template <class T>
FA_DEVICE float unpack_hi(uint32_t r) {
  uint16_t b = static_cast<uint16_t>(r >> 16);
  return to_float(*reinterpret_cast<T*>(&b));
}
#endif

FA_DEVICE uint32_t f2u(float f) {
#ifdef FA_EMULATE
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#else
  return __float_as_uint(f);
#endif
}
FA_DEVICE float u2f(uint32_t u) {
#ifdef FA_EMULATE
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#else
  return __uint_as_float(u);
#endif
}

// ---------------------------------------------------------------------------------
// GPtr<T>: pointer into one global tensor. Under emulation every access is checked
// against [lo, hi) of that tensor and fails with kernel / block / thread / offset.
// ---------------------------------------------------------------------------------
template <class T>
struct GPtr {
  T* p = nullptr;
#ifdef FA_EMULATE
  const char* lo = nullptr;
  const char* hi = nullptr;
  const char* name = "null";
  GPtr() = default;
  GPtr(T* p_, int64_t numel, const char* name_)
      : p(p_), lo(reinterpret_cast<const char*>(p_)), hi(reinterpret_cast<const char*>(p_ + numel)), name(name_) {}
  template <class U>
  GPtr(const GPtr<U>& o) : p(o.p), lo(o.lo), hi(o.hi), name(o.name) {}
  FA_DEVICE GPtr operator+(int64_t i) const {
    GPtr r = *this;
    r.p = p + i;
    return r;
  }
  // Address of element i for an access of `bytes` bytes (checked; a vector access
  // must also be aligned to its size unless `aligned_to_size` is false).
  FA_DEVICE T* at(int64_t i, int64_t bytes, const char* access, bool aligned_to_size = true) const {
    const char* a = reinterpret_cast<const char*>(p + i);
    if (a < lo || a + bytes > hi) {
      const int64_t off = (a - lo) / static_cast<int64_t>(sizeof(T)), n = (hi - lo) / static_cast<int64_t>(sizeof(T));
      ::fa_emu::fail(std::string("out-of-bounds global ") + access + " of " + std::to_string(bytes) + " bytes: tensor '" +
                     name + "' element offset " + std::to_string(off) + ", valid offsets [0, " + std::to_string(n) + ")");
    }
    if (aligned_to_size && bytes > static_cast<int64_t>(sizeof(T)) && reinterpret_cast<uintptr_t>(a) % static_cast<uintptr_t>(bytes))
      ::fa_emu::fail(std::string("misaligned global ") + access + " of " + std::to_string(bytes) + " bytes: tensor '" + name +
                     "' element offset " + std::to_string((a - lo) / static_cast<int64_t>(sizeof(T))));
    return reinterpret_cast<T*>(const_cast<char*>(a));
  }
#else
  GPtr() = default;
  FA_HOST_DEVICE GPtr(T* p_, int64_t, const char*) : p(p_) {}
  template <class U>
  FA_HOST_DEVICE GPtr(const GPtr<U>& o) : p(o.p) {}
  FA_DEVICE GPtr operator+(int64_t i) const {
    GPtr r = *this;
    r.p = p + i;
    return r;
  }
  FA_DEVICE T* at(int64_t i, int64_t, const char*, bool = true) const { return p + i; }
#endif
  FA_DEVICE T load(int64_t i) const { return *at(i, sizeof(T), "load"); }
  FA_DEVICE void store(int64_t i, T v) const { *at(i, sizeof(T), "store") = v; }
  template <class V>
  FA_DEVICE V load_vec(int64_t i) const { return *reinterpret_cast<const V*>(at(i, sizeof(V), "load")); }
  template <class V>
  FA_DEVICE void store_vec(int64_t i, const V& v) const { *reinterpret_cast<V*>(at(i, sizeof(V), "store")) = v; }
};

// ---------------------------------------------------------------------------------
// Emulation of the warp-wide instructions (the combine step runs once all lanes arrived)
// ---------------------------------------------------------------------------------
#ifdef FA_EMULATE
namespace detail {
using ::fa_emu::LaneIn;
using ::fa_emu::LaneOut;

template <class T>
inline void combine_mma(const LaneIn* in, LaneOut* out, unsigned) {
  // Gather the 16x16 A, 16x8 B and 16x8 C from the fragments (PTX ISA layout).
  float A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 8; ++i) {
      const uint32_t r = in[lane].w[i >> 1];
      const float v = (i & 1) ? unpack_hi<T>(r) : unpack_lo<T>(r);
      A[g + 8 * ((i >> 1) & 1)][2 * t + (i & 1) + 8 * (i >= 4)] = v;
    }
    for (int i = 0; i < 4; ++i) {
      const uint32_t r = in[lane].w[4 + (i >> 1)];
      const float v = (i & 1) ? unpack_hi<T>(r) : unpack_lo<T>(r);
      B[2 * t + (i & 1) + 8 * (i >= 2)][g] = v;
    }
    for (int i = 0; i < 4; ++i) C[g + 8 * (i >= 2)][2 * t + (i & 1)] = u2f(in[lane].w[6 + i]);
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int m = g + 8 * (i >= 2), n = 2 * t + (i & 1);
      double acc = C[m][n];  // products of 16-bit floats are exact; one rounding at the end
      for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[m][k]) * static_cast<double>(B[k][n]);
      out[lane].w[i] = f2u(static_cast<float>(acc));
    }
  }
}

inline void check_ldmatrix_row(const void* p, int lane) {
  const char* a = static_cast<const char*>(p);
  const char* s = ::fa_emu::dynamic_smem();
  const std::size_t n = ::fa_emu::dynamic_smem_bytes();
  if (a < s || a + 16 > s + n)
    ::fa_emu::fail("ldmatrix: row address of lane " + std::to_string(lane) + " (shared byte offset " +
                   std::to_string(a - s) + ") is outside the " + std::to_string(n) + "-byte dynamic shared memory");
  if (reinterpret_cast<uintptr_t>(a) % 16)
    ::fa_emu::fail("ldmatrix: row address of lane " + std::to_string(lane) + " (shared byte offset " +
                   std::to_string(a - s) + ") is not 16-byte aligned");
}

// Each row is read by the lane that supplied its address (for the race tracker).
template <int N, bool Trans>
inline void combine_ldmatrix(const LaneIn* in, LaneOut* out, unsigned) {
  uint16_t M[4][8][8];
  for (int j = 0; j < N; ++j)
    for (int r = 0; r < 8; ++r) {
      check_ldmatrix_row(in[8 * j + r].p, 8 * j + r);
      std::memcpy(M[j][r], ::fa_emu::smem_lane_access(8 * j + r, in[8 * j + r].p, 16, ::fa_emu::SmemOp::Ldmatrix), 16);
    }
  for (int lane = 0; lane < 32; ++lane) {
    const int q = lane >> 2, c = 2 * (lane & 3);
    for (int j = 0; j < N; ++j) {
      const uint16_t lo = Trans ? M[j][c][q] : M[j][q][c];
      const uint16_t hi = Trans ? M[j][c + 1][q] : M[j][q][c + 1];
      out[lane].w[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

// Shuffle source lane of `lane` (CUDA's rules with a width segment).
inline int shfl_src(int lane, int arg, int width, bool is_xor) {
  if (is_xor) {
    const int s = lane ^ arg;
    return s >= ((lane / width) + 1) * width ? lane : s;
  }
  return (arg % width) + (lane / width) * width;
}
template <bool Xor>
inline void combine_shfl(const LaneIn* in, LaneOut* out, unsigned mask) {
  for (int lane = 0; lane < 32; ++lane) {
    if (!((mask >> lane) & 1)) continue;
    const int src = shfl_src(lane, in[lane].arg, static_cast<int>(in[lane].w[1]), Xor);
    if (!((mask >> src) & 1))
      ::fa_emu::fail(std::string(Xor ? "__shfl_xor_sync" : "__shfl_sync") + ": lane " + std::to_string(lane) +
                     " reads lane " + std::to_string(src) + ", which the mask does not name");
    out[lane].w[0] = in[src].w[0];
  }
}

template <bool Xor, class T>
inline T shfl_emu(unsigned mask, T v, int arg, int width) {
  static_assert(sizeof(T) == 4, "the emulated shuffles move 32-bit values");
  LaneIn in{};
  std::memcpy(&in.w[0], &v, 4);
  in.w[1] = static_cast<uint32_t>(width);
  in.arg = arg;
  LaneOut o = ::fa_emu::warp_collective(Xor ? "__shfl_xor_sync" : "__shfl_sync", combine_shfl<Xor>, mask, in);
  T r;
  std::memcpy(&r, &o.w[0], 4);
  return r;
}
}  // namespace detail
#endif

// ---------------------------------------------------------------------------------
// Plain shared-memory accesses: ld.shared / st.shared of a T (1, 2, 4, 8 or 16 bytes,
// aligned to its size). On the GPU exactly `*p` and `*p = v`; under emulation checked
// against the block's shared memory and recorded by the race tracker.
// ---------------------------------------------------------------------------------
template <class T>
struct type_identity {
  using type = T;
};

template <class T>
FA_DEVICE T smem_load(const T* p) {
#ifdef FA_EMULATE
  static_assert(std::is_trivially_copyable<T>::value, "shared memory holds trivially copyable values");
  T v;
  std::memcpy(&v, ::fa_emu::smem_access(p, sizeof(T), ::fa_emu::SmemOp::Load), sizeof(T));
  return v;
#else
  return *p;
#endif
}

template <class T>
FA_DEVICE void smem_store(T* p, const typename type_identity<T>::type& v) {
#ifdef FA_EMULATE
  static_assert(std::is_trivially_copyable<T>::value, "shared memory holds trivially copyable values");
  std::memcpy(::fa_emu::smem_access(p, sizeof(T), ::fa_emu::SmemOp::Store), &v, sizeof(T));
#else
  *p = v;
#endif
}

// ---------------------------------------------------------------------------------
// mma.sync m16n8k16, fp32 accumulate: d = a * b + c (T = half_t or bf16_t)
// ---------------------------------------------------------------------------------
template <class T>
FA_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
#ifdef FA_EMULATE
  ::fa_emu::LaneIn in{};
  for (int i = 0; i < 4; ++i) in.w[i] = a[i];
  in.w[4] = b[0];
  in.w[5] = b[1];
  for (int i = 0; i < 4; ++i) in.w[6 + i] = f2u(c[i]);
  const ::fa_emu::LaneOut o = ::fa_emu::warp_collective("mma.sync.m16n8k16", detail::combine_mma<T>, kFullMask, in);
  for (int i = 0; i < 4; ++i) d[i] = u2f(o.w[i]);
#else
  if constexpr (std::is_same<T, half_t>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  }
#endif
}

// ---------------------------------------------------------------------------------
// ldmatrix m8n8 .b16: N = 1, 2 or 4 matrices; row address of matrix j row r from lane 8j+r
// ---------------------------------------------------------------------------------
template <int N, bool Trans = false>
FA_DEVICE void ldmatrix(uint32_t (&r)[N], const void* smem_row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
#ifdef FA_EMULATE
  ::fa_emu::LaneIn in{};
  in.p = smem_row;
  static const char* const kOps[2][3] = {{"ldmatrix.x1", "ldmatrix.x2", "ldmatrix.x4"},
                                         {"ldmatrix.x1.trans", "ldmatrix.x2.trans", "ldmatrix.x4.trans"}};
  const ::fa_emu::LaneOut o =
      ::fa_emu::warp_collective(kOps[Trans][N == 1 ? 0 : N == 2 ? 1 : 2], detail::combine_ldmatrix<N, Trans>, kFullMask, in);
  for (int j = 0; j < N; ++j) r[j] = o.w[j];
#else
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  if constexpr (N == 1 && !Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(s));
  } else if constexpr (N == 1 && Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(s));
  } else if constexpr (N == 2 && !Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
  } else if constexpr (N == 2 && Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
  } else if constexpr (N == 4 && !Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
  }
#endif
}

// ---------------------------------------------------------------------------------
// cp.async global -> shared. Copies kBytes to smem_dst; only the first src_bytes come
// from src (element i of tensor `src`), the rest is zero-filled. src_bytes = 0 reads
// nothing (the address is not checked then). Visible to the issuing thread after its
// cp_async_wait, to the other threads after that and a barrier; under emulation any access
// to the destination before the issuer's wait is a race (csrc/emu/runtime.h).
// ---------------------------------------------------------------------------------
template <int kBytes, class T>
FA_DEVICE void cp_async_ca(void* smem_dst, const GPtr<T>& src, int64_t i, int src_bytes) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async.ca copies 4, 8 or 16 bytes");
#ifdef FA_EMULATE
  const void* g = src_bytes > 0 ? static_cast<const void*>(src.at(i, src_bytes, "load (cp.async)", false)) : static_cast<const void*>(src.p + i);
  ::fa_emu::cp_async(smem_dst, g, kBytes, src_bytes);
#else
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(s), "l"(src.p + i), "n"(kBytes), "r"(src_bytes));
#endif
}

template <class T>
FA_DEVICE void cp_async_cg16(void* smem_dst, const GPtr<T>& src, int64_t i, int src_bytes) {
#ifdef FA_EMULATE
  const void* g = src_bytes > 0 ? static_cast<const void*>(src.at(i, src_bytes, "load (cp.async)", false)) : static_cast<const void*>(src.p + i);
  ::fa_emu::cp_async(smem_dst, g, 16, src_bytes);
#else
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src.p + i), "r"(src_bytes));
#endif
}

FA_DEVICE void cp_async_commit() {
#ifdef FA_EMULATE
  ::fa_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most N of this thread's most recent committed groups are pending.
template <int N>
FA_DEVICE void cp_async_wait() {
#ifdef FA_EMULATE
  ::fa_emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// ---------------------------------------------------------------------------------
// Shuffles and barriers
// ---------------------------------------------------------------------------------
template <class T>
FA_DEVICE T shfl_xor(unsigned mask, T v, int lane_mask) {
#ifdef FA_EMULATE
  return detail::shfl_emu<true>(mask, v, lane_mask, kWarpSize);
#else
  return __shfl_xor_sync(mask, v, lane_mask);
#endif
}

template <class T>
FA_DEVICE T shfl(unsigned mask, T v, int src_lane) {
#ifdef FA_EMULATE
  return detail::shfl_emu<false>(mask, v, src_lane, kWarpSize);
#else
  return __shfl_sync(mask, v, src_lane);
#endif
}

FA_DEVICE void sync_threads() {
#ifdef FA_EMULATE
  ::fa_emu::syncthreads();
#else
  __syncthreads();
#endif
}

FA_DEVICE void sync_warp(unsigned mask = kFullMask) {
#ifdef FA_EMULATE
  ::fa_emu::syncwarp(mask);
#else
  __syncwarp(mask);
#endif
}

FA_DEVICE float exp2_approx(float x) {
#ifdef FA_EMULATE
  return std::exp2(x);
#else
  return exp2f(x);  // ex2.approx under --use_fast_math
#endif
}

}  // namespace fa

#ifdef FA_EMULATE
// Standard CUDA spellings for kernels compiled as C++ by the emulator.
inline void __syncthreads() { ::fa_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::fa_emu::syncwarp(mask); }
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return fa::detail::shfl_emu<true>(mask, v, lane_mask, width);
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return fa::detail::shfl_emu<false>(mask, v, src_lane, width);
}
#endif
