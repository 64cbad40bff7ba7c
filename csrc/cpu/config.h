// Tuning and numeric constants of the CPU attention kernels, in one visible place.
#pragma once

#include <cstdint>

namespace fused_attn::cpu {

constexpr double LOG2E = 1.4426950408889634;  // log2(e): softmax runs in the exp2 domain
constexpr double LN2 = 0.6931471805599453;    // ln(2): lse back to the natural log

// Largest head dim (of q/k and of v) the kernels take.
constexpr int64_t MAX_HEAD_DIM = 256;

// Tile sizes (measured on a 2-core Sapphire/Emerald Rapids Xeon, fp32 and bf16, E 64-128).
// A forward task owns FWD_TILE.block_q query rows and walks the keys block_k at a time;
// its scratch (scores, P, output accumulator) stays in L2. A backward task owns
// BWD_TILE.block_k keys (dK/dV accumulators) and walks the query blocks of every q head
// in its kv head's group block_q rows at a time.
struct TileConfig {
  int64_t block_q;
  int64_t block_k;
};
constexpr TileConfig FWD_TILE{128, 256};  // block_k: a multiple of PackedKV::PANEL
constexpr TileConfig BWD_TILE{128, 128};

}  // namespace fused_attn::cpu
