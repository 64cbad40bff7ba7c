// Python entry points of the mutant kernels (module fused_attn_emu_mutants), built only by
// tests/test_cuda_emu_race.py through fused_attn/ops/_emu.py's build(): copies of the forward and
// backward kernels with one barrier moved or deleted (or one store moved out of bounds) by a
// textual edit, which the emulator's shared-memory tracker must report.
//
// The test generates "emu_mutants.inc" into the build directory: for each mutant M of a kernel
// K (flash_fwd_kernel, flash_bwd_dkdv_kernel, flash_bwd_dq_kernel) it defines K in namespace
// fa::mutant::M (the rest of the kernel headers is shared, unmutated), and the list
// FA_MUTANTS(X) of X(kind, M) entries, kind = fwd, dkdv or dq. Mutants run in the hdim-64
// fp16 bucket, non-causal with uneven tiles, only (one instantiation each keeps this module's
// build short; the race test's problem has that shape).
#include <torch/extension.h>

#include <string>

#include "cuda/flash_bwd_api.h"
#include "cuda/flash_bwd_launch.cuh"
#include "cuda/flash_fwd_api.h"
#include "cuda/flash_fwd_launch.cuh"
#include "emu/emu_tensor.h"
#include "emu_mutants.inc"

namespace {

using fa_emu::Dim3;
using fa_emu_tensor::record;
using Fwd = fa::FwdTraits<64, false>;
using Dkdv = fa::BwdDkdvTraits<64, false>;
using Dq = fa::BwdDqTraits<64, false>;
using T = fa::half_t;

// "flash_fwd_kernel<hdim 64, fp16> [mutant fwd_no_loop_barrier]"
std::string mutant_name(const char* kernel, const char* mutant) {
  return std::string(kernel) + "<hdim 64, fp16> [mutant " + mutant + "]";
}

void check_bucket(const at::Tensor& q, const at::Tensor& v) {
  TORCH_CHECK(q.device().is_cpu(), "the emulator runs on CPU tensors, got ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kHalf, "the mutant kernels are built for float16 only, got ", q.scalar_type());
  const int d = fa::fwd_head_dim(q, v);
  TORCH_CHECK(d > 32 && d <= 64, "the mutant kernels are built for the head-dim bucket 64 (33..64) only, got ", d);
}

void mutant_fwd(const std::string& mutant, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                at::Tensor& lse, int64_t causal, double scale) {
  fa::check_fwd_inputs(q, k, v, out, lse, causal);
  check_bucket(q, v);
  const fa::FwdParams<T> p = fa::make_fwd_params<T>(q, k, v, out, lse, causal, scale);
  TORCH_CHECK(causal == 0 && !fa::FwdGrid<Fwd>::is_even_mn(p), "the mutant kernels are built non-causal with uneven tiles only");
  const Dim3 grid(fa::FwdGrid<Fwd>::blocks_x(p), static_cast<unsigned>(p.dims.heads_q), static_cast<unsigned>(p.dims.batch));
#define FA_RUN_fwd(M)                                                                                          \
  if (mutant == #M) {                                                                                          \
    const std::string name = mutant_name("flash_fwd_kernel", #M);                                              \
    record(fa_emu::launch(name.c_str(), grid, Dim3(Fwd::kThreads), Fwd::kSmemBytes,                            \
                          [&] { fa::mutant::M::flash_fwd_kernel<Fwd, false, false>(p); }));                    \
    return;                                                                                                    \
  }
#define FA_RUN_dkdv(M)
#define FA_RUN_dq(M)
#define FA_RUN(kind, M) FA_RUN_##kind(M)
  FA_MUTANTS(FA_RUN)
#undef FA_RUN_fwd
#undef FA_RUN_dkdv
#undef FA_RUN_dq
  TORCH_CHECK(false, "no forward mutant named '", mutant, "'");
}

// Runs the (unmutated) preprocess, then the one mutated backward kernel: dk/dv or dq.
void mutant_bwd(const std::string& mutant, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk,
                at::Tensor& dv, at::Tensor& delta, int64_t causal, double scale) {
  const at::Tensor no_dlse;
  fa::check_bwd_inputs(dout, no_dlse, q, k, v, out, lse, dq, dk, dv, delta, causal);
  check_bucket(q, v);
  const fa::BwdParams<T> p = fa::make_bwd_params<T>(dout, no_dlse, q, k, v, out, lse, dq, dk, dv, delta, causal, scale);
  TORCH_CHECK(causal == 0 && !fa::BwdGrid<T>::is_even_mn<64>(p), "the mutant kernels are built non-causal with uneven tiles only");
  fa::run_flash_bwd_preprocess<T>(p);
#define FA_RUN_fwd(M)
#define FA_RUN_dkdv(M)                                                                                         \
  if (mutant == #M) {                                                                                          \
    const std::string name = mutant_name("flash_bwd_dkdv_kernel", #M);                                         \
    const Dim3 grid(fa::BwdGrid<T>::dkdv_x<Dkdv>(p), static_cast<unsigned>(p.dims.heads_kv),                   \
                    static_cast<unsigned>(p.dims.batch));                                                      \
    record(fa_emu::launch(name.c_str(), grid, Dim3(Dkdv::kThreads), Dkdv::kSmemBytes,                          \
                          [&] { fa::mutant::M::flash_bwd_dkdv_kernel<Dkdv, false, false>(p); }));              \
    return;                                                                                                    \
  }
#define FA_RUN_dq(M)                                                                                           \
  if (mutant == #M) {                                                                                          \
    const std::string name = mutant_name("flash_bwd_dq_kernel", #M);                                           \
    const Dim3 grid(fa::BwdGrid<T>::dq_x<Dq>(p), static_cast<unsigned>(p.dims.heads_q), static_cast<unsigned>(p.dims.batch)); \
    record(fa_emu::launch(name.c_str(), grid, Dim3(Dq::kThreads), Dq::kSmemBytes,                              \
                          [&] { fa::mutant::M::flash_bwd_dq_kernel<Dq, false, false>(p); }));                  \
    return;                                                                                                    \
  }
  FA_MUTANTS(FA_RUN)
  TORCH_CHECK(false, "no backward mutant named '", mutant, "'");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_attn kernels with one barrier moved or deleted, for the emulator's race tests";
  m.def("flash_fwd", &mutant_fwd, "a forward mutant, emulated: writes out and lse");
  m.def("flash_bwd", &mutant_bwd, "the preprocess, then a dK/dV or dQ mutant, emulated");
  m.def("mutants", [] {
    std::vector<std::pair<std::string, std::string>> r;
#define FA_LIST(kind, M) r.emplace_back(#kind, #M);
    FA_MUTANTS(FA_LIST)
#undef FA_LIST
    return r;
  }, "(kind, name) of every mutant in this build");
}
