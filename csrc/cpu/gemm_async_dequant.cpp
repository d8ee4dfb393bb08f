// CPU asynchronous-dequantization 2/4-bit GEMM over the aligned layout (async_dequant.h), and the int8
// activation quantization it multiplies.
// GEMM: tasks of 16 weight rows x 64 rows of x run in parallel (OpenMP). For each weight row and group, up to 4
// rows of x at a time: every 32-code run of the group is one 32-byte load of its chunk, one shift and one mask
// (the 32 codes as bytes), then per row of x one vpmaddubsw against the 32 contiguous int8 activations, summed
// in int16 lanes over the group (at most 4 runs: |sum| <= 4 * 2 * 15 * 127 fits), widened once per group and
// scaled in fp32 by scale * d. The next weight row is prefetched while the current one is unpacked. The zero
// correction sum_g scale * zero * d * sum(xq) uses per-group activation sums computed once per call. AVX2 is
// chosen at run time (LOWBIT_CPU_ISA=scalar forces the portable path); the portable path computes the same
// integers through aligned_code.
#include "lowbit/async_dequant.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LOWBIT_ASYNC_X86 1
#include <immintrin.h>
#endif

#include "lowbit/element_io.h"
#include "lowbit/half.h"

namespace lowbit {
namespace {

constexpr int kRowsPerTask = 16;
constexpr int64_t kXRowsPerTask = 64;
constexpr int kMaxMr = 4;

struct AsyncArgs;
using RowsFn = void (*)(const AsyncArgs&, int64_t, int64_t);
struct RowsFnTable {
  RowsFn by_mr[kMaxMr];  // by rows of x - 1
};

struct AsyncArgs {
  const int8_t* xq;
  int64_t kp;         // padded K of xq
  const float* d;     // [M, groups]
  const float* u;     // [M, groups]: d * (sum of the group's xq), the zero correction's activation factor
  const uint8_t* packed;
  int64_t row_bytes;
  const uint16_t* scales;
  const uint16_t* zeros;
  int64_t groups, k, m, n;
  int bits, group_size;
  float* y;  // [M, N] fp32
};

// The zero correction sum_g scale * zero * u of a weight row for rows m0..m0+mr of x.
inline void zero_correction(const AsyncArgs& a, int64_t row, int64_t m0, int mr, float* corr) {
  for (int i = 0; i < mr; ++i) corr[i] = 0.0f;
  for (int64_t g = 0; g < a.groups; ++g) {
    const float sz = half_to_float(a.scales[row * a.groups + g]) * half_to_float(a.zeros[row * a.groups + g]);
    for (int i = 0; i < mr; ++i) corr[i] += sz * a.u[(m0 + i) * a.groups + g];
  }
}

template <int MR>
void rows_portable(const AsyncArgs& a, int64_t row, int64_t m0) {
  const uint8_t* codes = a.packed + row * a.row_bytes;
  float acc[MR] = {};
  for (int64_t g = 0; g < a.groups; ++g) {
    const int64_t k0 = g * a.group_size, k1 = std::min(a.k, k0 + a.group_size);
    const float s = half_to_float(a.scales[row * a.groups + g]);
    for (int i = 0; i < MR; ++i) {
      const int8_t* x = a.xq + (m0 + i) * a.kp;
      int32_t dot = 0;
      for (int64_t k = k0; k < k1; ++k) dot += int32_t(aligned_code(codes, k, a.bits)) * x[k];
      acc[i] += s * a.d[(m0 + i) * a.groups + g] * float(dot);
    }
  }
  float corr[MR];
  zero_correction(a, row, m0, MR, corr);
  for (int i = 0; i < MR; ++i) a.y[(m0 + i) * a.n + row] = acc[i] - corr[i];
}

#ifdef LOWBIT_ASYNC_X86
#define LOWBIT_AVX2 __attribute__((target("avx2,fma,f16c")))

LOWBIT_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// zero_correction with 8 groups per step (F16C conversions of the fp16 scales and zeros).
LOWBIT_AVX2 inline void zero_correction_avx2(const AsyncArgs& a, int64_t row, int64_t m0, int mr, float* corr) {
  const uint16_t* sc = a.scales + row * a.groups;
  const uint16_t* zc = a.zeros + row * a.groups;
  for (int i = 0; i < mr; ++i) {
    const float* u = a.u + (m0 + i) * a.groups;
    __m256 acc = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= a.groups; g += 8) {
      const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + g)));
      const __m256 z = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zc + g)));
      acc = _mm256_fmadd_ps(_mm256_mul_ps(s, z), _mm256_loadu_ps(u + g), acc);
    }
    float tail = 0.0f;
    for (; g < a.groups; ++g) tail += _cvtsh_ss(sc[g]) * _cvtsh_ss(zc[g]) * u[g];
    corr[i] = hsum(acc) + tail;
  }
}

// The 32 codes of run r (k = 32 r .. 32 r + 31) of a BITS-wide aligned row, as bytes.
template <int BITS>
LOWBIT_AVX2 inline __m256i run_codes(const uint8_t* codes, int64_t r) {
  constexpr int kRuns = 8 / BITS;  // runs per 32-byte chunk
  const __m256i chunk = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + (r / kRuns) * 32));
  return _mm256_and_si256(_mm256_srli_epi16(chunk, int(r % kRuns) * BITS), _mm256_set1_epi8((1 << BITS) - 1));
}

// Adds the int16 sums of runs r0..r1 (the 32 codes of each against 32 int8 activations) for MR rows of x.
template <int MR, int BITS>
LOWBIT_AVX2 inline void add_runs(const AsyncArgs& a, const uint8_t* codes, int64_t m0, int64_t r0, int64_t r1,
                                 __m256i* sum16) {
  for (int64_t r = r0; r < r1; ++r) {
    const __m256i q = run_codes<BITS>(codes, r);
    for (int i = 0; i < MR; ++i) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + (m0 + i) * a.kp + r * 32));
      sum16[i] = _mm256_add_epi16(sum16[i], _mm256_maddubs_epi16(q, x));
    }
  }
}

// One weight row against MR rows of x, for groups of RPG runs (group_size / 32): whole groups run a loop of
// compile-time length, a short last group the general one.
template <int MR, int RPG, int BITS>
LOWBIT_AVX2 void rows_avx2(const AsyncArgs& a, int64_t row, int64_t m0) {
  const uint8_t* codes = a.packed + row * a.row_bytes;
  if (row + 1 < a.n) _mm_prefetch(reinterpret_cast<const char*>(codes + a.row_bytes), _MM_HINT_T0);
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t runs = (a.k + 31) / 32;
  const int64_t whole = std::min(a.groups, runs / RPG);
  __m256 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < a.groups; ++g) {
    __m256i sum16[MR];
    for (int i = 0; i < MR; ++i) sum16[i] = _mm256_setzero_si256();
    const int64_t r0 = g * RPG;
    if (g < whole) {
      for (int c = 0; c < RPG; ++c) {
        const int64_t r = r0 + c;
        const __m256i q = run_codes<BITS>(codes, r);
        for (int i = 0; i < MR; ++i) {
          const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + (m0 + i) * a.kp + r * 32));
          sum16[i] = _mm256_add_epi16(sum16[i], _mm256_maddubs_epi16(q, x));
        }
      }
    } else {
      add_runs<MR, BITS>(a, codes, m0, r0, std::min(runs, r0 + RPG), sum16);
    }
    const float s = _cvtsh_ss(a.scales[row * a.groups + g]);
    for (int i = 0; i < MR; ++i) {
      const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum16[i], ones));
      acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(s * a.d[(m0 + i) * a.groups + g]), dot, acc[i]);
    }
  }
  float corr[MR];
  zero_correction_avx2(a, row, m0, MR, corr);
  for (int i = 0; i < MR; ++i) a.y[(m0 + i) * a.n + row] = hsum(acc[i]) - corr[i];
}

template <int RPG, int BITS>
constexpr RowsFnTable avx2_table() {
  return {{rows_avx2<1, RPG, BITS>, rows_avx2<2, RPG, BITS>, rows_avx2<3, RPG, BITS>, rows_avx2<4, RPG, BITS>}};
}
#endif


// AVX2 when the CPU has it, unless the environment variable LOWBIT_CPU_ISA=scalar (read once) asks for the
// portable path.
// Kernel tables by bits (2, 4 -> 0, 1) and group size (32, 64, 128 -> 0, 1, 2).
struct RowsKernels {
  RowsFnTable by_bits_group[2][3];
};

RowsKernels select_kernels() {
  constexpr RowsFnTable portable_table{{rows_portable<1>, rows_portable<2>, rows_portable<3>, rows_portable<4>}};
#ifdef LOWBIT_ASYNC_X86
  const char* isa = std::getenv("LOWBIT_CPU_ISA");
  const bool portable = isa != nullptr && std::strcmp(isa, "scalar") == 0;
  if (!portable && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return {{{avx2_table<1, 2>(), avx2_table<2, 2>(), avx2_table<4, 2>()},
             {avx2_table<1, 4>(), avx2_table<2, 4>(), avx2_table<4, 4>()}}};
#endif
  return {{{portable_table, portable_table, portable_table}, {portable_table, portable_table, portable_table}}};
}

template <typename IO>
void quantize_rows(const typename IO::storage* x, int64_t m, int64_t k, int64_t kp, int group_size, int8_t* xq,
                   float* d) {
  const int64_t groups = (k + group_size - 1) / group_size;
#pragma omp parallel for schedule(static) if (m * k >= (int64_t(1) << 16))
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * group_size, k1 = std::min(k, k0 + group_size);
      float amax = 0.0f;
      for (int64_t j = k0; j < k1; ++j) amax = std::max(amax, std::fabs(IO::load(x, i * k + j)));
      const float mul = act_quant_multiplier(amax);
      d[i * groups + g] = act_quant_scale(amax);
      for (int64_t j = k0; j < k1; ++j) xq[i * kp + j] = act_quant_code(IO::load(x, i * k + j), mul);
    }
    std::memset(xq + i * kp + k, 0, size_t(kp - k));
  }
}

template <typename IO>
void store_rows(const float* y, int64_t count, typename IO::storage* out) {
  for (int64_t i = 0; i < count; ++i) IO::store(out, i, y[i]);
}

}  // namespace

void quantize_activations_cpu(const TensorView& x, const TensorView& xq, const TensorView& d, int group_size) {
  const int64_t m = x.size(0), k = x.size(1), kp = xq.size(1);
  int8_t* q = xq.ptr<int8_t>();
  float* dp = d.ptr<float>();
  switch (x.dtype) {
    case DType::f32: quantize_rows<F32>(x.ptr<float>(), m, k, kp, group_size, q, dp); break;
    case DType::f16: quantize_rows<F16>(x.ptr<uint16_t>(), m, k, kp, group_size, q, dp); break;
    case DType::bf16: quantize_rows<BF16>(x.ptr<uint16_t>(), m, k, kp, group_size, q, dp); break;
    default: throw type_error("quantize_activations: x must be float32, float16 or bfloat16");
  }
}

void async_dequant_gemm_cpu(const TensorView& xq, const TensorView& d, const TensorView& packed,
                            const TensorView& scales, const TensorView& zeros, const TensorView& out, int64_t k,
                            int bits, int group_size) {
  const int64_t m = xq.size(0), n = packed.size(0);
  if (m == 0 || n == 0) return;
  const int64_t groups = d.size(1), kp = xq.size(1);
  std::vector<float> u(size_t(m * groups));
  const int8_t* xqp = xq.ptr<int8_t>();
  const float* dp = d.ptr<float>();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t g = 0; g < groups; ++g) {
      int32_t s = 0;
      for (int64_t j = g * group_size, e = std::min(k, (g + 1) * group_size); j < e; ++j) s += xqp[i * kp + j];
      u[size_t(i * groups + g)] = dp[i * groups + g] * float(s);
    }
  const bool direct = out.dtype == DType::f32;
  std::vector<float> staging(direct ? 0 : size_t(m * n));
  AsyncArgs a{xqp, kp, dp, u.data(), static_cast<const uint8_t*>(packed.data),
              aligned_words_per_row(k, bits) * 4, scales.ptr<uint16_t>(), zeros.ptr<uint16_t>(), groups, k, m, n,
              bits, group_size, direct ? out.ptr<float>() : staging.data()};
  static const RowsKernels kernels = select_kernels();
  const int group_index = group_size == 32 ? 0 : group_size == 64 ? 1 : 2;
  const RowsFnTable& table = kernels.by_bits_group[bits == 2 ? 0 : 1][group_index];
  const int64_t row_tasks = (n + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t m_tasks = (m + kXRowsPerTask - 1) / kXRowsPerTask;
#pragma omp parallel for schedule(static) if (m * n * k >= (int64_t(1) << 18))
  for (int64_t task = 0; task < row_tasks * m_tasks; ++task) {
    const int64_t n0 = (task % row_tasks) * kRowsPerTask, n1 = std::min(n, n0 + kRowsPerTask);
    const int64_t mt0 = (task / row_tasks) * kXRowsPerTask, mt1 = std::min(m, mt0 + kXRowsPerTask);
    for (int64_t m0 = mt0; m0 < mt1; m0 += kMaxMr) {
      const RowsFn fn = table.by_mr[std::min<int64_t>(kMaxMr, mt1 - m0) - 1];
      for (int64_t row = n0; row < n1; ++row) fn(a, row, m0);
    }
  }
  if (direct) return;
  if (out.dtype == DType::f16)
    store_rows<F16>(staging.data(), m * n, out.ptr<uint16_t>());
  else
    store_rows<BF16>(staging.data(), m * n, out.ptr<uint16_t>());
}

}  // namespace lowbit
