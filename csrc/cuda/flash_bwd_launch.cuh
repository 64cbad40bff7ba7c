// Launch of the backward kernels: grids, blocks and shared-memory sizes. On the GPU CUDA
// launches on one stream (preprocess, then dK/dV, then dQ: the last two read delta);
// under FUSED_ATTN_EMULATE the CPU emulator, in the same order.
#pragma once

#include "cuda/flash_bwd_kernel.cuh"
#include "cuda/flash_fwd_launch.cuh"

#ifdef FA_EMULATE
#include <string>
#endif

namespace fa {

template <class T>
struct BwdGrid {
  // preprocess: x rows / kRowsPerBlock, y q heads, z batch
  static unsigned pre_x(const BwdParams<T>& p) {
    return static_cast<unsigned>((p.dims.len_q + BwdPreTraits::kRowsPerBlock - 1) / BwdPreTraits::kRowsPerBlock);
  }
  // dK/dV: x key blocks, y kv heads, z batch
  template <class Kt>
  static unsigned dkdv_x(const BwdParams<T>& p) {
    return static_cast<unsigned>((p.dims.len_k + Kt::kBlockN - 1) / Kt::kBlockN);
  }
  // dQ: x query blocks, y q heads, z batch
  template <class Kt>
  static unsigned dq_x(const BwdParams<T>& p) {
    return static_cast<unsigned>((p.dims.len_q + Kt::kBlockM - 1) / Kt::kBlockM);
  }
  // L and S are whole tiles of both kernels of bucket kD: their kIsEvenMN instantiations run.
  template <int kD>
  static bool is_even_mn(const BwdParams<T>& p) {
    using Kv = BwdDkdvTraits<kD, std::is_same<T, bf16_t>::value>;
    using Kq = BwdDqTraits<kD, std::is_same<T, bf16_t>::value>;
    return p.dims.len_q % Kv::kBlockM == 0 && p.dims.len_k % Kv::kBlockN == 0 && p.dims.len_q % Kq::kBlockM == 0 &&
           p.dims.len_k % Kq::kBlockN == 0;
  }
};

#ifdef FA_EMULATE
template <class T>
::fa_emu::LaunchStats run_flash_bwd_preprocess(const BwdParams<T>& p) {
  static const char* name = std::is_same<T, bf16_t>::value ? "flash_bwd_preprocess_kernel<bf16>"
                                                           : "flash_bwd_preprocess_kernel<fp16>";
  const ::fa_emu::Dim3 grid(BwdGrid<T>::pre_x(p), static_cast<unsigned>(p.dims.heads_q), static_cast<unsigned>(p.dims.batch));
  return ::fa_emu::launch(name, grid, ::fa_emu::Dim3(BwdPreTraits::kThreads), BwdPreTraits::kSmemBytes,
                          [&] { flash_bwd_preprocess_kernel<T>(p); });
}

// dK/dV then dQ for one head-dim bucket; returns the statistics of both launches summed.
template <int kD, bool kBf16, bool kIsCausal, bool kIsEvenMN>
::fa_emu::LaunchStats run_flash_bwd(const BwdParams<Elem<kBf16>>& p) {
  using Kv = BwdDkdvTraits<kD, kBf16>;
  using Kq = BwdDqTraits<kD, kBf16>;
  using T = Elem<kBf16>;
  static const std::string dkdv_name = kernel_name<Kv, kIsCausal, kIsEvenMN>("flash_bwd_dkdv_kernel");
  static const std::string dq_name = kernel_name<Kq, kIsCausal, kIsEvenMN>("flash_bwd_dq_kernel");
  const ::fa_emu::LaunchStats a = ::fa_emu::launch(
      dkdv_name.c_str(),
      ::fa_emu::Dim3(BwdGrid<T>::template dkdv_x<Kv>(p), static_cast<unsigned>(p.dims.heads_kv), static_cast<unsigned>(p.dims.batch)),
      ::fa_emu::Dim3(Kv::kThreads), Kv::kSmemBytes, [&] { flash_bwd_dkdv_kernel<Kv, kIsCausal, kIsEvenMN>(p); });
  const ::fa_emu::LaunchStats c = ::fa_emu::launch(
      dq_name.c_str(),
      ::fa_emu::Dim3(BwdGrid<T>::template dq_x<Kq>(p), static_cast<unsigned>(p.dims.heads_q), static_cast<unsigned>(p.dims.batch)),
      ::fa_emu::Dim3(Kq::kThreads), Kq::kSmemBytes, [&] { flash_bwd_dq_kernel<Kq, kIsCausal, kIsEvenMN>(p); });
  ::fa_emu::LaunchStats s;
  s.seconds = a.seconds + c.seconds;
  s.blocks = a.blocks + c.blocks;
  s.threads = a.threads + c.threads;
  s.switches = a.switches + c.switches;
  s.kernels = a.kernels + ";" + c.kernels;
  return s;
}
#else
template <class T>
cudaError_t run_flash_bwd_preprocess(const BwdParams<T>& p, cudaStream_t stream) {
  const dim3 grid(BwdGrid<T>::pre_x(p), p.dims.heads_q, p.dims.batch);
  flash_bwd_preprocess_kernel<T><<<grid, BwdPreTraits::kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <class Kt, class F>
cudaError_t launch_bwd_kernel(F kernel, dim3 grid, const BwdParams<typename Kt::Elem>& p, cudaStream_t stream) {
  if (Kt::kSmemBytes > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Kt::kSmemBytes);
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, Kt::kThreads, Kt::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// dK/dV then dQ for one head-dim bucket (after run_flash_bwd_preprocess on the same stream).
template <int kD, bool kBf16, bool kIsCausal, bool kIsEvenMN>
cudaError_t run_flash_bwd(const BwdParams<Elem<kBf16>>& p, cudaStream_t stream) {
  using Kv = BwdDkdvTraits<kD, kBf16>;
  using Kq = BwdDqTraits<kD, kBf16>;
  using T = Elem<kBf16>;
  cudaError_t e = launch_bwd_kernel<Kv>(flash_bwd_dkdv_kernel<Kv, kIsCausal, kIsEvenMN>,
                                        dim3(BwdGrid<T>::template dkdv_x<Kv>(p), p.dims.heads_kv, p.dims.batch), p, stream);
  if (e != cudaSuccess) return e;
  return launch_bwd_kernel<Kq>(flash_bwd_dq_kernel<Kq, kIsCausal, kIsEvenMN>,
                               dim3(BwdGrid<T>::template dq_x<Kq>(p), p.dims.heads_q, p.dims.batch), p, stream);
}
#endif

// Runs the dK/dV and dQ instantiations for p (cuda/static_switch.h): the head-dim bucket of d,
// and the causal and even-tile flags from p. `stream`: the CUDA stream (none under emulation).
template <bool kBf16, class... Stream>
auto run_bwd(const BwdParams<Elem<kBf16>>& p, int d, Stream... stream) {
  return head_dim_switch(d, [&](auto kd) {
    constexpr int kD = decltype(kd)::value;
    return bool_switch(
        [&](auto causal, auto even_mn) {
          return run_flash_bwd<kD, kBf16, decltype(causal)::value, decltype(even_mn)::value>(p, stream...);
        },
        p.vis.causal != fused_attn::kCausalNone, BwdGrid<Elem<kBf16>>::template is_even_mn<kD>(p));
  });
}

}  // namespace fa
