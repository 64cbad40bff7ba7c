// Tuning and numeric constants of the CPU attention kernels, in one visible place.
#pragma once

#include <cstdint>

namespace fused_attn::cpu {

constexpr double LOG2E = 1.4426950408889634;  // log2(e): softmax runs in the exp2 domain
constexpr double LN2 = 0.6931471805599453;    // ln(2): lse back to the natural log

// Forward online softmax (fp32: SoftmaxEpilogue; 16-bit: online_softmax_avx512): a row's
// exp2 reference stays put until a score exceeds it by more than this (log2 units), so
// P <= 2^8 and a row sum <= S * 2^8, far inside fp32's, bf16's and fp16's range; moving it
// rescales or recomputes the row's P so far.
constexpr float LAZY_MAX_SLACK = 8.0f;

// Backward: a row whose lse (log2 units) exceeds this in magnitude has its exp2 reference
// and row sum recomputed from the backward's own scores before P is formed (bwd_kernel.h):
// the stored lse's rounding (|lse| 2^-24 in fp32, 2^-53 in fp64) would pass to every P of
// the row, and beyond ~2^24 (fp32 lse; scale 1e9 on randn) make P 0 or inf. Typical rows
// (lse2 ~ log2 S + a few) stay below it and cost nothing. fp32 lse (bf16 / fp16 inputs)
// and fp64 inputs: 32. fp32 inputs save their lse in fp64, whose rounding stays below
// 2^-32 up to 2^20.
constexpr double LSE2_RECOMPUTE_ABOVE = 32.0;
constexpr double LSE2_RECOMPUTE_ABOVE_FP64_LSE = 1048576.0;  // 2^20

// Tile sizes (measured on a 2-core Emerald Rapids Xeon, E 64-128, L 1024-2048; the
// machine is shared and noisy, so differences under ~5% were not resolved).
// A forward task owns block_q query rows and walks the keys block_k at a time; its
// scratch (scores, P, output accumulator) stays in L2. A backward task owns block_k keys
// (dK/dV accumulators) and walks the query blocks of every q head in its kv head's group
// block_q rows at a time.
struct TileConfig {
  int64_t block_q;
  int64_t block_k;
};
// Forward, bf16 / fp16 (brgemm) and BLAS paths. block_k: a multiple of PackedKV::PANEL.
constexpr TileConfig FWD_TILE{128, 512};
// Forward, fp32 on the AVX-512 micro-kernel: block_q a multiple of its 6 rows.
constexpr TileConfig FWD_TILE_FP32{120, 512};
// Backward, every path.
constexpr TileConfig BWD_TILE{128, 128};

// Forward: packing K^T (and V) for the micro-kernel / brgemm is one more pass over a kv head, which
// the query rows that read the packed head (L x the GQA group) must repay; with fewer rows than this
// (decoding: one row per query head, GQA heads stacked) and at least FWD_IN_PLACE_MIN_KEYS keys (where
// the pass costs more than the call's fixed costs) the forward reads K and V in place through BLAS
// (fwd_packs_kv). The fp32 backward then forms P from its own row max and sum (bwd_kernel.h step 1b),
// as its micro-kernel does not reproduce BLAS's scores to the last bit. Measured on (1, 8, 1, 1024, 64)
// fp32 decoding: the packed forward took ~25% longer.
constexpr int64_t FWD_PACK_MIN_ROWS = 16;
constexpr int64_t FWD_IN_PLACE_MIN_KEYS = 512;
// Split-KV (fwd_kernel.h): a forward with fewer tasks than threads cuts each task's keys into chunks of at
// least this many keys (and only with twice as many), computed by separate threads and combined.
constexpr int64_t FWD_SPLIT_MIN_KEYS = 512;

// Whether the forward packs each kv head (see FWD_PACK_MIN_ROWS): heads_q / heads_kv query heads share it.
inline bool fwd_packs_kv(int64_t len_q, int64_t heads_q, int64_t heads_kv, int64_t len_k) {
  return len_q * (heads_q / heads_kv) >= FWD_PACK_MIN_ROWS || len_k < FWD_IN_PLACE_MIN_KEYS;
}

}  // namespace fused_attn::cpu
