// The pieces of the extension module fused_attn._C_cpu defined outside the binding file
// (attention.cpp, which holds PYBIND11_MODULE).
#pragma once

#include <torch/extension.h>

namespace fused_attn::cpu {

// isa.cpp: set_portable_only, set_vec_isa, vec_isa, has_avx512, gemm_backend.
void def_path_functions(pybind11::module& m);
// test_hooks.cpp: the _test_* functions and set_blas_ld_limit (tests only).
void def_test_hooks(pybind11::module& m);

}  // namespace fused_attn::cpu
