// Launch of the forward kernel: grid, block and shared-memory size for one traits
// instantiation. On the GPU a CUDA launch; under FUSED_ATTN_EMULATE the CPU emulator.
#pragma once

#include "cuda/flash_fwd_kernel.cuh"

#ifdef FA_EMULATE
#include <string>
#endif

namespace fa {

template <class Kt>
struct FwdGrid {
  // x: query blocks, y: query heads, z: batch.
  static unsigned blocks_x(const FwdParams<typename Kt::Elem>& p) {
    return static_cast<unsigned>((p.dims.len_q + Kt::kBlockM - 1) / Kt::kBlockM);
  }
};

#ifdef FA_EMULATE
template <class Kt>
const char* fwd_kernel_name() {
  static const std::string name = "flash_fwd_kernel<hdim " + std::to_string(Kt::kHeadDim) +
                                  (Kt::kIsBf16 ? ", bf16>" : ", fp16>");
  return name.c_str();
}

template <class Kt>
::fa_emu::LaunchStats run_flash_fwd(const FwdParams<typename Kt::Elem>& p) {
  const ::fa_emu::Dim3 grid(FwdGrid<Kt>::blocks_x(p), static_cast<unsigned>(p.dims.heads_q), static_cast<unsigned>(p.dims.batch));
  return ::fa_emu::launch(fwd_kernel_name<Kt>(), grid, ::fa_emu::Dim3(Kt::kThreads), Kt::kSmemBytes,
                          [&] { flash_fwd_kernel<Kt>(p); });
}
#else
template <class Kt>
cudaError_t run_flash_fwd(const FwdParams<typename Kt::Elem>& p, cudaStream_t stream) {
  const dim3 grid(FwdGrid<Kt>::blocks_x(p), p.dims.heads_q, p.dims.batch);
  auto kernel = flash_fwd_kernel<Kt>;
  if (Kt::kSmemBytes > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Kt::kSmemBytes);
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, Kt::kThreads, Kt::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}
#endif

// Calls f(FwdTraits<bucket, kBf16>{}) for the bucket that holds head dim d.
template <bool kBf16, class F>
auto with_fwd_traits(int d, F&& f) {
  if (d <= 32) return f(FwdTraits<32, kBf16>{});
  if (d <= 64) return f(FwdTraits<64, kBf16>{});
  if (d <= 96) return f(FwdTraits<96, kBf16>{});
  if (d <= 128) return f(FwdTraits<128, kBf16>{});
  if (d <= 160) return f(FwdTraits<160, kBf16>{});
  if (d <= 192) return f(FwdTraits<192, kBf16>{});
  if (d <= 224) return f(FwdTraits<224, kBf16>{});
  return f(FwdTraits<256, kBf16>{});
}

}  // namespace fa
