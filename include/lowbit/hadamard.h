// Hadamard transform: supported sizes, the shared element logic (butterflies, the H_m step) and the
// kernel entry points.
//
// Convention: for n = 2^k * m, element i = a * 2^k + b (a < m, b < 2^k) and H_n = H_m (x) H_{2^k}
// (Kronecker product, Sylvester H_{2^k}; H_m from hadamard_tables.h). The transform computes
//   forward:  out = scale * H_n * (signs .* x)
//   inverse:  out = signs .* (scale * H_n^T * x)
// so with scale = 1/sqrt(n) the inverse undoes the forward (H_m need not be symmetric).
#pragma once
#include <cstdint>

#include "lowbit/common.h"
#include "lowbit/hadamard_tables.h"
#include "lowbit/tensor_view.h"

namespace lowbit {

constexpr int kHadamardMaxN = 32768;
constexpr int kHadamardNumTables = int(sizeof(kHadamardTables) / sizeof(kHadamardTables[0]));

// The table for factor m, or nullptr (m == 1 needs none).
inline const HadamardTable* hadamard_table(int m) {
  for (const HadamardTable& t : kHadamardTables)
    if (t.m == m) return &t;
  return nullptr;
}

// Splits n = 2^log2_pow * m with m a supported factor; false when n has no such form.
inline bool hadamard_factor(int64_t n, int* log2_pow, int* m) {
  if (n < 1 || n > kHadamardMaxN) return false;
  int k = 0;
  while ((n & 1) == 0) {
    n >>= 1;
    ++k;
  }
  // n is now odd; try every supported m = 2^j * odd with the same odd part and j <= k
  if (n == 1) {
    *log2_pow = k;
    *m = 1;
    return true;
  }
  for (const HadamardTable& t : kHadamardTables) {
    int j = 0, odd = t.m;
    while ((odd & 1) == 0) {
      odd >>= 1;
      ++j;
    }
    if (odd == n && j <= k) {
      *log2_pow = k - j;
      *m = t.m;
      return true;
    }
  }
  return false;
}

// +1 or -1: entry (i, j) of H_m given its row bit masks.
LOWBIT_HD float hadamard_sign(const uint64_t* rows, int words_per_row, int i, int j) {
  return ((rows[i * words_per_row + (j >> 6)] >> (j & 63)) & 1ull) ? -1.0f : 1.0f;
}

// One radix-2 butterfly: (a, b) -> (a + b, a - b).
LOWBIT_HD void butterfly(float& a, float& b) {
  const float t = a;
  a = t + b;
  b = t - b;
}

// In-place unnormalized Sylvester transform of the len = 2^log2_len contiguous values at x.
LOWBIT_HD void fwht_inplace(float* x, int log2_len) {
  const int len = 1 << log2_len;
  for (int h = 1; h < len; h <<= 1)
    for (int i = 0; i < len; i += 2 * h)
      for (int j = i; j < i + h; ++j) butterfly(x[j], x[j + h]);
}

// Entry points. x and out: contiguous [rows, n] of the same float dtype; signs: nullptr or float32 [n].
void hadamard_transform_cpu(const TensorView& x, const TensorView& out, const TensorView* signs, float scale,
                            bool inverse);
void hadamard_transform_cuda(const TensorView& x, const TensorView& out, const TensorView* signs, float scale,
                             bool inverse, int64_t stream);

}  // namespace lowbit
