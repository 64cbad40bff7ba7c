// Every instantiation of the fp16 backward kernels (head-dim bucket x causal x even tiles),
// compiled for the emulator.
#include "cuda/flash_bwd_launch.cuh"
#include "emu/flash_bwd_emu.h"

namespace fa_emu_bwd {
fa_emu::LaunchStats run_fp16(const fa::BwdParams<fa::half_t>& p, int d) {
  fa::run_flash_bwd_preprocess<fa::half_t>(p);
  return fa::run_bwd<false>(p, d);
}
}  // namespace fa_emu_bwd
