// Dropout of the attention probabilities, as every backend draws it (fused_attn/dropout.py is the
// definition and the reference): element (b, h, i, j) of the (batch, heads_q, len_q, len_k)
// probability matrix (varlen: b = 0, i and j the packed rows) takes output j % 4 of Philox-4x32-10
// (Random123's) with key (seed low word, seed high word) and counter (j / 4, i, b * heads_q + h, 0);
// it is dropped iff that output is below `threshold`, and a kept one is multiplied by
// `keep_scale`. Nothing is stored: the backward draws the same outputs again.
//
// Plain C++ with host/device annotations: included by attn_params.h (its FA_COMMON_FN), not alone.
#pragma once

#include <cstdint>

namespace fused_attn {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;      // Weyl increments of the key
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u, kPhiloxRoundB = 0xCD9E8D57u;  // round multipliers
constexpr int kPhiloxRounds = 10;
constexpr int kKeysPerPhilox = 4;  // one call's outputs: keys 4c .. 4c + 3 of a row

// Philox-4x32-10 of counter x under key (k0, k1), in place.
FA_COMMON_FN void philox4x32_10(uint32_t& x0, uint32_t& x1, uint32_t& x2, uint32_t& x3, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxRoundB) * x2, p2 = static_cast<uint64_t>(kPhiloxRoundA) * x0;
    x0 = static_cast<uint32_t>(p0 >> 32) ^ x1 ^ k0;
    x2 = static_cast<uint32_t>(p2 >> 32) ^ x3 ^ k1;
    x1 = static_cast<uint32_t>(p0);
    x3 = static_cast<uint32_t>(p2);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}

struct Dropout {
  bool on = false;
  uint64_t seed = 0;
  uint32_t threshold = 0;   // dropped iff the element's output < threshold: floor(p 2^32), at most 2^32 - 1
  double keep_scale = 1.0;  // 1 / (1 - p); 0 for p = 1 (everything dropped)

  FA_COMMON_FN uint32_t key_lo() const { return static_cast<uint32_t>(seed); }
  FA_COMMON_FN uint32_t key_hi() const { return static_cast<uint32_t>(seed >> 32); }
};

// The Dropout of probability p (in [0, 1]) and seed.
FA_COMMON_FN Dropout make_dropout(double p, uint64_t seed) {
  Dropout d;
  d.on = p > 0.0;
  d.seed = seed;
  const double t = p * 4294967296.0;
  d.threshold = t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
  d.keep_scale = p >= 1.0 ? 0.0 : 1.0 / (1.0 - p);
  return d;
}

}  // namespace fused_attn
