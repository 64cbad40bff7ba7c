// Launch of the backward kernels: grids, blocks and shared-memory sizes. On the GPU CUDA
// launches on one stream (preprocess, then dK/dV, then dQ: the last two read delta);
// under FUSED_ATTN_EMULATE the CPU emulator, in the same order.
#pragma once

#include "cuda/flash_bwd_kernel.cuh"

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
};

#ifdef FA_EMULATE
template <class Kt>
std::string bwd_kernel_name(const char* what) {
  return std::string(what) + "<hdim " + std::to_string(Kt::kHeadDim) + (Kt::kIsBf16 ? ", bf16>" : ", fp16>");
}

template <class T>
::fa_emu::LaunchStats run_flash_bwd_preprocess(const BwdParams<T>& p) {
  static const char* name = std::is_same<T, bf16_t>::value ? "flash_bwd_preprocess_kernel<bf16>"
                                                           : "flash_bwd_preprocess_kernel<fp16>";
  const ::fa_emu::Dim3 grid(BwdGrid<T>::pre_x(p), static_cast<unsigned>(p.dims.heads_q), static_cast<unsigned>(p.dims.batch));
  return ::fa_emu::launch(name, grid, ::fa_emu::Dim3(BwdPreTraits::kThreads), BwdPreTraits::kSmemBytes,
                          [&] { flash_bwd_preprocess_kernel<T>(p); });
}

// dK/dV then dQ for one head-dim bucket; returns the statistics of both launches summed.
template <int kD, bool kBf16>
::fa_emu::LaunchStats run_flash_bwd(const BwdParams<typename BwdDkdvTraits<kD, kBf16>::Elem>& p) {
  using Kv = BwdDkdvTraits<kD, kBf16>;
  using Kq = BwdDqTraits<kD, kBf16>;
  using T = typename Kv::Elem;
  static const std::string dkdv_name = bwd_kernel_name<Kv>("flash_bwd_dkdv_kernel");
  static const std::string dq_name = bwd_kernel_name<Kq>("flash_bwd_dq_kernel");
  const ::fa_emu::LaunchStats a = ::fa_emu::launch(
      dkdv_name.c_str(),
      ::fa_emu::Dim3(BwdGrid<T>::template dkdv_x<Kv>(p), static_cast<unsigned>(p.dims.heads_kv), static_cast<unsigned>(p.dims.batch)),
      ::fa_emu::Dim3(Kv::kThreads), Kv::kSmemBytes, [&] { flash_bwd_dkdv_kernel<Kv>(p); });
  const ::fa_emu::LaunchStats c = ::fa_emu::launch(
      dq_name.c_str(),
      ::fa_emu::Dim3(BwdGrid<T>::template dq_x<Kq>(p), static_cast<unsigned>(p.dims.heads_q), static_cast<unsigned>(p.dims.batch)),
      ::fa_emu::Dim3(Kq::kThreads), Kq::kSmemBytes, [&] { flash_bwd_dq_kernel<Kq>(p); });
  ::fa_emu::LaunchStats s;
  s.seconds = a.seconds + c.seconds;
  s.blocks = a.blocks + c.blocks;
  s.threads = a.threads + c.threads;
  s.switches = a.switches + c.switches;
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
template <int kD, bool kBf16>
cudaError_t run_flash_bwd(const BwdParams<typename BwdDkdvTraits<kD, kBf16>::Elem>& p, cudaStream_t stream) {
  using Kv = BwdDkdvTraits<kD, kBf16>;
  using Kq = BwdDqTraits<kD, kBf16>;
  using T = typename Kv::Elem;
  cudaError_t e = launch_bwd_kernel<Kv>(flash_bwd_dkdv_kernel<Kv>,
                                        dim3(BwdGrid<T>::template dkdv_x<Kv>(p), p.dims.heads_kv, p.dims.batch), p, stream);
  if (e != cudaSuccess) return e;
  return launch_bwd_kernel<Kq>(flash_bwd_dq_kernel<Kq>, dim3(BwdGrid<T>::template dq_x<Kq>(p), p.dims.heads_q, p.dims.batch), p,
                               stream);
}
#endif

// Calls f(std::integral_constant<int, bucket>{}) for the head-dim bucket that holds d.
template <class F>
auto with_bwd_bucket(int d, F&& f) {
  if (d <= 32) return f(std::integral_constant<int, 32>{});
  if (d <= 64) return f(std::integral_constant<int, 64>{});
  if (d <= 96) return f(std::integral_constant<int, 96>{});
  if (d <= 128) return f(std::integral_constant<int, 128>{});
  if (d <= 160) return f(std::integral_constant<int, 160>{});
  if (d <= 192) return f(std::integral_constant<int, 192>{});
  if (d <= 224) return f(std::integral_constant<int, 224>{});
  return f(std::integral_constant<int, 256>{});
}

}  // namespace fa
