// Lookup-table GEMM (FLUTE-style): y = x . W_hat^T with W_hat[n, k] = scale[n, g] * (table[q[n, k]] - zero[n, g]),
// q in the canonical packed layout of pack.h, g = k / group_size. Element logic shared by the CPU and CUDA
// kernels, and the entry points.
//
// Both backends fold scale and zero into the table once per (row, group): the "fused table"
// T[i] = scale * (table[i] - zero), so the inner loop is one lookup and one FMA per code.
#pragma once
#include <cstdint>

#include "lowbit/common.h"
#include "lowbit/pack.h"
#include "lowbit/tensor_view.h"

namespace lowbit {

constexpr int kLutMaxEntries = 16;  // 2^4: tables have 2^bits entries, bits in {2, 3, 4}

LOWBIT_HD bool lut_gemm_bits_ok(int bits) { return bits >= 2 && bits <= 4; }
LOWBIT_HD bool lut_gemm_group_ok(int group_size) {
  return group_size == 32 || group_size == 64 || group_size == 128;
}

// One entry of the fused table of a (row, group).
LOWBIT_HD float lut_fused_entry(float table_value, float scale, float zero) { return scale * (table_value - zero); }

//! Weight rows per block of the interleaved code layout: codes[b][w][r] is word w of row 32 * b + r of the
//! canonical layout (zero past N), so the words of 32 consecutive rows at one position are contiguous.
constexpr int64_t kLutInterleaveRows = 32;

// Entry points. x: contiguous [M, K] fp32/fp16/bf16; packed: int32/uint32 [N, words_per_row(K, bits)]
// (canonical) or [ceil(N / 32), words_per_row(K, bits), 32] (interleaved; CPU only);
// scales (and zeros, or nullptr for zero = 0): fp16 [N, groups_for(K, group_size)]; table: fp32 [2^bits];
// out: contiguous [M, N] of x's dtype. Accumulation is fp32.
void lut_gemm_cpu(const TensorView& x, const TensorView& packed, const TensorView& scales, const TensorView* zeros,
                  const TensorView& table, const TensorView& out, int bits, int group_size);
void lut_gemm_cuda(const TensorView& x, const TensorView& packed, const TensorView& scales, const TensorView* zeros,
                   const TensorView& table, const TensorView& out, int bits, int group_size, int64_t stream);

}  // namespace lowbit
