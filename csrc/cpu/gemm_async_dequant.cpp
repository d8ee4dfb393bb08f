// CPU asynchronous-dequantization 2/4-bit GEMM over the aligned layout (async_dequant.h), the mixed 2/4-bit GEMM
// over the mixed aligned layout (the same run kernel over a 4-bit and a 2-bit segment, each run reading the
// activations of its K-run), and the int8 activation quantization they multiply.
// GEMM: tasks of 16 weight rows x 64 rows of x run in parallel (OpenMP). For each weight row and group, up to 4
// rows of x at a time: every 32-code run of the group is one 32-byte load of its chunk, one shift and one mask
// (the 32 codes as bytes), then per row of x one vpmaddubsw against the 32 contiguous int8 activations, summed
// in int16 lanes over the group (at most 4 runs: |sum| <= 4 * 2 * 15 * 127 fits), widened once per group and
// scaled in fp32 by scale * d. The next weight row is prefetched while the current one is unpacked. The zero
// correction sum_g scale * zero * d * sum(xq) uses per-group activation sums computed once per call.
// Table mode: the 32 codes of a run become their int8 table values by one vpshufb (the 16 table bytes in
// both lanes), multiplied by vpmaddubsw(|xq|, sign(tq, xq)) (|pair sums| <= 2 * 127 * 127) and widened to
// int32 per run; table_scale multiplies each row's sum once. The path follows cpu_isa.h: the AVX-512 VNNI row
// kernels of gemm_async_dequant_vnni.cpp, these AVX2 ones, or the portable path, which computes the same
// integers 4 columns at a time through aligned_codes4 / table_bytes4 / dot4_i8, the element logic of the CUDA
// kernel. The activation quantization runs 8 values at a time with AVX2.
#include "lowbit/async_dequant.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LOWBIT_ASYNC_X86 1
#include <immintrin.h>
#endif

#include "async_rows.h"
#include "lowbit/cpu_isa.h"
#include "lowbit/element_io.h"
#include "lowbit/half.h"

namespace lowbit {
namespace {

using namespace async_cpu;

constexpr int kRowsPerTask = 16;
constexpr int64_t kXRowsPerTask = 64;

// The zero correction sum_g scale * zero * u of a weight row for rows m0..m0+mr of x.
inline void zero_correction(const AsyncArgs& a, int64_t row, int64_t m0, int mr, float* corr) {
  for (int i = 0; i < mr; ++i) corr[i] = 0.0f;
  if (!a.zeros) return;
  for (int64_t g = 0; g < a.groups; ++g) {
    const float sz = half_to_float(a.scales[row * a.groups + g]) * half_to_float(a.zeros[row * a.groups + g]);
    for (int i = 0; i < mr; ++i) corr[i] += sz * a.u[(m0 + i) * a.groups + g];
  }
}

// 4 columns at a time (groups start at multiples of 32; xq is zero past K, so the codes there add nothing).
template <int MR>
void rows_portable(const AsyncArgs& a, int64_t row, int64_t m0) {
  const uint8_t* codes = a.packed + row * a.row_bytes;
  float acc[MR] = {};
  for (int64_t g = 0; g < a.groups; ++g) {
    const int64_t k0 = g * a.group_size, k1 = std::min(a.k, k0 + a.group_size);
    const float s = half_to_float(a.scales[row * a.groups + g]);
    int32_t dot[MR] = {};
    for (int64_t k = k0; k < k1; k += 4) {
      uint32_t w = aligned_codes4(codes, k, a.bits);
      if (a.tq) w = table_bytes4(w, a.tq);
      for (int i = 0; i < MR; ++i) {
        uint32_t x4;
        std::memcpy(&x4, a.xq + (m0 + i) * a.kp + k, 4);
        dot[i] += dot4_i8(w, x4);
      }
    }
    for (int i = 0; i < MR; ++i) acc[i] += s * a.d[(m0 + i) * a.groups + g] * float(dot[i]);
  }
  float corr[MR];
  zero_correction(a, row, m0, MR, corr);
  for (int i = 0; i < MR; ++i) a.y[(m0 + i) * a.n + row] = a.ts * acc[i] - corr[i];
}

// Mixed layout: both segments, 4 columns at a time; segment run s reads the activations at xcol[s].
template <int MR>
void rows_mixed_portable(const AsyncArgs& a, int64_t row, int64_t m0) {
  float acc[MR] = {};
  for (int sg = 0; sg < 2; ++sg) {
    const MixedSegment& seg = a.mixed[sg];
    const int bits = sg == 0 ? 4 : 2, rpg = a.group_size / 32;
    const uint8_t* codes = a.packed + row * a.row_bytes + seg.byte_offset;
    int32_t dot[MR] = {};
    for (int64_t r = 0; r < seg.count; ++r) {
      for (int j = 0; j < 32; j += 4) {
        const uint32_t w = aligned_codes4(codes, 32 * r + j, bits);
        for (int i = 0; i < MR; ++i) {
          uint32_t x4;
          std::memcpy(&x4, a.xq + (m0 + i) * a.kp + seg.xcol[r] + j, 4);
          dot[i] += dot4_i8(w, x4);
        }
      }
      if ((r + 1) % rpg != 0 && r + 1 != seg.count) continue;
      const int64_t g = seg.xcol[r] / a.group_size;
      const float sc = half_to_float(a.scales[row * a.groups + g]);
      for (int i = 0; i < MR; ++i) {
        acc[i] += sc * a.d[(m0 + i) * a.groups + g] * float(dot[i]);
        dot[i] = 0;
      }
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
  if (!a.zeros) {
    for (int i = 0; i < mr; ++i) corr[i] = 0.0f;
    return;
  }
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

// Adds run r (k = 32 r .. 32 r + 31: 32 codes against 32 int8 activations) of a BITS-wide row to the group
// sums of MR rows of x. Codes: vpmaddubsw(q, xq) into int16 lanes (at most 4 runs a group: |sum| <= 4 * 2 * 15
// * 127 fits). Table mode: tq[q] by vpshufb, vpmaddubsw(|xq|, sign(tq[q], xq)) widened to int32 lanes at once.
// xr: the K-run of the activations (r itself, except in a mixed segment).
template <int MR, int BITS, bool TABLE>
LOWBIT_AVX2 inline void add_run(const AsyncArgs& a, const uint8_t* codes, int64_t m0, int64_t r, int64_t xr,
                                __m256i table, __m256i* sum) {
  const __m256i q = run_codes<BITS>(codes, r);
  if constexpr (TABLE) {
    const __m256i w = _mm256_shuffle_epi8(table, q);
    for (int i = 0; i < MR; ++i) {
      const int64_t off = (m0 + i) * a.kp + xr * 32;
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + off));
      const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xa + off));
      const __m256i p = _mm256_maddubs_epi16(xa, _mm256_sign_epi8(w, x));
      sum[i] = _mm256_add_epi32(sum[i], _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
    }
  } else {
    for (int i = 0; i < MR; ++i) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + (m0 + i) * a.kp + xr * 32));
      sum[i] = _mm256_add_epi16(sum[i], _mm256_maddubs_epi16(q, x));
    }
  }
}

// One weight row against MR rows of x, for groups of RPG runs (group_size / 32): whole groups run a loop of
// compile-time length, a short last group the general one.
template <int MR, int RPG, int BITS, bool TABLE>
LOWBIT_AVX2 void rows_avx2(const AsyncArgs& a, int64_t row, int64_t m0) {
  const uint8_t* codes = a.packed + row * a.row_bytes;
  if (row + 1 < a.n) _mm_prefetch(reinterpret_cast<const char*>(codes + a.row_bytes), _MM_HINT_T0);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i table = TABLE ? _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.tq)))
                              : _mm256_setzero_si256();
  const int64_t runs = (a.k + 31) / 32;
  const int64_t whole = std::min(a.groups, runs / RPG);
  __m256 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < a.groups; ++g) {
    __m256i sum[MR];  // int16 lanes (codes) or int32 lanes (table)
    for (int i = 0; i < MR; ++i) sum[i] = _mm256_setzero_si256();
    const int64_t r0 = g * RPG;
    if (g < whole) {
      for (int c = 0; c < RPG; ++c) add_run<MR, BITS, TABLE>(a, codes, m0, r0 + c, r0 + c, table, sum);
    } else {
      for (int64_t r = r0, r1 = std::min(runs, r0 + RPG); r < r1; ++r)
        add_run<MR, BITS, TABLE>(a, codes, m0, r, r, table, sum);
    }
    const float s = _cvtsh_ss(a.scales[row * a.groups + g]);
    for (int i = 0; i < MR; ++i) {
      const __m256 dot = _mm256_cvtepi32_ps(TABLE ? sum[i] : _mm256_madd_epi16(sum[i], ones));
      acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(s * a.d[(m0 + i) * a.groups + g]), dot, acc[i]);
    }
  }
  float corr[MR];
  zero_correction_avx2(a, row, m0, MR, corr);
  for (int i = 0; i < MR; ++i) a.y[(m0 + i) * a.n + row] = a.ts * hsum(acc[i]) - corr[i];
}

// Flushes the int16 group sums of MR rows of x into acc (scale * d of group g) and clears them.
template <int MR>
LOWBIT_AVX2 inline void flush_group(const AsyncArgs& a, int64_t row, int64_t m0, int64_t g, __m256i* sum,
                                    __m256* acc) {
  const float sc = _cvtsh_ss(a.scales[row * a.groups + g]);
  for (int i = 0; i < MR; ++i) {
    const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum[i], _mm256_set1_epi16(1)));
    acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(sc * a.d[(m0 + i) * a.groups + g]), dot, acc[i]);
    sum[i] = _mm256_setzero_si256();
  }
}

// One segment of a mixed row (width BITS, groups of RPG runs) into acc: chunk by chunk, the runs of a chunk by
// immediate shifts, each against the activations of its K-run; a group's sums are flushed after its last run.
template <int MR, int BITS, int RPG>
LOWBIT_AVX2 inline void mixed_segment_avx2(const AsyncArgs& a, const MixedSegment& seg, int64_t row, int64_t m0,
                                           __m256* acc) {
  constexpr int kRuns = 8 / BITS;
  const uint8_t* codes = a.packed + row * a.row_bytes + seg.byte_offset;
  const __m256i mask = _mm256_set1_epi8((1 << BITS) - 1);
  __m256i sum[MR];
  for (int i = 0; i < MR; ++i) sum[i] = _mm256_setzero_si256();
  const int64_t whole = seg.count / kRuns;
  for (int64_t t = 0; t < whole; ++t) {
    const __m256i chunk = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32 * t));
#pragma GCC unroll 4
    for (int c = 0; c < kRuns; ++c) {
      const int64_t r = t * kRuns + c;
      const __m256i q = _mm256_and_si256(_mm256_srli_epi16(chunk, c * BITS), mask);
      for (int i = 0; i < MR; ++i) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + (m0 + i) * a.kp + seg.xcol[r]));
        sum[i] = _mm256_add_epi16(sum[i], _mm256_maddubs_epi16(q, x));
      }
      if (RPG <= kRuns ? (c + 1) % RPG == 0 : (r + 1) % RPG == 0)
        flush_group<MR>(a, row, m0, seg.xcol[r] / (32 * RPG), sum, acc);
    }
  }
  for (int64_t r = whole * kRuns; r < seg.count; ++r) {  // the runs of a last, partial chunk
    const __m256i chunk = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32 * whole));
    const __m256i q = _mm256_and_si256(_mm256_srl_epi16(chunk, _mm_cvtsi32_si128(int(r % kRuns) * BITS)), mask);
    for (int i = 0; i < MR; ++i) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + (m0 + i) * a.kp + seg.xcol[r]));
      sum[i] = _mm256_add_epi16(sum[i], _mm256_maddubs_epi16(q, x));
    }
    if ((r + 1) % RPG == 0) flush_group<MR>(a, row, m0, seg.xcol[r] / (32 * RPG), sum, acc);
  }
  if (seg.count % RPG != 0)  // a short last group of K
    flush_group<MR>(a, row, m0, seg.xcol[seg.count - 1] / (32 * RPG), sum, acc);
}

template <int MR, int RPG>
LOWBIT_AVX2 void rows_mixed_avx2(const AsyncArgs& a, int64_t row, int64_t m0) {
  if (row + 1 < a.n) _mm_prefetch(reinterpret_cast<const char*>(a.packed + (row + 1) * a.row_bytes), _MM_HINT_T0);
  __m256 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_ps();
  mixed_segment_avx2<MR, 4, RPG>(a, a.mixed[0], row, m0, acc);
  mixed_segment_avx2<MR, 2, RPG>(a, a.mixed[1], row, m0, acc);
  float corr[MR];
  zero_correction_avx2(a, row, m0, MR, corr);
  for (int i = 0; i < MR; ++i) a.y[(m0 + i) * a.n + row] = hsum(acc[i]) - corr[i];
}

template <int RPG>
constexpr RowsFnTable mixed_avx2_table() {
  return {{rows_mixed_avx2<1, RPG>, rows_mixed_avx2<2, RPG>, rows_mixed_avx2<3, RPG>, rows_mixed_avx2<4, RPG>}};
}

template <int RPG, int BITS, bool TABLE>
constexpr RowsFnTable avx2_table() {
  return {{rows_avx2<1, RPG, BITS, TABLE>, rows_avx2<2, RPG, BITS, TABLE>, rows_avx2<3, RPG, BITS, TABLE>,
           rows_avx2<4, RPG, BITS, TABLE>}};
}
#endif


#ifdef LOWBIT_ASYNC_X86
template <bool TABLE>
constexpr RowsFnTable avx2_tables[2][3] = {
    {avx2_table<1, 2, TABLE>(), avx2_table<2, 2, TABLE>(), avx2_table<4, 2, TABLE>()},
    {avx2_table<1, 4, TABLE>(), avx2_table<2, 4, TABLE>(), avx2_table<4, 4, TABLE>()}};
#endif

RowsKernels portable_kernels() {
  constexpr RowsFnTable p{{rows_portable<1>, rows_portable<2>, rows_portable<3>, rows_portable<4>}};
  constexpr RowsFnTable pm{{rows_mixed_portable<1>, rows_mixed_portable<2>, rows_mixed_portable<3>,
                            rows_mixed_portable<4>}};
  return {{{{p, p, p}, {p, p, p}}, {{p, p, p}, {p, p, p}}}, {pm, pm, pm}};
}

#ifdef LOWBIT_ASYNC_X86
RowsKernels avx2_kernels() {
  RowsKernels kernels{};
  for (int b = 0; b < 2; ++b)
    for (int g = 0; g < 3; ++g) {
      kernels.by_mode_bits_group[0][b][g] = avx2_tables<false>[b][g];
      kernels.by_mode_bits_group[1][b][g] = avx2_tables<true>[b][g];
    }
  kernels.mixed[0] = mixed_avx2_table<1>();
  kernels.mixed[1] = mixed_avx2_table<2>();
  kernels.mixed[2] = mixed_avx2_table<4>();
  return kernels;
}
#endif

// The row kernels of a CPU path (cpu_isa.h).
const RowsKernels& kernels_for(int isa) {
#ifdef LOWBIT_ASYNC_X86
  if (isa >= kIsaAvx512) return vnni_kernels();
  static const RowsKernels avx2 = avx2_kernels();
  if (isa == kIsaAvx2) return avx2;
#endif
  static const RowsKernels portable = portable_kernels();
  return portable;
}

// One group of one row of x: its scale *d and its int8 codes q (act_quant_* of async_dequant.h).
template <typename IO>
void quantize_group(const typename IO::storage* x, int64_t len, int8_t* q, float* d) {
  float amax = 0.0f;
  for (int64_t j = 0; j < len; ++j) amax = std::max(amax, std::fabs(IO::load(x, j)));
  const float mul = act_quant_multiplier(amax);
  *d = act_quant_scale(amax);
  for (int64_t j = 0; j < len; ++j) q[j] = act_quant_code(IO::load(x, j), mul);
}

#ifdef LOWBIT_ASYNC_X86
template <typename IO>
LOWBIT_AVX2 inline __m256 load8(const typename IO::storage* p) {
  if constexpr (std::is_same_v<IO, F32>) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (std::is_same_v<IO, F16>) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

// quantize_group 8 values at a time, with the same float operations (a NaN is skipped by the max, as there;
// the clamp before the rounding gives what rounding then clamping gives).
template <typename IO>
LOWBIT_AVX2 void quantize_group_avx2(const typename IO::storage* x, int64_t len, int8_t* q, float* d) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vmax = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) vmax = _mm256_max_ps(_mm256_and_ps(load8<IO>(x + j), abs_mask), vmax);
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  float amax = std::max(_mm_cvtss_f32(m4), _mm_cvtss_f32(_mm_movehdup_ps(m4)));
  for (; j < len; ++j) amax = std::max(amax, std::fabs(IO::load(x, j)));
  const float mul = act_quant_multiplier(amax);
  *d = act_quant_scale(amax);
  const __m256 vmul = _mm256_set1_ps(mul), hi = _mm256_set1_ps(float(kActQuantMax)), lo = _mm256_set1_ps(-float(kActQuantMax));
  const __m256i gather = _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0);
  for (j = 0; j + 8 <= len; j += 8) {
    const __m256i v = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(load8<IO>(x + j), vmul), lo), hi));
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(v, v), _mm256_setzero_si256());  // bytes 0-3, 16-19
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + j),
                     _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(b, gather)));
  }
  for (; j < len; ++j) q[j] = act_quant_code(IO::load(x, j), mul);
}
#endif

template <typename IO>
void quantize_rows(const typename IO::storage* x, int64_t m, int64_t k, int64_t kp, int group_size, int8_t* xq,
                   float* d) {
  const int64_t groups = (k + group_size - 1) / group_size;
  auto group = quantize_group<IO>;
#ifdef LOWBIT_ASYNC_X86
  if (cpu_isa() >= kIsaAvx2) group = quantize_group_avx2<IO>;
#endif
#pragma omp parallel for schedule(static) if (m * k >= (int64_t(1) << 16))
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * group_size, k1 = std::min(k, k0 + group_size);
      group(x + i * k + k0, k1 - k0, xq + i * kp + k0, d + i * groups + g);
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

namespace {

// d * (sum of each group's xq) per row of x: the zero correction's activation factor.
std::vector<float> group_sums(const int8_t* xq, const float* d, int64_t m, int64_t kp, int64_t k, int64_t groups,
                              int group_size) {
  std::vector<float> u(size_t(m * groups));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t g = 0; g < groups; ++g) {
      int32_t s = 0;
      for (int64_t j = g * group_size, e = std::min(k, (g + 1) * group_size); j < e; ++j) s += xq[i * kp + j];
      u[size_t(i * groups + g)] = d[i * groups + g] * float(s);
    }
  return u;
}

// Runs fns over tasks of kRowsPerTask weight rows x kXRowsPerTask rows of x in parallel into a.y.
void run_tasks(const AsyncArgs& a, const RowsFnTable& fns) {
  const int64_t m = a.m, n = a.n;
  const int64_t row_tasks = (n + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t m_tasks = (m + kXRowsPerTask - 1) / kXRowsPerTask;
#pragma omp parallel for schedule(static) if (m * n * a.k >= (int64_t(1) << 18))
  for (int64_t task = 0; task < row_tasks * m_tasks; ++task) {
    const int64_t n0 = (task % row_tasks) * kRowsPerTask, n1 = std::min(n, n0 + kRowsPerTask);
    const int64_t mt0 = (task / row_tasks) * kXRowsPerTask, mt1 = std::min(m, mt0 + kXRowsPerTask);
    for (int64_t m0 = mt0; m0 < mt1; m0 += kMaxMr) {
      const RowsFn fn = fns.by_mr[std::min<int64_t>(kMaxMr, mt1 - m0) - 1];
      for (int64_t row = n0; row < n1; ++row) fn(a, row, m0);
    }
  }
}

// The GEMM on the path of isa: the AMX tiles for many rows of x, else the row kernels fns (the AVX-512 ones with
// the plan they read); a.y staged in fp32 when out is not, then stored.
void run_rows(AsyncArgs& a, const RowsFnTable& fns, int isa, const TensorView& out) {
  const bool direct = out.dtype == DType::f32;
  std::vector<float> staging(direct ? 0 : size_t(a.m * a.n));
  a.y = direct ? out.ptr<float>() : staging.data();
  if (isa >= kIsaAmx && a.m >= kAmxMinRows) {
    amx_gemm(a);
  } else {
    VnniPlan plan;
    if (isa >= kIsaAvx512) {
      plan = make_vnni_plan(a);
      a.vnni = &plan;
    }
    run_tasks(a, fns);
  }
  if (direct) return;
  if (out.dtype == DType::f16)
    store_rows<F16>(staging.data(), a.m * a.n, out.ptr<uint16_t>());
  else
    store_rows<BF16>(staging.data(), a.m * a.n, out.ptr<uint16_t>());
}

// The xq column of each run of a mixed segment.
std::vector<int64_t> segment_columns(const int32_t* runs, int64_t count) {
  std::vector<int64_t> xcol(static_cast<size_t>(count));
  for (int64_t r = 0; r < count; ++r) xcol[size_t(r)] = 32 * int64_t(runs[r]);
  return xcol;
}

int group_index(int group_size) { return group_size == 32 ? 0 : group_size == 64 ? 1 : 2; }

}  // namespace

void async_dequant_gemm_cpu(const AsyncGemmOperands& op) {
  const int64_t m = op.xq.size(0), n = op.packed.size(0), k = op.k;
  if (m == 0 || n == 0) return;
  const int group_size = op.group_size, bits = op.bits, isa = cpu_isa();
  const int64_t groups = op.d.size(1), kp = op.xq.size(1);
  const int8_t* xqp = op.xq.ptr<int8_t>();
  const float* dp = op.d.ptr<float>();
  const bool table = op.table_q != nullptr;
  const std::vector<float> u = op.zeros ? group_sums(xqp, dp, m, kp, k, groups, group_size) : std::vector<float>();
  std::vector<uint8_t> xa(table && isa < kIsaAvx512 ? size_t(m * kp) : 0);
  for (size_t i = 0; i < xa.size(); ++i) xa[i] = uint8_t(std::abs(int(xqp[i])));
  AsyncArgs a{xqp, xa.empty() ? nullptr : xa.data(), kp, dp, op.zeros ? u.data() : nullptr,
              static_cast<const uint8_t*>(op.packed.data), aligned_words_per_row(k, bits) * 4,
              op.scales.ptr<uint16_t>(), op.zeros ? op.zeros->ptr<uint16_t>() : nullptr,
              table ? static_cast<const uint32_t*>(op.table_q->data) : nullptr,
              table ? *op.table_scale->ptr<float>() : 1.0f, groups, k, m, n, bits, group_size, nullptr, nullptr,
              nullptr};
  run_rows(a, kernels_for(isa).by_mode_bits_group[table ? 1 : 0][bits == 2 ? 0 : 1][group_index(group_size)], isa,
           op.out);
}

void mixed_gemm_cpu(const MixedGemmOperands& op) {
  const int64_t m = op.xq.size(0), n = op.packed.size(0), k = op.k;
  if (m == 0 || n == 0) return;
  const int64_t groups = op.d.size(1), kp = op.xq.size(1), r4 = op.runs4.size(0), r2 = op.runs2.size(0);
  const int8_t* xqp = op.xq.ptr<int8_t>();
  const float* dp = op.d.ptr<float>();
  const std::vector<float> u = group_sums(xqp, dp, m, kp, k, groups, op.group_size);
  const std::vector<int64_t> c4 = segment_columns(op.runs4.ptr<int32_t>(), r4);
  const std::vector<int64_t> c2 = segment_columns(op.runs2.ptr<int32_t>(), r2);
  const MixedSegment segments[2] = {{0, r4, c4.data()}, {aligned_words_per_row(32 * r4, 4) * 4, r2, c2.data()}};
  AsyncArgs a{xqp, nullptr, kp, dp, u.data(), static_cast<const uint8_t*>(op.packed.data),
              mixed_aligned_words(r4, r2) * 4, op.scales.ptr<uint16_t>(), op.zeros.ptr<uint16_t>(), nullptr, 1.0f,
              groups, k, m, n, 0, op.group_size, nullptr, segments, nullptr};
  const int isa = cpu_isa();
  run_rows(a, kernels_for(isa).mixed[group_index(op.group_size)], isa, op.out);
}

}  // namespace lowbit
