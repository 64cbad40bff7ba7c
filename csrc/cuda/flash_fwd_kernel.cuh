// FlashAttention-2 forward on tensor cores (mma.sync m16n8k16, fp32 accumulation).
//
// Algorithm: one block per (query block of kBlockM rows, query head, batch). The Q tile
// stays in shared memory; K/V tiles of kBlockN keys stream through a kStages-deep
// cp.async pipeline. Each warp owns 16 query rows: S = Q K^T (A = Q via ldmatrix, B = K
// via ldmatrix), scale and mask, online softmax in registers (row max / sum reduced over
// the 4 lanes of a quad with shuffles, exp2 with the scale folded into LOG2E), then
// O += P V with P taken straight from the S accumulators as the A operand and V through
// ldmatrix.trans. Finally O /= l and lse = m * ln 2 + ln l (natural log, fp32).
//
// Layout: q (B, Hq, L, d), k (B, Hk, S, d), v (B, Hk, S, dv), out (B, Hq, L, dv): any
// int64 strides, unit stride on the last dim, rows 16-byte aligned (strides and base
// multiples of 8 elements); lse (B, Hq, L) contiguous fp32. d, dv <= kHeadDim and
// multiples of 8. GQA: query head h reads kv head h / (Hq / Hk).
// Dtypes: fp16, bf16 (Traits::Elem). Causal: query i sees key j iff j <= i + offset
// (offset 0: upper-left, S - L: lower-right: common/attn_params.h's Visibility); key blocks
// past the diagonal are skipped, only blocks crossing it (or the ragged end of S) are masked.
// Causal and "even tiles" (L, S multiples of kBlockM, kBlockN) are template flags (kIsCausal,
// kIsEvenMN), chosen per call by cuda/static_switch.h: a non-causal instantiation carries no
// diagonal code, an even one no bounds checks on rows or keys. A row that sees no key
// (or whose scores are all -inf) gets out = 0 and lse = -inf, whatever v holds.
// NaN in, NaN out, as torch's math path: the row max propagates NaN (nan_max; fmaxf would
// drop it), so a NaN score makes the row's out and lse NaN; a +inf score makes lse +inf and
// out NaN; a NaN / inf in v reaches the columns of the rows that weigh its key.
//
// Shared memory (Q tile, kStages K/V tiles) is written only by cp.async and read only by
// ldmatrix. The __syncthreads() at the top of the main loop orders both directions: each
// thread's landed copies (after its cp.async.wait_group) before every warp's reads of tile
// j, and every warp's reads of tile j - 1 before the prefetch that overwrites that stage.
// Under emulation every shared access is bounds-checked and race-tracked per byte
// (csrc/emu/runtime.h); tests/test_cuda_emu_race.py shows that moving or deleting that
// barrier is reported as a race.
#pragma once

#include "common/attn_params.h"
#include "cuda/flash_fwd_traits.h"
#include "cuda/primitives.cuh"

namespace fa {

constexpr float kLog2e = 1.4426950408889634f;  // log2(e): exp(x) = exp2(x * LOG2E)
constexpr float kLn2 = 0.6931471805599453f;     // ln(2)

// max(a, b), NaN if either is NaN (fmaxf returns the other operand).
FA_DEVICE float nan_max(float a, float b) { return b > a || b != b ? b : a; }

// A times one 16x16 B tile, given as the four registers of an ldmatrix x4 (two 16x8 halves),
// accumulated into the two 16x8 accumulators c0 (columns 0-7) and c1 (columns 8-15).
template <class T>
FA_DEVICE void mma_m16n16k16(float (&c0)[4], float (&c1)[4], const uint32_t (&a)[4], const uint32_t (&b)[4]) {
  const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
  mma_m16n8k16<T>(c0, a, b0, c0);
  mma_m16n8k16<T>(c1, a, b1, c1);
}

// The shared forward parameters (common/attn_params.h: dims, strides, visibility, scale;
// 32-bit index arithmetic on the GPU) plus the bounds-checked pointers and the scale in log2 units.
template <class T>
struct FwdParams : fused_attn::AttnFwdCommon<int> {
  GPtr<const T> q, k, v;
  GPtr<T> o;
  GPtr<float> lse;
  float scale_log2;  // softmax scale * LOG2E
};

// Copies rows [row0, row0 + kRows) x the first `cols` columns of a global tile into a
// padded shared tile with 16-byte cp.async; rows >= nrows and columns >= cols are
// zero-filled (src-size 0, the source address then stays at the tile's base). kEvenRows: the
// caller knows row0 + kRows <= nrows (an even-tile kernel), so rows are not checked.
template <class Kt, int kRows, bool kEvenRows>
FA_DEVICE void load_tile(typename Kt::Elem* dst, const GPtr<const typename Kt::Elem>& src, int64_t base,
                         int64_t row_stride, int row0, int nrows, int cols, int tid) {
  constexpr int kC = Kt::kChunks, kTotal = kRows * kC;
  constexpr int kPerThread = (kTotal + Kt::kThreads - 1) / Kt::kThreads;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int idx = tid + i * Kt::kThreads;
    if (kTotal % Kt::kThreads == 0 || idx < kTotal) {
      const int r = idx / kC, c = idx % kC;
      const bool valid = (kEvenRows || row0 + r < nrows) && c * 8 < cols;
      cp_async_cg16(dst + r * Kt::kRowStride + c * 8, src, valid ? base + (row0 + r) * row_stride + c * 8 : base,
                    valid ? 16 : 0);
    }
  }
}

// kIsCausal: p.vis is causal (a non-causal kernel has no diagonal code). kIsEvenMN: L and S are
// multiples of kBlockM and kBlockN (no bounds checks on rows or keys).
template <class Kt, bool kIsCausal, bool kIsEvenMN>
__global__ void __launch_bounds__(Kt::kThreads, Kt::kMinBlocksPerSm) flash_fwd_kernel(const FwdParams<typename Kt::Elem> p) {
  using T = typename Kt::Elem;
  constexpr int kM = Kt::kBlockM, kN = Kt::kBlockN, kD = Kt::kHeadDim, kRS = Kt::kRowStride;
  constexpr int kStages = Kt::kStages;
  FA_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kM * kRS;                  // stage s at sK + s * kN * kRS
  T* sV = sK + kStages * kN * kRS;        // stage s at sV + s * kN * kRS

  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int g = lane >> 2, t = lane & 3;  // mma groupID / thread in group
  const int m0 = blockIdx.x * kM, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.dims.heads_q / p.dims.heads_kv);
  const int64_t q_base = b * p.q_stride.batch + h * p.q_stride.head;
  const int64_t k_base = b * p.k_stride.batch + hk * p.k_stride.head;
  const int64_t v_base = b * p.v_stride.batch + hk * p.v_stride.head;
  const int64_t o_base = b * p.o_stride.batch + h * p.o_stride.head;

  // Keys this query block sees: [0, n_end), its last row's; blocks past the causal diagonal are skipped.
  const int n_end = kIsCausal ? p.vis.keys(m0 + kM - 1, p.dims.len_k).end : p.dims.len_k;
  const int n_blocks = (n_end + kN - 1) / kN;

  float acc_o[kD / 8][4];
#pragma unroll
  for (int i = 0; i < kD / 8; ++i) acc_o[i][0] = acc_o[i][1] = acc_o[i][2] = acc_o[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // running max of scaled scores (log2 units), rows g and g + 8
  float row_sum[2] = {0.f, 0.f};              // this lane's part of the running sum of exp2

  auto load_kv = [&](int j) {
    const int st = j % kStages;
    load_tile<Kt, kN, kIsEvenMN>(sK + st * kN * kRS, p.k, k_base, p.k_stride.row, j * kN, p.dims.len_k, p.dims.head_dim, tid);
    load_tile<Kt, kN, kIsEvenMN>(sV + st * kN * kRS, p.v, v_base, p.v_stride.row, j * kN, p.dims.len_k, p.dims.head_dim_v, tid);
  };

  if (n_blocks > 0) {
    // Prologue: Q and the first kStages - 1 K/V tiles, one commit group per tile.
    load_tile<Kt, kM, kIsEvenMN>(sQ, p.q, q_base, p.q_stride.row, m0, p.dims.len_q, p.dims.head_dim, tid);
#pragma unroll
    for (int j = 0; j < kStages - 1; ++j) {
      if (j < n_blocks) load_kv(j);
      cp_async_commit();
    }
  }

  for (int j = 0; j < n_blocks; ++j) {
    cp_async_wait<kStages - 2>();  // tile j (and Q) landed for this thread ...
    __syncthreads();               // ... and for every thread; tile j - 1 is no longer read
    if (j + kStages - 1 < n_blocks) load_kv(j + kStages - 1);
    cp_async_commit();
    const T* tK = sK + (j % kStages) * kN * kRS;
    const T* tV = sV + (j % kStages) * kN * kRS;

    // ---- S = Q K^T for this warp's 16 rows x kN keys ----
    float acc_s[kN / 8][4];
#pragma unroll
    for (int i = 0; i < kN / 8; ++i) acc_s[i][0] = acc_s[i][1] = acc_s[i][2] = acc_s[i][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      if (ks * 16 >= p.dims.head_dim) break;
      uint32_t a[4];  // matrices: rows 0-7 / 8-15 x cols 0-7, then x cols 8-15
      ldmatrix<4>(a, sQ + (16 * warp + (lane & 15)) * kRS + 16 * ks + (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < kN / 16; ++np) {
        uint32_t bk[4];  // matrices: keys 0-7 x d 0-7, 0-7 x 8-15, 8-15 x 0-7, 8-15 x 8-15
        ldmatrix<4>(bk, tK + (16 * np + (lane & 7) + (lane >> 4) * 8) * kRS + 16 * ks + ((lane >> 3) & 1) * 8);
        mma_m16n16k16<T>(acc_s[2 * np], acc_s[2 * np + 1], a, bk);
      }
    }

    // ---- scale into log2 units, mask, online softmax ----
    const int n0 = j * kN;
    const int row_lo = m0 + 16 * warp + g;  // row of elements 0, 1; elements 2, 3 are row_lo + 8
    // Only tiles that reach past len_k (uneven kernels) or cross the diagonal (causal) are masked.
    const bool masked = (!kIsEvenMN && n0 + kN > p.dims.len_k) || (kIsCausal && n0 + kN - 1 > m0 + p.vis.causal_offset);
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc_s[nt][i] *= p.scale_log2;
    if (masked) {
      int key_end[2];  // rows row_lo and row_lo + 8 see keys [0, key_end)
#pragma unroll
      for (int r = 0; r < 2; ++r) key_end[r] = kIsCausal ? p.vis.keys(row_lo + 8 * r, p.dims.len_k).end : p.dims.len_k;
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if (n0 + nt * 8 + 2 * t + (i & 1) >= key_end[i >> 1]) acc_s[nt][i] = -INFINITY;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt) mx = nan_max(mx, nan_max(acc_s[nt][2 * r], acc_s[nt][2 * r + 1]));
      mx = nan_max(mx, shfl_xor(kFullMask, mx, 1));  // the 4 lanes of a quad share the row
      mx = nan_max(mx, shfl_xor(kFullMask, mx, 2));
      const float m_use = mx == -INFINITY ? 0.f : mx;  // a row with no visible key yet: p = 0 (NaN stays NaN)
      const float correction = exp2_approx(row_max[r] - m_use);
      row_max[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pv = exp2_approx(acc_s[nt][2 * r + e] - m_use);
          acc_s[nt][2 * r + e] = pv;
          sum += pv;
        }
      }
      row_sum[r] = row_sum[r] * correction + sum;
#pragma unroll
      for (int dt = 0; dt < kD / 8; ++dt) {
        acc_o[dt][2 * r] *= correction;
        acc_o[dt][2 * r + 1] *= correction;
      }
    }

    // ---- O += P V: the S accumulators of key tiles 2kk, 2kk+1 are the A fragment ----
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(acc_s[2 * kk][0], acc_s[2 * kk][1]), pack2<T>(acc_s[2 * kk][2], acc_s[2 * kk][3]),
                             pack2<T>(acc_s[2 * kk + 1][0], acc_s[2 * kk + 1][1]),
                             pack2<T>(acc_s[2 * kk + 1][2], acc_s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < kD / 16; ++dp) {
        if (dp * 16 >= p.dims.head_dim_v) break;
        uint32_t bv[4];  // .trans matrices: keys 0-7 / 8-15 x d 0-7, then x d 8-15
        ldmatrix<4, true>(bv, tV + (16 * kk + (lane & 7) + ((lane >> 3) & 1) * 8) * kRS + 16 * dp + (lane >> 4) * 8);
        mma_m16n16k16<T>(acc_o[2 * dp], acc_o[2 * dp + 1], a, bv);
      }
    }
  }
  cp_async_wait<0>();  // no copy may outlive the block (the last commit groups are empty)

  // ---- epilogue: O /= l, lse ----
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += shfl_xor(kFullMask, l, 1);
    l += shfl_xor(kFullMask, l, 2);
    const int row = m0 + 16 * warp + g + 8 * r;
    if (!kIsEvenMN && row >= p.dims.len_q) continue;
    // l == 0: no visible key (out 0 even where 0 * NaN of v made acc_o NaN). l NaN: a NaN or
    // +inf score (row_max NaN or +inf, which lse keeps).
    const bool empty = l == 0.f;
    const float inv = empty ? 0.f : 1.f / l;
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt) {
      const int col = dt * 8 + 2 * t;
      if (col < p.dims.head_dim_v)
        p.o.template store_vec<uint32_t>(o_base + row * p.o_stride.row + col,
                                         empty ? 0u : pack2<T>(acc_o[dt][2 * r] * inv, acc_o[dt][2 * r + 1] * inv));
    }
    if (t == 0)
      p.lse.store((int64_t(b) * p.dims.heads_q + h) * p.dims.len_q + row,
                  empty ? -INFINITY : row_max[r] == INFINITY ? INFINITY : row_max[r] * kLn2 + logf(l));
  }
}

}  // namespace fa
