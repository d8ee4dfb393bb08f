// CPU Hadamard transform: rows in parallel (OpenMP), each row in a thread-local fp32 buffer; the
// butterflies and the H_m step run as contiguous loops the compiler vectorizes (one clone per ISA).
#include "lowbit/hadamard.h"

#include <cmath>
#include <stdexcept>
#include <vector>

#include "lowbit/element_io.h"

namespace lowbit {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LOWBIT_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LOWBIT_ISA_CLONES
#endif

// Unnormalized Sylvester transform of one contiguous run of 2^log2_len floats.
LOWBIT_ISA_CLONES void fwht_run(float* x, int log2_len) {
  const int len = 1 << log2_len;
  if (len < 8) {
    fwht_inplace(x, log2_len);
    return;
  }
  for (int i = 0; i < len; i += 8) {  // strides 1, 2, 4 inside blocks of eight
    float* v = x + i;
    butterfly(v[0], v[1]); butterfly(v[2], v[3]); butterfly(v[4], v[5]); butterfly(v[6], v[7]);
    butterfly(v[0], v[2]); butterfly(v[1], v[3]); butterfly(v[4], v[6]); butterfly(v[5], v[7]);
    butterfly(v[0], v[4]); butterfly(v[1], v[5]); butterfly(v[2], v[6]); butterfly(v[3], v[7]);
  }
  for (int h = 8; h < len; h <<= 1)
    for (int i = 0; i < len; i += 2 * h) {
      float* __restrict a = x + i;
      float* __restrict b = x + i + h;
      for (int j = 0; j < h; ++j) {
        const float t = a[j];
        a[j] = t + b[j];
        b[j] = t - b[j];
      }
    }
}

// out[a][:] = sum_a2 H_m[a][a2] * x[a2][:] (transposed: H_m[a2][a]) over rows of length p.
LOWBIT_ISA_CLONES void hadamard_m_step(const float* signs_m, int m, int p, const float* __restrict x,
                                       float* __restrict out) {
  for (int a = 0; a < m; ++a) {
    float* __restrict o = out + int64_t(a) * p;
    for (int j = 0; j < p; ++j) o[j] = 0.0f;
    for (int a2 = 0; a2 < m; ++a2) {
      const float s = signs_m[a * m + a2];
      const float* __restrict xi = x + int64_t(a2) * p;
      for (int j = 0; j < p; ++j) o[j] += s * xi[j];
    }
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
