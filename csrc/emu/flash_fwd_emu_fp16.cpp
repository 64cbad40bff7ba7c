// Every instantiation of the fp16 forward kernel (head-dim bucket x causal x even tiles),
// compiled for the emulator.
#include "cuda/flash_fwd_launch.cuh"
#include "emu/flash_fwd_emu.h"

namespace fa_emu_fwd {
fa_emu::LaunchStats run_fp16(const fa::FwdParams<fa::half_t>& p, int d) { return fa::run_fwd<false>(p, d); }
}  // namespace fa_emu_fwd
