// Every head-dim bucket of the fp16 forward kernel, compiled for the emulator.
#include "cuda/flash_fwd_launch.cuh"
#include "emu/flash_fwd_emu.h"

namespace fa_emu_fwd {
fa_emu::LaunchStats run_fp16(const fa::FwdParams<fa::half_t>& p, int d) {
  return fa::with_fwd_traits<false>(d, [&](auto kt) { return fa::run_flash_fwd<decltype(kt)>(p); });
}
}  // namespace fa_emu_fwd
