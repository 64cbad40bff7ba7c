// Compile-time dispatch: the runtime head dim and feature flags of a call turned into the
// template arguments of one kernel instantiation, in this one place. The head-dim buckets it
// walks are generated with the instantiations that exist for them (cuda/generated/kernel_list.h,
// by `python -m fused_attn.tools.gen_cuda_kernels`), so a switch can only reach an
// instantiation that was compiled. Plain C++17: the binding, the
// emulator and the compile table's manifest include it.
#pragma once

#include <cstddef>
#include <type_traits>
#include <utility>

#include "cuda/generated/kernel_list.h"

namespace fa {

// f(std::integral_constant<int, kD>{}) for the smallest head-dim bucket kD >= d (the largest
// bucket past them all: the input checks keep d <= kMaxHeadDim). A smaller head dim runs in
// the next bucket up: its missing columns are zero-filled in shared memory and never stored.
template <std::size_t kI = 0, class F>
decltype(auto) head_dim_switch(int d, F&& f) {
  constexpr int kD = kHeadDimBuckets[kI];
  if constexpr (kI + 1 == sizeof(kHeadDimBuckets) / sizeof(kHeadDimBuckets[0])) {
    return f(std::integral_constant<int, kD>{});
  } else {
    if (d <= kD) return f(std::integral_constant<int, kD>{});
    return head_dim_switch<kI + 1>(d, std::forward<F>(f));
  }
}

// f(std::bool_constant<b>{}...) for the runtime bools b... (one call; 2^n instantiations of f):
//   bool_switch([&](auto causal, auto even) { return run<decltype(causal)::value, decltype(even)::value>(p); },
//               is_causal, is_even);
template <bool... kSet, class F>
decltype(auto) bool_switch(F&& f) {
  return f(std::bool_constant<kSet>{}...);
}
template <bool... kSet, class F, class... Bools>
decltype(auto) bool_switch(F&& f, bool b, Bools... rest) {
  if (b) return bool_switch<kSet..., true>(std::forward<F>(f), rest...);
  return bool_switch<kSet..., false>(std::forward<F>(f), rest...);
}

}  // namespace fa
