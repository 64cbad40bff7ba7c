// The forward kernel compiled for the CPU emulator, one translation unit per dtype
// (no torch headers: these build in parallel and fast).
#pragma once

#include "cuda/flash_fwd_kernel.cuh"

namespace fa_emu_fwd {
// Runs the instantiation for p: the head-dim bucket that holds d, causal and even tiles from p.
fa_emu::LaunchStats run_fp16(const fa::FwdParams<fa::half_t>& p, int d);
fa_emu::LaunchStats run_bf16(const fa::FwdParams<fa::bf16_t>& p, int d);
}  // namespace fa_emu_fwd
