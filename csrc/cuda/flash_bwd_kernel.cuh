// FlashAttention-2 backward on tensor cores (mma.sync m16n8k16, fp32 accumulation).
//
// Three kernels, no atomics (gradients are bitwise reproducible run to run):
//  1. flash_bwd_preprocess_kernel: delta = rowsum(dO * O) - dlse (fp32). The lse gradient
//     enters here, since d lse / d s = P: dS = P * (dP - (delta - dlse)).
//  2. flash_bwd_dkdv_kernel: one block per (key block, kv head, batch). K and V stay in
//     shared memory; the block walks the query tiles of every q head of its GQA group (so
//     the group sum of dK/dV needs no atomics); Q and dO arrive by cp.async (the next
//     tile prefetched where two stages fit), lse and delta by plain loads. Phase A:
//     S^T = K Q^T and dP^T = V dO^T per warp tile, P^T = exp2(S^T * scale * LOG2E -
//     lse * LOG2E) recomputed from the saved lse, dS^T = P^T * (dP^T - delta); both
//     rounded to the input dtype into shared memory. Phase B: dV += P^T dO,
//     dK += dS^T Q (dO and Q through ldmatrix.trans), accumulators spread over all warps.
//     dK is scaled by the softmax scale once at the end.
//  3. flash_bwd_dq_kernel: one block per (query block, q head, batch), the forward's
//     layout: each warp owns 16 query rows, walks the visible key tiles, recomputes P and
//     dS = P * (dO V^T - delta) in registers and accumulates dQ += dS K (dS taken straight
//     from the accumulators as the A operand, K through ldmatrix.trans).
//
// Layout and coverage as the forward (cuda/flash_fwd_kernel.cuh): any int64 strides with a
// unit last dim and 16-byte rows; lse and delta (B, Hq, L) contiguous fp32; fp16 / bf16;
// head dims in buckets (cuda/flash_bwd_traits.h); GQA: q head h belongs to kv head
// h / (Hq / Hk). Causal: query i sees key j iff j <= i + offset; tiles wholly above the
// diagonal are skipped, only tiles crossing it are masked. The dK/dV and dQ kernels take the
// forward's template flags kIsCausal and kIsEvenMN (L and S multiples of both kernels' tiles).
// A row that sees no key has lse = -inf; it is treated as lse = +inf here, so its P, and all
// its gradients, are 0.
// NaN in, NaN out: a NaN lse makes the row's P NaN, and so dQ of the row and dK / dV of every
// key it sees; a +inf lse and a NaN delta follow the reference too (bwd_lse_log2, bwd_ds).
//
// Shared memory is accessed only through cp.async, ldmatrix and smem_load / smem_store
// (the dK/dV kernel's lse, delta, P^T and dS^T), so that under emulation every access is
// bounds-checked and race-tracked per byte (csrc/emu/runtime.h). Barriers: at the top of
// each main loop, landed tiles and stored lse / delta before their reads, and the previous
// iteration's reads before the prefetch into that stage; in the dK/dV kernel, between
// phases A and B, the P^T / dS^T stores before other warps' ldmatrix reads of them.
// tests/test_cuda_emu_race.py moves or deletes these barriers and expects race reports.
#pragma once

#include "cuda/flash_bwd_traits.h"
#include "cuda/flash_fwd_kernel.cuh"

namespace fa {

// The shared backward parameters (common/attn_params.h: the forward's plus the gradients'
// strides and has_dlse) plus the bounds-checked pointers and the scale in fp32 and log2 units.
template <class T>
struct BwdParams : fused_attn::AttnBwdCommon<int> {
  GPtr<const T> q, k, v, o, dout;
  GPtr<const float> lse, dlse;  // dlse: read only when has_dlse
  GPtr<float> delta;            // written by the preprocess kernel, read by the others
  GPtr<T> dq, dk, dv;
  float scale_f32;   // softmax scale (dQ, dK = scale * dS K, scale * dS^T Q)
  float scale_log2;  // scale * LOG2E
};

// lse in log2 units for P = exp2(s * scale_log2 - lse2); rows past L and rows that see no
// key (lse = -inf) get +inf, so their P is exactly 0. A +inf lse (a +inf score) stays +inf:
// P is then NaN at the +inf scores and 0 elsewhere, as the reference's.
FA_DEVICE float bwd_lse_log2(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// dS = P * (dP - delta), but 0 in a row that sees no key (lse2 +inf with a number for delta:
// O = 0 there), where dP may hold 0 * NaN of v. A +inf-lse row has out NaN, so delta NaN and
// dS NaN, as the reference's.
FA_DEVICE float bwd_ds(float pv, float dp, float lse2, float delta) {
  return lse2 == INFINITY && delta == delta ? 0.f : pv * (dp - delta);
}

// ---- 1. delta = rowsum(dO * O) - dlse: one warp per row ----------------------------------
template <class T>
__global__ void __launch_bounds__(BwdPreTraits::kThreads) flash_bwd_preprocess_kernel(const BwdParams<T> p) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int row = blockIdx.x * BwdPreTraits::kRowsPerBlock + warp, h = blockIdx.y, b = blockIdx.z;
  if (row >= p.dims.len_q) return;  // the whole warp leaves together
  const int64_t o_off = b * p.o_stride.batch + h * p.o_stride.head + row * p.o_stride.row;
  const int64_t do_off = b * p.do_stride.batch + h * p.do_stride.head + row * p.do_stride.row;
  float acc = 0.f;
  for (int c = 2 * lane; c < p.dims.head_dim_v; c += 2 * kWarpSize) {  // head_dim_v is a multiple of 8
    const uint32_t o2 = p.o.template load_vec<uint32_t>(o_off + c);
    const uint32_t d2 = p.dout.template load_vec<uint32_t>(do_off + c);
    acc += unpack_lo<T>(o2) * unpack_lo<T>(d2) + unpack_hi<T>(o2) * unpack_hi<T>(d2);
  }
#pragma unroll
  for (int m = kWarpSize / 2; m >= 1; m >>= 1) acc += shfl_xor(kFullMask, acc, m);
  if (lane == 0) {
    const int64_t idx = (int64_t(b) * p.dims.heads_q + h) * p.dims.len_q + row;
    p.delta.store(idx, p.has_dlse ? acc - p.dlse.load(idx) : acc);
  }
}

// ---- 2. dK, dV: one block per (key block, kv head, batch) ----------------------------------
// kIsCausal, kIsEvenMN as the forward's (L, S multiples of this kernel's kBlockM, kBlockN).
template <class Kt, bool kIsCausal, bool kIsEvenMN>
__global__ void __launch_bounds__(Kt::kThreads, Kt::kMinBlocksPerSm)
    flash_bwd_dkdv_kernel(const BwdParams<typename Kt::Elem> p) {
  using T = typename Kt::Elem;
  constexpr int kM = Kt::kBlockM, kN = Kt::kBlockN, kD = Kt::kHeadDim, kRS = Kt::kRowStride;
  constexpr int kPS = Kt::kPRowStride, kStages = Kt::kStages;
  constexpr int kColsA = Kt::kColsA, kColsB = Kt::kColsB;
  FA_DYNAMIC_SMEM(smem);
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kN * kRS;
  T* sP = sV + kN * kRS;            // P^T: kN keys x kM queries
  T* sdS = sP + kN * kPS;           // dS^T
  T* sQ = sdS + kN * kPS;           // stage s at sQ + s * kM * kRS
  T* sdO = sQ + kStages * kM * kRS;  // stage s at sdO + s * kM * kRS
  float* sLse = reinterpret_cast<float*>(sdO + kStages * kM * kRS);  // stage s at sLse + s * kM
  float* sDelta = sLse + kStages * kM;

  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int g = lane >> 2, t = lane & 3;
  const int slab = warp % Kt::kSlabs, grp = warp / Kt::kSlabs;  // 16-key slab; column group
  const int n0 = blockIdx.x * kN, hk = blockIdx.y, b = blockIdx.z;
  const int group = p.dims.heads_q / p.dims.heads_kv;
  const int64_t k_base = b * p.k_stride.batch + hk * p.k_stride.head;
  const int64_t v_base = b * p.v_stride.batch + hk * p.v_stride.head;

  // Query rows that see a key of this block start at `first` (causal); tiles of kM rows from
  // first / kM * kM to L, for each q head of the group: n_iters = group * tiles.
  const int64_t first = kIsCausal ? (n0 - p.vis.causal_offset > 0 ? n0 - p.vis.causal_offset : 0) : 0;
  const int m_begin = first < p.dims.len_q ? static_cast<int>(first / kM * kM) : p.dims.len_q;
  const int tiles = (p.dims.len_q - m_begin + kM - 1) / kM;
  const int n_iters = group * tiles;

  auto load_q = [&](int it, int st) {
    const int h = hk * group + it / tiles, m0 = m_begin + (it % tiles) * kM;
    load_tile<Kt, kM, kIsEvenMN>(sQ + st * kM * kRS, p.q, b * p.q_stride.batch + h * p.q_stride.head, p.q_stride.row,
                                 m0, p.dims.len_q, p.dims.head_dim, tid);
    load_tile<Kt, kM, kIsEvenMN>(sdO + st * kM * kRS, p.dout, b * p.do_stride.batch + h * p.do_stride.head,
                                 p.do_stride.row, m0, p.dims.len_q, p.dims.head_dim_v, tid);
    for (int i = tid; i < kM; i += Kt::kThreads) {  // plain stores: visible after the next barrier
      const int row = m0 + i;
      const int64_t idx = (int64_t(b) * p.dims.heads_q + h) * p.dims.len_q + row;
      const float lse2 = kIsEvenMN || row < p.dims.len_q ? bwd_lse_log2(p.lse.load(idx)) : INFINITY;
      smem_store(sLse + st * kM + i, lse2);
      const float delta = kIsEvenMN || row < p.dims.len_q ? p.delta.load(idx) : 0.f;
      smem_store(sDelta + st * kM + i, delta);
    }
  };

  load_tile<Kt, kN, kIsEvenMN>(sK, p.k, k_base, p.k_stride.row, n0, p.dims.len_k, p.dims.head_dim, tid);
  load_tile<Kt, kN, kIsEvenMN>(sV, p.v, v_base, p.v_stride.row, n0, p.dims.len_k, p.dims.head_dim_v, tid);
  if (kStages == 2 && n_iters > 0) load_q(0, 0);
  cp_async_commit();

  float acc_dk[kColsB / 8][4], acc_dv[kColsB / 8][4];
#pragma unroll
  for (int i = 0; i < kColsB / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[i][e] = acc_dv[i][e] = 0.f;

  const int qc0 = grp * kColsA;  // phase A: this warp's first query column in the tile
  const int dc0 = grp * kColsB;  // phase B: this warp's first head-dim column
  for (int it = 0; it < n_iters; ++it) {
    const int st = kStages == 2 ? it % 2 : 0;
    if (kStages == 1) {
      load_q(it, 0);
      cp_async_commit();
    }
    cp_async_wait<0>();  // this query tile (and K, V) landed for this thread ...
    __syncthreads();     // ... and for every thread; the other stage is no longer read
    if (kStages == 2) {
      if (it + 1 < n_iters) load_q(it + 1, (it + 1) % 2);
      cp_async_commit();
    }
    const T* tQ = sQ + st * kM * kRS;
    const T* tdO = sdO + st * kM * kRS;
    const float* tLse = sLse + st * kM;
    const float* tDelta = sDelta + st * kM;
    const int m0 = m_begin + (it % tiles) * kM;

    // ---- phase A: S^T = K Q^T and dP^T = V dO^T for 16 keys x kColsA queries ----
    float acc_s[kColsA / 8][4], acc_dp[kColsA / 8][4];
#pragma unroll
    for (int i = 0; i < kColsA / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_s[i][e] = acc_dp[i][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      if (ks * 16 >= p.dims.head_dim) break;
      uint32_t a[4];  // K rows of the slab (the forward's Q fragment)
      ldmatrix<4>(a, sK + (16 * slab + (lane & 15)) * kRS + 16 * ks + (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < kColsA / 16; ++np) {
        uint32_t bq[4];  // Q rows as the "col" B operand (the forward's K fragment)
        ldmatrix<4>(bq, tQ + (qc0 + 16 * np + (lane & 7) + (lane >> 4) * 8) * kRS + 16 * ks + ((lane >> 3) & 1) * 8);
        mma_m16n16k16<T>(acc_s[2 * np], acc_s[2 * np + 1], a, bq);
      }
    }
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      if (ks * 16 >= p.dims.head_dim_v) break;
      uint32_t a[4];
      ldmatrix<4>(a, sV + (16 * slab + (lane & 15)) * kRS + 16 * ks + (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < kColsA / 16; ++np) {
        uint32_t bo[4];
        ldmatrix<4>(bo, tdO + (qc0 + 16 * np + (lane & 7) + (lane >> 4) * 8) * kRS + 16 * ks + ((lane >> 3) & 1) * 8);
        mma_m16n16k16<T>(acc_dp[2 * np], acc_dp[2 * np + 1], a, bo);
      }
    }

    // P^T and dS^T, masked where the tile crosses the causal diagonal, into shared memory.
    const bool masked = kIsCausal && n0 + kN - 1 > m0 + p.vis.causal_offset;
    const int key_lo = n0 + 16 * slab + g;  // key of elements 0, 1; elements 2, 3: key_lo + 8
#pragma unroll
    for (int nt = 0; nt < kColsA / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int qc = qc0 + nt * 8 + 2 * t + (i & 1);
        const float lse2 = smem_load(tLse + qc);
        // a hidden pair has P = dS = 0 exactly, whatever NaN the row's lse or delta holds
        const bool hidden = masked && key_lo + 8 * (i >> 1) > m0 + qc + p.vis.causal_offset;
        const float pv = hidden ? 0.f : exp2_approx(acc_s[nt][i] * p.scale_log2 - lse2);
        acc_s[nt][i] = pv;
        acc_dp[nt][i] = hidden ? 0.f : bwd_ds(pv, acc_dp[nt][i], lse2, smem_load(tDelta + qc));
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int off = (16 * slab + g + 8 * r) * kPS + qc0 + nt * 8 + 2 * t;
        smem_store(reinterpret_cast<uint32_t*>(sP + off), pack2<T>(acc_s[nt][2 * r], acc_s[nt][2 * r + 1]));
        smem_store(reinterpret_cast<uint32_t*>(sdS + off), pack2<T>(acc_dp[nt][2 * r], acc_dp[nt][2 * r + 1]));
      }
    }
    __syncthreads();

    // ---- phase B: dV += P^T dO, dK += dS^T Q for 16 keys x kColsB head-dim columns ----
#pragma unroll
    for (int kk = 0; kk < kM / 16; ++kk) {
      uint32_t ap[4], ads[4];
      ldmatrix<4>(ap, sP + (16 * slab + (lane & 15)) * kPS + 16 * kk + (lane >> 4) * 8);
      ldmatrix<4>(ads, sdS + (16 * slab + (lane & 15)) * kPS + 16 * kk + (lane >> 4) * 8);
      const int trow = 16 * kk + (lane & 7) + ((lane >> 3) & 1) * 8;  // .trans: queries x 8 columns
#pragma unroll
      for (int dp = 0; dp < kColsB / 16; ++dp) {
        const int col = dc0 + 16 * dp;
        if (col < p.dims.head_dim_v) {
          uint32_t bo[4];
          ldmatrix<4, true>(bo, tdO + trow * kRS + col + (lane >> 4) * 8);
          mma_m16n16k16<T>(acc_dv[2 * dp], acc_dv[2 * dp + 1], ap, bo);
        }
        if (col < p.dims.head_dim) {
          uint32_t bq[4];
          ldmatrix<4, true>(bq, tQ + trow * kRS + col + (lane >> 4) * 8);
          mma_m16n16k16<T>(acc_dk[2 * dp], acc_dk[2 * dp + 1], ads, bq);
        }
      }
    }
    if (kStages == 1) __syncthreads();  // the next tile overwrites Q, dO, lse and delta
  }
  cp_async_wait<0>();  // no copy may outlive the block

  // ---- epilogue: dK * scale, dV (keys that no query sees get zeros) ----
  const int64_t dk_base = b * p.dk_stride.batch + hk * p.dk_stride.head;
  const int64_t dv_base = b * p.dv_stride.batch + hk * p.dv_stride.head;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = n0 + 16 * slab + g + 8 * r;
    if (!kIsEvenMN && key >= p.dims.len_k) continue;
#pragma unroll
    for (int nt = 0; nt < kColsB / 8; ++nt) {
      const int col = dc0 + nt * 8 + 2 * t;
      if (col < p.dims.head_dim)
        p.dk.template store_vec<uint32_t>(dk_base + key * p.dk_stride.row + col,
                                          pack2<T>(acc_dk[nt][2 * r] * p.scale_f32, acc_dk[nt][2 * r + 1] * p.scale_f32));
      if (col < p.dims.head_dim_v)
        p.dv.template store_vec<uint32_t>(dv_base + key * p.dv_stride.row + col,
                                          pack2<T>(acc_dv[nt][2 * r], acc_dv[nt][2 * r + 1]));
    }
  }
}

// ---- 3. dQ: one block per (query block, q head, batch) -----------------------------------
template <class Kt, bool kIsCausal, bool kIsEvenMN>
__global__ void __launch_bounds__(Kt::kThreads, Kt::kMinBlocksPerSm)
    flash_bwd_dq_kernel(const BwdParams<typename Kt::Elem> p) {
  using T = typename Kt::Elem;
  constexpr int kM = Kt::kBlockM, kN = Kt::kBlockN, kD = Kt::kHeadDim, kRS = Kt::kRowStride;
  constexpr int kStages = Kt::kStages;
  FA_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + kM * kRS;
  T* sK = sdO + kM * kRS;           // stage s at sK + s * kN * kRS
  T* sV = sK + kStages * kN * kRS;  // stage s at sV + s * kN * kRS

  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int g = lane >> 2, t = lane & 3;
  const int m0 = blockIdx.x * kM, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.dims.heads_q / p.dims.heads_kv);
  const int64_t q_base = b * p.q_stride.batch + h * p.q_stride.head;
  const int64_t do_base = b * p.do_stride.batch + h * p.do_stride.head;
  const int64_t k_base = b * p.k_stride.batch + hk * p.k_stride.head;
  const int64_t v_base = b * p.v_stride.batch + hk * p.v_stride.head;

  // Keys this query block sees: [0, n_end), its last row's.
  const int n_end = kIsCausal ? p.vis.keys(m0 + kM - 1, p.dims.len_k).end : p.dims.len_k;
  const int n_blocks = (n_end + kN - 1) / kN;

  const int row_lo = m0 + 16 * warp + g;  // row of accumulator elements 0, 1; 2, 3: row_lo + 8
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row_lo + 8 * r;
    const int64_t idx = (int64_t(b) * p.dims.heads_q + h) * p.dims.len_q + row;
    lse2[r] = kIsEvenMN || row < p.dims.len_q ? bwd_lse_log2(p.lse.load(idx)) : INFINITY;
    delta[r] = kIsEvenMN || row < p.dims.len_q ? p.delta.load(idx) : 0.f;
  }

  auto load_kv = [&](int j, int st) {
    load_tile<Kt, kN, kIsEvenMN>(sK + st * kN * kRS, p.k, k_base, p.k_stride.row, j * kN, p.dims.len_k, p.dims.head_dim,
                                 tid);
    load_tile<Kt, kN, kIsEvenMN>(sV + st * kN * kRS, p.v, v_base, p.v_stride.row, j * kN, p.dims.len_k,
                                 p.dims.head_dim_v, tid);
  };
  if (n_blocks > 0) {
    load_tile<Kt, kM, kIsEvenMN>(sQ, p.q, q_base, p.q_stride.row, m0, p.dims.len_q, p.dims.head_dim, tid);
    load_tile<Kt, kM, kIsEvenMN>(sdO, p.dout, do_base, p.do_stride.row, m0, p.dims.len_q, p.dims.head_dim_v, tid);
    if (kStages == 2) load_kv(0, 0);
    cp_async_commit();
  }

  float acc_dq[kD / 8][4];
#pragma unroll
  for (int i = 0; i < kD / 8; ++i) acc_dq[i][0] = acc_dq[i][1] = acc_dq[i][2] = acc_dq[i][3] = 0.f;

  for (int j = 0; j < n_blocks; ++j) {
    const int st = kStages == 2 ? j % 2 : 0;
    if (kStages == 1) {
      if (j > 0) __syncthreads();  // tile j - 1 is no longer read
      load_kv(j, 0);
      cp_async_commit();
    }
    cp_async_wait<0>();
    __syncthreads();
    if (kStages == 2) {
      if (j + 1 < n_blocks) load_kv(j + 1, (j + 1) % 2);
      cp_async_commit();
    }
    const T* tK = sK + st * kN * kRS;
    const T* tV = sV + st * kN * kRS;

    // ---- S = Q K^T and dP = dO V^T for this warp's 16 rows x kN keys ----
    float acc_s[kN / 8][4], acc_dp[kN / 8][4];
#pragma unroll
    for (int i = 0; i < kN / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_s[i][e] = acc_dp[i][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      if (ks * 16 >= p.dims.head_dim) break;
      uint32_t a[4];
      ldmatrix<4>(a, sQ + (16 * warp + (lane & 15)) * kRS + 16 * ks + (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < kN / 16; ++np) {
        uint32_t bk[4];
        ldmatrix<4>(bk, tK + (16 * np + (lane & 7) + (lane >> 4) * 8) * kRS + 16 * ks + ((lane >> 3) & 1) * 8);
        mma_m16n16k16<T>(acc_s[2 * np], acc_s[2 * np + 1], a, bk);
      }
    }
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      if (ks * 16 >= p.dims.head_dim_v) break;
      uint32_t a[4];
      ldmatrix<4>(a, sdO + (16 * warp + (lane & 15)) * kRS + 16 * ks + (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < kN / 16; ++np) {
        uint32_t bv[4];
        ldmatrix<4>(bv, tV + (16 * np + (lane & 7) + (lane >> 4) * 8) * kRS + 16 * ks + ((lane >> 3) & 1) * 8);
        mma_m16n16k16<T>(acc_dp[2 * np], acc_dp[2 * np + 1], a, bv);
      }
    }

    // ---- P = exp2(S * scale_log2 - lse2), masked; dS = P * (dP - delta) (into acc_s) ----
    const int n0 = j * kN;
    const bool masked = (!kIsEvenMN && n0 + kN > p.dims.len_k) || (kIsCausal && n0 + kN - 1 > m0 + p.vis.causal_offset);
    int key_end[2] = {p.dims.len_k, p.dims.len_k};  // rows row_lo and row_lo + 8 see keys [0, key_end)
    if (kIsCausal && masked) {
#pragma unroll
      for (int r = 0; r < 2; ++r) key_end[r] = p.vis.keys(row_lo + 8 * r, p.dims.len_k).end;
    }
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float pv = exp2_approx(acc_s[nt][i] * p.scale_log2 - lse2[i >> 1]), dp = acc_dp[nt][i];
        // past len_k or above the diagonal: P = dP = 0, so a NaN of v there stays out
        if (masked && n0 + nt * 8 + 2 * t + (i & 1) >= key_end[i >> 1]) pv = dp = 0.f;
        acc_s[nt][i] = pv * (dp - delta[i >> 1]);
      }
    }

    // ---- dQ += dS K: dS from the accumulators as the A fragment, K through ldmatrix.trans ----
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(acc_s[2 * kk][0], acc_s[2 * kk][1]), pack2<T>(acc_s[2 * kk][2], acc_s[2 * kk][3]),
                             pack2<T>(acc_s[2 * kk + 1][0], acc_s[2 * kk + 1][1]),
                             pack2<T>(acc_s[2 * kk + 1][2], acc_s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < kD / 16; ++dp) {
        if (dp * 16 >= p.dims.head_dim) break;
        uint32_t bk[4];
        ldmatrix<4, true>(bk, tK + (16 * kk + (lane & 7) + ((lane >> 3) & 1) * 8) * kRS + 16 * dp + (lane >> 4) * 8);
        mma_m16n16k16<T>(acc_dq[2 * dp], acc_dq[2 * dp + 1], a, bk);
      }
    }
  }
  cp_async_wait<0>();

  // ---- epilogue: dQ * scale (rows that see no key get zeros: every pair of theirs is hidden) ----
  const int64_t dq_base = b * p.dq_stride.batch + h * p.dq_stride.head;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row_lo + 8 * r;
    if (!kIsEvenMN && row >= p.dims.len_q) continue;
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt) {
      const int col = dt * 8 + 2 * t;
      if (col < p.dims.head_dim)
        p.dq.template store_vec<uint32_t>(dq_base + row * p.dq_stride.row + col,
                                          pack2<T>(acc_dq[dt][2 * r] * p.scale_f32, acc_dq[dt][2 * r + 1] * p.scale_f32));
    }
  }
}

}  // namespace fa
