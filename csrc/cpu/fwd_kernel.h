// Fused attention forward on the CPU (FlashAttention-2's algorithm on tiles).
//
// One task per (batch, q head, block of block_q query rows); threads take tasks from a
// shared counter (worker_count in params.h), each head's query blocks last to first so
// the heaviest causal blocks go first. Decoding with GQA (one query row per head) stacks a
// kv head's query heads as the rows of one task instead, so K and V are read once per kv
// head (stack_heads). A task walks the keys block_k at a time:
//   S = Q K^T                                  (tile GEMM)
//   online softmax: T = sign(scale) S, m = max(T), P = exp2((T - m) |scale| log2 e)
//   acc = acc * exp2((m_old - m) |scale| log2 e) + P V          (tile GEMM)
// and writes out = acc / l, lse = (m |scale| log2 e + log2 l) ln 2 (in fp64 for fp32 and
// fp64 inputs: bwd_kernel.h rebuilds P from it). Scores are scaled
// after the max is subtracted (tile_ops.h), so any finite scale, 1e-30 to 1e30 and
// negative, gives exact row maxima. Each query row sees an interval of keys
// (Visibility::keys: causal, a sliding window, the batch entry's key bounds, or all of them,
// common/attn_params.h); a task visits the key blocks of its rows'
// [min begin, max end) only, the last one cut at the end, skips blocks none of its rows
// sees, and masks (per row interval) only blocks that some row sees in part;
// nothing of size L x S is allocated. A row that sees no key gets out = 0, lse = -inf;
// a row with a NaN score gets NaN out and lse, one with a +inf score NaN out, lse = +inf.
// GEMMs, on K^T (and V) of the task's kv head packed by each thread (PackedKV, O(S) memory):
//   fp32 on AVX-512: our register-blocked micro-kernel (gemm_avx512.h), the online
//     softmax in the score GEMM's epilogue (SoftmaxEpilogue), V read in place, the
//     rescale of acc folded into the PV product;
//   bf16 / fp16 where oneDNN's AMX / AVX-512 micro-kernels exist: at::native::cpublas::
//     brgemm, with P rounded to 16 bits as tensor-core kernels do, the softmax one
//     AVX-512 pass over the score tile (online_softmax_avx512, tile_ops.h);
//   otherwise (fp64, CPUs without them, fewer than FWD_PACK_MIN_ROWS query rows per kv head:
//     decoding) BLAS (MKL) on K and V in place, the softmax in compiler-vectorised clones.
// On the AVX-512 paths m is a lazily moved reference (within LAZY_MAX_SLACK below the
// running max), not the max itself: most rows keep it from block to block (corr = 1).
// Dtypes: fp32, bf16, fp16 accumulate in fp32; fp64 in fp64. Head dims up to 256, E (q/k)
// and Ev (v) independent.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

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
// A 16-bit (rows x n) block (ld_src) as a VNNI brgemm B operand: (rows_pad / 2) x PANEL
// 32-bit words, word (j / 2, c) = (src[j][c], src[j + 1][c]); rows past `rows` (up to
// rows_pad) and columns past n are zero.
template <typename T>
FA_AVX512_TARGET void interleave_rows_avx512(int64_t rows, int64_t rows_pad, int64_t n, const T* src, int64_t ld_src,
                                             T* dst) {
  constexpr int64_t PANEL = 64;
  auto* out = reinterpret_cast<uint32_t*>(dst);
  const auto* in = reinterpret_cast<const uint16_t*>(src);
  for (int64_t j = 0; j < rows_pad; j += 2) {
    uint32_t* o = out + (j / 2) * PANEL;
    for (int64_t c = 0; c < PANEL; c += 16) {
      const __mmask16 m = lane_mask(n - c);
      const __m256i a = j < rows ? _mm256_maskz_loadu_epi16(m, in + j * ld_src + c) : _mm256_setzero_si256();
      const __m256i b = j + 1 < rows ? _mm256_maskz_loadu_epi16(m, in + (j + 1) * ld_src + c) : _mm256_setzero_si256();
      const __m512i word = _mm512_or_si512(_mm512_cvtepu16_epi32(a), _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
      _mm512_storeu_si512(o + c, word);
    }
  }
}
#endif

#ifdef FA_CPU_HAVE_AVX512_PATH
// Multiply a row's first n P values and its 16 partial sums by f (the rare raise of a
// lazily kept softmax reference, SoftmaxEpilogue).
FA_AVX512_TARGET __attribute__((noinline)) inline void rescale_row(float* row, int64_t n, float* sum16, float f) {
  const __m512 vf = _mm512_set1_ps(f);
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 k = lane_mask(n - c);
    _mm512_mask_storeu_ps(row + c, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, row + c), vf));
  }
  _mm512_storeu_ps(sum16, _mm512_mul_ps(_mm512_loadu_ps(sum16), vf));
}

// The fp32 forward's online softmax, fused into the score GEMM's epilogue, so scores go
// from registers to P once instead of a GEMM store and two passes over an L2-sized tile.
// For each register tile of one key block: x = (sgn s - m[r]) asc (softmax_exponent,
// tile_ops.h), P = exp2(x) (0 where not visible) stored at column c0 of the P tile, and
// P summed into the row's 16 lanes of sum16. m[r] is a lazy reference, not the running
// max: it moves only when a score exceeds it by more than LAZY_MAX_SLACK, then to that
// tile's row max, and the row's P and sums so far are rescaled (rescale_row). With m[r]
// within LAZY_MAX_SLACK below the true max, P and the row sums stay far inside fp32's
// range and lose nothing (fp32 rounding is relative; the result is out = acc / l,
// lse = m asc + log2 l either way). A row with no visible key yet has m = -inf and moves
// at its first visible tile (to -inf again if those scores are all -inf or NaN: P is
// then taken against 0, so -inf gives 0 and NaN stays NaN).
// MASKED: row r sees the columns iv[r] of the tile (tile_ops.h); otherwise every column
// (a tile every row sees wholly: no masks but the panel's tail).
template <bool MASKED>
struct SoftmaxEpilogue {
  float* p;  // P tile (row-major, ld), column 0 = the block's first key
  int64_t ld;
  int64_t c0;  // the panel's first column
  const KeyInterval* iv;  // MASKED only
  float sgn, asc;  // t = sgn s, P = exp2((t - m) asc)
  float* m;
  float* sum16;  // rows x 16
  template <int MR, int NV>
  FA_AVX512_TARGET FA_ALWAYS_INLINE void apply(int64_t m0, __m512 (&c)[MR][NV], __mmask16 tail) const {
    constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
    const __m512 vsgn = _mm512_set1_ps(sgn), vasc = _mm512_set1_ps(asc);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const int64_t row = m0 + r;
      float* p_row = p + row * ld;
      __mmask16 kv[NV];
      __m512 x[NV];
      const float m_old = m[row];
      __m512 vm = _mm512_set1_ps(m_old);
      __m512 x_max = _mm512_set1_ps(NEG_INF);
      bool any = true;  // the row sees a key of this panel
      if constexpr (MASKED) {
        const int64_t cb = iv[row].begin - c0, ce = iv[row].end - c0;
        __mmask16 seen = 0;
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) seen |= kv[v] = lane_range(cb - 16 * v, ce - 16 * v);
        any = seen != 0;
      } else {
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) kv[v] = v == NV - 1 ? tail : __mmask16(0xFFFF);
      }
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        x[v] = softmax_exponent(c[r][v], vsgn, vm, vasc);
        x_max = _mm512_mask_max_ps(x_max, kv[v], x_max, x[v]);
      }
      if (__builtin_expect((m_old == NEG_INF && any) ||
                               _mm512_cmp_ps_mask(x_max, _mm512_set1_ps(LAZY_MAX_SLACK), _CMP_GT_OQ) != 0, 0)) {
        __m512 y_max = _mm512_set1_ps(NEG_INF);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) y_max = _mm512_mask_max_ps(y_max, kv[v], y_max, _mm512_mul_ps(c[r][v], vsgn));
        const float m_new = _mm512_reduce_max_ps(y_max);
        rescale_row(p_row, c0, sum16 + row * 16, m_old == NEG_INF ? 0.0f : std::exp2((m_old - m_new) * asc));
        m[row] = m_new;
        vm = _mm512_set1_ps(m_new == NEG_INF ? 0.0f : m_new);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) x[v] = softmax_exponent(c[r][v], vsgn, vm, vasc);
      }
      __m512 sum = _mm512_loadu_ps(sum16 + row * 16);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const __m512 e = exp2_avx512(x[v], kv[v], EXP2_01_D6);
        sum = _mm512_add_ps(sum, e);
        _mm512_mask_storeu_ps(p_row + c0 + 16 * v, v == NV - 1 ? tail : __mmask16(0xFFFF), e);
      }
      _mm512_storeu_ps(sum16 + row * 16, sum);
    }
  }
};

// After a key block of SoftmaxEpilogue: corr = exp2((m before - m after) asc) (1 if
// unchanged, including -inf; 0 from -inf), l = l * corr + the row's sum16. corr holds m
// before on entry.
FA_AVX512_TARGET inline void fold_softmax_block(int64_t rows, const float* m, float* l, float* corr,
                                                const float* sum16, float asc) {
  constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    corr[r] = corr[r] == m[r] ? 1.0f : (corr[r] == NEG_INF ? 0.0f : std::exp2((corr[r] - m[r]) * asc));
    l[r] = l[r] * corr[r] + _mm512_reduce_add_ps(_mm512_loadu_ps(sum16 + r * 16));
  }
}
#endif

// K^T and V of one kv head's key blocks laid out as GEMM B operands. Each worker thread
// holds one and packs the kv head of its task when that changes, key blocks as far as the
// task needs (tasks run head by head, so a thread packs a head once however many of its
// query blocks it takes): the extra memory is one head per thread, O(S), and the packed
// head stays in the thread's L2.
// A key block holds K^T as BK / PANEL column panels of (Ep x PANEL). 16-bit inputs
// (oneDNN brgemm): panels in VNNI pairs (Ep = E rounded up to even), zero-padded, and V
// packed the same way as ceil(Ev / PANEL) panels of (BK x PANEL). fp32 (our
// micro-kernel): K^T panels as plain row-major transposes, and V read in place.
template <typename scalar_t>
struct PackedKV {
  static constexpr bool VNNI = !std::is_same_v<scalar_t, float>;
  static constexpr int64_t PANEL = 64;
  static int64_t padded_E(int64_t E) { return VNNI ? (E + 1) / 2 * 2 : E; }
  AttnFwdParams p;
  int64_t Ep, BK, Evp, n_kblocks, k_elems, v_elems, head = -1, n_packed = 0;
  bool vnni_words;  // 16-bit: K's rows read as 32-bit words (even E and strides, aligned)
  at::Tensor buf, tmp;  // tmp: the unaligned 16-bit path's K^T / V block before packing

  PackedKV(const AttnFwdParams& params, int64_t block_k) : p(params) {
    const Dims& d = p.dims;
    const auto dt = c10::CppTypeToScalarType<scalar_t>::value;
    Ep = padded_E(d.head_dim);
    BK = block_k;  // a multiple of PANEL
    Evp = (d.head_dim_v + PANEL - 1) / PANEL * PANEL;
    n_kblocks = (d.len_k + BK - 1) / BK;
    k_elems = Ep * BK;
    v_elems = VNNI ? BK * Evp : 0;
    buf = at::empty({n_kblocks * (k_elems + v_elems)}, at::TensorOptions().dtype(dt));
    vnni_words = d.head_dim % 2 == 0 && p.k_stride.row % 2 == 0 && p.k_stride.head % 2 == 0 &&
                 p.k_stride.batch % 2 == 0 &&
                 reinterpret_cast<uintptr_t>(p.k) % 4 == 0;
  }

  // Make bhk (b * Hk + kv head) the packed head, with its keys [0, key_end) packed (a
  // causal task needs only those; the head's later tasks extend them).
  void pack(int64_t bhk, int64_t key_end) {
    const Dims& d = p.dims;
    if (bhk != head) {
      head = bhk;
      n_packed = 0;
    }
    const int64_t b = bhk / d.heads_kv, hk = bhk % d.heads_kv;
    const auto* k = static_cast<const scalar_t*>(p.k) + b * p.k_stride.batch + hk * p.k_stride.head;
    const auto* v = static_cast<const scalar_t*>(p.v) + b * p.v_stride.batch + hk * p.v_stride.head;
    // (a KV cache's slots past its count are never read: the block's rest is packed as zeros, which the
    // 16-bit P V's pair of keys past an odd count then multiplies by P's zero column)
    const int64_t stored = p.stored_keys(b);
    for (; n_packed * BK < key_end; ++n_packed) {
      const int64_t j0 = n_packed * BK;
      pack_block(k + j0 * p.k_stride.row, v + j0 * p.v_stride.row, std::min(BK, stored - j0),
                 buf.data_ptr<scalar_t>() + n_packed * (k_elems + v_elems));
    }
  }

  // One key block of cols keys (K rows k_blk, V rows v_blk) into dst.
  void pack_block(const scalar_t* k_blk, const scalar_t* v_blk, int64_t cols, scalar_t* dst) {
    const Dims& d = p.dims;
    if constexpr (!VNNI) {
#ifdef FA_CPU_HAVE_AVX512_PATH
      for (int64_t c0 = 0; c0 < cols; c0 += PANEL)
        transpose_f32_avx512(std::min(PANEL, cols - c0), d.head_dim, k_blk + c0 * p.k_stride.row, p.k_stride.row,
                             dst + c0 * Ep, PANEL);
#endif
      return;
    }
#ifdef FA_CPU_HAVE_AVX512_PATH
    // VNNI pairs of K^T are 32-bit words of K's rows: a 32-bit transpose; V's pairs
    // interleave two rows.
    if (avx512_enabled() && vnni_words) {
      for (int64_t c0 = 0; c0 < BK; c0 += PANEL) {
        float* panel = reinterpret_cast<float*>(dst + c0 * Ep);  // Ep / 2 x PANEL words
        const int64_t n = std::max<int64_t>(0, std::min(PANEL, cols - c0));
        if (n < PANEL) std::fill(reinterpret_cast<scalar_t*>(panel), reinterpret_cast<scalar_t*>(panel) + Ep * PANEL,
                                 scalar_t(0));
        if (n > 0)
          transpose_f32_avx512(n, Ep / 2, reinterpret_cast<const float*>(k_blk + c0 * p.k_stride.row),
                               p.k_stride.row / 2, panel, PANEL);
      }
      for (int64_t c0 = 0; c0 < Evp; c0 += PANEL)
        interleave_rows_avx512(cols, BK, std::min(PANEL, d.head_dim_v - c0), v_blk + c0, p.v_stride.row,
                               dst + k_elems + c0 * BK);
      return;
    }
#endif
    if (!tmp.defined()) tmp = at::empty({k_elems + v_elems}, buf.options());
    scalar_t* kt = tmp.data_ptr<scalar_t>();  // K^T block, Ep x BK row-major
    scalar_t* vt = kt + k_elems;              // V block, BK x Evp row-major
    std::fill(kt, kt + k_elems + v_elems, scalar_t(0));
    for (int64_t j = 0; j < cols; ++j)
      for (int64_t e = 0; e < d.head_dim; ++e) kt[e * BK + j] = k_blk[j * p.k_stride.row + e];
    for (int64_t j = 0; j < cols; ++j) std::copy(v_blk + j * p.v_stride.row, v_blk + j * p.v_stride.row + d.head_dim_v,
                                                 vt + j * Evp);
    for (int64_t c0 = 0; c0 < BK; c0 += PANEL) pack_panel(Ep, BK, kt + c0, dst + c0 * Ep);
    for (int64_t c0 = 0; c0 < Evp; c0 += PANEL) pack_panel(BK, Evp, vt + c0, dst + k_elems + c0 * BK);
  }
  // One (rows x PANEL) column panel of a row-major matrix with leading dim ld.
  static void pack_panel(int64_t rows, int64_t ld, const scalar_t* src, scalar_t* dst) {
    const auto dt = c10::CppTypeToScalarType<scalar_t>::value;
    at::native::cpublas::pack(rows, PANEL, ld, PANEL, dt, dt, src, dst);
  }
  // Panel c0 / PANEL of the packed head's key block kb: K^T / V.
  const scalar_t* k_panel(int64_t kb, int64_t c0) const {
    return buf.data_ptr<scalar_t>() + kb * (k_elems + v_elems) + c0 * Ep;
  }
  const scalar_t* v_panel(int64_t kb, int64_t c0) const {
    return buf.data_ptr<scalar_t>() + kb * (k_elems + v_elems) + k_elems + c0 * BK;
  }
  // fp32: the K^T panel of the keys from j (a multiple of PANEL) on. Blocks hold K^T alone there,
  // so the panels of consecutive blocks follow each other: a tile may start at any panel.
  const float* k_panel_at(int64_t j) const {
    static_assert(!VNNI, "16-bit blocks interleave K^T and V: address them by block");
    return buf.data_ptr<float>() + j * Ep;
  }
  // 16-bit: S (rows x cols, ld_s) = Q (rows x Ep, ld_q) K^T for the keys from j0 (a multiple of
  // PANEL) on, panel by panel (a panel lies inside one block).
  void scores(int64_t j0, const scalar_t* q, int64_t ld_q, int64_t rows, int64_t cols, float* s, int64_t ld_s) const {
    static_assert(VNNI, "fp32 scores go through scores_softmax");
    for (int64_t c0 = 0; c0 < cols; c0 += PANEL)
      at::native::cpublas::brgemm(rows, std::min(PANEL, cols - c0), Ep, ld_q, PANEL, ld_s, false, q,
                                  k_panel((j0 + c0) / BK, (j0 + c0) % BK), s + c0, VNNI);
  }
#ifdef FA_CPU_HAVE_AVX512_PATH
  // fp32: P (rows x cols, ld_p) of the keys from j0 (a multiple of PANEL) on with the online
  // softmax in the score GEMM's epilogue (SoftmaxEpilogue; m, sum16 per row as it describes; iv
  // nullptr: unmasked).
  void scores_softmax(int64_t j0, const float* q, int64_t ld_q, int64_t rows, int64_t cols, const KeyInterval* iv,
                      float sgn, float asc, float* p, int64_t ld_p, float* m, float* sum16) const {
    for (int64_t c0 = 0; c0 < cols; c0 += PANEL) {
      if (iv)
        micro_panel<false>(rows, std::min(PANEL, cols - c0), Ep, q, ld_q, k_panel_at(j0 + c0), PANEL,
                           SoftmaxEpilogue<true>{p, ld_p, c0, iv, sgn, asc, m, sum16});
      else
        micro_panel<false>(rows, std::min(PANEL, cols - c0), Ep, q, ld_q, k_panel_at(j0 + c0), PANEL,
                           SoftmaxEpilogue<false>{p, ld_p, c0, nullptr, sgn, asc, m, sum16});
    }
  }
  // fp32: the raw scores S (rows x cols, ld_s) = Q K^T of the keys from j0 on (a tile a mask tensor
  // changes in part: mask_ops.h rewrites it before the softmax).
  void scores_raw(int64_t j0, const float* q, int64_t ld_q, int64_t rows, int64_t cols, float* s, int64_t ld_s) const {
    for (int64_t c0 = 0; c0 < cols; c0 += PANEL)
      gemm_f32_avx512<false>(rows, std::min(PANEL, cols - c0), Ep, 1.0f, q, ld_q, k_panel_at(j0 + c0), PANEL, s + c0,
                             ld_s, false);
  }
#endif
  // acc (rows x Ev) += P (rows x kdim, ld_p) V for key block kb (16-bit: V is packed).
  // (16-bit) for the kdim keys from j0 (a multiple of PANEL) on: one brgemm per packed block they
  // touch (a block's V rows start at row r0, an even offset, r0 * PANEL elements into its panel).
  void accumulate(int64_t j0, const scalar_t* pm, int64_t ld_p, int64_t rows, int64_t kdim, int64_t Ev,
                  float* acc) const {
    static_assert(VNNI, "fp32 reads V in place");
    for (int64_t c = 0; c < kdim;) {
      const int64_t kb = (j0 + c) / BK, r0 = (j0 + c) % BK, n = std::min(kdim - c, BK - r0);
      for (int64_t e0 = 0; e0 < Ev; e0 += PANEL)
        at::native::cpublas::brgemm(rows, std::min(PANEL, Ev - e0), n, ld_p, PANEL, Ev, true, pm + c,
                                    v_panel(kb, e0) + r0 * PANEL, acc + e0, VNNI);
      c += n;
    }
  }
};

// Online softmax of one score tile, row r seeing the columns iv[r] (nullptr: all); for
// 16-bit inputs P lands in p16 (the PV GEMM's A).
template <typename scalar_t, typename acc_t>
void softmax_step(acc_t* s, int64_t ld, int64_t rows, int64_t cols, const KeyInterval* iv, acc_t sgn, acc_t asc,
                  acc_t* m, acc_t* l, acc_t* corr, scalar_t* p16, int64_t ld16) {
#ifdef FA_CPU_HAVE_AVX512_PATH
  // (fp32 on AVX-512 never comes here: its softmax is the score GEMM's SoftmaxEpilogue.)
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    if (cpu_has_avx512()) {
      auto* out16 = reinterpret_cast<uint16_t*>(p16);
      if constexpr (std::is_same_v<scalar_t, c10::Half>) {
        return online_softmax_avx512<2>(s, ld, rows, cols, iv, sgn, asc, m, l, corr, out16, ld16);
      } else if (cpu_has_avx512_bf16()) {
        return online_softmax_avx512<1>(s, ld, rows, cols, iv, sgn, asc, m, l, corr, out16, ld16);
      } else {
        return online_softmax_avx512<3>(s, ld, rows, cols, iv, sgn, asc, m, l, corr, out16, ld16);
      }
    }
  }
#endif
  online_softmax(s, ld, rows, cols, iv, sgn, asc, m, l, corr);
  if constexpr (!std::is_same_v<scalar_t, acc_t>) convert_tile(s, ld, p16, ld16, rows, cols);
}

// The math path multiplies P (0 where masked) by every row of V, so a NaN or inf in
// v[j, e] makes out[i, e] NaN for each row i that does not see key j (0 * NaN, 0 * inf).
// The tiles do that for the keys of the blocks they visit; this sets it for the rest (key
// blocks outside a query block's key range), so that out does not depend on the tiling.
// A vectorisable check of each kv head (v * 0 is NaN only for NaN / inf), and a scan of its
// columns only where it finds one: row i gets NaN at e where column e holds a non-finite
// value outside the row's keys [begin, end), before begin or from end on, or (a mask tensor)
// at a key inside them that the mask hides from the row.
// Whether some query row does not see some stored key of its batch entry (keys the pass below must
// consider): each row sees one interval whose ends do not decrease with the row, so every row sees all
// stored keys iff the first row's interval ends at the count and the last row's begins at 0. Decoding
// (one row, lower-right causal, a KV cache's count) hides none, and skips the pass's read of V.
inline bool hides_stored_keys(const AttnFwdParams& p) {
  const Dims& d = p.dims;
  if (p.vis.cu_q != nullptr) return true;  // (varlen: not examined)
  for (int64_t b = 0; b < d.batch; ++b) {
    const Visibility vis = p.visibility(b);
    const int64_t stored = p.stored_keys(b);
    const KeyInterval first = vis.keys<int64_t>(0, d.len_k), last = vis.keys<int64_t>(d.len_q - 1, d.len_k);
    if (first.begin > 0 || first.end < stored || last.begin > 0 || last.end < stored) return true;
  }
  return false;
}

template <typename scalar_t>
void poison_unseen_nonfinite_v(const AttnFwdParams& p) {
  const Dims& d = p.dims;
  const bool has_mask = p.mask.kind != kMaskNone;
  const int64_t group = d.heads_q / d.heads_kv;
  const auto* v = static_cast<const scalar_t*>(p.v);
  auto* out = static_cast<scalar_t*>(p.out);
  at::parallel_for(0, d.batch * d.heads_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> first_bad(d.head_dim_v), last_bad(d.head_dim_v);
    for (int64_t bhk = begin; bhk < end; ++bhk) {
      const int64_t b = bhk / d.heads_kv, hk = bhk % d.heads_kv;
      const scalar_t* v_bh = v + b * p.v_stride.batch + hk * p.v_stride.head;
      const int64_t stored = p.stored_keys(b);  // (a KV cache's slots past its count are never read)
      float probe = 0.0f;
      for (int64_t j = 0; j < stored; ++j) {
        const scalar_t* row = v_bh + j * p.v_stride.row;
#pragma omp simd reduction(+ : probe)
        for (int64_t e = 0; e < d.head_dim_v; ++e) probe += static_cast<float>(row[e]) * 0.0f;
      }
      if (probe == probe) continue;
      std::fill(first_bad.begin(), first_bad.end(), d.len_k);
      std::fill(last_bad.begin(), last_bad.end(), int64_t(-1));
      std::vector<std::vector<int64_t>> bad_keys(has_mask ? d.head_dim_v : 0);  // per column
      for (int64_t j = 0; j < stored; ++j)
        for (int64_t e = 0; e < d.head_dim_v; ++e)
          if (!std::isfinite(static_cast<double>(v_bh[j * p.v_stride.row + e]))) {
            first_bad[e] = std::min(first_bad[e], j);
            last_bad[e] = j;
            if (has_mask) bad_keys[e].push_back(j);
          }
      const Visibility vis = p.visibility(b);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        scalar_t* out_bh = out + (b * d.heads_q + h) * d.len_q * d.head_dim_v;
        for (int64_t i = 0; i < d.len_q; ++i) {
          const KeyInterval seen = vis.keys<int64_t>(i, d.len_k);
          for (int64_t e = 0; e < d.head_dim_v; ++e) {
            bool hidden = first_bad[e] < seen.begin || last_bad[e] >= seen.end;
            if (has_mask && !hidden)
              for (const int64_t j : bad_keys[e])
                if (j >= seen.begin && j < seen.end && !mask_admits(p.mask, b, h, i, j)) {
                  hidden = true;
                  break;
                }
            if (hidden) out_bh[i * d.head_dim_v + e] = std::numeric_limits<scalar_t>::quiet_NaN();
          }
        }
      }
    }
  });
}

// How many key chunks the last forward cut its tasks' keys into (split-KV; 1: none): for the tests.
inline std::atomic<int64_t>& last_forward_splits() {
  static std::atomic<int64_t> n{1};
  return n;
}

template <typename scalar_t, typename acc_t>
void attention_forward(AttnFwdParams p) {
  const Dims& d = p.dims;
  constexpr bool LOW_PRECISION = !std::is_same_v<scalar_t, acc_t>;
  constexpr bool FP32 = std::is_same_v<scalar_t, float>;
  // Packed K^T / V: for 16-bit inputs through oneDNN's brgemm (AMX), for fp32 through our
  // AVX-512 micro-kernel (gemm_avx512.h); elsewhere (fp64, no AVX-512 / oneDNN, few query
  // rows per kv head) BLAS on K and V in place.
  // Packing a kv head pays off only when enough query rows read it (FWD_PACK_MIN_ROWS; decoding does not).
  const bool pack_pays = fwd_packs_kv(d.len_q, d.heads_q, d.heads_kv, d.len_k);
  bool use_brgemm = false;
  if constexpr (LOW_PRECISION) use_brgemm = pack_pays && brgemm_available<scalar_t>() && !portable_only();
  const bool use_micro = pack_pays && FP32 && avx512_enabled();
  const bool use_packed = use_brgemm || use_micro;
  const TileConfig tile = use_micro ? FWD_TILE_FP32 : FWD_TILE;
  const int64_t group = d.heads_q / d.heads_kv;
  // Decoding with GQA (one query row per head): the query heads of a kv head are stacked as the rows
  // of one task, so K and V are read (and packed) once per kv head rather than once per query head
  // (FlashAttention's GQA packing for decoding). The stacked rows all sit at query position 0 and share
  // its keys. Not with inputs that differ per head (a mask tensor, ALiBi, dropout), not for varlen, and
  // only with a task per thread at least (tasks are per kv head).
  const bool stack_heads = d.len_q == 1 && group > 1 && group <= tile.block_q && p.mask.kind == kMaskNone &&
                           p.alibi == nullptr && !p.dropout.on && p.vis.cu_q == nullptr &&
                           p.q_stride.head >= d.head_dim &&  // (the heads' rows apart: a BLAS operand)
                           d.batch * d.heads_kv >= at::get_num_threads();
  const int64_t heads_per_task = stack_heads ? group : 1;
  const int64_t BQ = stack_heads ? group : std::min<int64_t>(tile.block_q, d.len_q);
  // With packing the key block is a whole number of packing panels.
  const int64_t BK = std::min<int64_t>(tile.block_k, (d.len_k + 63) / 64 * 64);
  // Query blocks [start, start + rows): BQ rows on one grid, or, for varlen sequences, per
  // sequence (a block never holds rows of two sequences, whose keys are disjoint).
  std::vector<KeyInterval> qblocks;  // {first row, end row}
  const Visibility& v0 = p.vis;
  for (int64_t s = 0; s < (v0.cu_q ? v0.n_seq : 1); ++s) {
    const int64_t first = v0.cu_q ? v0.cu_q[s] : 0, end = v0.cu_q ? v0.cu_q[s + 1] : d.len_q;
    for (int64_t i = first; i < end; i += BQ) qblocks.push_back({i, std::min(end, i + BQ)});
  }
  const int64_t n_qblocks = static_cast<int64_t>(qblocks.size());
  const int64_t tile_align = PackedKV<scalar_t>::PANEL;  // key tiles start on a packing panel
  // t = sgn * s, P = exp2((t - m) * asc): the scale's sign and magnitude apart (tile_ops.h).
  const acc_t score_sgn = p.scale < 0 ? acc_t(-1) : acc_t(1);
  const acc_t score_asc = static_cast<acc_t>(std::abs(p.scale) * LOG2E);
  // A mask tensor's float values enter the raw scores as bias / scale (mask_ops.h).
  const bool has_mask = p.mask.kind != kMaskNone, has_alibi = p.alibi != nullptr, has_softcap = p.softcap > 0.0;
  const acc_t mask_mult = static_cast<acc_t>(1.0 / p.scale);
  const bool has_dropout = p.dropout.on;
  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  const auto* v = static_cast<const scalar_t*>(p.v);
  auto* out = static_cast<scalar_t*>(p.out);
  using lse_type = lse_t<scalar_t, acc_t>;
  auto* lse = static_cast<lse_type*>(p.lse);
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const auto in_dtype = c10::CppTypeToScalarType<scalar_t>::value;
  const int64_t Ep = use_packed ? PackedKV<scalar_t>::padded_E(d.head_dim) : d.head_dim;

  // Tasks: per (batch, head) (stacked: per (batch, kv head)), query blocks last to first (causal: heaviest first).
  const int64_t n_tasks = d.batch * (d.heads_q / heads_per_task) * n_qblocks;
  // Split-KV (flash-decoding): where there are fewer tasks than threads and each reads its keys in place
  // (decoding; not with dropout), each task's keys are cut into n_split chunks of whole key tiles, computed
  // as tasks of their own into `partial` (each chunk's rows: acc, then m and l) and combined after through
  // their row maxima and sums (the epilogue below, once per row). The chunks depend on the thread count
  // only: results are deterministic for a given thread count, as the rest of the kernels'.
  int64_t n_split = 1, chunk = d.len_k;
  const int64_t threads = at::get_num_threads();
  if (!use_packed && !has_dropout && n_tasks < threads && d.len_k >= 2 * FWD_SPLIT_MIN_KEYS) {
    n_split = std::min((threads + n_tasks - 1) / n_tasks, d.len_k / FWD_SPLIT_MIN_KEYS);
    chunk = ((d.len_k + n_split - 1) / n_split + BK - 1) / BK * BK;  // whole tiles (and packing panels)
    n_split = (d.len_k + chunk - 1) / chunk;
  }
  last_forward_splits().store(n_split, std::memory_order_relaxed);
  const int64_t part_row = d.head_dim_v + 2;  // a partial row: acc, m, l
  at::Tensor partial;
  if (n_split > 1) partial = at::empty({n_tasks * n_split * BQ * part_row}, at::TensorOptions().dtype(acc_dtype));
  // The rows [i0, i0 + rows) of task t and its first head bh (stacked: rows are heads bh.. at position i0).
  const auto task_rows = [&](int64_t t, int64_t& bh, int64_t& i0, int64_t& rows) {
    bh = t / n_qblocks * heads_per_task;
    const KeyInterval qblock = qblocks[n_qblocks - 1 - t % n_qblocks];
    i0 = qblock.begin;
    rows = stack_heads ? heads_per_task : qblock.end - qblock.begin;
  };
  // out and lse of a block's rows from their m, l and acc. l = 0: the row saw no key (or only -inf scores):
  // out 0, lse -inf. l NaN (a NaN score) makes out and lse NaN; m = +inf (a +inf score) gives lse = +inf
  // (out NaN: inf - inf).
  const acc_t keep_scale = has_dropout ? static_cast<acc_t>(p.dropout.keep_scale) : acc_t(1);
  const auto finish = [&](int64_t bh, int64_t i0, int64_t rows, const acc_t* m, const acc_t* l, const acc_t* acc) {
    scalar_t* out_blk = out + (bh * d.len_q + i0) * d.head_dim_v;
    auto* lse_blk = lse + bh * d.len_q + i0;
    for (int64_t r = 0; r < rows; ++r) {
      const bool seen = l[r] != acc_t(0);
      const acc_t inv = seen ? keep_scale / l[r] : acc_t(0);
      for (int64_t c = 0; c < d.head_dim_v; ++c)
        out_blk[r * d.head_dim_v + c] = static_cast<scalar_t>(acc[r * d.head_dim_v + c] * inv);
      const double lse2 = m[r] == std::numeric_limits<acc_t>::infinity()
          ? double(m[r])
          : double(m[r]) * double(score_asc) + std::log2(double(l[r]));
      lse_blk[r] = seen ? static_cast<lse_type>(lse2 * LN2) : -std::numeric_limits<lse_type>::infinity();
    }
  };
  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, worker_count(n_tasks * n_split), 1, [&](int64_t, int64_t) {
    // Per-thread scratch, through PyTorch's allocator (so memory profilers see it).
    const int64_t n_acc = BQ * BK + BQ * d.head_dim_v + 3 * BQ + (use_micro ? 16 * BQ : 0);
    at::Tensor scratch = at::empty({n_acc}, at::TensorOptions().dtype(acc_dtype));
    at::Tensor scratch16 = at::empty({(LOW_PRECISION ? BQ * BK : 0) + (use_brgemm ? BQ * Ep : 0)},
                                     at::TensorOptions().dtype(in_dtype));
    std::vector<KeyInterval> iv_buf(BQ);
    acc_t* s = scratch.data_ptr<acc_t>();
    acc_t* acc = s + BQ * BK;
    acc_t* m = acc + BQ * d.head_dim_v;
    acc_t* l = m + BQ;
    acc_t* corr = l + BQ;
    acc_t* sum16 = corr + BQ;  // fp32 micro path: rows x 16 partial row sums
    scalar_t* p16 = scratch16.data_ptr<scalar_t>();
    scalar_t* q_pad = p16 + (LOW_PRECISION ? BQ * BK : 0);
    KeyInterval* iv = iv_buf.data();
    std::optional<DropoutTile> dropped;  // this thread's keep decisions of a tile
    if (has_dropout) dropped.emplace(BQ, BK);
    std::optional<PackedKV<scalar_t>> packed;  // this thread's packed kv head
    if constexpr (LOW_PRECISION || FP32) {
      if (use_packed) packed.emplace(p, BK);
    }

    for (int64_t idx = next_task.fetch_add(1); idx < n_tasks * n_split; idx = next_task.fetch_add(1)) {
      const int64_t task = idx / n_split, split = idx % n_split;
      int64_t bh, i0, rows;  // (bh: the first stacked head's)
      task_rows(task, bh, i0, rows);
      const int64_t b = bh / d.heads_q, h = bh % d.heads_q, hk = h / group, bhk = b * d.heads_kv + hk;
      const int64_t pos_rows = stack_heads ? 1 : rows;  // query positions of the rows (stacked: all at i0)
      const int64_t ldq = stack_heads ? p.q_stride.head : p.q_stride.row;  // from one row of Q to the next
      const scalar_t* q_blk = q + b * p.q_stride.batch + h * p.q_stride.head + i0 * p.q_stride.row;
      const scalar_t* k_bh = k + b * p.k_stride.batch + hk * p.k_stride.head;
      const scalar_t* v_bh = v + b * p.v_stride.batch + hk * p.v_stride.head;
      // The packed GEMMs' A operand: Q in place for fp32; for brgemm rows x Ep, contiguous,
      // zero-padded.
      const scalar_t* q_a = q_blk;
      int64_t ld_qa = ldq;
      if (use_brgemm) {
        for (int64_t r = 0; r < rows; ++r) {
          std::copy(q_blk + r * ldq, q_blk + r * ldq + d.head_dim, q_pad + r * Ep);
          std::fill(q_pad + r * Ep + d.head_dim, q_pad + (r + 1) * Ep, scalar_t(0));
        }
        q_a = q_pad;
        ld_qa = Ep;
      }

      std::fill(m, m + rows, -std::numeric_limits<acc_t>::infinity());
      std::fill(l, l + rows, acc_t(0));
      std::fill(acc, acc + rows * d.head_dim_v, acc_t(0));
      // The block's keys: [min begin, max end) of its rows' (causal: up to the last row's
      // diagonal). Key tiles of BK keys start at the range's begin rounded down to the packing
      // panel (64 keys), the last one cut at the range's end; keys before a row's begin are masked. Tiles no row sees are
      // skipped; tiles every row sees wholly take the unmasked path (tile_iv nullptr).
      const Visibility vis = p.visibility(b);
      KeyInterval keys = block_keys(vis, d.len_k, i0, pos_rows);
      if (n_split > 1) {  // this chunk's part of them
        keys.begin = std::max(keys.begin, split * chunk);
        keys.end = std::min(keys.end, (split + 1) * chunk);
      }
      if constexpr (LOW_PRECISION || FP32) {
        if (packed) packed->pack(bhk, keys.end);
      }
      for (int64_t j0 = keys.begin / tile_align * tile_align; j0 < keys.end; j0 += BK) {
        const int64_t cols = std::min(BK, keys.end - j0);
        const TileMask seen = tile_intervals(vis, d.len_k, i0, pos_rows, j0, cols, iv);
        if (seen == TileMask::NONE) continue;
        if (stack_heads) std::fill(iv + 1, iv + rows, iv[0]);
        const KeyInterval* tile_iv = seen == TileMask::FULL ? nullptr : iv;
        // A mask tensor: tiles where it hides every visible score are skipped, tiles where it
        // changes none take the path without it, the others get their scores rewritten.
        const TileMask by_mask = has_mask ? classify_mask_tile(p.mask, b, h, i0, rows, j0, cols, tile_iv)
                                          : TileMask::FULL;
        if (by_mask == TileMask::NONE) continue;
        const bool apply_mask = by_mask == TileMask::PARTIAL;
        const bool rewrite = apply_mask || has_alibi || has_softcap;  // scores changed before the softmax
        const auto rewrite_scores = [&] {  // soft-capping, then ALiBi, then the mask (FlashAttention-2's order)
          if (has_softcap) apply_softcap_tile(s, BK, rows, cols, static_cast<acc_t>(p.softcap), mask_mult, (acc_t*)nullptr);
          if (apply_mask) apply_mask_tile(p.mask, b, h, i0, rows, j0, cols, tile_iv, s, BK, mask_mult);
          if (has_alibi) apply_alibi_tile(p, vis, b, h, i0, rows, j0, cols, tile_iv, s, BK, mask_mult);
        };
        // Dropout: the row sums l (and lse) take P before it; P V after it (keep_scale at the end).
        const auto drop = [&](auto* probs, int64_t ld) {
          if (has_dropout) drop_tile(probs, ld, rows, cols, dropped->draw(p.dropout, bh, i0, rows, j0, cols), dropped->ldk);
        };
        const scalar_t* v_blk = v_bh + j0 * p.v_stride.row;
#ifdef FA_CPU_HAVE_AVX512_PATH
        if constexpr (FP32) {
          if (use_micro && rewrite) {  // scores, the mask / ALiBi, then the softmax pass (AVX-512 clone)
            packed->scores_raw(j0, q_blk, ldq, rows, cols, s, BK);
            rewrite_scores();
            online_softmax(s, BK, rows, cols, tile_iv, score_sgn, score_asc, m, l, corr);
            drop(s, BK);
            gemm_f32_avx512<false>(rows, d.head_dim_v, cols, 1.0f, s, BK, v_blk, p.v_stride.row, acc, d.head_dim_v,
                                   true, corr);
            continue;
          }
          if (use_micro) {  // softmax in the score GEMM's epilogue; V in place, corr in the PV epilogue
            std::copy(m, m + rows, corr);
            std::fill(sum16, sum16 + rows * 16, 0.0f);
            packed->scores_softmax(j0, q_blk, ldq, rows, cols, tile_iv, score_sgn, score_asc, s, BK, m,
                                   sum16);
            fold_softmax_block(rows, m, l, corr, sum16, score_asc);
            drop(s, BK);
            gemm_f32_avx512<false>(rows, d.head_dim_v, cols, 1.0f, s, BK, v_blk, p.v_stride.row, acc, d.head_dim_v,
                                   true, corr);
            continue;
          }
        }
#endif
        if constexpr (LOW_PRECISION) {
          if (use_brgemm) packed->scores(j0, q_a, ld_qa, rows, cols, s, BK);
        }
        if (!use_packed)
          gemm(false, true, rows, cols, d.head_dim, acc_t(1), q_blk, ldq, k_bh + j0 * p.k_stride.row,
               p.k_stride.row, acc_t(0), s, BK);
        if (rewrite) rewrite_scores();
        softmax_step<scalar_t>(s, BK, rows, cols, tile_iv, score_sgn, score_asc, m, l, corr, p16, BK);
        if constexpr (LOW_PRECISION) drop(p16, BK); else drop(s, BK);
        if constexpr (LOW_PRECISION) {
          scale_rows(acc, d.head_dim_v, rows, d.head_dim_v, corr);
          if (use_brgemm) {
            // The VNNI reduction dim runs in pairs: an odd tail gets one zero column of P.
            const int64_t k_even = (cols + 1) / 2 * 2;
            if (k_even != cols)
              for (int64_t r = 0; r < rows; ++r) p16[r * BK + cols] = scalar_t(0);
            packed->accumulate(j0, p16, BK, rows, k_even, d.head_dim_v, acc);
          } else {
            gemm(false, false, rows, d.head_dim_v, cols, acc_t(1), p16, BK, v_blk, p.v_stride.row, acc_t(1), acc,
                 d.head_dim_v);
          }
        } else {
          scale_rows(acc, d.head_dim_v, rows, d.head_dim_v, corr);
          gemm(false, false, rows, d.head_dim_v, cols, acc_t(1), s, BK, v_blk, p.v_stride.row, acc_t(1), acc,
               d.head_dim_v);
        }
      }
      if (n_split == 1) {
        finish(bh, i0, rows, m, l, acc);
        continue;
      }
      acc_t* part = partial.data_ptr<acc_t>() + idx * BQ * part_row;
      for (int64_t r = 0; r < rows; ++r) {
        std::copy(acc + r * d.head_dim_v, acc + (r + 1) * d.head_dim_v, part + r * part_row);
        part[r * part_row + d.head_dim_v] = m[r];
        part[r * part_row + d.head_dim_v + 1] = l[r];
      }
    }
    if (use_brgemm) at::native::cpublas::brgemm_release(PackedKV<scalar_t>::VNNI);
  });
  if (n_split > 1) {  // each row's chunks combined, in chunk order: acc and l rescaled to the largest m
    at::parallel_for(0, n_tasks, 1, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> m(BQ), l(BQ), acc(BQ * d.head_dim_v);
      for (int64_t t = t0; t < t1; ++t) {
        int64_t bh, i0, rows;
        task_rows(t, bh, i0, rows);
        const acc_t* parts = partial.data_ptr<acc_t>() + t * n_split * BQ * part_row;
        for (int64_t r = 0; r < rows; ++r) {
          acc_t top = -std::numeric_limits<acc_t>::infinity();
          for (int64_t c = 0; c < n_split; ++c) {  // chunks that saw a key (l != 0; NaN counts)
            const acc_t* row = parts + (c * BQ + r) * part_row;
            if (row[d.head_dim_v + 1] != acc_t(0)) top = std::max(top, row[d.head_dim_v]);
          }
          m[r] = top;
          l[r] = acc_t(0);
          std::fill(acc.begin() + r * d.head_dim_v, acc.begin() + (r + 1) * d.head_dim_v, acc_t(0));
          for (int64_t c = 0; c < n_split; ++c) {
            const acc_t* row = parts + (c * BQ + r) * part_row;
            if (row[d.head_dim_v + 1] == acc_t(0)) continue;
            const acc_t w = std::exp2((row[d.head_dim_v] - top) * score_asc);
            l[r] += row[d.head_dim_v + 1] * w;
            for (int64_t e = 0; e < d.head_dim_v; ++e) acc[r * d.head_dim_v + e] += row[e] * w;
          }
        }
        finish(bh, i0, rows, m.data(), l.data(), acc.data());
      }
    });
  }
  if (has_mask || hides_stored_keys(p)) poison_unseen_nonfinite_v<scalar_t>(p);
}

}  // namespace fused_attn::cpu
