// The AMX-INT8 path of the CPU async-dequant and mixed GEMMs for many rows of x (prefill): the same integers as
// the row kernels (exact int32 sums of code * xq per weight group, then fp32 scaling; async_dequant.h), but the
// sums come from tile dot products (TDPBUSD; TDPBSSD for table mode's signed table bytes).
// A task owns a panel of 32 weight rows and walks K group by group. The group's 32-code runs (of either layout:
// a per-call list of where each run's chunk and shift are, sorted by column) are unpacked by one shift and one
// mask (two runs of a chunk at once where they are adjacent, then one vpshufb in table mode) into a 4 KB slice
// laid out as A tiles (16 weight rows x 64 columns, 1 KB in a row), which stays in L1 while every block of 32
// rows of x multiplies it: 4 accumulator tiles (2 x 16 weight rows times 2 x 16 rows of x; 2 tiles for a last
// block of at most 16 rows) are zeroed, fed with the group's 64-column steps against the activations staged once
// per call as B tiles (row k/4 of a tile holds bytes k..k+3 of its 16 rows of x; a step's tiles side by side),
// stored, and folded in fp32 into the block's outputs: acc += scale * d * table_scale * sum - scale * zero * u.
#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "async_rows.h"
#include "lowbit/async_dequant.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LOWBIT_AMX_X86 1
#include <immintrin.h>
#endif

namespace lowbit {
namespace async_cpu {

#if LOWBIT_AMX_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx2,fma,f16c")
#endif
namespace {

constexpr int kTile = 16;           // rows of an accumulator tile, and its int32 columns
constexpr int kPanelRows = 2 * kTile;  // weight rows per task
constexpr int kBlockRows = 2 * kTile;  // rows of x per block
constexpr int64_t kPrefetchGroups = 8;  // how many groups ahead a panel's codes are prefetched

// The tile palette: tiles 0-3 accumulators (16 x 16 int32), 4-5 weight bytes (16 rows x step), 6-7 activations
// (step / 4 rows x 64 bytes).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// One 32-code run of a row: where its chunk lies in the row, the shift and width of its codes, and where its
// 32 bytes go in a group's slice (slice_col).
struct Run {
  int64_t byte;
  int shift, bits;
  int64_t dst;
  bool pair;  // this run and the chunk's next one (shift + bits) fill the 64 bytes from dst
};

// What one call shares between its tasks: the runs of every group (runs [first[g], first[g + 1])), the
// activations staged in VNNI order, and d * table_scale and u by group.
struct Plan {
  std::vector<Run> runs;
  std::vector<int64_t> first;
  std::vector<int8_t> xt;  // the activations as B tiles (x_tile_offset)
  std::vector<float> dt;   // [groups][mpad]
  std::vector<float> ut;   // [groups][mpad] (with zeros)
  int64_t mpad;
  int step;  // columns per tile product: min(64, group size)
};

// A group's slice of a 32-row panel: its bytes k (0 <= k < group size) of panel row i at
// (i / 16) * 16 * G + (k / step) * 16 * step + (i % 16) * step + k % step, so the A tile of each half and step
// is 1 KB in a row (and the slice, 4 KB at most, stays in L1).
int64_t slice_row(int i, int group_size, int step) { return (i / kTile) * kTile * group_size + (i % kTile) * step; }
int64_t slice_col(int64_t k, int step) { return (k / step) * kTile * step + k % step; }

// Where the B tile of activation rows [16 t, 16 t + 16) and the step holding column k starts in Plan::xt: the
// tiles of one step lie side by side (so a group's activations are contiguous) and each is step / 4 rows of 64
// bytes, row k/4 (within the step) holding bytes k..k+3 of each of the 16 rows of x.
inline int64_t x_tile_offset(int64_t k, int64_t t, int64_t tiles, int step) {
  return ((k / step) * tiles + t) * int64_t(step) * 16;
}

Plan make_plan(const AsyncArgs& a) {
  Plan p;
  p.step = std::min(64, a.group_size);
  RunSource src[2];  // the runs by segment, then sorted by column
  const int segments = run_sources(a, src);
  std::vector<std::pair<int64_t, Run>> cols;
  for (int s = 0; s < segments; ++s) {
    const int runs_per_chunk = 8 / src[s].bits;
    for (int64_t r = 0; r < src[s].count; ++r) {
      const int64_t col = src[s].xcol ? src[s].xcol[r] : 32 * r;
      cols.push_back({col, {src[s].byte_offset + 32 * (r / runs_per_chunk), int(r % runs_per_chunk) * src[s].bits,
                            src[s].bits, slice_col(col % a.group_size, p.step), false}});
    }
  }
  std::sort(cols.begin(), cols.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
  p.first.assign(size_t(a.groups + 1), 0);
  for (size_t i = 0; i < cols.size(); ++i) {
    Run run = cols[i].second;
    if (i + 1 < cols.size()) {
      const Run& next = cols[i + 1].second;
      run.pair = cols[i + 1].first / a.group_size == cols[i].first / a.group_size && next.byte == run.byte &&
                 next.shift == run.shift + run.bits && next.dst == run.dst + 32;
    }
    p.runs.push_back(run);
    ++p.first[size_t(cols[i].first / a.group_size + 1)];
    i += run.pair;
  }
  for (int64_t g = 0; g < a.groups; ++g) p.first[size_t(g + 1)] += p.first[size_t(g)];

  p.mpad = (a.m + kBlockRows - 1) / kBlockRows * kBlockRows;
  p.xt.assign(size_t(p.mpad * a.kp), 0);
  const int64_t tiles = p.mpad / kTile;
#pragma omp parallel for schedule(static) if (a.m * a.kp >= (int64_t(1) << 16))
  for (int64_t m = 0; m < a.m; ++m) {
    const int8_t* src = a.xq + m * a.kp;
    for (int64_t k0 = 0; k0 < a.kp; k0 += p.step) {
      int8_t* dst = p.xt.data() + x_tile_offset(k0, m / kTile, tiles, p.step) + (m % kTile) * 4;
      for (int q = 0; q < p.step / 4; ++q) std::memcpy(dst + q * 64, src + k0 + 4 * q, 4);
    }
  }
  p.dt.assign(size_t(a.groups * p.mpad), 0.0f);
  if (a.u) p.ut.assign(size_t(a.groups * p.mpad), 0.0f);
  for (int64_t m = 0; m < a.m; ++m)
    for (int64_t g = 0; g < a.groups; ++g) {
      p.dt[size_t(g * p.mpad + m)] = a.d[m * a.groups + g] * a.ts;
      if (a.u) p.ut[size_t(g * p.mpad + m)] = a.u[m * a.groups + g];
    }
  return p;
}

// Group g of panel rows n0 .. n0 + 31 into its slice: codes, or their signed table bytes in table mode. Rows
// past N keep what the slice held (their outputs are dropped), as do columns past the runs (xq is zero there).
template <bool TABLE>
void unpack_group(const AsyncArgs& a, const Plan& p, int64_t n0, int64_t g, uint8_t* slice) {
  const __m256i table = TABLE ? _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.tq)))
                              : _mm256_setzero_si256();
  const __m512i table512 = _mm512_broadcast_i64x4(table);
  const int rows = int(std::min<int64_t>(kPanelRows, a.n - n0));
  const int64_t row_bytes = a.row_bytes;
  const Run* runs = p.runs.data() + p.first[size_t(g)];
  const int64_t count = p.first[size_t(g + 1)] - p.first[size_t(g)];
  const uint8_t* codes = a.packed + n0 * row_bytes;
  // The bytes of a later group of each row, of this panel or of the next (a task's next, with the static
  // schedule): 32 streams of row-strided lines are more than the hardware prefetcher follows from DRAM.
  const int64_t ahead = (g + kPrefetchGroups) % a.groups, pn0 = n0 + (g + kPrefetchGroups) / a.groups * kPanelRows;
  if (pn0 < a.n) {
    const int64_t b0 = p.runs[size_t(p.first[size_t(ahead)])].byte;
    const int64_t b1 = p.runs[size_t(p.first[size_t(ahead + 1)] - 1)].byte + 31;
    const uint8_t* pcodes = a.packed + pn0 * row_bytes;
    for (int i = 0, pr = int(std::min<int64_t>(kPanelRows, a.n - pn0)); i < pr; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(pcodes + i * row_bytes + b0), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(pcodes + i * row_bytes + b1), _MM_HINT_T0);
    }
  }
  for (int i = 0; i < rows; ++i) {
    const uint8_t* row = codes + i * row_bytes;
    uint8_t* dst = slice + slice_row(i, a.group_size, p.step);
    for (int64_t r = 0; r < count; ++r) {
      const Run run = runs[r];
      const __m256i chunk = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + run.byte));
      if (run.pair) {  // both runs at once: the chunk in both halves, shifted by shift and shift + bits
        const __m512i shifts = _mm512_mask_set1_epi16(_mm512_set1_epi16(short(run.shift)), 0xffff0000u,
                                                      short(run.shift + run.bits));
        __m512i q = _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i64x4(chunk), shifts),
                                     _mm512_set1_epi8(char((1 << run.bits) - 1)));
        if constexpr (TABLE) q = _mm512_shuffle_epi8(table512, q);
        _mm512_storeu_si512(dst + run.dst, q);
      } else {
        __m256i q = _mm256_and_si256(_mm256_srl_epi16(chunk, _mm_cvtsi32_si128(run.shift)),
                                     _mm256_set1_epi8(char((1 << run.bits) - 1)));
        if constexpr (TABLE) q = _mm256_shuffle_epi8(table, q);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + run.dst), q);
      }
    }
  }
}

// acc[32 weight rows][32 rows of x] += the group's tile sums c[2][XT][16][16] (weight tile, x tile), scaled by
// scale * d * table_scale, minus scale * zero * u.
template <int XT>
void fold_group(const int32_t* c, const float* sp, const float* szp, const float* dt, const float* ut, float* acc) {
  for (int wt = 0; wt < 2; ++wt)
    for (int xt = 0; xt < XT; ++xt) {
      const int32_t* ct = c + (wt * XT + xt) * kTile * kTile;
      const __m512 dv = _mm512_loadu_ps(dt + xt * kTile);
      const __m512 uv = ut ? _mm512_loadu_ps(ut + xt * kTile) : _mm512_setzero_ps();
      for (int r = 0; r < kTile; ++r) {
        const int i = wt * kTile + r;
        float* out = acc + i * kBlockRows + xt * kTile;
        __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(ct + r * kTile)),
                                   _mm512_mul_ps(dv, _mm512_set1_ps(sp[i])), _mm512_loadu_ps(out));
        if (ut) v = _mm512_fnmadd_ps(uv, _mm512_set1_ps(szp[i]), v);
        _mm512_storeu_ps(out, v);
      }
    }
}

// Group g's tile products for rows of x [m0, m0 + 16 XT) and the panel's slice, folded into acc.
template <bool SIGNED, int XT>
void group_block(const AsyncArgs& a, const Plan& p, const uint8_t* slice, const float* sp, const float* szp,
                 int64_t g, int64_t m0, float* acc) {
  alignas(64) int32_t c[2 * XT * kTile * kTile];
  const int64_t tiles = p.mpad / kTile, t0 = m0 / kTile;
  const uint8_t* w1 = slice + kTile * a.group_size;  // the second half's tiles
  _tile_zero(0);
  _tile_zero(2);
  if constexpr (XT == 2) {
    _tile_zero(1);
    _tile_zero(3);
  }
  const int64_t k0 = g * a.group_size, k1 = std::min(a.k, k0 + a.group_size);
  for (int64_t k = k0; k < k1; k += p.step) {
    const int64_t t = (k - k0) * kTile;
    _tile_loadd(4, slice + t, p.step);
    _tile_loadd(5, w1 + t, p.step);
    const int8_t* x0 = p.xt.data() + x_tile_offset(k, t0, tiles, p.step);
    _tile_loadd(6, x0, 64);
    if constexpr (XT == 2) _tile_loadd(7, x0 + p.step * 16, 64);
    if constexpr (SIGNED) {
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(2, 5, 6);
      if constexpr (XT == 2) {
        _tile_dpbssd(1, 4, 7);
        _tile_dpbssd(3, 5, 7);
      }
    } else {
      _tile_dpbusd(0, 4, 6);
      _tile_dpbusd(2, 5, 6);
      if constexpr (XT == 2) {
        _tile_dpbusd(1, 4, 7);
        _tile_dpbusd(3, 5, 7);
      }
    }
  }
  // c[wt][xt]: accumulator wt * 2 + xt
  _tile_stored(0, c, 64);
  _tile_stored(2, c + XT * kTile * kTile, 64);
  if constexpr (XT == 2) {
    _tile_stored(1, c + kTile * kTile, 64);
    _tile_stored(3, c + 3 * kTile * kTile, 64);
  }
  fold_group<XT>(c, sp + g * kPanelRows, szp + g * kPanelRows, p.dt.data() + g * p.mpad + m0,
                 p.ut.empty() ? nullptr : p.ut.data() + g * p.mpad + m0, acc);
}

// The outputs of panel rows [n0, n0 + 32) for all rows of x: group by group, the group's slice is unpacked once
// and multiplied into every block of 32 rows of x (16 for a last block of at most 16); acc[block][32][32].
template <bool SIGNED>
void panel_task(const AsyncArgs& a, const Plan& p, int64_t n0, uint8_t* slice, float* sp, float* szp, float* acc) {
  const int rows = int(std::min<int64_t>(kPanelRows, a.n - n0));
  for (int i = 0; i < kPanelRows; ++i) {  // scales (F16C, 8 at a time) and scale * zero, transposed
    const uint16_t* srow = a.scales + (n0 + i) * a.groups;
    const uint16_t* zrow = a.zeros ? a.zeros + (n0 + i) * a.groups : nullptr;
    for (int64_t g0 = 0; g0 < a.groups; g0 += 8) {
      const int cnt = int(std::min<int64_t>(8, a.groups - g0));
      alignas(32) uint16_t sh[8] = {}, zh[8] = {};
      if (i < rows) {
        std::memcpy(sh, srow + g0, size_t(cnt) * 2);
        if (zrow) std::memcpy(zh, zrow + g0, size_t(cnt) * 2);
      }
      alignas(32) float sf[8], szf[8];
      const __m256 sv = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(sh)));
      _mm256_store_ps(sf, sv);
      _mm256_store_ps(szf, _mm256_mul_ps(sv, _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(zh)))));
      for (int j = 0; j < cnt; ++j) {
        sp[(g0 + j) * kPanelRows + i] = sf[j];
        szp[(g0 + j) * kPanelRows + i] = szf[j];
      }
    }
  }
  const int64_t blocks = p.mpad / kBlockRows;
  std::fill(acc, acc + blocks * kPanelRows * kBlockRows, 0.0f);
  for (int64_t g = 0; g < a.groups; ++g) {
    unpack_group<SIGNED>(a, p, n0, g, slice);
    for (int64_t b = 0; b < blocks; ++b) {
      float* acc_b = acc + b * kPanelRows * kBlockRows;
      if (a.m - b * kBlockRows <= kTile) group_block<SIGNED, 1>(a, p, slice, sp, szp, g, b * kBlockRows, acc_b);
      else group_block<SIGNED, 2>(a, p, slice, sp, szp, g, b * kBlockRows, acc_b);
    }
  }
  for (int64_t m = 0; m < a.m; ++m) {
    const float* src = acc + (m / kBlockRows) * kPanelRows * kBlockRows + m % kBlockRows;
    for (int i = 0; i < rows; ++i) a.y[m * a.n + n0 + i] = src[i * kBlockRows];
  }
}

}  // namespace

void amx_gemm(const AsyncArgs& a) {
  const Plan p = make_plan(a);
  TileConfig config;
  for (int t = 0; t < 4; ++t) config.colsb[t] = 64, config.rows[t] = kTile;            // int32 accumulators
  for (int t = 4; t < 6; ++t) config.colsb[t] = uint16_t(p.step), config.rows[t] = kTile;  // weight bytes
  for (int t = 6; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = uint8_t(p.step / 4);  // activations
  const int64_t panels = (a.n + kPanelRows - 1) / kPanelRows;
#pragma omp parallel
  {
    _tile_loadconfig(&config);
    alignas(64) uint8_t slice[kPanelRows * 128] = {};
    std::vector<float> sp(size_t(a.groups * kPanelRows)), szp(sp.size());
    std::vector<float> acc(size_t(p.mpad * kPanelRows));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < panels; ++t) {
      if (a.tq) panel_task<true>(a, p, t * kPanelRows, slice, sp.data(), szp.data(), acc.data());
      else panel_task<false>(a, p, t * kPanelRows, slice, sp.data(), szp.data(), acc.data());
    }
    _tile_release();
  }
}

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#else
void amx_gemm(const AsyncArgs&) {}
#endif

}  // namespace async_cpu
}  // namespace lowbit
