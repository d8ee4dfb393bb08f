// The 2-bit LUT GEMV by pair tables (AVX-512), for a few rows of x. For each pair of positions (k, k + 1) and
// row of x, a 16-entry table holds table[a] * x[k] + table[b] * x[k + 1] for every code pair (a, b); the four
// bits of a code pair as the canonical layout stores them (a in bits 0-1, b in bits 2-3) index it directly, so
// one vpermps looks up two codes of 16 weight rows at once and one add accumulates them, the products being in
// the table. Weight rows are read 32 at a time (two 16-lane halves), lane r of a vector holding row r's word,
// whose 8 code pairs come out by shifts of 4 (vpermps reads bits 0-3 of each index): the interleaved layout
// (lut_gemm.h) stores the words so; from the canonical one, 16 code words of each of 16 rows are transposed in
// registers first (about a fifth of the time). At the end of each group zero * sum(x over the group) is
// subtracted from the sums and they are multiplied by the scales (scales and zeros transposed the same way,
// once per task). Per two codes of 16 rows that is a shift, a permute and an add, half the vector work per
// code of the per-row lookup in gemm_lut_isa.inc, which bounds that kernel at M = 1 on cores that run 512-bit
// ops on two ports.
#include "lut_pairs.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "lowbit/lut_gemm.h"
#include "scratch.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LOWBIT_PAIRS_X86 1
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 warns inside its own AVX-512 intrinsics (the undefined pass-through operand, GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#endif

namespace lowbit {

#if LOWBIT_PAIRS_X86
namespace {

#define LOWBIT_PAIRS __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

constexpr int kRows = 32;          // weight rows per task: two halves of 16 lanes
static_assert(kRows == kLutInterleaveRows, "a task is one block of the interleaved layout");
constexpr int kChunkWords = 16;    // code words of each row transposed at once (256 codes)
constexpr int kPairsPerWord = 8;   // 2-bit code pairs per 32-bit word
constexpr int kEntries = 16;       // entries of one pair table

// Floats of pair tables per row of x: 16 entries for each of the 8 code pairs of every code word.
inline int64_t pair_table_floats(const LutPairArgs& a) { return a.wpr * kPairsPerWord * kEntries; }

// In place 16 x 16 transpose of 32-bit elements: afterwards v[c] lane r is what v[r] lane c was.
LOWBIT_PAIRS inline void transpose16(__m512i v[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // t[2i], t[2i+1]: rows 2i and 2i+1 interleaved, per 128-bit lane
    t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + j], 128-bit lane L: column 4L + j of rows 4i..4i+3
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // transpose the 4 x 4 blocks of 128-bit lanes
    const __m512i v0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44), v1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);
    v[j] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    v[4 + j] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    v[8 + j] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    v[12 + j] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
}

// The pair tables of one row of x: tables[p * 16 + a + 4 * b] = table[a] * x[2p] + table[b] * x[2p + 1].
LOWBIT_PAIRS void build_pair_tables(const float* t, const float* x, int64_t pairs, float* tables) {
  const __m512 ta = _mm512_setr_ps(t[0], t[1], t[2], t[3], t[0], t[1], t[2], t[3], t[0], t[1], t[2], t[3], t[0],
                                   t[1], t[2], t[3]);
  const __m512 tb = _mm512_setr_ps(t[0], t[0], t[0], t[0], t[1], t[1], t[1], t[1], t[2], t[2], t[2], t[2], t[3],
                                   t[3], t[3], t[3]);
  for (int64_t p = 0; p < pairs; ++p)
    _mm512_store_ps(tables + p * kEntries,
                    _mm512_fmadd_ps(tb, _mm512_set1_ps(x[2 * p + 1]), _mm512_mul_ps(ta, _mm512_set1_ps(x[2 * p]))));
}

// x[0] + ... + x[count - 1] (a scalar loop is a chain of dependent adds: 4 us per call at K = 4096).
LOWBIT_PAIRS float sum_floats(const float* x, int64_t count) {
  __m512 sum = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) sum = _mm512_add_ps(sum, _mm512_loadu_ps(x + i));
  if (i < count) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(__mmask16((1u << (count - i)) - 1), x + i));
  return _mm512_reduce_add_ps(sum);
}

// The fp16 scale and zero of each row and group of a task, as one 32-bit word (scale in the low half, zero in the
// high half), transposed: words[g * 32 + r] for row r and group g.
LOWBIT_PAIRS void transpose_scales(const LutPairArgs& a, int64_t n0, uint32_t* words) {
  const int64_t chunks = (a.groups + 15) / 16;
  for (int h = 0; h < 2; ++h)
    for (int64_t c = 0; c < chunks; ++c) {
      const int left = int(std::min<int64_t>(16, a.groups - c * 16));
      const __mmask16 mask = __mmask16((1u << left) - 1);
      __m512i v[16];
      for (int r = 0; r < 16; ++r) {
        const int64_t off = std::min(n0 + 16 * h + r, a.n - 1) * a.groups + c * 16;  // past N: the last row
        v[r] = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, a.scales + off));
        if (a.zeros)
          v[r] = _mm512_or_si512(v[r], _mm512_slli_epi32(
                                           _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, a.zeros + off)), 16));
      }
      transpose16(v);
      for (int g = 0; g < left; ++g) _mm512_storeu_si512(words + (c * 16 + g) * kRows + 16 * h, v[g]);
    }
}

// Outputs y[0..MR) x [n0, n0 + 32) from the pair tables of MR rows of x (tables: [MR][wpr * 8 * 16], xg: the
// sums of x over each group, [MR][groups]). NA accumulators per row of x and half break the add chains.
template <int MR>
LOWBIT_PAIRS void pair_task(const LutPairArgs& a, const float* tables, const float* xg, int64_t n0, uint32_t* sz) {
  constexpr int NA = MR >= 3 ? 1 : 2;
  // Rows past N read as zero codes (the interleaved layout stores them so); their outputs are dropped. (Rows are
  // addressed from one base pointer: an array of 32 row pointers was kept in vector registers, and the lookups'
  // sums were spilled for lack of them.) In both layouts the task's codes start at n0 * wpr and the next task's
  // follow them.
  const int valid = int(std::min<int64_t>(kRows, a.n - n0));
  const uint32_t* task_codes = a.packed + n0 * a.wpr;
  transpose_scales(a, n0, sz);
  const int64_t tstride = pair_table_floats(a);
  const int wpg = a.group_size / 16;  // words per group: 2, 4 or 8, dividing kChunkWords
  // The next task's rows (this thread's next under a static schedule) follow this task's in memory: a few of
  // their lines are prefetched into L2 per word, so that their DRAM latency overlaps this task's lookups
  // (4096 x 4096 on 2 cores: 495 us without, 335 us with), and their scales and zeros over the first words.
  const char* next = reinterpret_cast<const char*>(a.packed + (n0 + kRows) * a.wpr);
  const int64_t next_rows = std::max<int64_t>(0, std::min<int64_t>(kRows, a.n - n0 - kRows));
  const int64_t next_lines = next_rows * a.wpr * 4 / 64;
  const int64_t lines_per_word = (next_lines + a.wpr - 1) / a.wpr;
  const char* next_scales = reinterpret_cast<const char*>(a.scales + (n0 + kRows) * a.groups);
  const char* next_zeros = a.zeros ? reinterpret_cast<const char*>(a.zeros + (n0 + kRows) * a.groups) : nullptr;
  const int64_t next_sz_lines = (next_rows * a.groups * 2 + 63) / 64;
  __m512 y[MR][2], acc[MR][2][NA];
  for (int m = 0; m < MR; ++m)
    for (int h = 0; h < 2; ++h) {
      y[m][h] = _mm512_setzero_ps();
      for (int i = 0; i < NA; ++i) acc[m][h][i] = _mm512_setzero_ps();
    }
  alignas(64) uint32_t words[kChunkWords][kRows];  // canonical codes of the chunk, transposed: [word][row]
  for (int64_t wb = 0; wb < a.wpr; wb += kChunkWords) {
    const int nw = int(std::min<int64_t>(kChunkWords, a.wpr - wb));
    // The chunk's words as [word][row of the task]: the interleaved layout stores them so, the canonical one is
    // transposed here (16 x 16 per half).
    const uint32_t* chunk = a.interleaved ? task_codes + wb * kRows : &words[0][0];
    if (!a.interleaved) {
      const __mmask16 mask = __mmask16((1u << nw) - 1);
      for (int h = 0; h < 2; ++h) {
        __m512i v[16];
        for (int r = 0; r < 16; ++r)
          v[r] = 16 * h + r < valid ? _mm512_maskz_loadu_epi32(mask, task_codes + (16 * h + r) * a.wpr + wb)
                                    : _mm512_setzero_si512();
        transpose16(v);
        for (int w = 0; w < kChunkWords; ++w) _mm512_store_si512(&words[w][16 * h], v[w]);
      }
    }
    for (int w0 = 0; w0 < nw; w0 += wpg) {  // the groups of the chunk (chunks start on a group boundary)
      for (int w = w0; w < std::min(nw, w0 + wpg); ++w) {
        const int64_t line0 = (wb + w) * lines_per_word;  // this word's share of the next task's lines
        for (int64_t l = line0; l < std::min(next_lines, line0 + lines_per_word); ++l)
          _mm_prefetch(next + l * 64, _MM_HINT_T1);
        if (wb + w < next_sz_lines) {
          _mm_prefetch(next_scales + (wb + w) * 64, _MM_HINT_T1);
          if (a.zeros) _mm_prefetch(next_zeros + (wb + w) * 64, _MM_HINT_T1);
        }
        __m512i idx[2] = {_mm512_loadu_si512(chunk + w * kRows), _mm512_loadu_si512(chunk + w * kRows + 16)};
        const float* tw = tables + (wb + w) * kPairsPerWord * kEntries;
#pragma GCC unroll 8
        for (int j = 0; j < kPairsPerWord; ++j) {
#pragma GCC unroll 4
          for (int m = 0; m < MR; ++m) {
            const __m512 tab = _mm512_load_ps(tw + m * tstride + j * kEntries);
            for (int h = 0; h < 2; ++h)
              acc[m][h][j % NA] = _mm512_add_ps(acc[m][h][j % NA], _mm512_permutexvar_ps(idx[h], tab));
          }
          idx[0] = _mm512_srli_epi32(idx[0], 4);
          idx[1] = _mm512_srli_epi32(idx[1], 4);
        }
      }
      const int64_t g = (wb + w0) / wpg;  // fold the group's sums into y
      for (int h = 0; h < 2; ++h) {  // y += scale * (sum - zero * sum(x over the group))
        const __m512i words_sz = _mm512_loadu_si512(sz + g * kRows + 16 * h);
        const __m512 s = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(words_sz));
        const __m512 z = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(words_sz, 16)));
        for (int m = 0; m < MR; ++m) {
          __m512 sum = acc[m][h][0];
          for (int i = 1; i < NA; ++i) sum = _mm512_add_ps(sum, acc[m][h][i]);
          if (a.zeros) sum = _mm512_fnmadd_ps(z, _mm512_set1_ps(xg[m * a.groups + g]), sum);
          y[m][h] = _mm512_fmadd_ps(s, sum, y[m][h]);
          for (int i = 0; i < NA; ++i) acc[m][h][i] = _mm512_setzero_ps();
        }
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int h = 0; h < 2; ++h) {
      alignas(64) float out[16];
      _mm512_store_ps(out, y[m][h]);
      for (int r = 0; r < 16; ++r)
        if (n0 + 16 * h + r < a.n) a.y[m * a.n + n0 + 16 * h + r] = out[r];
    }
}

// The pair tables of MR rows of x and their sums over each group, for one thread.
template <int MR>
LOWBIT_PAIRS void build_thread_tables(const LutPairArgs& a, float* tables, float* xg) {
  const int64_t kp = a.wpr * 16, tstride = pair_table_floats(a);
  for (int64_t m = 0; m < MR; ++m) {
    const float* x = a.x + m * kp;
    build_pair_tables(a.table, x, kp / 2, tables + m * tstride);
    for (int64_t g = 0; g < a.groups; ++g) {
      const int64_t k0 = g * a.group_size, k1 = std::min<int64_t>(kp, k0 + a.group_size);
      xg[m * a.groups + g] = sum_floats(x + k0, k1 - k0);
    }
  }
}

// The tasks, each thread building its own copy of the tables before its first one: tables shared between the
// threads would be written by one core and read by all on every call, and those cache-line transfers cost more
// than building them twice (4096 x 64 on 2 cores: 25 -> 8 us per call).
template <int MR>
void run_tasks(const LutPairArgs& a) {
  const int64_t tasks = (a.n + kRows - 1) / kRows;
#pragma omp parallel
  {
    std::vector<float> owned, xg;
    std::vector<uint32_t> sz;
    float* tables = nullptr;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      if (!tables) {
        float* const raw = scratch_floats(size_t(MR * pair_table_floats(a) + kEntries), owned);
        tables = raw + (kEntries - (reinterpret_cast<uintptr_t>(raw) / 4) % kEntries) % kEntries;  // 64-byte aligned
        xg.resize(size_t(MR * a.groups));
        sz.resize(size_t(a.groups * kRows));
        build_thread_tables<MR>(a, tables, xg.data());
      }
      pair_task<MR>(a, tables, xg.data(), t * kRows, sz.data());
    }
  }
}

}  // namespace

void lut2_pairs_gemv_avx512(const LutPairArgs& a) {
  if (a.m < 1 || a.m > kLutPairMaxRows) throw std::invalid_argument("lut2_pairs_gemv: m out of range");
  switch (a.m) {
    case 1: run_tasks<1>(a); break;
    case 2: run_tasks<2>(a); break;
    case 3: run_tasks<3>(a); break;
    default: run_tasks<4>(a); break;
  }
}

#else
void lut2_pairs_gemv_avx512(const LutPairArgs&) { throw std::logic_error("lut2_pairs_gemv: needs x86-64 AVX-512"); }
#endif

}  // namespace lowbit
