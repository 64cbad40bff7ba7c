// The backward kernels compiled for the CPU emulator, one translation unit per dtype
// (no torch headers: these build in parallel and fast).
#pragma once

#include "cuda/flash_bwd_kernel.cuh"

namespace fa_emu_bwd {
// Preprocess, then dK/dV and dQ of the instantiation for p and d (as the forward); returns the
// statistics of the dK/dV and dQ launches summed.
fa_emu::LaunchStats run_fp16(const fa::BwdParams<fa::half_t>& p, int d);
fa_emu::LaunchStats run_bf16(const fa::BwdParams<fa::bf16_t>& p, int d);
}  // namespace fa_emu_bwd
