// Every instantiation of the bf16 backward kernels (head-dim bucket x causal x even tiles),
// compiled for the emulator.
#include "cuda/flash_bwd_launch.cuh"
#include "emu/flash_bwd_emu.h"

namespace fa_emu_bwd {
fa_emu::LaunchStats run_bf16(const fa::BwdParams<fa::bf16_t>& p, int d) {
  fa::run_flash_bwd_preprocess<fa::bf16_t>(p);
  return fa::run_bwd<true>(p, d);
}
}  // namespace fa_emu_bwd
