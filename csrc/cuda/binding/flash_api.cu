// Torch binding of the CUDA kernels: extension module fused_attn._C_cuda. Importing it
// registers the op torch.ops.fused_attn.cuda_fwd_out (TORCH_LIBRARY, CUDA kernel), which
// fused_attn/ops/cuda.py wraps in the public op fused_attn::cuda_fwd (with its fake).
// Only torch's dispatcher headers and Python.h are included: no pybind11, so this file
// compiles quickly with nvcc.
//
// Kernel instantiations live in csrc/cuda/instantiations/ (one per head-dim bucket and
// dtype, so nvcc compiles them in parallel); this file only checks inputs and launches.
// Not built by setup.py yet: it globs csrc/cuda/*.cu only (see the issue-3 notes);
// fused_attn/tools/cuda_compile_table.py compiles it against torch's headers.
#include <Python.h>
#include <c10/core/DeviceGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "cuda/flash_fwd_api.h"
#include "cuda/flash_fwd_launch.cuh"

namespace fa {
#define FA_EXTERN_FWD(D)                                                                                   \
  extern template cudaError_t run_flash_fwd<FwdTraits<D, false>>(const FwdParams<half_t>&, cudaStream_t); \
  extern template cudaError_t run_flash_fwd<FwdTraits<D, true>>(const FwdParams<bf16_t>&, cudaStream_t);
FA_EXTERN_FWD(32)
FA_EXTERN_FWD(64)
FA_EXTERN_FWD(96)
FA_EXTERN_FWD(128)
FA_EXTERN_FWD(160)
FA_EXTERN_FWD(192)
FA_EXTERN_FWD(224)
FA_EXTERN_FWD(256)
#undef FA_EXTERN_FWD
}  // namespace fa

namespace {

// Writes out (B, Hq, L, Ev) and lse (B, Hq, L) fp32. causal: 0 none, 1 upper-left, 2 lower-right.
// stream: torch.cuda.current_stream(device).cuda_stream (passed from Python so that this file
// needs only the CUDA runtime and torch's device-generic headers).
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
             int64_t causal, double scale, int64_t stream_handle) {
  fa::check_fwd_inputs(q, k, v, out, lse, causal);
  TORCH_CHECK(q.is_cuda(), "fused_attn._C_cuda.forward takes CUDA tensors, got ", q.device());
  const c10::DeviceGuard guard(q.device());
  int major = 0;
  const cudaError_t attr = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device());
  TORCH_CHECK(attr == cudaSuccess, "cudaDeviceGetAttribute failed: ", cudaGetErrorString(attr));
  TORCH_CHECK(major >= 8, "the CUDA kernels need compute capability 8.0 or newer (mma.sync bf16, cp.async), got ",
              major, ".x");
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int d = fa::fwd_head_dim(q, v);
  cudaError_t err;
  if (q.scalar_type() == at::kHalf) {
    const auto p = fa::make_fwd_params<fa::half_t>(q, k, v, out, lse, causal, scale);
    err = fa::with_fwd_traits<false>(d, [&](auto kt) { return fa::run_flash_fwd<decltype(kt)>(p, stream); });
  } else {
    const auto p = fa::make_fwd_params<fa::bf16_t>(q, k, v, out, lse, causal, scale);
    err = fa::with_fwd_traits<true>(d, [&](auto kt) { return fa::run_flash_fwd<decltype(kt)>(p, stream); });
  }
  TORCH_CHECK(err == cudaSuccess, "fused_attn flash_fwd launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_attn, m) {
  m.def("cuda_fwd_out(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse, int causal, float scale, "
        "int stream) -> ()");
}

TORCH_LIBRARY_IMPL(fused_attn, CUDA, m) { m.impl("cuda_fwd_out", &forward); }

// An importable module with no Python functions: importing it loads the library above.
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C_cuda", "fused_attn CUDA kernels: torch.ops.fused_attn.cuda_fwd_out",
                            -1, nullptr};
  return PyModule_Create(&def);
}
