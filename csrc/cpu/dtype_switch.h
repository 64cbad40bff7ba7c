// The one place a runtime dtype becomes the kernels' template parameters:
// scalar_t (storage) and acc_t (accumulation: fp32, or fp64 for fp64 inputs).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

namespace fused_attn::cpu {

template <typename Fn>
void dtype_switch(c10::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case c10::ScalarType::Float: return fn(float{}, float{});
    case c10::ScalarType::Double: return fn(double{}, double{});
    case c10::ScalarType::BFloat16: return fn(c10::BFloat16{}, float{});
    case c10::ScalarType::Half: return fn(c10::Half{}, float{});
    default: TORCH_CHECK(false, "fused_attn CPU kernels take float32, float64, bfloat16 or float16, got ", dtype);
  }
}

}  // namespace fused_attn::cpu
