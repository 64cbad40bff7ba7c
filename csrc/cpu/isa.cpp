// Path selection: the state behind isa.h and the Python functions that set and report it
// (set_portable_only, set_vec_isa, vec_isa, has_avx512, gemm_backend).
#include "isa.h"

#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "bindings.h"
#include "gemm.h"

namespace fused_attn::cpu {
namespace {

bool g_portable_only = false;
VecIsa g_vec_isa_cap = VecIsa::AVX512;

// The best version of the loops this CPU runs.
VecIsa cpu_vec_isa() {
#ifdef FA_CPU_ISA_VERSIONS
  static const VecIsa best = __builtin_cpu_supports("x86-64-v4")   ? VecIsa::AVX512
                             : __builtin_cpu_supports("x86-64-v3") ? VecIsa::AVX2
                                                                    : VecIsa::BASELINE;
  return best;
#else
  return VecIsa::BASELINE;
#endif
}

}  // namespace

bool portable_only() { return g_portable_only; }
void set_portable_only(bool on) { g_portable_only = on; }

VecIsa vec_isa() { return std::min(cpu_vec_isa(), g_vec_isa_cap); }

void set_vec_isa(const char* name) {
  for (int i = 0; i <= int(VecIsa::AVX512); ++i) {
    if (std::strcmp(name, VEC_ISA_NAMES[i]) == 0) {
      g_vec_isa_cap = VecIsa(i);
      return;
    }
  }
  TORCH_CHECK(false, "vec isa must be avx512, avx2 or baseline, got '", name, "'");
}

bool cpu_has_avx512() {
#ifdef FA_CPU_HAVE_AVX512_PATH
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok && !g_portable_only;
#else
  return false;
#endif
}

bool cpu_has_avx512_bf16() {
#ifdef FA_CPU_HAVE_AVX512_PATH
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

void def_path_functions(pybind11::module& m) {
  m.def("set_portable_only", &set_portable_only,
        "run the portable fallbacks instead of the AVX-512 softmax, micro-kernel and oneDNN brgemm");
  m.def("set_vec_isa", [](const std::string& name) { set_vec_isa(name.c_str()); },
        "the most the compiler-vectorised loops may use: avx512 (default: the CPU's best), avx2 or baseline");
  m.def("vec_isa", [] { return std::string(VEC_ISA_NAMES[int(vec_isa())]); },
        "which version of the compiler-vectorised loops runs: avx512, avx2 or baseline");
  m.def("has_avx512", &avx512_enabled, "whether the AVX-512 paths run (CPU has it, not portable-only)");
  m.def("gemm_backend",
        [] {
          return std::string("fp32 on the AVX-512 micro-kernel: ") + (avx512_enabled() ? "yes" : "no") + " (else " +
                 gemm_backend() + "); " + brgemm_backend();
        },
        "which GEMM library each dtype uses");
}

}  // namespace fused_attn::cpu
