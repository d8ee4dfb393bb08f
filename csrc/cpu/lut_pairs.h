// The 2-bit pair-table GEMV of the CPU LUT GEMM (gemm_lut_pairs.cpp), which gemm_lut.cpp calls for a few rows
// of x on AVX-512 CPUs.
#pragma once
#include <cstdint>

namespace lowbit {

//! Rows of x up to which the 2-bit LUT GEMM takes the pair-table path (its tables grow with M: 512 B per code
//! word and row of x, 352 KB per row at K = 11008, read from L2).
constexpr int64_t kLutPairMaxRows = 4;
//! Weight rows from which it does (below, its 32-row tasks would leave a core idle: 4096 x 32 took 24 us against
//! 14 us for the per-row kernel).
constexpr int64_t kLutPairMinN = 64;

struct LutPairArgs {
  const uint32_t* packed;  // 2-bit codes: canonical [n, wpr], or interleaved [ceil(n / 32), wpr, 32]
  bool interleaved;        // which of the two (lut_gemm.h)
  int64_t wpr;             // words per row (16 codes each; a multiple of 2)
  const uint16_t* scales;  // fp16 [n, groups]
  const uint16_t* zeros;   // fp16 [n, groups], or nullptr for zero = 0
  int64_t groups;
  int group_size;      // 32, 64 or 128
  const float* table;  // the 4 table entries
  const float* x;      // fp32 [m, wpr * 16] in natural order, zero past K
  float* y;            // fp32 [m, n]
  int64_t m, n;
};

// y = x . W_hat^T, W_hat[r, k] = scale[r, g] * (table[q[r, k]] - zero[r, g]), for m <= kLutPairMaxRows. Needs
// AVX-512 F (the caller checks cpu_isa()).
void lut2_pairs_gemv_avx512(const LutPairArgs& a);

}  // namespace lowbit
