// Every head-dim bucket of the bf16 forward kernel, compiled for the emulator.
#include "cuda/flash_fwd_launch.cuh"
#include "emu/flash_fwd_emu.h"

namespace fa_emu_fwd {
fa_emu::LaunchStats run_bf16(const fa::FwdParams<fa::bf16_t>& p, int d) {
  return fa::with_fwd_traits<true>(d, [&](auto kt) { return fa::run_flash_fwd<decltype(kt)>(p); });
}
}  // namespace fa_emu_fwd
