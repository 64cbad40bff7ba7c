// Host-side helpers of the emulator bindings: tensors to bounds-checked GPtr, and the
// statistics of the last launch.
#pragma once

#include <torch/extension.h>

#include "cuda/flash_fwd_api.h"

namespace fa_emu_tensor {

template <class T>
fa::GPtr<T> gptr(const at::Tensor& t, const char* name) {
  return fa::global_ptr<T>(t, name);
}

inline fa_emu::LaunchStats& last_stats() {
  static fa_emu::LaunchStats s;
  return s;
}
inline void record(const fa_emu::LaunchStats& s) { last_stats() = s; }

}  // namespace fa_emu_tensor
