// Python bindings of the CPU attention kernels: input checks, the params structs
// (params.h) from the tensors, then the kernels, which write the outputs allocated here whole; and
// their autograd formula for eager calls (Attention). Path selection (isa.cpp) and the test
// hooks (test_hooks.cpp) add their functions to the same module.
#include <torch/extension.h>

#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "bindings.h"
#include "bwd_kernel.h"
#include "dtype_switch.h"
#include "fwd_kernel.h"
#include "params.h"

namespace fused_attn::cpu {
namespace {

// The saved lse (lse_t in params.h): fp64 for fp32 and fp64 inputs, fp32 for bf16 / fp16.
c10::ScalarType lse_dtype(c10::ScalarType dt) {
  return dt == c10::ScalarType::Double || dt == c10::ScalarType::Float ? c10::ScalarType::Double
                                                                      : c10::ScalarType::Float;
}

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D (B, H, L, E), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " must have query's dtype ", q.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) == 1, name, " must have a unit stride on the last dim, got strides ",
              t.strides());
  TORCH_CHECK(t.size(2) == 1 || t.stride(2) >= t.size(3), name,
              " rows must not overlap (stride(2) >= size(3)), got shape ", t.sizes(), " strides ", t.strides());
}

void check_output(const at::Tensor& t, const char* name, at::IntArrayRef shape, c10::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor, got device ",
              t.device(), " strides ", t.strides());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// What the kernels read in place: unit stride on the last dim and rows that do not overlap (an
// expanded L does); anything else is copied contiguous first.
at::Tensor operand(const at::Tensor& t) {
  const bool unit = t.dim() != 4 || t.stride(3) == 1 || t.size(3) == 1;
  const bool rows_apart = t.dim() != 4 || t.size(2) <= 1 || t.stride(2) >= t.size(3);
  return unit && rows_apart ? t : t.contiguous();
}

// An output the kernels write whole: uninitialised, or NaN-filled (poison, the tests' setting) so
// that an element a kernel forgets to write shows.
at::Tensor new_output(at::IntArrayRef shape, c10::ScalarType dtype, bool poison) {
  const auto options = at::TensorOptions().dtype(dtype);
  return poison ? at::full(shape, std::numeric_limits<double>::quiet_NaN(), options) : at::empty(shape, options);
}

// The checked inputs' part of the params, shared by forward and backward.
// The op arguments after the tensors (fused_attn/spec.py: OP_ARGS_SCHEMA).
struct SpecArgs {
  int64_t causal;
  double scale;
  int64_t window_left, window_right;
  double softcap;
  double dropout_p;
  const std::optional<at::Tensor>& key_bounds;
  const std::optional<at::Tensor>& mask;
  const std::optional<at::Tensor>& cu_seqlens_q;
  const std::optional<at::Tensor>& cu_seqlens_k;
  const std::optional<at::Tensor>& alibi_slopes;
  const std::optional<at::Tensor>& dropout_seed;
  const std::optional<at::Tensor>& seqlens_k;
};

// One of varlen's cumulative sequence lengths: int64 (n_seq + 1,), 0 first, non-decreasing, total last.
const int64_t* cu_seqlens(const at::Tensor& cu, const char* name, int64_t n_seq, int64_t total) {
  TORCH_CHECK(cu.device().is_cpu() && cu.scalar_type() == at::kLong && cu.dim() == 1 && cu.is_contiguous() &&
                  cu.size(0) == n_seq + 1,
              name, " must be a contiguous int64 CPU tensor of ", n_seq + 1, " offsets, got ", cu.scalar_type(), " ",
              cu.sizes(), " on ", cu.device());
  const int64_t* c = cu.data_ptr<int64_t>();
  TORCH_CHECK(c[0] == 0 && c[n_seq] == total, name, " must run from 0 to ", total, ", got ", c[0], " to ", c[n_seq]);
  for (int64_t s = 0; s < n_seq; ++s)
    TORCH_CHECK(c[s] <= c[s + 1], name, " must not decrease, got ", c[s], " then ", c[s + 1]);
  return c;
}

// The mask tensor (B, Hq, L, S) as the kernels read it: any strides (0 on broadcast dims).
MaskRef mask_ref(const at::Tensor& m, const Dims& d) {
  TORCH_CHECK(m.device().is_cpu() && m.dim() == 4 && m.size(0) == d.batch && m.size(1) == d.heads_q &&
                  m.size(2) == d.len_q && m.size(3) == d.len_k,
              "mask must be a CPU tensor of shape (", d.batch, ", ", d.heads_q, ", ", d.len_q, ", ", d.len_k,
              ") (strides 0 where it broadcasts), got ", m.sizes(), " on ", m.device());
  MaskRef r;
  switch (m.scalar_type()) {
    case at::kBool: r.kind = kMaskBool; break;
    case at::kFloat: r.kind = kMaskF32; break;
    case at::kDouble: r.kind = kMaskF64; break;
    case at::kBFloat16: r.kind = kMaskBF16; break;
    case at::kHalf: r.kind = kMaskF16; break;
    default: TORCH_CHECK(false, "mask must be bool, float32, float64, bfloat16 or float16, got ", m.scalar_type());
  }
  r.ptr = m.data_ptr();
  r.batch = m.stride(0);
  r.head = m.stride(1);
  r.row = m.stride(2);
  r.col = m.stride(3);
  return r;
}

AttnFwdCommon<int64_t> make_common(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const SpecArgs& spec) {
  check_operand(q, "query", q);
  check_operand(k, "key", q);
  check_operand(v, "value", q);
  const Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  TORCH_CHECK(k.size(0) == d.batch && v.size(0) == d.batch, "batch sizes differ: query ", q.sizes(), ", key ",
              k.sizes(), ", value ", v.sizes());
  TORCH_CHECK(k.size(3) == d.head_dim, "query and key head dims differ: ", q.sizes(), " vs ", k.sizes());
  TORCH_CHECK(v.size(1) == d.heads_kv && v.size(2) == d.len_k, "key ", k.sizes(), " and value ", v.sizes(),
              " must agree in heads and length");
  TORCH_CHECK(d.heads_kv >= 1 && d.heads_q % d.heads_kv == 0, "query heads (", d.heads_q,
              ") must be a multiple of key/value heads (", d.heads_kv, ")");
  TORCH_CHECK(d.head_dim <= kMaxHeadDim && d.head_dim_v <= kMaxHeadDim, "head dims must be <= ", kMaxHeadDim,
              ", got E = ", d.head_dim, ", Ev = ", d.head_dim_v);
  TORCH_CHECK(d.batch > 0 && d.heads_q > 0 && d.len_q > 0 && d.len_k > 0 && d.head_dim > 0 && d.head_dim_v > 0,
              "empty inputs: query ", q.sizes(), ", key ", k.sizes(), ", value ", v.sizes());
  TORCH_CHECK(valid_causal_mode(spec.causal), "causal must be 0 (none), 1 (upper-left) or 2 (lower-right), got ",
              spec.causal);
  TORCH_CHECK(spec.window_left >= -1 && spec.window_right >= -1, "window sizes must be >= -1 (-1: unbounded), got (",
              spec.window_left, ", ", spec.window_right, ")");
  AttnFwdCommon<int64_t> c{};
  c.dims = d;
  c.q_stride = strides_of(q);
  c.k_stride = strides_of(k);
  c.v_stride = strides_of(v);
  c.vis = make_visibility(spec.causal, d.len_q, d.len_k, spec.window_left, spec.window_right);
  c.scale = spec.scale;
  TORCH_CHECK(std::isfinite(spec.softcap) && spec.softcap >= 0.0, "softcap must be finite and >= 0, got ",
              spec.softcap);
  c.softcap = spec.softcap;
  if (spec.key_bounds.has_value()) {
    const at::Tensor& kb = *spec.key_bounds;
    TORCH_CHECK(kb.device().is_cpu() && kb.scalar_type() == at::kLong && kb.is_contiguous() && kb.dim() == 2 &&
                    kb.size(0) == d.batch && kb.size(1) == 2,
                "key_bounds must be a contiguous int64 CPU tensor of shape (", d.batch, ", 2), got ", kb.scalar_type(),
                " ", kb.sizes(), " on ", kb.device());
    const int64_t* bounds = kb.data_ptr<int64_t>();
    for (int64_t b = 0; b < d.batch; ++b)
      TORCH_CHECK(0 <= bounds[2 * b] && bounds[2 * b] <= bounds[2 * b + 1] && bounds[2 * b + 1] <= d.len_k,
                  "key_bounds[", b, "] = (", bounds[2 * b], ", ", bounds[2 * b + 1], ") is not a range of [0, ", d.len_k,
                  "]");
    c.key_bounds = bounds;
  }
  if (spec.mask.has_value()) c.mask = mask_ref(*spec.mask, d);
  TORCH_CHECK(spec.cu_seqlens_q.has_value() == spec.cu_seqlens_k.has_value(),
              "cu_seqlens_q and cu_seqlens_k come together");
  if (spec.cu_seqlens_q.has_value()) {
    TORCH_CHECK(d.batch == 1 && !spec.key_bounds.has_value(),
                "varlen sequences are packed into batch 1 and take no key_bounds, got batch ", d.batch);
    const int64_t n_seq = spec.cu_seqlens_q->numel() - 1;
    TORCH_CHECK(n_seq >= 0, "cu_seqlens_q must hold at least one offset");
    c.vis.cu_q = cu_seqlens(*spec.cu_seqlens_q, "cu_seqlens_q", n_seq, d.len_q);
    c.vis.cu_k = cu_seqlens(*spec.cu_seqlens_k, "cu_seqlens_k", n_seq, d.len_k);
    c.vis.n_seq = n_seq;
  }
  if (spec.seqlens_k.has_value()) {
    const at::Tensor& n = *spec.seqlens_k;
    TORCH_CHECK(n.device().is_cpu() && n.scalar_type() == at::kLong && n.is_contiguous() && n.dim() == 1 &&
                    n.size(0) == d.batch,
                "seqlens_k must be a contiguous int64 CPU tensor of shape (", d.batch, ",), got ", n.scalar_type(),
                " ", n.sizes(), " on ", n.device());
    TORCH_CHECK(!c.vis.cu_q, "seqlens_k does not combine with varlen sequences");
    const int64_t* counts = n.data_ptr<int64_t>();
    for (int64_t b = 0; b < d.batch; ++b)
      TORCH_CHECK(0 <= counts[b] && counts[b] <= d.len_k, "seqlens_k[", b, "] = ", counts[b], " is not in [0, ",
                  d.len_k, "]");
    c.seqlens_k = counts;
  }
  if (spec.alibi_slopes.has_value()) {
    const at::Tensor& a = *spec.alibi_slopes;
    const int64_t rows = c.vis.cu_q ? c.vis.n_seq : d.batch;
    TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == at::kFloat && a.is_contiguous() && a.dim() == 2 &&
                    a.size(0) == rows && a.size(1) == d.heads_q,
                "alibi_slopes must be a contiguous float32 CPU tensor of shape (", rows, ", ", d.heads_q, "), got ",
                a.scalar_type(), " ", a.sizes(), " on ", a.device());
    c.alibi = a.data_ptr<float>();
  }
  TORCH_CHECK(spec.dropout_p >= 0.0 && spec.dropout_p <= 1.0, "dropout_p must be in [0, 1], got ", spec.dropout_p);
  if (spec.dropout_p > 0.0) {
    TORCH_CHECK(spec.dropout_seed.has_value(), "dropout_p = ", spec.dropout_p, " needs dropout_seed");
    const at::Tensor& s = *spec.dropout_seed;
    TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kLong && s.numel() == 1,
                "dropout_seed must be an int64 CPU tensor of one element, got ", s.scalar_type(), " ", s.sizes(),
                " on ", s.device());
    c.dropout = make_dropout(spec.dropout_p, static_cast<uint64_t>(s.item<int64_t>()));
  }
  return c;
}

// (out, lse): allocated here (poison: NaN-filled first), q, k, v read in place where they can be.
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
             bool poison, int64_t causal, double scale, int64_t window_left, int64_t window_right, double softcap,
             double dropout_p, const std::optional<at::Tensor>& key_bounds, const std::optional<at::Tensor>& mask,
             const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
             const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& dropout_seed,
    const std::optional<at::Tensor>& seqlens_k) {
  const at::Tensor q = operand(q_in), k = operand(k_in), v = operand(v_in);
  AttnFwdParams p{};
  static_cast<AttnFwdCommon<int64_t>&>(p) = make_common(q, k, v, SpecArgs{causal, scale, window_left, window_right,
                                                                          softcap, dropout_p, key_bounds, mask,
                                                                          cu_seqlens_q, cu_seqlens_k, alibi_slopes,
                                                                          dropout_seed, seqlens_k});
  const Dims& d = p.dims;
  at::Tensor out = new_output({d.batch, d.heads_q, d.len_q, d.head_dim_v}, q.scalar_type(), poison);
  at::Tensor lse = new_output({d.batch, d.heads_q, d.len_q}, lse_dtype(q.scalar_type()), poison);
  p.o_stride = strides_of(out);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  dtype_switch(q.scalar_type(), [&](auto scalar, auto acc) {
    attention_forward<decltype(scalar), decltype(acc)>(p);
  });
  return {out, lse};
}

// (dq, dk, dv, dmask): allocated here as the forward's outputs (poison: NaN-filled first); dmask, the float
// mask's gradient in the mask's dtype and shape (B, Hq, L, S), only with mask_grad (zero where no tile is
// visited), else None. q, k, v, dout read in place where they can be (operand); out, lse made contiguous,
// dlse also cast to lse's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> backward(
    const at::Tensor& dout_in, const std::optional<at::Tensor>& dlse_in, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in, bool poison,
    bool mask_grad, int64_t causal, double scale, int64_t window_left, int64_t window_right, double softcap,
    double dropout_p, const std::optional<at::Tensor>& key_bounds, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& dropout_seed,
    const std::optional<at::Tensor>& seqlens_k) {
  const at::Tensor q = operand(q_in), k = operand(k_in), v = operand(v_in), dout = operand(dout_in);
  AttnBwdParams p{};
  static_cast<AttnFwdCommon<int64_t>&>(p) = make_common(q, k, v, SpecArgs{causal, scale, window_left, window_right,
                                                                          softcap, dropout_p, key_bounds, mask,
                                                                          cu_seqlens_q, cu_seqlens_k, alibi_slopes,
                                                                          dropout_seed, seqlens_k});
  const Dims& d = p.dims;
  const at::Tensor out = out_in.contiguous(), lse = lse_in.contiguous();
  std::optional<at::Tensor> dlse;
  if (dlse_in.has_value()) dlse = dlse_in->to(lse.scalar_type()).contiguous();
  at::Tensor dq = new_output({d.batch, d.heads_q, d.len_q, d.head_dim}, q.scalar_type(), poison);
  at::Tensor dk = new_output({d.batch, d.heads_kv, d.len_k, d.head_dim}, q.scalar_type(), poison);
  at::Tensor dv = new_output({d.batch, d.heads_kv, d.len_k, d.head_dim_v}, q.scalar_type(), poison);
  std::optional<at::Tensor> dmask;
  if (mask_grad) {
    TORCH_CHECK(mask.has_value() && p.mask.kind != kMaskNone && p.mask.kind != kMaskBool,
                "mask_grad needs a float mask tensor");
    // the tiles write dS (fp32; fp64 for fp64 inputs) where they visit; the rest (skipped tiles) stays zero
    dmask = at::zeros({d.batch, d.heads_q, d.len_q, d.len_k},
                      at::TensorOptions().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  }
  check_operand(dout, "dout", q);
  TORCH_CHECK(dout.sizes() == out.sizes(), "dout must have out's shape ", out.sizes(), ", got ", dout.sizes());
  const auto lse_dt = lse_dtype(q.scalar_type());
  check_output(out, "out", {d.batch, d.heads_q, d.len_q, d.head_dim_v}, q.scalar_type());
  check_output(lse, "lse", {d.batch, d.heads_q, d.len_q}, lse_dt);
  if (dlse.has_value()) check_output(*dlse, "dlse", {d.batch, d.heads_q, d.len_q}, lse_dt);
  p.o_stride = strides_of(out);
  p.do_stride = strides_of(dout);
  p.dq_stride = strides_of(dq);
  p.dk_stride = strides_of(dk);
  p.dv_stride = strides_of(dv);
  p.has_dlse = dlse.has_value();
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  p.dout = dout.data_ptr();
  p.dlse = dlse.has_value() ? dlse->data_ptr() : nullptr;
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  if (dmask.has_value()) p.dmask = dmask->data_ptr();
  dtype_switch(q.scalar_type(), [&](auto scalar, auto acc) {
    attention_backward<decltype(scalar), decltype(acc)>(p);
  });
  if (dmask.has_value() && dmask->scalar_type() != mask->scalar_type()) dmask = dmask->to(mask->scalar_type());
  return {dq, dk, dv, dmask};
}

// attention_with_kvcache's append to a contiguous cache (fused_attn/kvcache.py): new keys k (B, Hk, n, E) and
// values v (B, Hk, n, Ev) copied into k_cache (B, Hk, S, E) / v_cache at rows lengths[b] .. lengths[b] + n - 1
// of each batch entry (the caller checked the ranges, shapes and dtypes); row copies, one call for both caches
// (per-call cost: a decoding step's append was four tensor ops per batch entry from Python).
void append_kv(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k_in, const at::Tensor& v_in,
               const std::vector<int64_t>& lengths) {
  for (auto [cache, rows_in] : {std::pair<at::Tensor*, const at::Tensor*>{&k_cache, &k_in}, {&v_cache, &v_in}}) {
    const at::Tensor rows = rows_in->contiguous();
    TORCH_CHECK(cache->device().is_cpu() && cache->dim() == 4 && rows.dim() == 4 &&
                    cache->scalar_type() == rows.scalar_type() && cache->size(0) == rows.size(0) &&
                    cache->size(1) == rows.size(1) && cache->size(3) == rows.size(3) &&
                    static_cast<int64_t>(lengths.size()) == rows.size(0),
                "append_kv: caches (B, H, S, D) and rows (B, H, n, D) of one dtype, a length per batch entry");
    const int64_t B = rows.size(0), H = rows.size(1), n = rows.size(2), D = rows.size(3);
    if (cache->stride(3) != 1 && D > 1) {  // (any layout: through ATen)
      for (int64_t b = 0; b < B; ++b) cache->select(0, b).narrow(1, lengths[b], n).copy_(rows.select(0, b));
      continue;
    }
    const int64_t elem = cache->element_size(), bytes = D * elem;
    auto* dst = static_cast<char*>(cache->data_ptr());
    const auto* src = static_cast<const char*>(rows.data_ptr());
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(lengths[b] >= 0 && lengths[b] + n <= cache->size(2), "append_kv: rows ", lengths[b], " .. ",
                  lengths[b] + n - 1, " of batch entry ", b, " are outside the cache's ", cache->size(2));
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < n; ++i)
          std::memcpy(dst + (b * cache->stride(0) + h * cache->stride(1) + (lengths[b] + i) * cache->stride(2)) * elem,
                      src + ((b * H + h) * n + i) * bytes, bytes);
    }
  }
}

// The autograd formula of fused_attn/autograd.py, for eager CPU calls that record gradients
// (fused_attn.ops.cpu._differentiable): the same forward and backward as the torch.library ops run, with
// autograd's bookkeeping in C++ rather than in a Python autograd.Function (per-call cost: a small training
// step or a decoding step with gradients paid tens of microseconds for it). Under create_graph the
// gradients come out through RefusedGradients, which raises double_backward_message() if they are
// differentiated (the reference backend supports double backward).
std::string& double_backward_message() {
  static std::string message = "fused_attn backend 'cpu' does not support double backward";
  return message;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct RefusedGradients : public torch::autograd::Function<RefusedGradients> {
  // anchor: an input that requires grad, so that the copies do too.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& anchor, at::TensorList grads) {
    variable_list copies;
    for (const at::Tensor& g : grads) copies.push_back(g.clone());
    return copies;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(false, double_backward_message());
  }
};

// Arguments as forward()'s; backward gives dq, dk, dv and (a float mask that requires grad) dmask.
struct Attention : public torch::autograd::Function<Attention> {
  static constexpr int kArgs = 17;     // forward's arguments after ctx: backward returns one gradient each
  static constexpr int kMaskArg = 11;  // the mask's place among them

  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               bool poison, int64_t causal, double scale, int64_t window_left, int64_t window_right,
                               double softcap, double dropout_p, const std::optional<at::Tensor>& key_bounds,
                               const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_seqlens_q,
                               const std::optional<at::Tensor>& cu_seqlens_k,
                               const std::optional<at::Tensor>& alibi_slopes,
                               const std::optional<at::Tensor>& dropout_seed,
                               const std::optional<at::Tensor>& seqlens_k) {
    auto [out, lse] = fused_attn::cpu::forward(q, k, v, poison, causal, scale, window_left, window_right, softcap,
                                               dropout_p, key_bounds, mask, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
                                               dropout_seed, seqlens_k);
    ctx->save_for_backward({q, k, v, out, lse, mask.has_value() ? *mask : at::Tensor()});
    // the other arguments, as one tuple (one entry of saved_data: per-call cost)
    ctx->saved_data["args"] = c10::ivalue::Tuple::create(
        {poison, causal, scale, window_left, window_right, softcap, dropout_p, key_bounds, cu_seqlens_q, cu_seqlens_k,
         alibi_slopes, dropout_seed, seqlens_k});
    ctx->set_materialize_grads(false);  // an unused lse gives an undefined dlse, not a tensor of zeros
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4], &mask = saved[5];
    const auto& a = ctx->saved_data["args"].toTupleRef().elements();
    const auto optional = [&](int i) { return a[i].toOptional<at::Tensor>(); };
    const at::Tensor dout = grads[0].defined() ? grads[0] : at::zeros_like(out);
    const std::optional<at::Tensor> dlse = grads[1].defined() ? std::optional<at::Tensor>(grads[1]) : std::nullopt;
    const bool mask_grad = mask.defined() && mask.requires_grad();
    variable_list result(kArgs);
    {
      at::NoGradGuard no_grad;
      auto [dq, dk, dv, dmask] = fused_attn::cpu::backward(
          dout, dlse, q, k, v, out, lse, a[0].toBool(), mask_grad, a[1].toInt(), a[2].toDouble(), a[3].toInt(),
          a[4].toInt(), a[5].toDouble(), a[6].toDouble(), optional(7),
          mask.defined() ? std::optional<at::Tensor>(mask) : std::nullopt, optional(8), optional(9), optional(10),
          optional(11), optional(12));
      result[0] = dq;
      result[1] = dk;
      result[2] = dv;
      if (dmask.has_value()) result[kMaskArg] = *dmask;
    }
    if (at::GradMode::is_enabled()) {  // create_graph: gradients that refuse to be differentiated
      at::Tensor anchor;
      for (const at::Tensor* t : {&q, &k, &v, &mask})
        if (!anchor.defined() && t->defined() && t->requires_grad()) anchor = *t;
      std::vector<at::Tensor> given;
      for (int i : {0, 1, 2, kMaskArg})
        if (result[i].defined()) given.push_back(result[i]);
      const variable_list copies = RefusedGradients::apply(anchor, at::TensorList(given));
      int j = 0;
      for (int i : {0, 1, 2, kMaskArg})
        if (result[i].defined()) result[i] = copies[j++];
    }
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> differentiable_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool poison, int64_t causal, double scale,
    int64_t window_left, int64_t window_right, double softcap, double dropout_p,
    const std::optional<at::Tensor>& key_bounds, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& dropout_seed,
    const std::optional<at::Tensor>& seqlens_k) {
  variable_list r = Attention::apply(q, k, v, poison, causal, scale, window_left, window_right, softcap, dropout_p,
                                     key_bounds, mask, cu_seqlens_q, cu_seqlens_k, alibi_slopes, dropout_seed,
                                     seqlens_k);
  return {r[0], r[1]};
}

}  // namespace
}  // namespace fused_attn::cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_attn CPU kernels: fused attention forward and backward (see csrc/cpu/*_kernel.h)";
  m.def("forward", &fused_attn::cpu::forward, "attention forward: (out, lse)");
  m.def("backward", &fused_attn::cpu::backward, "attention backward: (dq, dk, dv, dmask or None)");
  m.def("differentiable_forward", &fused_attn::cpu::differentiable_forward,
        "attention forward recorded for autograd (backward in C++): (out, lse)");
  m.def("append_kv", &fused_attn::cpu::append_kv,
        "attention_with_kvcache's append: new rows into contiguous KV caches at each batch entry's length");
  m.def("last_forward_splits", [] { return fused_attn::cpu::last_forward_splits().load(); },
        "how many key chunks the last forward cut its tasks' keys into (split-KV; 1: none)");
  m.def("set_double_backward_message", [](const std::string& m) { fused_attn::cpu::double_backward_message() = m; },
        "the error raised when gradients of this backend's gradients are asked for");
  fused_attn::cpu::def_path_functions(m);
  fused_attn::cpu::def_test_hooks(m);
}
