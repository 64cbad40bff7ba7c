// Fused attention backward on the CPU: recomputes P from the saved lse, never
// forming anything of size L x S.
//
// 1. delta = rowsum(dO * O) - dlse per query row (the lse gradient enters here:
//    d lse / d s = P, so dS = P * (dP - delta) covers both outputs' gradients).
//    Rows with |lse| past LSE2_RECOMPUTE_ABOVE (config.h) get their exp2 max and row sum
//    recomputed from the same score GEMMs as step 2 (recompute_row_stats), so that P
//    does not inherit the stored lse's rounding.
// 2. One task per (batch, kv head, chunk of key blocks), taken by threads from a shared
//    counter. For each key block of BWD_TILE.block_k keys it accumulates dK, dV in fp32 (fp64) over the query
//    blocks of every q head in the group (GQA sums in a fixed order, no atomics):
//      S  = (scale log2 e) Q K^T;  P = exp2(S - lse log2 e)   (causal mask, skipped blocks)
//      dV += P^T dO;  dP = dO V^T;  dS = P * (dP - delta)
//      dK += scale dS^T Q;  dQ_chunk += scale dS K
//    dQ accumulates in one fp32 (fp64) buffer per chunk of key blocks. Chunks exist
//    only to feed every thread when B * Hk is smaller than the thread count; key
//    blocks are dealt to chunks round-robin (balanced under causal masks).
// 3. dQ = sum over chunks, in order: deterministic for a given thread count.
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
#include <type_traits>

#include "config.h"
#include "gemm.h"
#include "gemm_avx512.h"
#include "params.h"
#include "tile_ops.h"

namespace fused_attn::cpu {

#ifdef FA_CPU_HAVE_AVX512_PATH
// fp32 on AVX-512, the elementwise steps in the GEMMs' epilogues (tiles row-major, ld;
// c0 = the panel's first column):
// P = exp2((sc s - lse2[r]) - lse2_lo[r]), 0 past nvalid[r], from the score tile Q K^T in
// registers; sc s rounded once and never contracted with the subtraction (the same
// product StoreEpilogue makes, which recompute_row_stats relies on).
struct ProbsEpilogue {
  float* p;
  int64_t ld, c0;
  float sc;
  const int64_t* nvalid;
  const float* lse2;
  const float* lse2_lo;
  template <int MR, int NV>
  FA_AVX512_TARGET FA_ALWAYS_INLINE void apply(int64_t m0, __m512 (&c)[MR][NV], __mmask16 tail) const {
    const __m512 vsc = _mm512_set1_ps(sc);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const int64_t row = m0 + r, nv = nvalid[row] - c0;
      const __m512 hi = _mm512_set1_ps(lse2[row]), lo = _mm512_set1_ps(lse2_lo[row]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const __m512 y = _mm512_mul_round_ps(c[r][v], vsc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512 x = _mm512_sub_ps(_mm512_sub_ps(y, hi), lo);
        const __m512 e = exp2_avx512(x, lane_mask(nv - 16 * v), EXP2_01_D6);
        _mm512_mask_storeu_ps(p + row * ld + c0 + 16 * v, v == NV - 1 ? tail : __mmask16(0xFFFF), e);
      }
    }
  }
};
// dS = P * (dP - delta[r]) from the tile dP = dO V^T in registers.
struct DScoresEpilogue {
  float* ds;
  const float* p;
  int64_t ld, c0;
  const float* delta;
  template <int MR, int NV>
  FA_AVX512_TARGET FA_ALWAYS_INLINE void apply(int64_t m0, __m512 (&c)[MR][NV], __mmask16 tail) const {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const int64_t at = (m0 + r) * ld + c0;
      const __m512 d = _mm512_set1_ps(delta[m0 + r]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const __mmask16 k = v == NV - 1 ? tail : __mmask16(0xFFFF);
        const __m512 pv = _mm512_maskz_loadu_ps(k, p + at + 16 * v);
        _mm512_mask_storeu_ps(ds + at + 16 * v, k, _mm512_mul_ps(pv, _mm512_sub_ps(c[r][v], d)));
      }
    }
  }
};
#endif

// Step 1b of attention_backward: for the rows marked in `exact` (B * Hq * L), lse2 = the
// row's max of y = sc Q K^T (the scaled scores exactly as step 2's GEMMs make them, on the
// same blocks) and lse2_lo = log2 of the row's sum of exp2(y - max). Step 2's
// P = exp2((y - lse2) - lse2_lo) is then 1 / l at the max however large the scores.
template <typename scalar_t, typename acc_t>
void recompute_row_stats(const AttnParams& p, bool use_micro, int64_t BQ, int64_t BK, const uint8_t* exact,
                         acc_t* lse2, acc_t* lse2_lo) {
  constexpr acc_t NEG_INF = -std::numeric_limits<acc_t>::infinity();
  const int64_t n_kblocks = (p.S + BK - 1) / BK, group = p.Hq / p.Hk;
  const acc_t score_scale = static_cast<acc_t>(p.scale * LOG2E);
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  at::parallel_for(0, p.B * p.Hq, 1, [&](int64_t begin, int64_t end) {
    at::Tensor scratch = at::empty({BQ * BK + (use_micro ? BK * p.E : 0)}, at::TensorOptions().dtype(acc_dtype));
    at::Tensor stats = at::empty({2 * p.L}, at::TensorOptions().dtype(at::kDouble));
    acc_t* s = scratch.data_ptr<acc_t>();
    acc_t* k_t = s + BQ * BK;
    double* m_row = stats.data_ptr<double>();
    double* l_row = m_row + p.L;
    for (int64_t bh = begin; bh < end; ++bh) {
      const uint8_t* ex = exact + bh * p.L;
      if (std::find(ex, ex + p.L, uint8_t(1)) == ex + p.L) continue;
      const int64_t b = bh / p.Hq, h = bh % p.Hq, hk = h / group;
      std::fill(m_row, m_row + p.L, double(NEG_INF));
      std::fill(l_row, l_row + p.L, 0.0);
      for (int64_t kb = 0; kb < n_kblocks; ++kb) {
        const int64_t j0 = kb * BK, cols = std::min(BK, p.S - j0);
        const scalar_t* k_blk = k + b * p.k_sb + hk * p.k_sh + j0 * p.k_sl;
        bool transposed = false;
        // The query blocks of step 2 for this key block, the same GEMM calls.
        for (int64_t i0 = p.causal ? std::max<int64_t>(0, j0 - p.offset) : 0; i0 < p.L; i0 += BQ) {
          const int64_t rows = std::min(BQ, p.L - i0);
          if (std::find(ex + i0, ex + i0 + rows, uint8_t(1)) == ex + i0 + rows) continue;
          const int64_t kc = p.causal ? std::min(cols, i0 + rows + p.offset - j0) : cols;
          const scalar_t* q_blk = q + b * p.q_sb + h * p.q_sh + i0 * p.q_sl;
#ifdef FA_CPU_HAVE_AVX512_PATH
          if constexpr (std::is_same_v<scalar_t, float>) {
            if (use_micro) {
              if (!transposed) transpose_f32_avx512(cols, p.E, k_blk, p.k_sl, k_t, BK);
              transposed = true;
              gemm_f32_avx512<false>(rows, kc, p.E, score_scale, q_blk, p.q_sl, k_t, BK, s, BK, false);
            }
          }
#endif
          if (!use_micro) gemm(false, true, rows, kc, p.E, score_scale, q_blk, p.q_sl, k_blk, p.k_sl, acc_t(0), s, BK);
          for (int64_t r = 0; r < rows; ++r) {
            if (!ex[i0 + r]) continue;
            const acc_t* y = s + r * BK;
            const int64_t nv = visible_keys(p, i0 + r, j0, kc);
            acc_t mx = NEG_INF;
            for (int64_t c = 0; c < nv; ++c) mx = y[c] > mx ? y[c] : mx;
            const double m_old = m_row[i0 + r], m_new = std::max<double>(m_old, mx);
            if (m_new == double(NEG_INF)) continue;
            double sum = 0;
            for (int64_t c = 0; c < nv; ++c) sum += std::exp2(double(y[c]) - m_new);
            l_row[i0 + r] = (m_old == m_new ? l_row[i0 + r] : l_row[i0 + r] * std::exp2(m_old - m_new)) + sum;
            m_row[i0 + r] = m_new;
          }
        }
      }
      for (int64_t i = 0; i < p.L; ++i) {
        if (!ex[i]) continue;
        lse2[bh * p.L + i] = static_cast<acc_t>(m_row[i]);
        lse2_lo[bh * p.L + i] = static_cast<acc_t>(std::log2(l_row[i]));
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void attention_backward(AttnParams p) {
  constexpr bool LOW_PRECISION = !std::is_same_v<scalar_t, acc_t>;
  constexpr bool FP32 = std::is_same_v<scalar_t, float>;
  // fp32 on AVX-512: our micro-kernel (gemm_avx512.h) on K^T / V^T transposed once per key
  // block; elsewhere BLAS (MKL) on the operands in place.
  const bool use_micro = FP32 && avx512_enabled();
  const TileConfig tile_cfg = BWD_TILE;
  const int64_t BQ = std::min<int64_t>(tile_cfg.block_q, p.L);
  const int64_t BK = std::min<int64_t>(tile_cfg.block_k, p.S);
  const int64_t n_kblocks = (p.S + BK - 1) / BK;
  const int64_t group = p.Hq / p.Hk;
  const int64_t threads = at::get_num_threads();
  const int64_t n_chunks = std::min(n_kblocks, std::max<int64_t>(1, (threads + p.B * p.Hk - 1) / (p.B * p.Hk)));
  const acc_t score_scale = static_cast<acc_t>(p.scale * LOG2E);
  const acc_t scale = static_cast<acc_t>(p.scale);
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const auto in_dtype = c10::CppTypeToScalarType<scalar_t>::value;
  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  const auto* v = static_cast<const scalar_t*>(p.v);
  const auto* out = static_cast<const scalar_t*>(p.out);
  const auto* dout = static_cast<const scalar_t*>(p.dout);
  const auto* lse = static_cast<const acc_t*>(p.lse);
  const auto* dlse = static_cast<const acc_t*>(p.dlse);

  // 1. delta, and lse in the exp2 domain as hi + lo (lse * log2 e in double, split, so the
  //    change of base adds no rounding to the exponent of P).
  at::Tensor rowstats = at::empty({3, p.B * p.Hq * p.L}, at::TensorOptions().dtype(acc_dtype));
  acc_t* delta = rowstats.data_ptr<acc_t>();
  acc_t* lse2 = delta + p.B * p.Hq * p.L;
  acc_t* lse2_lo = lse2 + p.B * p.Hq * p.L;
  at::Tensor exact_t = at::empty({p.B * p.Hq * p.L}, at::TensorOptions().dtype(at::kByte));
  uint8_t* exact = exact_t.data_ptr<uint8_t>();
  at::parallel_for(0, p.B * p.Hq * p.L, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / p.L, i = row % p.L, b = bh / p.Hq, h = bh % p.Hq;
      const scalar_t* o = out + row * p.Ev;
      const scalar_t* d = dout + b * p.do_sb + h * p.do_sh + i * p.do_sl;
      acc_t sum = 0;
      for (int64_t c = 0; c < p.Ev; ++c) sum += static_cast<acc_t>(o[c]) * static_cast<acc_t>(d[c]);
      delta[row] = sum - (dlse ? dlse[row] : acc_t(0));
      const double t = static_cast<double>(lse[row]) * LOG2E;
      lse2[row] = static_cast<acc_t>(t);
      lse2_lo[row] = std::isinf(t) ? acc_t(0) : static_cast<acc_t>(t - static_cast<double>(lse2[row]));
      exact[row] = std::isfinite(t) && std::abs(t) > LSE2_RECOMPUTE_ABOVE;
    }
  });
  if (std::find(exact, exact + p.B * p.Hq * p.L, uint8_t(1)) != exact + p.B * p.Hq * p.L)
    recompute_row_stats<scalar_t>(p, use_micro, BQ, BK, exact, lse2, lse2_lo);

  // 2. dK, dV per key block; dQ per chunk.
  at::Tensor dq_acc_t = at::zeros({n_chunks, p.B * p.Hq * p.L * p.E}, at::TensorOptions().dtype(acc_dtype));
  acc_t* dq_acc = dq_acc_t.data_ptr<acc_t>();
  auto* dk = static_cast<scalar_t*>(p.dk);
  auto* dv = static_cast<scalar_t*>(p.dv);
  const int64_t n_tasks = p.B * p.Hk * n_chunks;
  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, worker_count(n_tasks), 1, [&](int64_t, int64_t) {
    const int64_t tile = BQ * BK;
    const int64_t n_t = use_micro ? BK * (p.E + p.Ev) : 0;  // K^T and V^T of the key block
    at::Tensor scratch = at::empty({2 * tile + BK * p.E + BK * p.Ev + n_t}, at::TensorOptions().dtype(acc_dtype));
    at::Tensor scratch16 = at::empty({LOW_PRECISION ? tile : 0}, at::TensorOptions().dtype(in_dtype));
    at::Tensor nvalid_t = at::empty({BQ}, at::TensorOptions().dtype(at::kLong));
    acc_t* s = scratch.data_ptr<acc_t>();
    acc_t* dp = s + tile;
    acc_t* dk_acc = dp + tile;
    acc_t* dv_acc = dk_acc + BK * p.E;
    acc_t* k_t = dv_acc + BK * p.Ev;  // E x BK
    acc_t* v_t = k_t + BK * p.E;      // Ev x BK
    scalar_t* t16 = scratch16.data_ptr<scalar_t>();
    int64_t* nvalid = nvalid_t.data_ptr<int64_t>();

    for (int64_t idx = next_task.fetch_add(1); idx < n_tasks; idx = next_task.fetch_add(1)) {
      const int64_t chunk = idx % n_chunks, bhk = idx / n_chunks;
      const int64_t b = bhk / p.Hk, hk = bhk % p.Hk;
      const scalar_t* k_bh = k + b * p.k_sb + hk * p.k_sh;
      const scalar_t* v_bh = v + b * p.v_sb + hk * p.v_sh;
      acc_t* dq_chunk = dq_acc + chunk * p.B * p.Hq * p.L * p.E;
      for (int64_t kb = chunk; kb < n_kblocks; kb += n_chunks) {
        const int64_t j0 = kb * BK, cols = std::min(BK, p.S - j0);
        const scalar_t* k_blk = k_bh + j0 * p.k_sl;
        const scalar_t* v_blk = v_bh + j0 * p.v_sl;
        std::fill(dk_acc, dk_acc + cols * p.E, acc_t(0));
        std::fill(dv_acc, dv_acc + cols * p.Ev, acc_t(0));
#ifdef FA_CPU_HAVE_AVX512_PATH
        if constexpr (FP32) {
          if (use_micro) {
            transpose_f32_avx512(cols, p.E, k_blk, p.k_sl, k_t, BK);
            transpose_f32_avx512(cols, p.Ev, v_blk, p.v_sl, v_t, BK);
          }
        }
#endif
        // Query rows before the first one that sees key j0 skip this block entirely.
        const int64_t first_row = p.causal ? std::max<int64_t>(0, j0 - p.offset) : 0;
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          const int64_t bh = b * p.Hq + h;
          for (int64_t i0 = first_row; i0 < p.L; i0 += BQ) {
            const int64_t rows = std::min(BQ, p.L - i0);
            // Keys of this block that some row of the query block sees (causal diagonal).
            const int64_t kc = p.causal ? std::min(cols, i0 + rows + p.offset - j0) : cols;
            const scalar_t* q_blk = q + b * p.q_sb + h * p.q_sh + i0 * p.q_sl;
            const scalar_t* do_blk = dout + b * p.do_sb + h * p.do_sh + i0 * p.do_sl;
            const acc_t* lse2_blk = lse2 + bh * p.L + i0;
            const acc_t* lse2_lo_blk = lse2_lo + bh * p.L + i0;
            const acc_t* delta_blk = delta + bh * p.L + i0;
            for (int64_t r = 0; r < rows; ++r)
              nvalid[r] = lse2_blk[r] == -std::numeric_limits<acc_t>::infinity() ? 0 : visible_keys(p, i0 + r, j0, kc);
            acc_t* dq_blk = dq_chunk + (bh * p.L + i0) * p.E;
#ifdef FA_CPU_HAVE_AVX512_PATH
            if constexpr (FP32) {
              if (use_micro) {
                gemm_f32_panels<false>(rows, kc, p.E, q_blk, p.q_sl, k_t, BK, [&](int64_t c0) {
                  return ProbsEpilogue{s, BK, c0, score_scale, nvalid, lse2_blk, lse2_lo_blk};
                });
                gemm_f32_panels<false>(rows, kc, p.Ev, do_blk, p.do_sl, v_t, BK, [&](int64_t c0) {
                  return DScoresEpilogue{dp, s, BK, c0, delta_blk};
                });
                gemm_f32_avx512<true>(kc, p.Ev, rows, 1.0f, s, BK, do_blk, p.do_sl, dv_acc, p.Ev, true);
                gemm_f32_avx512<true>(kc, p.E, rows, scale, dp, BK, q_blk, p.q_sl, dk_acc, p.E, true);
                gemm_f32_avx512<false>(rows, p.E, kc, scale, dp, BK, k_blk, p.k_sl, dq_blk, p.E, true);
                continue;
              }
            }
#endif
            gemm(false, true, rows, kc, p.E, score_scale, q_blk, p.q_sl, k_blk, p.k_sl, acc_t(0), s, BK);
            probs(s, BK, rows, kc, nvalid, lse2_blk, lse2_lo_blk);
            gemm(false, true, rows, kc, p.Ev, acc_t(1), do_blk, p.do_sl, v_blk, p.v_sl, acc_t(0), dp, BK);
            dscores(dp, s, BK, rows, kc, delta_blk);
            if constexpr (LOW_PRECISION) {
              convert_tile(s, BK, t16, BK, rows, kc);
              gemm(true, false, kc, p.Ev, rows, acc_t(1), t16, BK, do_blk, p.do_sl, acc_t(1), dv_acc, p.Ev);
              convert_tile(dp, BK, t16, BK, rows, kc);
              gemm(true, false, kc, p.E, rows, scale, t16, BK, q_blk, p.q_sl, acc_t(1), dk_acc, p.E);
              gemm(false, false, rows, p.E, kc, scale, t16, BK, k_blk, p.k_sl, acc_t(1), dq_blk, p.E);
            } else {
              gemm(true, false, kc, p.Ev, rows, acc_t(1), s, BK, do_blk, p.do_sl, acc_t(1), dv_acc, p.Ev);
              gemm(true, false, kc, p.E, rows, scale, dp, BK, q_blk, p.q_sl, acc_t(1), dk_acc, p.E);
              gemm(false, false, rows, p.E, kc, scale, dp, BK, k_blk, p.k_sl, acc_t(1), dq_blk, p.E);
            }
          }
        }
        scalar_t* dk_blk = dk + (bhk * p.S + j0) * p.E;
        scalar_t* dv_blk = dv + (bhk * p.S + j0) * p.Ev;
        for (int64_t x = 0; x < cols * p.E; ++x) dk_blk[x] = static_cast<scalar_t>(dk_acc[x]);
        for (int64_t x = 0; x < cols * p.Ev; ++x) dv_blk[x] = static_cast<scalar_t>(dv_acc[x]);
      }
    }
  });

  // 3. dQ = sum of the chunks' partial sums, in chunk order.
  auto* dq = static_cast<scalar_t*>(p.dq);
  const int64_t n_dq = p.B * p.Hq * p.L * p.E;
  at::parallel_for(0, n_dq, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t x = begin; x < end; ++x) {
      acc_t sum = dq_acc[x];
      for (int64_t c = 1; c < n_chunks; ++c) sum += dq_acc[c * n_dq + x];
      dq[x] = static_cast<scalar_t>(sum);
    }
  });
}

}  // namespace fused_attn::cpu
