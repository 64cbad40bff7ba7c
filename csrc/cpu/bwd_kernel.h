// Fused attention backward on the CPU: recomputes P from the saved lse, never
// forming anything of size L x S.
//
// 1. delta = rowsum(dO * O) and dlse per query row (the lse gradient enters with it:
//    d lse / d s = P, so dS = P * ((dP - delta) + dlse) covers both outputs' gradients).
//    lse as the exponent's row terms: fp32 inputs save it in fp64 (fwd_kernel.h), taken
//    here as a score hi and a remainder lo, P = exp2((sign(scale) s - hi) |scale| log2 e - lo)
//    from the raw scores s, exact at the row's max as in the forward; other dtypes take
//    P = exp2(s log2 e scale - hi - lo). Rows with |lse| past LSE2_RECOMPUTE_ABOVE*
//    (config.h) get their exp2 reference and row sum recomputed from the same score GEMMs
//    as step 2 (recompute_row_stats), so that P does not inherit the stored lse's rounding.
// 2. One task per (batch, kv head, chunk of key blocks), taken by threads from a shared
//    counter. For each key block of BWD_TILE.block_k keys it accumulates dK, dV in fp32 (fp64) over the query
//    blocks of every q head in the group (GQA sums in a fixed order, no atomics):
//      S  = Q K^T;  P from S and the row terms of step 1   (masked to each row's keys)
//      dV += P^T dO;  dP = dO V^T;  dS = P * ((dP - delta) + dlse)
//      dK += scale dS^T Q;  dQ_chunk += scale dS K
//    dQ accumulates in one fp32 (fp64) buffer per chunk of key blocks. Chunks exist
//    only to feed every thread when B * Hk is smaller than the thread count; key
//    blocks are dealt to chunks round-robin (balanced under causal masks).
// 3. dQ = sum over chunks, in order: deterministic for a given thread count.
//    fp32: where P > DS_EXACT_ABOVE (one key per row at most, the one a large-score row
//    all but picks) dS = P ((dP - delta) + dlse) takes dP = dO . v and delta in double
//    (exact_dscore, tile_ops.h): in fp32 both sides' rounding would swamp the difference.
// GEMMs: fp32 on AVX-512 through our micro-kernel (gemm_avx512.h), with K^T and V^T of
// the key block transposed once per block, P and dS made in the epilogues of the S and dP
// GEMMs (ProbsEpilogue, DScoresEpilogue), and P^T, dS^T read in place; otherwise BLAS
// (MKL sgemm / dgemm / bf16 / fp16 GEMMs) on the operands in place.
// Extra memory: delta and n_chunks dQ buffers, O(L) per head, plus per-thread tiles.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "config.h"
#include "dropout_ops.h"
#include "gemm.h"
#include "gemm_avx512.h"
#include "mask_ops.h"
#include "params.h"
#include "tile_ops.h"

namespace fused_attn::cpu {

#ifdef FA_CPU_HAVE_AVX512_PATH
// fp32 on AVX-512, the elementwise steps in the GEMMs' epilogues (tiles row-major, ld;
// c0 = the panel's first column):
// P = exp2((g s - hi[r]) a - lo[r]), 0 outside row r's keys iv[r] (MASKED; otherwise
// every column), from the raw score tile Q K^T in registers (g = sign(scale),
// a = |scale| log2 e; hi, lo from step 1): g s - hi is exact near the row's max and the
// scale multiplies the difference, as in the forward.
template <bool MASKED>
struct ProbsEpilogue {
  float* p;
  int64_t ld, c0;
  float g, a;
  const KeyInterval* iv;  // MASKED only
  const float* hi;
  const float* lo;
  template <int MR, int NV>
  FA_AVX512_TARGET FA_ALWAYS_INLINE void apply(int64_t m0, __m512 (&c)[MR][NV], __mmask16 tail) const {
    const __m512 vg = _mm512_set1_ps(g), va = _mm512_set1_ps(a);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const int64_t row = m0 + r;
      const int64_t cb = MASKED ? iv[row].begin - c0 : 0, ce = MASKED ? iv[row].end - c0 : 0;
      const __m512 h = _mm512_set1_ps(hi[row]), o = _mm512_set1_ps(lo[row]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const __m512 x = _mm512_sub_ps(softmax_exponent(c[r][v], vg, h, va), o);
        const __mmask16 k = v == NV - 1 ? tail : __mmask16(0xFFFF);
        const __m512 e = exp2_avx512(x, MASKED ? lane_range(cb - 16 * v, ce - 16 * v) : k, EXP2_01_D6);
        _mm512_mask_storeu_ps(p + row * ld + c0 + 16 * v, k, e);
      }
    }
  }
};
// dS = P * ((dP - delta[r]) + dlse[r]) from the tile dP = dO V^T in registers; where
// P > DS_EXACT_ABOVE, exact_dscore (tile_ops.h) from dO's row and V's (in place).
struct DScoresEpilogue {
  float* ds;
  const float* p;
  int64_t ld, c0;
  const float* delta;
  const float* dlse;
  const double* delta64;
  const float* dout;
  int64_t do_sl;
  const float* v;
  int64_t v_sl, Ev;
  template <int MR, int NV>
  FA_AVX512_TARGET FA_ALWAYS_INLINE void apply(int64_t m0, __m512 (&c)[MR][NV], __mmask16 tail) const {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const int64_t at = (m0 + r) * ld + c0;
      const __m512 d = _mm512_set1_ps(delta[m0 + r]), dl = _mm512_set1_ps(dlse[m0 + r]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const __mmask16 k = v == NV - 1 ? tail : __mmask16(0xFFFF);
        const __m512 pv = _mm512_maskz_loadu_ps(k, p + at + 16 * v);
        _mm512_mask_storeu_ps(ds + at + 16 * v, k, _mm512_mul_ps(pv, _mm512_add_ps(_mm512_sub_ps(c[r][v], d), dl)));
        __mmask16 big = _mm512_mask_cmp_ps_mask(k, pv, _mm512_set1_ps(DS_EXACT_ABOVE), _CMP_GT_OQ);
        while (__builtin_expect(big != 0, 0)) {
          const int lane = __builtin_ctz(big);
          big &= big - 1;
          const int64_t col = c0 + 16 * v + lane, row = m0 + r;
          ds[at + 16 * v + lane] = exact_dscore(dout + row * do_sl, this->v + col * v_sl, Ev, delta64[row],
                                                p[at + 16 * v + lane], dlse[row]);
        }
      }
    }
  }
};
#endif

// Step 1b of attention_backward: for the rows marked in `exact` (B * Hq * L), hi = the
// row's max of t = g s (s = alpha Q K^T, the scores exactly as step 2's GEMMs make them, on
// the same blocks) and lo = log2 of the row's sum of exp2((t - max) a). Step 2's
// P = exp2((t - hi) a - lo) is then 1 / l at the max however large the scores.
template <typename scalar_t, typename acc_t>
void recompute_row_stats(const AttnBwdParams& p, bool use_micro, int64_t BQ, int64_t BK, const uint8_t* exact,
                         acc_t alpha, acc_t g, acc_t a, acc_t mask_mult, acc_t* hi, acc_t* lo) {
  const Dims& d = p.dims;
  constexpr acc_t NEG_INF = -std::numeric_limits<acc_t>::infinity();
  const int64_t n_kblocks = (d.len_k + BK - 1) / BK, group = d.heads_q / d.heads_kv;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  at::parallel_for(0, d.batch * d.heads_q, 1, [&](int64_t begin, int64_t end) {
    at::Tensor scratch = at::empty({BQ * BK + (use_micro ? BK * d.head_dim : 0)}, at::TensorOptions().dtype(acc_dtype));
    at::Tensor stats = at::empty({2 * d.len_q}, at::TensorOptions().dtype(at::kDouble));
    acc_t* s = scratch.data_ptr<acc_t>();
    acc_t* k_t = s + BQ * BK;
    double* m_row = stats.data_ptr<double>();
    double* l_row = m_row + d.len_q;
    for (int64_t bh = begin; bh < end; ++bh) {
      const uint8_t* ex = exact + bh * d.len_q;
      if (std::find(ex, ex + d.len_q, uint8_t(1)) == ex + d.len_q) continue;
      const int64_t b = bh / d.heads_q, h = bh % d.heads_q, hk = h / group;
      const Visibility vis = p.visibility(b);
      std::fill(m_row, m_row + d.len_q, double(NEG_INF));
      std::fill(l_row, l_row + d.len_q, 0.0);
      for (int64_t kb = 0; kb < n_kblocks; ++kb) {
        const int64_t j0 = kb * BK, cols = std::min(BK, d.len_k - j0);
        const scalar_t* k_blk = k + b * p.k_stride.batch + hk * p.k_stride.head + j0 * p.k_stride.row;
        bool transposed = false;
        // The query blocks of step 2 for this key block, the same GEMM calls.
        const RowRange seeing = rows_seeing(vis, d.len_q, d.len_k, j0, j0 + cols);
        for (int64_t i0 = seeing.begin; i0 < seeing.end; i0 += BQ) {
          const int64_t rows = std::min(BQ, d.len_q - i0);
          if (std::find(ex + i0, ex + i0 + rows, uint8_t(1)) == ex + i0 + rows) continue;
          const int64_t kc = block_cols(vis, d.len_k, i0, rows, j0, cols);
          const scalar_t* q_blk = q + b * p.q_stride.batch + h * p.q_stride.head + i0 * p.q_stride.row;
#ifdef FA_CPU_HAVE_AVX512_PATH
          if constexpr (std::is_same_v<scalar_t, float>) {
            if (use_micro) {
              if (!transposed) transpose_f32_avx512(cols, d.head_dim, k_blk, p.k_stride.row, k_t, BK);
              transposed = true;
              gemm_f32_avx512<false>(rows, kc, d.head_dim, alpha, q_blk, p.q_stride.row, k_t, BK, s, BK, false);
            }
          }
#endif
          if (!use_micro) gemm(false, true, rows, kc, d.head_dim, alpha, q_blk, p.q_stride.row, k_blk, p.k_stride.row,
                               acc_t(0), s, BK);
          if (p.softcap > 0.0)
            apply_softcap_tile(s, BK, rows, kc, static_cast<acc_t>(p.softcap), mask_mult, (acc_t*)nullptr);
          if (p.mask.kind != kMaskNone) apply_mask_tile(p.mask, b, h, i0, rows, j0, kc, nullptr, s, BK, mask_mult);
          if (p.alibi != nullptr) apply_alibi_tile(p, vis, b, h, i0, rows, j0, kc, nullptr, s, BK, mask_mult);
          for (int64_t r = 0; r < rows; ++r) {
            if (!ex[i0 + r]) continue;
            const acc_t* y = s + r * BK;
            const KeyInterval keys = tile_interval(vis.keys<int64_t>(i0 + r, d.len_k), j0, kc);
            acc_t mx = NEG_INF;
            for (int64_t c = keys.begin; c < keys.end; ++c) mx = g * y[c] > mx ? g * y[c] : mx;
            const double m_old = m_row[i0 + r], m_new = std::max<double>(m_old, mx);
            if (m_new == double(NEG_INF)) continue;
            double sum = 0;
            for (int64_t c = keys.begin; c < keys.end; ++c) sum += std::exp2((double(g * y[c]) - m_new) * double(a));
            l_row[i0 + r] =
                (m_old == m_new ? l_row[i0 + r] : l_row[i0 + r] * std::exp2((m_old - m_new) * double(a))) + sum;
            m_row[i0 + r] = m_new;
          }
        }
      }
      for (int64_t i = 0; i < d.len_q; ++i) {
        if (!ex[i]) continue;
        hi[bh * d.len_q + i] = static_cast<acc_t>(m_row[i]);
        lo[bh * d.len_q + i] = static_cast<acc_t>(std::log2(l_row[i]));
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void attention_backward(AttnBwdParams p) {
  const Dims& d = p.dims;
  constexpr bool LOW_PRECISION = !std::is_same_v<scalar_t, acc_t>;
  constexpr bool FP32 = std::is_same_v<scalar_t, float>;
  // fp32 on AVX-512: our micro-kernel (gemm_avx512.h) on K^T / V^T transposed once per key
  // block; elsewhere BLAS (MKL) on the operands in place.
  const bool use_micro = FP32 && avx512_enabled();
  const TileConfig tile_cfg = BWD_TILE;
  const int64_t BQ = std::min<int64_t>(tile_cfg.block_q, d.len_q);
  const int64_t BK = std::min<int64_t>(tile_cfg.block_k, d.len_k);
  const int64_t n_kblocks = (d.len_k + BK - 1) / BK;
  const int64_t group = d.heads_q / d.heads_kv;
  const int64_t threads = at::get_num_threads();
  const int64_t kv_heads = d.batch * d.heads_kv;
  const int64_t n_chunks = std::min(n_kblocks, std::max<int64_t>(1, (threads + kv_heads - 1) / kv_heads));
  const acc_t score_scale = static_cast<acc_t>(p.scale * LOG2E);
  const acc_t scale = static_cast<acc_t>(p.scale);
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const auto in_dtype = c10::CppTypeToScalarType<scalar_t>::value;
  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  const auto* v = static_cast<const scalar_t*>(p.v);
  const auto* out = static_cast<const scalar_t*>(p.out);
  const auto* dout = static_cast<const scalar_t*>(p.dout);
  using lse_type = lse_t<scalar_t, acc_t>;
  const auto* lse = static_cast<const lse_type*>(p.lse);
  const auto* dlse = p.has_dlse ? static_cast<const lse_type*>(p.dlse) : nullptr;
  // P = exp2((g s - hi) a - lo) from the scores s = alpha Q K^T (probs_impl, tile_ops.h).
  // fp32: raw scores, g = sign(scale), a = |scale| log2 e (the forward's), the scale applied
  // after the subtraction as in the forward; otherwise s already in log2 units.
  const acc_t score_sgn = p.scale < 0 ? acc_t(-1) : acc_t(1);
  const acc_t score_asc = static_cast<acc_t>(std::abs(p.scale) * LOG2E);
  const acc_t alpha = FP32 ? acc_t(1) : score_scale;
  const acc_t g = FP32 ? score_sgn : acc_t(1);
  const acc_t a = FP32 ? score_asc : acc_t(1);
  // A mask tensor's float values in the scores' units (mask_ops.h): raw scores for fp32, log2 units else.
  const bool has_mask = p.mask.kind != kMaskNone, has_softcap = p.softcap > 0.0;
  const acc_t mask_mult = FP32 ? static_cast<acc_t>(1.0 / p.scale) : static_cast<acc_t>(LOG2E);
  const bool has_dropout = p.dropout.on;
  const acc_t keep_scale = static_cast<acc_t>(p.dropout.keep_scale);

  // 1. delta = rowsum(dO * O) (fp32: also in double, delta64, for exact_dscore) and dlse,
  //    kept apart (dscores_impl), and lse log2 e in double split as hi a + lo, so that
  //    neither the change of base nor the split adds rounding to the exponent of P. fp32
  //    (lse saved in fp64): hi = lse log2 e / a rounded to fp32, a score value (g s - hi exact
  //    near the row's max), lo the remainder, |lo| <= |lse log2 e| 2^-24.
  const int64_t n_rows = d.batch * d.heads_q * d.len_q;
  // The forward's scores came from BLAS, not from the micro-kernel this backward uses (config.h,
  // FWD_PACK_MIN_ROWS): its lse may miss these scores by their rounding (large at large scores), so every
  // row's max and sum are formed again from this backward's own scores (step 1b; few rows, cheap).
  const bool own_stats = FP32 && use_micro && !fwd_packs_kv(d.len_q, d.heads_q, d.heads_kv, d.len_k);
  at::Tensor rowstats = at::empty({4, n_rows}, at::TensorOptions().dtype(acc_dtype));
  acc_t* delta = rowstats.data_ptr<acc_t>();
  acc_t* dl = delta + n_rows;
  acc_t* hi = dl + n_rows;
  acc_t* lo = hi + n_rows;
  at::Tensor delta64_t = at::empty({FP32 ? n_rows : 0}, at::TensorOptions().dtype(at::kDouble));
  double* delta64 = delta64_t.data_ptr<double>();
  at::Tensor exact_t = at::empty({n_rows}, at::TensorOptions().dtype(at::kByte));
  uint8_t* exact = exact_t.data_ptr<uint8_t>();
  at::parallel_for(0, n_rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / d.len_q, i = row % d.len_q, b = bh / d.heads_q, h = bh % d.heads_q;
      const scalar_t* o = out + row * d.head_dim_v;
      const scalar_t* dor = dout + b * p.do_stride.batch + h * p.do_stride.head + i * p.do_stride.row;
      if constexpr (FP32) {
        delta64[row] = dot_f64(dor, o, d.head_dim_v);
        delta[row] = static_cast<float>(delta64[row]);
      } else {
        acc_t sum = 0;
        for (int64_t c = 0; c < d.head_dim_v; ++c) sum += static_cast<acc_t>(o[c]) * static_cast<acc_t>(dor[c]);
        delta[row] = sum;
      }
      dl[row] = dlse ? static_cast<acc_t>(dlse[row]) : acc_t(0);
      const double t = static_cast<double>(lse[row]) * LOG2E;
      if (!std::isfinite(t)) {  // -inf: the row sees nothing; +inf, NaN: P NaN or 0 as in the forward
        hi[row] = static_cast<acc_t>(t);
        lo[row] = 0;
        exact[row] = 0;
        continue;
      }
      if constexpr (FP32) {
        constexpr double MAX = std::numeric_limits<float>::max();
        hi[row] = static_cast<float>(std::clamp(t / double(a), -MAX, MAX));
        lo[row] = static_cast<float>(t - double(hi[row]) * double(a));
        exact[row] = std::abs(t) > LSE2_RECOMPUTE_ABOVE_FP64_LSE || own_stats;
      } else {
        hi[row] = static_cast<acc_t>(t);
        lo[row] = static_cast<acc_t>(t - static_cast<double>(hi[row]));
        exact[row] = std::abs(t) > LSE2_RECOMPUTE_ABOVE;
      }
    }
  });
  if (std::find(exact, exact + n_rows, uint8_t(1)) != exact + n_rows)
    recompute_row_stats<scalar_t>(p, use_micro, BQ, BK, exact, alpha, g, a, mask_mult, hi, lo);

  // 2. dK, dV per key block; dQ per chunk.
  at::Tensor dq_acc_t = at::zeros({n_chunks, d.batch * d.heads_q * d.len_q * d.head_dim},
                                  at::TensorOptions().dtype(acc_dtype));
  acc_t* dq_acc = dq_acc_t.data_ptr<acc_t>();
  auto* dk = static_cast<scalar_t*>(p.dk);
  auto* dv = static_cast<scalar_t*>(p.dv);
  auto* dmask = static_cast<acc_t*>(p.dmask);
  const int64_t n_tasks = d.batch * d.heads_kv * n_chunks;
  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, worker_count(n_tasks), 1, [&](int64_t, int64_t) {
    const int64_t tile = BQ * BK;
    const int64_t n_t = use_micro ? BK * (d.head_dim + d.head_dim_v) : 0;  // K^T and V^T of the key block
    at::Tensor scratch = at::empty({(has_softcap ? 3 : 2) * tile + BK * d.head_dim + BK * d.head_dim_v + n_t},
                                   at::TensorOptions().dtype(acc_dtype));
    at::Tensor scratch16 = at::empty({LOW_PRECISION ? tile : 0}, at::TensorOptions().dtype(in_dtype));
    std::vector<KeyInterval> iv_buf(BQ);
    acc_t* s = scratch.data_ptr<acc_t>();
    acc_t* dp = s + tile;
    acc_t* dk_acc = dp + tile;
    acc_t* dv_acc = dk_acc + BK * d.head_dim;
    acc_t* k_t = dv_acc + BK * d.head_dim_v;  // E x BK
    acc_t* v_t = k_t + BK * d.head_dim;      // Ev x BK
    // soft-capping's tanh, a tile, after everything above (k_t / v_t take n_t, 0 off the micro path)
    acc_t* th = has_softcap ? s + 2 * tile + BK * d.head_dim + BK * d.head_dim_v + n_t : nullptr;
    scalar_t* t16 = scratch16.data_ptr<scalar_t>();
    KeyInterval* iv = iv_buf.data();
    std::optional<DropoutTile> dropped;  // this thread's keep decisions of a tile
    if (has_dropout) dropped.emplace(BQ, BK);

    for (int64_t idx = next_task.fetch_add(1); idx < n_tasks; idx = next_task.fetch_add(1)) {
      const int64_t chunk = idx % n_chunks, bhk = idx / n_chunks;
      const int64_t b = bhk / d.heads_kv, hk = bhk % d.heads_kv;
      const Visibility vis = p.visibility(b);
      const scalar_t* k_bh = k + b * p.k_stride.batch + hk * p.k_stride.head;
      const scalar_t* v_bh = v + b * p.v_stride.batch + hk * p.v_stride.head;
      acc_t* dq_chunk = dq_acc + chunk * d.batch * d.heads_q * d.len_q * d.head_dim;
      for (int64_t kb = chunk; kb < n_kblocks; kb += n_chunks) {
        const int64_t j0 = kb * BK, cols = std::min(BK, d.len_k - j0);
        const scalar_t* k_blk = k_bh + j0 * p.k_stride.row;
        const scalar_t* v_blk = v_bh + j0 * p.v_stride.row;
        std::fill(dk_acc, dk_acc + cols * d.head_dim, acc_t(0));
        std::fill(dv_acc, dv_acc + cols * d.head_dim_v, acc_t(0));
#ifdef FA_CPU_HAVE_AVX512_PATH
        if constexpr (FP32) {
          if (use_micro) {
            transpose_f32_avx512(cols, d.head_dim, k_blk, p.k_stride.row, k_t, BK);
            transpose_f32_avx512(cols, d.head_dim_v, v_blk, p.v_stride.row, v_t, BK);
          }
        }
#endif
        // Query rows before the first or after the last that sees a key of this block skip
        // it entirely; query blocks start at the first.
        const RowRange seeing = rows_seeing(vis, d.len_q, d.len_k, j0, j0 + cols);
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          const int64_t bh = b * d.heads_q + h;
          for (int64_t i0 = seeing.begin; i0 < seeing.end; i0 += BQ) {
            const int64_t rows = std::min(BQ, d.len_q - i0);
            // The block's keys [0, kc) up to the last one some row of the query block sees.
            const int64_t kc = block_cols(vis, d.len_k, i0, rows, j0, cols);
            const scalar_t* q_blk = q + b * p.q_stride.batch + h * p.q_stride.head + i0 * p.q_stride.row;
            const scalar_t* do_blk = dout + b * p.do_stride.batch + h * p.do_stride.head + i0 * p.do_stride.row;
            const acc_t* hi_blk = hi + bh * d.len_q + i0;
            const acc_t* lo_blk = lo + bh * d.len_q + i0;
            const acc_t* delta_blk = delta + bh * d.len_q + i0;
            const acc_t* dl_blk = dl + bh * d.len_q + i0;
            const double* delta64_blk = FP32 ? delta64 + bh * d.len_q + i0 : nullptr;
            // Rows' keys; a row whose lse is -inf saw none in the forward and sees none here.
            if (tile_intervals(vis, d.len_k, i0, rows, j0, kc, iv) == TileMask::NONE) continue;
            for (int64_t r = 0; r < rows; ++r)
              if (hi_blk[r] == -std::numeric_limits<acc_t>::infinity()) iv[r] = {0, 0};
            const bool masked = classify_tile(iv, rows, kc) != TileMask::FULL;
            // A mask tensor (as the forward): skip, leave as is, or rewrite the tile's scores.
            const TileMask by_mask = has_mask ? classify_mask_tile(p.mask, b, h, i0, rows, j0, kc, iv)
                                              : TileMask::FULL;
            if (by_mask == TileMask::NONE) continue;
            const bool apply_mask = by_mask == TileMask::PARTIAL;
            const bool rewrite = apply_mask || p.alibi != nullptr || has_softcap;  // scores changed before P
            const auto rewrite_scores = [&] {  // soft-capping (tanh kept in th), ALiBi, the mask
              if (has_softcap) apply_softcap_tile(s, BK, rows, kc, static_cast<acc_t>(p.softcap), mask_mult, th);
              if (apply_mask) apply_mask_tile(p.mask, b, h, i0, rows, j0, kc, iv, s, BK, mask_mult);
              if (p.alibi != nullptr) apply_alibi_tile(p, vis, b, h, i0, rows, j0, kc, iv, s, BK, mask_mult);
            };
            acc_t* dq_blk = dq_chunk + (bh * d.len_q + i0) * d.head_dim;
            // fp32: dS where P > DS_EXACT_ABOVE in double (as DScoresEpilogue), dP times keep (dropout).
            const auto exact_dscores = [&](const uint8_t* keep) {
              if constexpr (FP32) {
                for (int64_t r = 0; r < rows; ++r)
                  for (int64_t c = 0; c < kc; ++c)
                    if (s[r * BK + c] > DS_EXACT_ABOVE)
                      dp[r * BK + c] = exact_dscore(do_blk + r * p.do_stride.row, v_blk + c * p.v_stride.row,
                                                    d.head_dim_v, delta64_blk[r], s[r * BK + c], dl_blk[r],
                                                    keep == nullptr ? 1.0 : keep[r * dropped->ldk + c] ? p.dropout.keep_scale : 0.0);
              }
            };
            // Dropout (P in s, dP = dO V^T in dp): dP as the forward's dropped P saw it, dS from the
            // undropped P, then P dropped for dV.
            const auto dropout_dscores = [&] {
              const uint8_t* keep = dropped->draw(p.dropout, bh, i0, rows, j0, kc);
              drop_scale_tile(dp, BK, rows, kc, keep, dropped->ldk, keep_scale);
              dscores(dp, s, BK, rows, kc, delta_blk, dl_blk);
              exact_dscores(keep);
              drop_scale_tile(s, BK, rows, kc, keep, dropped->ldk, keep_scale);
            };
            // The float mask's gradient: dS, the gradient of the scores it is added to (before
            // soft-capping's factor: the mask comes after the cap).
            const auto save_dmask = [&] {
              if (dmask == nullptr) return;
              for (int64_t r = 0; r < rows; ++r)
                std::copy(dp + r * BK, dp + r * BK + kc, dmask + ((bh * d.len_q) + i0 + r) * d.len_k + j0);
            };
#ifdef FA_CPU_HAVE_AVX512_PATH
            if constexpr (FP32) {
              if (use_micro) {
                if (rewrite) {  // raw scores, the mask / ALiBi, then P (the AVX-512 clone of probs)
                  gemm_f32_avx512<false>(rows, kc, d.head_dim, 1.0f, q_blk, p.q_stride.row, k_t, BK, s, BK, false);
                  rewrite_scores();
                  probs(s, BK, rows, kc, iv, g, a, hi_blk, lo_blk);
                } else if (masked)
                  gemm_f32_panels<false>(rows, kc, d.head_dim, q_blk, p.q_stride.row, k_t, BK, [&](int64_t c0) {
                    return ProbsEpilogue<true>{s, BK, c0, g, a, iv, hi_blk, lo_blk};
                  });
                else
                  gemm_f32_panels<false>(rows, kc, d.head_dim, q_blk, p.q_stride.row, k_t, BK, [&](int64_t c0) {
                    return ProbsEpilogue<false>{s, BK, c0, g, a, nullptr, hi_blk, lo_blk};
                  });
                if (has_dropout) {
                  gemm_f32_avx512<false>(rows, kc, d.head_dim_v, 1.0f, do_blk, p.do_stride.row, v_t, BK, dp, BK, false);
                  dropout_dscores();
                } else {
                  gemm_f32_panels<false>(rows, kc, d.head_dim_v, do_blk, p.do_stride.row, v_t, BK, [&](int64_t c0) {
                    return DScoresEpilogue{dp, s, BK, c0, delta_blk, dl_blk, delta64_blk, do_blk, p.do_stride.row,
                                           v_blk, p.v_stride.row, d.head_dim_v};
                  });
                }
                save_dmask();
                if (has_softcap) softcap_grad_tile(dp, th, BK, rows, kc);
                gemm_f32_avx512<true>(kc, d.head_dim_v, rows, 1.0f, s, BK, do_blk, p.do_stride.row, dv_acc,
                                      d.head_dim_v, true);
                gemm_f32_avx512<true>(kc, d.head_dim, rows, scale, dp, BK, q_blk, p.q_stride.row, dk_acc, d.head_dim,
                                      true);
                gemm_f32_avx512<false>(rows, d.head_dim, kc, scale, dp, BK, k_blk, p.k_stride.row, dq_blk, d.head_dim,
                                       true);
                continue;
              }
            }
#endif
            gemm(false, true, rows, kc, d.head_dim, alpha, q_blk, p.q_stride.row, k_blk, p.k_stride.row, acc_t(0), s,
                 BK);
            if (rewrite) rewrite_scores();
            probs(s, BK, rows, kc, masked || rewrite ? iv : nullptr, g, a, hi_blk, lo_blk);
            gemm(false, true, rows, kc, d.head_dim_v, acc_t(1), do_blk, p.do_stride.row, v_blk, p.v_stride.row,
                 acc_t(0), dp, BK);
            if (has_dropout) {
              dropout_dscores();
            } else {
              dscores(dp, s, BK, rows, kc, delta_blk, dl_blk);
              exact_dscores(nullptr);
            }
            save_dmask();
            if (has_softcap) softcap_grad_tile(dp, th, BK, rows, kc);
            if constexpr (LOW_PRECISION) {
              convert_tile(s, BK, t16, BK, rows, kc);
              gemm(true, false, kc, d.head_dim_v, rows, acc_t(1), t16, BK, do_blk, p.do_stride.row, acc_t(1), dv_acc,
                   d.head_dim_v);
              convert_tile(dp, BK, t16, BK, rows, kc);
              gemm(true, false, kc, d.head_dim, rows, scale, t16, BK, q_blk, p.q_stride.row, acc_t(1), dk_acc,
                   d.head_dim);
              gemm(false, false, rows, d.head_dim, kc, scale, t16, BK, k_blk, p.k_stride.row, acc_t(1), dq_blk,
                   d.head_dim);
            } else {
              gemm(true, false, kc, d.head_dim_v, rows, acc_t(1), s, BK, do_blk, p.do_stride.row, acc_t(1), dv_acc,
                   d.head_dim_v);
              gemm(true, false, kc, d.head_dim, rows, scale, dp, BK, q_blk, p.q_stride.row, acc_t(1), dk_acc,
                   d.head_dim);
              gemm(false, false, rows, d.head_dim, kc, scale, dp, BK, k_blk, p.k_stride.row, acc_t(1), dq_blk,
                   d.head_dim);
            }
          }
        }
        scalar_t* dk_blk = dk + (bhk * d.len_k + j0) * d.head_dim;
        scalar_t* dv_blk = dv + (bhk * d.len_k + j0) * d.head_dim_v;
        for (int64_t x = 0; x < cols * d.head_dim; ++x) dk_blk[x] = static_cast<scalar_t>(dk_acc[x]);
        for (int64_t x = 0; x < cols * d.head_dim_v; ++x) dv_blk[x] = static_cast<scalar_t>(dv_acc[x]);
      }
    }
  });

  // 3. dQ = sum of the chunks' partial sums, in chunk order.
  auto* dq = static_cast<scalar_t*>(p.dq);
  const int64_t n_dq = d.batch * d.heads_q * d.len_q * d.head_dim;
  at::parallel_for(0, n_dq, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t x = begin; x < end; ++x) {
      acc_t sum = dq_acc[x];
      for (int64_t c = 1; c < n_chunks; ++c) sum += dq_acc[c * n_dq + x];
      dq[x] = static_cast<scalar_t>(sum);
    }
  });
}

}  // namespace fused_attn::cpu
