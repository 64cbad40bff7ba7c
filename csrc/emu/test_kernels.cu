// nvcc translation unit for the primitive probe kernels: compiled (never run) by
// fused_attn/tools/cuda_compile_table.py so that every inline-PTX primitive is
// assembled by ptxas for each target architecture.
#include "emu/test_kernels.cuh"

namespace fa_probe {
template __global__ void probe_mma<fa::half_t>(GPtr<const uint32_t>, GPtr<const uint32_t>, GPtr<const float>, GPtr<float>);
template __global__ void probe_mma<fa::bf16_t>(GPtr<const uint32_t>, GPtr<const uint32_t>, GPtr<const float>, GPtr<float>);
#define FA_LDM(N, T) \
  template __global__ void probe_ldmatrix<N, T>(GPtr<const fa::u32x4>, int, GPtr<const int32_t>, GPtr<uint32_t>);
FA_LDM(1, false)
FA_LDM(2, false)
FA_LDM(4, false)
FA_LDM(1, true)
FA_LDM(2, true)
FA_LDM(4, true)
#undef FA_LDM
template __global__ void probe_cp_async<4, false>(GPtr<const uint8_t>, GPtr<const int32_t>, GPtr<uint8_t>, int);
template __global__ void probe_cp_async<8, false>(GPtr<const uint8_t>, GPtr<const int32_t>, GPtr<uint8_t>, int);
template __global__ void probe_cp_async<16, false>(GPtr<const uint8_t>, GPtr<const int32_t>, GPtr<uint8_t>, int);
template __global__ void probe_cp_async<16, true>(GPtr<const uint8_t>, GPtr<const int32_t>, GPtr<uint8_t>, int);
}  // namespace fa_probe
