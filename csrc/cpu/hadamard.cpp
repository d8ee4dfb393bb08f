// CPU Hadamard transform: rows in parallel (OpenMP), each row in a thread-local fp32 buffer; the
// butterflies and the H_m step run as contiguous loops the compiler vectorizes (one clone per ISA).
#include "lowbit/hadamard.h"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "cpu/isa_clones.h"
#include "lowbit/element_io.h"

namespace lowbit {
namespace {

// Eight floats as one GCC vector: AVX in the v3/v4 clones, SSE pairs in the default one.
typedef float v8 __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));

__attribute__((always_inline)) inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
__attribute__((always_inline)) inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }

// Butterflies of stride 1, 2 and 4 inside one vector of eight (the first three stages).
__attribute__((always_inline)) inline v8 fwht8(v8 v) {
  const v8i lo1 = {0, 0, 2, 2, 4, 4, 6, 6}, hi1 = {1, 1, 3, 3, 5, 5, 7, 7};
  const v8i lo2 = {0, 1, 0, 1, 4, 5, 4, 5}, hi2 = {2, 3, 2, 3, 6, 7, 6, 7};
  const v8i lo4 = {0, 1, 2, 3, 0, 1, 2, 3}, hi4 = {4, 5, 6, 7, 4, 5, 6, 7};
  const v8 s1 = {1, -1, 1, -1, 1, -1, 1, -1}, s2 = {1, 1, -1, -1, 1, 1, -1, -1}, s4 = {1, 1, 1, 1, -1, -1, -1, -1};
  v = __builtin_shuffle(v, lo1) + s1 * __builtin_shuffle(v, hi1);
  v = __builtin_shuffle(v, lo2) + s2 * __builtin_shuffle(v, hi2);
  return __builtin_shuffle(v, lo4) + s4 * __builtin_shuffle(v, hi4);
}

// Unnormalized Sylvester transform of one contiguous run of 2^log2_len floats.
LOWBIT_ISA_CLONES void fwht_run(float* x, int log2_len) {
  const int len = 1 << log2_len;
  if (len < 8) {
    fwht_inplace(x, log2_len);
    return;
  }
  for (int i = 0; i < len; i += 8) store8(x + i, fwht8(load8(x + i)));
  for (int h = 8; h < len; h <<= 1)
    for (int i = 0; i < len; i += 2 * h)
      for (int j = i; j < i + h; j += 8) {
        const v8 a = load8(x + j), b = load8(x + j + h);
        store8(x + j, a + b);
        store8(x + j + h, a - b);
      }
}

// out[a][j0 + 8v + i] = sum_a2 hm[a][a2] * x[a2][j0 + 8v + i] for four rows a at once and NV vectors of
// columns, the 4 x NV accumulators held in registers while x streams through (m is a multiple of 4).
template <int NV>
__attribute__((always_inline)) inline void m_step_tile(const float* __restrict hm, int m, int p, int j0, const float* __restrict x,
                        float* __restrict out) {
  for (int a = 0; a < m; a += 4) {
    v8 acc[4][NV] = {};
    for (int a2 = 0; a2 < m; ++a2) {
      const float* xi = x + int64_t(a2) * p + j0;
      v8 xv[NV];
      for (int v = 0; v < NV; ++v) xv[v] = load8(xi + 8 * v);
      for (int r = 0; r < 4; ++r) {
        const float sr = hm[(a + r) * m + a2];
        for (int v = 0; v < NV; ++v) acc[r][v] += sr * xv[v];
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int v = 0; v < NV; ++v) store8(out + int64_t(a + r) * p + j0 + 8 * v, acc[r][v]);
  }
}

// out[a][:] = sum_a2 hm[a][a2] * x[a2][:] over rows of length p (hm: H_m or its transpose, dense +-1).
LOWBIT_ISA_CLONES void hadamard_m_step(const float* hm, int m, int p, const float* __restrict x,
                                       float* __restrict out) {
  int j0 = 0;
  for (; j0 + 32 <= p; j0 += 32) m_step_tile<4>(hm, m, p, j0, x, out);
  for (; j0 + 8 <= p; j0 += 8) m_step_tile<1>(hm, m, p, j0, x, out);
  for (; j0 < p; ++j0)  // p < 8: plain dot products
    for (int a = 0; a < m; ++a) {
      float acc = 0.0f;
      for (int a2 = 0; a2 < m; ++a2) acc += hm[a * m + a2] * x[int64_t(a2) * p + j0];
      out[int64_t(a) * p + j0] = acc;
    }
}

// H_m (or its transpose) expanded to a dense +-1 float matrix.
std::vector<float> dense_sign_matrix(int m, bool transpose) {
  std::vector<float> d(size_t(m) * m, 1.0f);
  const HadamardTable* t = hadamard_table(m);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < m; ++j)
      d[size_t(i) * m + j] = transpose ? hadamard_sign(kHadamardRowBits + t->offset, t->words_per_row, j, i)
                                       : hadamard_sign(kHadamardRowBits + t->offset, t->words_per_row, i, j);
  return d;
}

template <typename IO>
void run(const TensorView& x, const TensorView& out, const float* signs, float scale, bool inverse, int log2_p,
         int m) {
  const int64_t n = x.size(-1);
  const int64_t rows = n ? x.numel() / n : 0;
  const int p = 1 << log2_p;
  const std::vector<float> hm = m > 1 ? dense_sign_matrix(m, inverse) : std::vector<float>();
  const auto* src = x.ptr<typename IO::storage>();
  auto* dst = out.ptr<typename IO::storage>();
#pragma omp parallel
  {
    std::vector<float> buf(n), tmp(m > 1 ? n : 0);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t base = r * n;
      for (int64_t i = 0; i < n; ++i) buf[i] = IO::load(src, base + i) * (signs && !inverse ? signs[i] : 1.0f);
      for (int a = 0; a < m; ++a) fwht_run(buf.data() + int64_t(a) * p, log2_p);
      const float* res = buf.data();
      if (m > 1) {
        hadamard_m_step(hm.data(), m, p, buf.data(), tmp.data());
        res = tmp.data();
      }
      for (int64_t i = 0; i < n; ++i) IO::store(dst, base + i, res[i] * scale * (signs && inverse ? signs[i] : 1.0f));
    }
  }
}

}  // namespace

void hadamard_transform_cpu(const TensorView& x, const TensorView& out, const TensorView* signs, float scale,
                            bool inverse) {
  int log2_p = 0, m = 1;
  if (!hadamard_factor(x.size(-1), &log2_p, &m))
    throw std::invalid_argument("hadamard_transform: unsupported size " + std::to_string(x.size(-1)));
  const float* s = signs ? signs->ptr<float>() : nullptr;
  switch (x.dtype) {
    case DType::f32: run<F32>(x, out, s, scale, inverse, log2_p, m); break;
    case DType::f16: run<F16>(x, out, s, scale, inverse, log2_p, m); break;
    case DType::bf16: run<BF16>(x, out, s, scale, inverse, log2_p, m); break;
    default: throw type_error("hadamard_transform: x must be float32, float16 or bfloat16");
  }
}

}  // namespace lowbit
