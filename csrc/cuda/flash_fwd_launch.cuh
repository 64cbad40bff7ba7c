// Launch of the forward kernel: grid, block and shared-memory size for one traits
// instantiation. On the GPU a CUDA launch; under FUSED_ATTN_EMULATE the CPU emulator.
#pragma once

#include "cuda/flash_fwd_kernel.cuh"
#include "cuda/static_switch.h"

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
  // L and S are whole tiles: the kIsEvenMN kernel (no bounds checks) runs.
  static bool is_even_mn(const FwdParams<typename Kt::Elem>& p) {
    return p.dims.len_q % Kt::kBlockM == 0 && p.dims.len_k % Kt::kBlockN == 0;
  }
};

#ifdef FA_EMULATE
// "flash_fwd_kernel<hdim 64, fp16, causal 1, even_mn 0>": the launch's name in the emulator's
// reports and in last_launch_kernels().
template <class Kt, bool kIsCausal, bool kIsEvenMN>
std::string kernel_name(const char* what) {
  return std::string(what) + "<hdim " + std::to_string(Kt::kHeadDim) + (Kt::kIsBf16 ? ", bf16" : ", fp16") +
         ", causal " + (kIsCausal ? "1" : "0") + ", even_mn " + (kIsEvenMN ? "1>" : "0>");
}

template <class Kt, bool kIsCausal, bool kIsEvenMN>
::fa_emu::LaunchStats run_flash_fwd(const FwdParams<typename Kt::Elem>& p) {
  static const std::string name = kernel_name<Kt, kIsCausal, kIsEvenMN>("flash_fwd_kernel");
  const ::fa_emu::Dim3 grid(FwdGrid<Kt>::blocks_x(p), static_cast<unsigned>(p.dims.heads_q), static_cast<unsigned>(p.dims.batch));
  return ::fa_emu::launch(name.c_str(), grid, ::fa_emu::Dim3(Kt::kThreads), Kt::kSmemBytes,
                          [&] { flash_fwd_kernel<Kt, kIsCausal, kIsEvenMN>(p); });
}
#else
template <class Kt, bool kIsCausal, bool kIsEvenMN>
cudaError_t run_flash_fwd(const FwdParams<typename Kt::Elem>& p, cudaStream_t stream) {
  const dim3 grid(FwdGrid<Kt>::blocks_x(p), p.dims.heads_q, p.dims.batch);
  auto kernel = flash_fwd_kernel<Kt, kIsCausal, kIsEvenMN>;
  if (Kt::kSmemBytes > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Kt::kSmemBytes);
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, Kt::kThreads, Kt::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}
#endif

// Runs the forward instantiation for p (cuda/static_switch.h): the head-dim bucket of d, and
// the causal and even-tile flags from p. `stream`: the CUDA stream (none under emulation).
template <bool kBf16, class... Stream>
auto run_fwd(const FwdParams<Elem<kBf16>>& p, int d, Stream... stream) {
  return head_dim_switch(d, [&](auto kd) {
    using Kt = FwdTraits<decltype(kd)::value, kBf16>;
    return bool_switch(
        [&](auto causal, auto even_mn) {
          return run_flash_fwd<Kt, decltype(causal)::value, decltype(even_mn)::value>(p, stream...);
        },
        p.vis.causal != fused_attn::kCausalNone, FwdGrid<Kt>::is_even_mn(p));
  });
}

}  // namespace fa
