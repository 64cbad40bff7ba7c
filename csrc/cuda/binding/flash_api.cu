// Torch binding of the CUDA kernels: extension module fused_attn._C_cuda. Importing it
// registers the ops torch.ops.fused_attn.cuda_fwd_out and cuda_bwd_out (TORCH_LIBRARY, CUDA
// kernels), which fused_attn/ops/cuda.py wraps in the public ops fused_attn::cuda_fwd and
// fused_attn::cuda_bwd (with their fakes).
// Only torch's dispatcher headers and Python.h are included: no pybind11, so this file
// compiles quickly with nvcc.
//
// Kernel instantiations live in csrc/cuda/instantiations/ (one file per head-dim bucket and
// dtype, each holding the causal x even-tile variants, so nvcc compiles them in parallel),
// generated with their extern declarations (cuda/generated/kernel_externs.h) by
// `python -m fused_attn.tools.gen_cuda_kernels`; this file only checks inputs and launches.
// setup.py builds it (with every csrc/cuda/**/*.cu) when torch has CUDA and nvcc is found;
// fused_attn/tools/cuda_compile_table.py compiles it against torch's headers in CI.
#include <Python.h>
#include <c10/core/DeviceGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "cuda/flash_bwd_api.h"
#include "cuda/flash_bwd_launch.cuh"
#include "cuda/flash_fwd_api.h"
#include "cuda/flash_fwd_launch.cuh"
#include "cuda/generated/kernel_externs.h"


// What setup.py compiled the kernels for, "+"-separated ("sm_80+sm_90a+compute_80": machine
// code for sm_80 and sm_90a, PTX for compute_80), passed as -DFUSED_ATTN_BUILT_ARCHS=...
// (a bare token list: nvcc splits -D values at commas). fused_attn/ops/cuda.py reads it
// from the module attribute built_archs to decide whether a GPU can run the kernels.
#define FA_STRINGIFY_(...) #__VA_ARGS__
#define FA_STRINGIFY(...) FA_STRINGIFY_(__VA_ARGS__)
#ifdef FUSED_ATTN_BUILT_ARCHS
#define FA_BUILT_ARCHS FA_STRINGIFY(FUSED_ATTN_BUILT_ARCHS)
#else
#define FA_BUILT_ARCHS ""  // built without setup.py: unknown
#endif

namespace {

void check_device(const at::Tensor& q) {
  TORCH_CHECK(q.is_cuda(), "fused_attn._C_cuda takes CUDA tensors, got ", q.device());
  int major = 0, minor = 0;
  cudaError_t attr = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device());
  if (attr == cudaSuccess) attr = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.get_device());
  TORCH_CHECK(attr == cudaSuccess, "cudaDeviceGetAttribute failed: ", cudaGetErrorString(attr));
  TORCH_CHECK(major >= 8, "the CUDA kernels need compute capability 8.0 or newer (mma.sync bf16, cp.async), got ",
              major, ".", minor);
}

// A failed launch names the GPU's arch and what the kernels were built for ("no kernel image
// is available" means neither machine code for this arch nor PTX it can JIT from).
void check_launch(cudaError_t err, const char* what, const at::Tensor& q) {
  if (err == cudaSuccess) return;
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device());
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.get_device());
  TORCH_CHECK(false, "fused_attn ", what, " launch failed: ", cudaGetErrorString(err), " (GPU sm_", major, minor,
              ", kernels built for ", *FA_BUILT_ARCHS ? FA_BUILT_ARCHS : "unknown archs", ")");
}

// Writes out (B, Hq, L, Ev) and lse (B, Hq, L) fp32. causal: 0 none, 1 upper-left, 2 lower-right.
// stream: torch.cuda.current_stream(device).cuda_stream (passed from Python so that this file
// needs only the CUDA runtime and torch's device-generic headers).
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
             int64_t causal, double scale, int64_t stream_handle) {
  fa::check_fwd_inputs(q, k, v, out, lse, causal);
  const c10::DeviceGuard guard(q.device());
  check_device(q);
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int d = fa::fwd_head_dim(q, v);
  cudaError_t err;
  if (q.scalar_type() == at::kHalf) {
    const auto p = fa::make_fwd_params<fa::half_t>(q, k, v, out, lse, causal, scale);
    err = fa::run_fwd<false>(p, d, stream);
  } else {
    const auto p = fa::make_fwd_params<fa::bf16_t>(q, k, v, out, lse, causal, scale);
    err = fa::run_fwd<true>(p, d, stream);
  }
  check_launch(err, "flash_fwd", q);
}

// Writes dq, dk, dv (shaped like q, k, v) and the fp32 scratch delta (B, Hq, L); dlse may be None.
void backward(const at::Tensor& dout, const c10::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk,
              at::Tensor& dv, at::Tensor& delta, int64_t causal, double scale, int64_t stream_handle) {
  const at::Tensor dl = dlse.has_value() ? *dlse : at::Tensor();
  fa::check_bwd_inputs(dout, dl, q, k, v, out, lse, dq, dk, dv, delta, causal);
  const c10::DeviceGuard guard(q.device());
  check_device(q);
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int d = fa::fwd_head_dim(q, v);
  cudaError_t err;
  if (q.scalar_type() == at::kHalf) {
    const auto p = fa::make_bwd_params<fa::half_t>(dout, dl, q, k, v, out, lse, dq, dk, dv, delta, causal, scale);
    err = fa::run_flash_bwd_preprocess(p, stream);
    if (err == cudaSuccess) err = fa::run_bwd<false>(p, d, stream);
  } else {
    const auto p = fa::make_bwd_params<fa::bf16_t>(dout, dl, q, k, v, out, lse, dq, dk, dv, delta, causal, scale);
    err = fa::run_flash_bwd_preprocess(p, stream);
    if (err == cudaSuccess) err = fa::run_bwd<true>(p, d, stream);
  }
  check_launch(err, "flash_bwd", q);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_attn, m) {
  m.def("cuda_fwd_out(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse, int causal, float scale, "
        "int stream) -> ()");
  m.def("cuda_bwd_out(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, Tensor(d!) delta, int causal, float scale, int stream) -> ()");
}

TORCH_LIBRARY_IMPL(fused_attn, CUDA, m) {
  m.impl("cuda_fwd_out", &forward);
  m.impl("cuda_bwd_out", &backward);
}

// An importable module with no Python functions: importing it loads the library above.
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C_cuda", "fused_attn CUDA kernels: torch.ops.fused_attn.cuda_fwd_out, cuda_bwd_out",
                            -1, nullptr};
  PyObject* m = PyModule_Create(&def);
  if (m != nullptr && PyModule_AddStringConstant(m, "built_archs", FA_BUILT_ARCHS) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
