// Python entry points of the CPU emulator (module fused_attn_emu, built on first
// use by fused_attn/ops/_emu.py): the forward and backward kernels and the primitive probe kernels.
#include <torch/extension.h>

#include "cuda/flash_bwd_api.h"
#include "cuda/flash_fwd_api.h"
#include "emu/emu_tensor.h"
#include "emu/flash_bwd_emu.h"
#include "emu/flash_fwd_emu.h"
#include "emu/test_kernels.cuh"

namespace {

using fa_emu::Dim3;
using fa_emu_tensor::gptr;
using fa_emu_tensor::last_stats;
using fa_emu_tensor::record;

void check_probe_input(const at::Tensor& t, at::ScalarType dt, int64_t numel, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dt && t.numel() == numel, name,
              " must be a contiguous CPU ", c10::toString(dt), " tensor of ", numel, " elements, got ", t.scalar_type(),
              " of shape ", t.sizes());
}

at::Tensor run_index(std::vector<int64_t> grid, std::vector<int64_t> block) {
  TORCH_CHECK(grid.size() == 3 && block.size() == 3, "grid and block must be 3-tuples");
  const int64_t n = grid[0] * grid[1] * grid[2] * block[0] * block[1] * block[2];
  auto out = torch::full({n, 12}, -1, torch::kInt32);
  Dim3 g(grid[0], grid[1], grid[2]), b(block[0], block[1], block[2]);
  auto po = gptr<int32_t>(out, "out");
  record(fa_emu::launch("probe_index", g, b, 0, [&] { fa_probe::probe_index(po); }));
  return out;
}

at::Tensor run_barrier(int64_t nblocks, int64_t nthreads) {
  auto out = torch::full({nblocks, nthreads}, -1, torch::kInt32);
  auto po = gptr<int32_t>(out, "out");
  record(fa_emu::launch("probe_barrier", Dim3(nblocks), Dim3(nthreads), 4 * nthreads, [&] { fa_probe::probe_barrier(po); }));
  return out;
}

at::Tensor run_mma(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool bf16) {
  check_probe_input(a, torch::kInt32, 128, "a (32 lanes x 4 registers)");
  check_probe_input(b, torch::kInt32, 64, "b (32 lanes x 2 registers)");
  check_probe_input(c, torch::kFloat32, 128, "c (32 lanes x 4 floats)");
  auto d = torch::full({32, 4}, NAN, torch::kFloat32);
  auto pa = gptr<const uint32_t>(a, "a"), pb = gptr<const uint32_t>(b, "b");
  auto pc = gptr<const float>(c, "c");
  auto pd = gptr<float>(d, "d");
  if (bf16)
    record(fa_emu::launch("probe_mma<bf16>", Dim3(1), Dim3(32), 0, [&] { fa_probe::probe_mma<fa::bf16_t>(pa, pb, pc, pd); }));
  else
    record(fa_emu::launch("probe_mma<f16>", Dim3(1), Dim3(32), 0, [&] { fa_probe::probe_mma<fa::half_t>(pa, pb, pc, pd); }));
  return d;
}

template <int N, bool Trans>
void launch_ldmatrix(const at::Tensor& rows, const at::Tensor& row_of_lane, at::Tensor& out) {
  const int nrows = static_cast<int>(rows.size(0));
  auto pr = gptr<const fa::u32x4>(rows, "rows");
  auto pl = gptr<const int32_t>(row_of_lane, "row_of_lane");
  auto po = gptr<uint32_t>(out, "out");
  record(fa_emu::launch("probe_ldmatrix", Dim3(1), Dim3(32), 16 * nrows,
                        [&] { fa_probe::probe_ldmatrix<N, Trans>(pr, nrows, pl, po); }));
}

at::Tensor run_ldmatrix(const at::Tensor& rows, const at::Tensor& row_of_lane, int64_t num, bool trans) {
  TORCH_CHECK(rows.scalar_type() == torch::kInt16 && rows.dim() == 2 && rows.size(1) == 8 && rows.is_contiguous(),
              "rows must be a contiguous int16 tensor (R, 8), got ", rows.scalar_type(), " ", rows.sizes());
  check_probe_input(row_of_lane, torch::kInt32, 32, "row_of_lane");
  auto out = torch::zeros({32, num}, torch::kInt32);
  if (num == 1) trans ? launch_ldmatrix<1, true>(rows, row_of_lane, out) : launch_ldmatrix<1, false>(rows, row_of_lane, out);
  else if (num == 2) trans ? launch_ldmatrix<2, true>(rows, row_of_lane, out) : launch_ldmatrix<2, false>(rows, row_of_lane, out);
  else if (num == 4) trans ? launch_ldmatrix<4, true>(rows, row_of_lane, out) : launch_ldmatrix<4, false>(rows, row_of_lane, out);
  else TORCH_CHECK(false, "ldmatrix loads 1, 2 or 4 matrices, got ", num);
  return out;
}

at::Tensor run_cp_async(const at::Tensor& src, const at::Tensor& src_size, int64_t bytes, bool cg, bool peek) {
  check_probe_input(src, torch::kUInt8, 512, "src");
  check_probe_input(src_size, torch::kInt32, 32, "src_size");
  auto out = torch::zeros({32, 16}, torch::kUInt8);
  const int pk = peek ? 1 : 0;
  auto ps = gptr<const uint8_t>(src, "src");
  auto pz = gptr<const int32_t>(src_size, "src_size");
  auto po = gptr<uint8_t>(out, "out");
  std::function<void()> body;
  if (cg) {
    TORCH_CHECK(bytes == 16, "cp.async.cg copies 16 bytes, got ", bytes);
    body = [&] { fa_probe::probe_cp_async<16, true>(ps, pz, po, pk); };
  } else if (bytes == 4) {
    body = [&] { fa_probe::probe_cp_async<4, false>(ps, pz, po, pk); };
  } else if (bytes == 8) {
    body = [&] { fa_probe::probe_cp_async<8, false>(ps, pz, po, pk); };
  } else {
    TORCH_CHECK(bytes == 16, "cp.async.ca copies 4, 8 or 16 bytes, got ", bytes);
    body = [&] { fa_probe::probe_cp_async<16, false>(ps, pz, po, pk); };
  }
  record(fa_emu::launch("probe_cp_async", Dim3(1), Dim3(32), 512, body));
  return out;
}

at::Tensor run_cp_async_groups(const at::Tensor& src, int64_t peek) {
  check_probe_input(src, torch::kUInt8, 4 * 32 * 16, "src");
  TORCH_CHECK(peek >= -1 && peek < 4, "peek must be a region 0..3 or -1 (none), got ", peek);
  auto out = torch::zeros({4, 32, 4, 16}, torch::kUInt8);
  auto ps = gptr<const uint8_t>(src, "src");
  auto po = gptr<uint8_t>(out, "out");
  record(fa_emu::launch("probe_cp_async_groups", Dim3(1), Dim3(32), 32 * 64,
                        [&] { fa_probe::probe_cp_async_groups(ps, po, static_cast<int>(peek)); }));
  return out;
}

at::Tensor run_cp_async_visibility(const at::Tensor& src, int64_t mode) {
  check_probe_input(src, torch::kUInt8, 512, "src");
  TORCH_CHECK(mode >= 0 && mode <= 2, "mode must be 0, 1 or 2, got ", mode);
  auto out = torch::zeros({32, 16}, torch::kUInt8);
  auto ps = gptr<const uint8_t>(src, "src");
  auto po = gptr<uint8_t>(out, "out");
  record(fa_emu::launch("probe_cp_async_visibility", Dim3(1), Dim3(32), 512,
                        [&] { fa_probe::probe_cp_async_visibility(ps, po, static_cast<int>(mode)); }));
  return out;
}

// The shared-memory tracker probes (modes in test_kernels.cuh): one block of nthreads
// threads with 4 * nthreads bytes of shared memory; returns out (nthreads,).
at::Tensor run_smem_race(int64_t mode, int64_t nthreads) {
  TORCH_CHECK(mode >= 0 && mode <= 10, "mode must be 0..10, got ", mode);
  TORCH_CHECK(nthreads >= 64 && nthreads % 32 == 0 && nthreads <= 1024, "nthreads must be a multiple of 32 in [64, 1024], got ",
              nthreads);
  auto out = torch::full({nthreads}, -1, torch::kInt32);
  auto po = gptr<int32_t>(out, "out");
  record(fa_emu::launch("probe_smem_race", Dim3(1), Dim3(nthreads), 4 * nthreads,
                        [&] { fa_probe::probe_smem_race(po, static_cast<int>(mode)); }));
  return out;
}

at::Tensor run_shfl(const at::Tensor& v, const std::string& which) {
  check_probe_input(v, torch::kFloat32, 32, "v");
  auto out = torch::full({7, 32}, NAN, torch::kFloat32);
  auto pv = gptr<const float>(v, "v");
  auto po = gptr<float>(out, "out");
  if (which == "all") {
    record(fa_emu::launch("probe_shfl", Dim3(1), Dim3(32), 0, [&] { fa_probe::probe_shfl(pv, po); }));
  } else if (which == "partial") {
    record(fa_emu::launch("probe_shfl_partial", Dim3(1), Dim3(32), 0, [&] { fa_probe::probe_shfl_partial(pv, po); }));
  } else {
    TORCH_CHECK(which == "missing_lane", "unknown shuffle probe ", which);
    record(fa_emu::launch("probe_shfl_missing_lane", Dim3(1), Dim3(32), 0, [&] { fa_probe::probe_shfl_missing_lane(pv, po); }));
  }
  return out;
}

void run_oob(const at::Tensor& x, const at::Tensor& y, int64_t shift, int64_t mode, int64_t nblocks, int64_t nthreads) {
  auto px = gptr<const float>(x, "x");
  auto py = gptr<float>(y, "y");
  record(fa_emu::launch("probe_oob", Dim3(nblocks), Dim3(nthreads), 16 * nthreads,
                        [&] { fa_probe::probe_oob(px, py, shift, static_cast<int>(mode)); }));
}


// ---- the forward kernel ------------------------------------------------------------
// Writes out (B, Hq, L, Ev) and lse (B, Hq, L); checks as the GPU binding (cuda/flash_fwd_api.h).
void flash_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
               int64_t causal, double scale) {
  fa::check_fwd_inputs(q, k, v, out, lse, causal);
  TORCH_CHECK(q.device().is_cpu(), "the emulator runs on CPU tensors, got ", q.device());
  const int d = fa::fwd_head_dim(q, v);
  if (q.scalar_type() == at::kHalf)
    record(fa_emu_fwd::run_fp16(fa::make_fwd_params<fa::half_t>(q, k, v, out, lse, causal, scale), d));
  else
    record(fa_emu_fwd::run_bf16(fa::make_fwd_params<fa::bf16_t>(q, k, v, out, lse, causal, scale), d));
}

// ---- the backward kernels -----------------------------------------------------------
// Writes dq, dk, dv (shaped like q, k, v) and the scratch delta (B, Hq, L); dlse may be None.
// Checks as the GPU binding (cuda/flash_bwd_api.h).
void flash_bwd(const at::Tensor& dout, const c10::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k,
               const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk,
               at::Tensor& dv, at::Tensor& delta, int64_t causal, double scale) {
  const at::Tensor dl = dlse.has_value() ? *dlse : at::Tensor();
  fa::check_bwd_inputs(dout, dl, q, k, v, out, lse, dq, dk, dv, delta, causal);
  TORCH_CHECK(q.device().is_cpu(), "the emulator runs on CPU tensors, got ", q.device());
  const int d = fa::fwd_head_dim(q, v);
  if (q.scalar_type() == at::kHalf)
    record(fa_emu_bwd::run_fp16(fa::make_bwd_params<fa::half_t>(dout, dl, q, k, v, out, lse, dq, dk, dv, delta, causal, scale), d));
  else
    record(fa_emu_bwd::run_bf16(fa::make_bwd_params<fa::bf16_t>(dout, dl, q, k, v, out, lse, dq, dk, dv, delta, causal, scale), d));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_attn CUDA kernels compiled for the CPU emulator (see csrc/emu/runtime.h)";
  m.def("run_index", &run_index);
  m.def("run_barrier", &run_barrier);
  m.def("run_mma", &run_mma);
  m.def("run_ldmatrix", &run_ldmatrix);
  m.def("run_cp_async", &run_cp_async, pybind11::arg("src"), pybind11::arg("src_size"), pybind11::arg("bytes"),
        pybind11::arg("cg"), pybind11::arg("peek") = false);
  m.def("run_cp_async_groups", &run_cp_async_groups, pybind11::arg("src"), pybind11::arg("peek") = -1);
  m.def("run_cp_async_visibility", &run_cp_async_visibility);
  m.def("run_smem_race", &run_smem_race, pybind11::arg("mode"), pybind11::arg("nthreads") = 64);
  m.def("run_shfl", &run_shfl);
  m.def("run_oob", &run_oob);
  m.def("last_launch_stats", [] {
    const auto& s = last_stats();
    return pybind11::make_tuple(s.seconds, s.blocks, s.threads, s.switches);
  }, "(seconds, blocks, threads, fiber switches) of the last launch");
  m.def("last_launch_kernels", [] { return last_stats().kernels; },
        "the kernel(s) of the last launch, ';'-joined: e.g. 'flash_fwd_kernel<hdim 64, fp16, causal 1, even_mn 0>'");
  m.def("flash_fwd", &flash_fwd, "the CUDA forward kernel, emulated: writes out and lse");
  m.def("flash_bwd", &flash_bwd, "the CUDA backward kernels, emulated: writes dq, dk, dv and delta");
}
