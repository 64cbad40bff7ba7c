// Every instantiation of the bf16 forward kernel (head-dim bucket x causal x even tiles),
// compiled for the emulator.
#include "cuda/flash_fwd_launch.cuh"
#include "emu/flash_fwd_emu.h"

namespace fa_emu_fwd {
fa_emu::LaunchStats run_bf16(const fa::FwdParams<fa::bf16_t>& p, int d) { return fa::run_fwd<true>(p, d); }
}  // namespace fa_emu_fwd
