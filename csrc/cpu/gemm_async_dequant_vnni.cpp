// The AVX-512 VNNI row kernels of the CPU async-dequant and mixed GEMMs (async_rows.h), and the per-call plan
// they read. A row is read 64 bytes (two 32-byte chunks of the aligned layout) at a time: one shift and one mask
// give, for run c of both chunks, 64 codes as bytes (lanes 0-31 from the first chunk, 32-63 from the second);
// one vpdpbusd per row of x multiplies them by the 64 activations staged in that order and sums each 4 into
// int32 lanes (lanes 0-7: first chunk, 8-15: second), so each half of the vector stays inside one weight group.
// After the runs of a group (or of a chunk, if a group spans two) the int32 sums are converted and FMA'd into
// fp32 accumulators with scale * d of each half's group, looked up through the plan's flush-group table (which
// maps padding to a zero entry). Table mode looks the codes up by vpshufb in the table bytes made unsigned
// (tq + 128, offset binary), so vpdpbusd applies, and subtracts the 128 * sum(xq) this adds from each flush's
// int32 sums (one vpsubd of a vector the plan precomputes), so the integers stay exact.
// The next weight row is prefetched 64 bytes per step while the current one is multiplied.
#include <algorithm>
#include <cstring>
#include <vector>

#include "async_rows.h"
#include "lowbit/async_dequant.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LOWBIT_VNNI_X86 1
#include <immintrin.h>
#endif

namespace lowbit {
namespace async_cpu {

constexpr int kRunBytes = 32;

VnniPlan make_vnni_plan(const AsyncArgs& a) {
  RunSource src[2];
  const int segments = run_sources(a, src);
  VnniPlan p;
  const int rpg = a.group_size / kRunBytes;
  int64_t x_offset = 0, fg_offset = 0;
  for (int i = 0; i < segments; ++i) {
    const int runs = 8 / src[i].bits, per_flush = std::min(rpg, runs);
    const int64_t chunks = (src[i].count + runs - 1) / runs, supers = (chunks + 1) / 2;
    p.seg[i] = {src[i].byte_offset, supers, chunks % 2 == 1, x_offset, fg_offset};
    x_offset += supers * 2 * runs * kRunBytes;
    fg_offset += supers * (runs / per_flush) * 2;
  }
  p.stride = x_offset;
  p.slots = fg_offset / 2;
  p.fg.resize(size_t(fg_offset));
  p.xs.assign(size_t(a.m * p.stride), 0);
  for (int i = 0; i < segments; ++i) {
    const RunSource& s = src[i];
    const VnniSegment& sg = p.seg[i];
    const int runs = 8 / s.bits, per_flush = std::min(rpg, runs), flushes = runs / per_flush;
    auto column = [&](int64_t r) { return s.xcol ? s.xcol[r] : kRunBytes * r; };
    for (int64_t t = 0; t < sg.supers; ++t)
      for (int j = 0; j < flushes; ++j)
        for (int h = 0; h < 2; ++h) {
          const int64_t r = runs * (2 * t + h) + j * per_flush;
          p.fg[size_t(sg.fg_offset + (t * flushes + j) * 2 + h)] =
              int32_t(r < s.count ? column(r) / a.group_size : a.groups);
        }
#pragma omp parallel for schedule(static) if (a.m * a.k >= (int64_t(1) << 16))
    for (int64_t m = 0; m < a.m; ++m)
      for (int64_t t = 0; t < sg.supers; ++t)
        for (int c = 0; c < runs; ++c)
          for (int h = 0; h < 2; ++h) {
            const int64_t r = runs * (2 * t + h) + c;
            if (r >= s.count) continue;
            int8_t* dst = p.xs.data() + m * p.stride + sg.x_offset + ((t * runs + c) * 2 + h) * kRunBytes;
            std::memcpy(dst, a.xq + m * a.kp + column(r), kRunBytes);
          }
    if (!a.tq) continue;
    p.xc.resize(size_t(a.m * p.slots * 16));
    for (int64_t m = 0; m < a.m; ++m)
      for (int64_t t = 0; t < sg.supers; ++t)
        for (int j = 0; j < flushes; ++j)
          for (int h = 0; h < 2; ++h) {
            int32_t sum = 0;
            for (int c = j * per_flush; c < (j + 1) * per_flush; ++c) {
              const int8_t* x = p.xs.data() + m * p.stride + sg.x_offset + ((t * runs + c) * 2 + h) * kRunBytes;
              for (int b = 0; b < kRunBytes; ++b) sum += x[b];
            }
            p.xc[size_t((m * p.slots + sg.fg_offset / 2 + t * flushes + j) * 16 + 8 * h)] = 128 * sum;
          }
  }
  return p;
}

#ifdef LOWBIT_VNNI_X86
namespace {

#define LOWBIT_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

LOWBIT_VNNI inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
}

// sd[i * stride + g] = scale[row, g] * d[m0 + i, g] for the groups, and 0 at g = groups (the padding entry).
template <int MR>
LOWBIT_VNNI inline void scale_products(const AsyncArgs& a, int64_t row, int64_t m0, float* sd, int64_t stride) {
  const uint16_t* sc = a.scales + row * a.groups;
  for (int64_t g = 0; g < a.groups; g += 16) {
    const __mmask16 k = tail_mask(a.groups - g);
    const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, sc + g));
    for (int i = 0; i < MR; ++i)
      _mm512_mask_storeu_ps(sd + i * stride + g, k,
                            _mm512_mul_ps(s, _mm512_maskz_loadu_ps(k, a.d + (m0 + i) * a.groups + g)));
  }
  for (int i = 0; i < MR; ++i) sd[i * stride + a.groups] = 0.0f;
}

// corr[i] = sum_g scale * zero * u[m0 + i, g] (0 without zeros).
template <int MR>
LOWBIT_VNNI inline void zero_correction(const AsyncArgs& a, int64_t row, int64_t m0, float* corr) {
  for (int i = 0; i < MR; ++i) corr[i] = 0.0f;
  if (!a.zeros) return;
  const uint16_t* sc = a.scales + row * a.groups;
  const uint16_t* zc = a.zeros + row * a.groups;
  __m512 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < a.groups; g += 16) {
    const __mmask16 k = tail_mask(a.groups - g);
    const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, sc + g));
    const __m512 sz = _mm512_mul_ps(s, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, zc + g)));
    for (int i = 0; i < MR; ++i)
      acc[i] = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(k, a.u + (m0 + i) * a.groups + g), acc[i]);
  }
  for (int i = 0; i < MR; ++i) corr[i] = _mm512_reduce_add_ps(acc[i]);
}

// One segment of a row into acc: BITS-wide codes, groups of RPG runs, MR rows of x from m0.
template <int MR, int BITS, int RPG, bool TABLE>
LOWBIT_VNNI inline void segment(const AsyncArgs& a, const VnniSegment& sg, const uint8_t* row_codes, int64_t m0,
                                const float* sd, int64_t sd_stride, __m512i table, __m512* acc) {
  constexpr int kRuns = 8 / BITS, kPerFlush = RPG < kRuns ? RPG : kRuns, kFlushes = kRuns / kPerFlush;
  const __m512i mask = _mm512_set1_epi8(char((1 << BITS) - 1));
  const uint8_t* codes = row_codes + sg.byte_offset;
  const int32_t* fg = a.vnni->fg.data() + sg.fg_offset;
  const int8_t* xs = a.vnni->xs.data() + m0 * a.vnni->stride + sg.x_offset;
  const int64_t xstride = a.vnni->stride;
  const int32_t* xc = TABLE ? a.vnni->xc.data() + (m0 * a.vnni->slots + sg.fg_offset / 2) * 16 : nullptr;
  for (int64_t t = 0; t < sg.supers; ++t) {
    _mm_prefetch(reinterpret_cast<const char*>(codes + a.row_bytes + 64 * t), _MM_HINT_T0);
    const bool half = sg.half_tail && t + 1 == sg.supers;
    const __m512i v = _mm512_maskz_loadu_epi8(half ? __mmask64(0xffffffffull) : ~__mmask64(0), codes + 64 * t);
    const int8_t* xt = xs + t * 2 * kRuns * kRunBytes;
#pragma GCC unroll 4
    for (int j = 0; j < kFlushes; ++j) {
      __m512i dot[MR][2];  // two chains (even and odd runs), so successive vpdpbusd do not wait on each other
      for (int i = 0; i < MR; ++i) dot[i][0] = dot[i][1] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int cc = 0; cc < kPerFlush; ++cc) {
        const int c = j * kPerFlush + cc;
        __m512i q = _mm512_and_si512(_mm512_srli_epi16(v, unsigned(c * BITS)), mask);
        if constexpr (TABLE) q = _mm512_shuffle_epi8(table, q);
        for (int i = 0; i < MR; ++i)
          dot[i][cc & 1] =
              _mm512_dpbusd_epi32(dot[i][cc & 1], q, _mm512_loadu_si512(xt + i * xstride + c * 2 * kRunBytes));
      }
      const int32_t g0 = fg[(t * kFlushes + j) * 2], g1 = fg[(t * kFlushes + j) * 2 + 1];
      if constexpr (TABLE)
        for (int i = 0; i < MR; ++i)
          dot[i][0] = _mm512_sub_epi32(dot[i][0], _mm512_loadu_si512(xc + (i * a.vnni->slots + t * kFlushes + j) * 16));
      for (int i = 0; i < MR; ++i) {
        const __m512 s = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(sd[i * sd_stride + g0])),
                                                             _mm256_castps_pd(_mm256_set1_ps(sd[i * sd_stride + g1])), 1));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(dot[i][0], dot[i][1])), s, acc[i]);
      }
    }
  }
}

// One weight row against MR rows of x from m0. BITS = 0: the mixed layout (a 4-bit and a 2-bit segment).
template <int MR, int RPG, int BITS, bool TABLE>
LOWBIT_VNNI void rows_vnni(const AsyncArgs& a, int64_t row, int64_t m0) {
  thread_local std::vector<float> sd;
  const int64_t sd_stride = a.groups + 1;
  if (sd.size() < size_t(MR * sd_stride)) sd.resize(size_t(MR * sd_stride));
  scale_products<MR>(a, row, m0, sd.data(), sd_stride);
  const __m512i table =
      TABLE ? _mm512_xor_si512(_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.tq))),
                               _mm512_set1_epi8(char(0x80)))
            : _mm512_setzero_si512();
  __m512 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
  const uint8_t* codes = a.packed + row * a.row_bytes;
  if constexpr (BITS == 0) {
    segment<MR, 4, RPG, false>(a, a.vnni->seg[0], codes, m0, sd.data(), sd_stride, table, acc);
    segment<MR, 2, RPG, false>(a, a.vnni->seg[1], codes, m0, sd.data(), sd_stride, table, acc);
  } else {
    segment<MR, BITS, RPG, TABLE>(a, a.vnni->seg[0], codes, m0, sd.data(), sd_stride, table, acc);
  }
  float corr[MR];
  zero_correction<MR>(a, row, m0, corr);
  for (int i = 0; i < MR; ++i) a.y[(m0 + i) * a.n + row] = a.ts * _mm512_reduce_add_ps(acc[i]) - corr[i];
}

template <int RPG, int BITS, bool TABLE>
constexpr RowsFnTable table_of() {
  return {{rows_vnni<1, RPG, BITS, TABLE>, rows_vnni<2, RPG, BITS, TABLE>, rows_vnni<3, RPG, BITS, TABLE>,
           rows_vnni<4, RPG, BITS, TABLE>}};
}

template <bool TABLE>
constexpr RowsFnTable tables_by_bits_group[2][3] = {
    {table_of<1, 2, TABLE>(), table_of<2, 2, TABLE>(), table_of<4, 2, TABLE>()},
    {table_of<1, 4, TABLE>(), table_of<2, 4, TABLE>(), table_of<4, 4, TABLE>()}};

}  // namespace

const RowsKernels& vnni_kernels() {
  static const RowsKernels kernels = [] {
    RowsKernels k{};
    for (int b = 0; b < 2; ++b)
      for (int g = 0; g < 3; ++g) {
        k.by_mode_bits_group[0][b][g] = tables_by_bits_group<false>[b][g];
        k.by_mode_bits_group[1][b][g] = tables_by_bits_group<true>[b][g];
      }
    k.mixed[0] = table_of<1, 0, false>();
    k.mixed[1] = table_of<2, 0, false>();
    k.mixed[2] = table_of<4, 0, false>();
    return k;
  }();
  return kernels;
}
#endif  // LOWBIT_VNNI_X86

}  // namespace async_cpu
}  // namespace lowbit
