// CPU VQ GEMM, y = x . W_hat^T (format in vq.h), and VQ dequantization. x is staged once per call as fp32.
// Strategies:
//   decode, M < kGemmM: weight rows in parallel (OpenMP); each codeword is gathered, summed over the R codebooks
//       and FMA'd into up to 4 rows of x (gemm_vq_rows.inc), so the codes are read once per 4 rows of x; with one
//       row of x, four weight rows share each load of x. Codewords come from an fp32 copy of the codebooks made
//       once per call, except when that copy would exceed 1 MiB (E * R > 32768) and the CPU has F16C: then they
//       are converted from fp16 as read, which keeps the table L2-resident (it halves the footprint).
//   decode, M >= kGemmM: 32-row x 256-column tiles of W_hat decoded to fp32 (scale folded in), then a
//       register-blocked GEMM (6 rows of x by 16 columns) over each tile.
//   lut (AQLM): T[m][p][e] = x[m, 8j .. 8j+8) . codebooks[r, e] for every vector p = j * R + r and entry e,
//       built once per call (for as many rows of x at a time as fit in 64 MiB), then
//       y[m, n] = scale[n] * sum_p T[m][p][codes[n, p]]: N * J * R lookups per row of x instead of N * K FMAs,
//       16 at a time with AVX-512 gathers, blocked so that the slices of T a gather reads stay in L1 (T is
//       scratch memory kept between calls, scratch.h).
// The auto rule (vq_gemm_cpu_choice) compares estimated costs, see kCost* below.
// Byte codes (uint8) are widened to 16 bits per block of rows (row_codes) before the kernels read them.
// Index checks: kernels mask every code with E - 1 (reads stay in bounds) and OR the raw codes together; when
// the OR has a bit at or above E, the codes are scanned and std::invalid_argument names the first bad (n, j, r).
#include "lowbit/vq.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "lowbit/cpu_isa.h"
#include "lowbit/element_io.h"
#include "scratch.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LOWBIT_VQ_X86 1
#include <immintrin.h>
#define LOWBIT_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LOWBIT_ISA_CLONES
#endif

#define VQ_INLINE __attribute__((always_inline)) inline

namespace lowbit {
namespace {

constexpr int64_t kGemmM = 64;                 // rows of x from which the decode strategy runs tiled GEMMs
constexpr int kTileN = 32;                      // weight rows per decoded tile
constexpr int64_t kTileK = 256;                 // columns per decoded tile (32 vectors: 32 KiB of fp32)
constexpr int kMicroM = 6;                      // rows of x per GEMM micro-kernel (x 16 columns)
constexpr int64_t kRowChunk = 16;               // weight rows per OpenMP work item in the small-M kernel
constexpr int kLutRowBlock = 64;                // weight rows per work item of the AVX-512 lut kernel
constexpr int64_t kF32TableMaxEntries = 32768;  // E * R above which codewords are read as fp16 (with F16C)
constexpr int64_t kLutBudget = int64_t(64) << 20;  // bytes of T built at a time
// Cost estimates (cycles on one core, measured on an AVX-512 Xeon) for the auto rule.
constexpr double kCostCodeword = 0.6;  // decode: one codeword gathered and summed, per row block of 4 rows of x
constexpr double kCostFma = 0.25;      // decode: one 8-wide FMA with a load of x
constexpr double kCostLutEntry = 0.2;  // lut: one entry of T (an 8-long dot product, vectorized over entries)
constexpr double kCostLookup = 0.35;   // lut: one lookup (AVX-512 gather; the scalar path costs ~1)

typedef float v8 __attribute__((vector_size(32)));

VQ_INLINE v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
VQ_INLINE void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }
VQ_INLINE float hsum8(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

struct VqGemm {
  const float* x;          // fp32 [m, k]
  const uint16_t* codes;   // [n, j * r] 16-bit codes, or nullptr when the codes are bytes:
  const uint8_t* codes8;   // [n, j * r] uint8 codes (widened to 16 bits per block of rows, see row_codes)
  const uint16_t* scales;  // fp16 [n]
  float* y;                // fp32 [m, n]
  int64_t m, n, k, j;      // j = k / 8 vectors per row
  int r;
  uint32_t mask;  // E - 1
};

namespace f32 {
struct Cb {  // fp32 copy of the codebooks, [R][E][8]
  const float* t;
  int64_t e;
  VQ_INLINE v8 load(int r, uint32_t idx) const { return load8(t + (r * e + idx) * kVqVecLen); }
};
#include "gemm_vq_rows.inc"
}  // namespace f32

LOWBIT_ISA_CLONES uint32_t rows_f32(const VqGemm& g, const float* table, int64_t e, int64_t n0, int64_t n1) {
  const f32::Cb cb{table, e};
  return g.r == 1 ? f32::rows<1>(g, cb, n0, n1) : f32::rows<2>(g, cb, n0, n1);
}

#ifdef LOWBIT_VQ_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace f16 {
struct Cb {  // the fp16 codebooks themselves, [R][E][8]
  const uint16_t* t;
  int64_t e;
  VQ_INLINE v8 load(int r, uint32_t idx) const {
    const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + (r * e + idx) * 8)));
    v8 v;
    std::memcpy(&v, &f, sizeof(v));
    return v;
  }
};
#include "gemm_vq_rows.inc"
}  // namespace f16

uint32_t rows_f16(const VqGemm& g, const uint16_t* codebooks, int64_t e, int64_t n0, int64_t n1) {
  const f16::Cb cb{codebooks, e};
  return g.r == 1 ? f16::rows<1>(g, cb, n0, n1) : f16::rows<2>(g, cb, n0, n1);
}
#pragma GCC pop_options

// The SIMD paths by the active CPU level (cpu_isa.h), which never exceeds what the CPU supports.
bool cpu_has_f16c() { return cpu_isa() >= kIsaAvx2; }
bool cpu_has_avx512() { return cpu_isa() >= kIsaAvx512; }
#else
bool cpu_has_f16c() { return false; }
bool cpu_has_avx512() { return false; }
#endif

// ---- large M: decoded tiles and a register-blocked GEMM ----------------------------------------------------

// Rows [n0, n0 + nb) x vectors [j0, j1) of W_hat, transposed into wt[k][kTileN] (columns past nb are zero);
// codes: those rows' codes.
VQ_INLINE uint32_t decode_tile(const VqGemm& g, const f32::Cb& cb, const uint16_t* codes, int64_t n0, int nb,
                               int64_t j0, int64_t j1, float* wt) {
  uint32_t seen = 0;
  for (int nl = 0; nl < nb; ++nl) {
    const uint16_t* c = codes + nl * g.j * g.r;
    const float s = half_to_float(g.scales[n0 + nl]);
    for (int64_t j = j0; j < j1; ++j) {
      const v8 w = s * (g.r == 1 ? f32::codeword_sum<1>(cb, c + j, g.mask, seen)
                                 : f32::codeword_sum<2>(cb, c + 2 * j, g.mask, seen));
      float* dst = wt + (j - j0) * kVqVecLen * kTileN + nl;
      for (int d = 0; d < kVqVecLen; ++d) dst[d * kTileN] = w[d];
    }
  }
  if (nb < kTileN)
    for (int64_t k = 0; k < (j1 - j0) * kVqVecLen; ++k) std::fill(wt + k * kTileN + nb, wt + (k + 1) * kTileN, 0.0f);
  return seen;
}

// y[m, 0..cols) (+)= sum_k x[m, k] * wt[k][0..16) for MR rows of x (row stride ldx) and kc columns.
template <int MR>
VQ_INLINE void micro(const float* x, int64_t ldx, const float* wt, int64_t kc, float* y, int64_t ldy, int cols,
                     bool first) {
  v8 acc[MR][2] = {};
  for (int64_t k = 0; k < kc; ++k) {
    const v8 b0 = load8(wt + k * kTileN), b1 = load8(wt + k * kTileN + 8);
#pragma GCC unroll 6
    for (int m = 0; m < MR; ++m) {
      const float a = x[m * ldx + k];
      acc[m][0] += a * b0;
      acc[m][1] += a * b1;
    }
  }
  for (int m = 0; m < MR; ++m) {
    float* dst = y + m * ldy;
    if (cols == 16) {
      store8(dst, first ? acc[m][0] : acc[m][0] + load8(dst));
      store8(dst + 8, first ? acc[m][1] : acc[m][1] + load8(dst + 8));
    } else {
      for (int c = 0; c < cols; ++c) dst[c] = (first ? 0.0f : dst[c]) + acc[m][c / 8][c % 8];
    }
  }
}

template <int MR>
VQ_INLINE void micro_cols(const VqGemm& g, const float* wt, int64_t m0, int64_t n0, int nb, int64_t k0, int64_t kc) {
  for (int c0 = 0; c0 < nb; c0 += 16)
    micro<MR>(g.x + m0 * g.k + k0, g.k, wt + c0, kc, g.y + m0 * g.n + n0 + c0, g.n, std::min(16, nb - c0), k0 == 0);
}

// y[:, n0 .. n0 + kTileN) for all rows of x, tile by tile; codes: those rows' codes; wt: kTileK * kTileN floats
// of scratch.
LOWBIT_ISA_CLONES uint32_t gemm_rows(const VqGemm& g, const float* table, int64_t e, const uint16_t* codes, int64_t n0,
                                     float* wt) {
  const f32::Cb cb{table, e};
  const int nb = int(std::min<int64_t>(kTileN, g.n - n0));
  uint32_t seen = 0;
  for (int64_t j0 = 0; j0 < g.j; j0 += kTileK / kVqVecLen) {
    const int64_t j1 = std::min(g.j, j0 + kTileK / kVqVecLen);
    seen |= decode_tile(g, cb, codes, n0, nb, j0, j1, wt);
    const int64_t k0 = j0 * kVqVecLen, kc = (j1 - j0) * kVqVecLen;
    int64_t m0 = 0;
    for (; m0 + kMicroM <= g.m; m0 += kMicroM) micro_cols<kMicroM>(g, wt, m0, n0, nb, k0, kc);
    switch (g.m - m0) {
      case 1: micro_cols<1>(g, wt, m0, n0, nb, k0, kc); break;
      case 2: micro_cols<2>(g, wt, m0, n0, nb, k0, kc); break;
      case 3: micro_cols<3>(g, wt, m0, n0, nb, k0, kc); break;
      case 4: micro_cols<4>(g, wt, m0, n0, nb, k0, kc); break;
      case 5: micro_cols<5>(g, wt, m0, n0, nb, k0, kc); break;
      default: break;
    }
  }
  return seen;
}

// ---- lookup tables -----------------------------------------------------------------------------------------

// T[p][e] = x[8j .. 8j+8) . codebook_r[e] for vectors p in [p0, p1) (j = p / R, r = p % R) of one row of x;
// cbt: the codebooks transposed to fp32 [R][8][E].
LOWBIT_ISA_CLONES void lut_build(const float* x, const float* cbt, int r_count, int64_t e, int64_t p0, int64_t p1,
                                 float* t) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* xv = x + (p / r_count) * kVqVecLen;
    const float* cb = cbt + (p % r_count) * kVqVecLen * e;
    float* dst = t + p * e;
    for (int64_t i = 0; i < e; i += 8) {
      v8 acc = xv[0] * load8(cb + i);
      for (int d = 1; d < kVqVecLen; ++d) acc += xv[d] * load8(cb + d * e + i);
      store8(dst + i, acc);
    }
  }
}

struct VqLut {
  const float* t;  // [mc][p][e]
  const uint16_t* codes;
  const uint16_t* scales;
  float* y;  // row m of the chunk at y + m * n
  int64_t mc, n, p, e;
  uint32_t mask;
};

// y[m, n] for every row m of the chunk and weight rows [n0, n1), one lookup at a time (4 running sums).
LOWBIT_ISA_CLONES uint32_t lut_rows_scalar(const VqLut& a, int64_t n0, int64_t n1) {
  uint32_t seen = 0;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* c = a.codes + n * a.p;
    const float s = half_to_float(a.scales[n]);
    for (int64_t m = 0; m < a.mc; ++m) {
      const float* t = a.t + m * a.p * a.e;
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int64_t p = 0; p < a.p; ++p) {
        seen |= c[p];
        acc[p & 3] += t[p * a.e + (c[p] & a.mask)];
      }
      a.y[m * a.n + n] = s * ((acc[0] + acc[1]) + (acc[2] + acc[3]));
    }
  }
  return seen;
}

#ifdef LOWBIT_VQ_X86
// As lut_rows_scalar for at most kLutRowBlock weight rows, 16 lookups per gather (lanes: 16 consecutive vectors
// p of a row). The loops run over blocks of 16 vectors, then rows, so that a gather reads the block's 16 slices
// of T (16 * E entries: 16 KiB for E = 256) from L1 for every row of the block; each row keeps its 16 running
// sums (in the same order as one row at a time would) across the blocks.
__attribute__((target("avx512f"))) uint32_t lut_rows_avx512(const VqLut& a, int64_t n0, int64_t n1) {
  const __m512i mask = _mm512_set1_epi32(int(a.mask));
  const __m512i lane_base = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                _mm512_set1_epi32(int(a.e)));
  const int rows = int(n1 - n0);
  const int64_t full = a.p / 16 * 16;
  __m512i seen = _mm512_setzero_si512();
  uint32_t tail_seen = 0;
  __m512 acc[kLutRowBlock];
  for (int64_t m = 0; m < a.mc; ++m) {
    const float* t = a.t + m * a.p * a.e;
    for (int i = 0; i < rows; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t p = 0; p < full; p += 16) {
      const float* block = t + p * a.e;
      for (int i = 0; i < rows; ++i) {
        const uint16_t* c = a.codes + (n0 + i) * a.p + p;
        const __m512i raw = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c)));
        seen = _mm512_or_si512(seen, raw);
        const __m512i idx = _mm512_add_epi32(lane_base, _mm512_and_si512(raw, mask));
        acc[i] = _mm512_add_ps(acc[i], _mm512_i32gather_ps(idx, block, 4));
      }
    }
    for (int i = 0; i < rows; ++i) {
      const uint16_t* c = a.codes + (n0 + i) * a.p;
      float tail = 0.0f;
      for (int64_t q = full; q < a.p; ++q) {
        tail_seen |= c[q];
        tail += t[q * a.e + (c[q] & a.mask)];
      }
      a.y[m * a.n + n0 + i] = half_to_float(a.scales[n0 + i]) * (_mm512_reduce_add_ps(acc[i]) + tail);
    }
  }
  return uint32_t(_mm512_reduce_or_epi32(seen)) | tail_seen;
}
#endif

// ---- drivers -----------------------------------------------------------------------------------------------

// Raises naming the first code >= E (called only when the OR of the codes read says there is one).
[[noreturn]] void throw_bad_index(const char* op, const uint16_t* codes, int64_t n, int64_t j, int r, int64_t e) {
  const int64_t total = n * j * r;
  int64_t i = 0;
  while (i < total && codes[i] < e) ++i;
  throw std::invalid_argument(std::string(op) + ": codes[" + std::to_string(i / (j * r)) + ", " +
                              std::to_string(i / r % j) + ", " + std::to_string(i % r) + "] = " +
                              std::to_string(i < total ? codes[i] : 0) + " is out of range for codebooks with " +
                              std::to_string(e) + " entries (indices must be < " + std::to_string(e) + ")");
}

// x as fp32 [M, K]: x itself when it is fp32, otherwise converted into buf.
template <typename IO>
const float* stage_x(const TensorView& x, std::vector<float>& buf) {
  const int64_t total = x.numel();
  buf.resize(size_t(total));
  const auto* src = x.ptr<typename IO::storage>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < total; ++i) buf[i] = IO::load(src, i);
  return buf.data();
}

// The codebooks as fp32: [R][E][8] (transpose = false) or [R][8][E] (transpose = true).
std::vector<float> codebooks_f32(const uint16_t* cb, int r_count, int64_t e, bool transpose) {
  std::vector<float> out(size_t(r_count * e * kVqVecLen));
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < r_count * e; ++i)
    for (int d = 0; d < kVqVecLen; ++d) {
      const float v = half_to_float(cb[i * kVqVecLen + d]);
      if (transpose)
        out[size_t(((i / e) * kVqVecLen + d) * e + i % e)] = v;
      else
        out[size_t(i * kVqVecLen + d)] = v;
    }
  return out;
}

// The 16-bit codes of rows [n0, n0 + rows): a pointer into them, or byte codes widened into buf.
const uint16_t* row_codes(const VqGemm& g, int64_t n0, int64_t rows, std::vector<uint16_t>& buf) {
  const int64_t per_row = g.j * g.r;
  if (!g.codes8) return g.codes + n0 * per_row;
  buf.resize(size_t(rows * per_row));
  const uint8_t* src = g.codes8 + n0 * per_row;
  for (int64_t i = 0; i < rows * per_row; ++i) buf[size_t(i)] = src[i];
  return buf.data();
}

// g restricted to the rows from n0 on (their codes, scales and outputs), so that a kernel runs them as rows 0...
VqGemm rows_from(const VqGemm& g, int64_t n0, const uint16_t* codes) {
  VqGemm s = g;
  s.codes = codes;
  s.codes8 = nullptr;
  s.scales = g.scales + n0;
  s.y = g.y + n0;  // row stride of y stays g.n
  return s;
}

uint32_t run_decode(const VqGemm& g, const uint16_t* codebooks, int64_t e) {
  const bool fp16_reads = g.m < kGemmM && e * g.r > kF32TableMaxEntries && cpu_has_f16c();
  std::vector<float> table = fp16_reads ? std::vector<float>() : codebooks_f32(codebooks, g.r, e, false);
  uint32_t seen = 0;
  if (g.m >= kGemmM) {
    const int64_t tiles = (g.n + kTileN - 1) / kTileN;
#pragma omp parallel reduction(| : seen)
    {
      std::vector<float> wt(size_t(kTileK * kTileN));
      std::vector<uint16_t> buf;
#pragma omp for schedule(dynamic)
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t n0 = t * kTileN;
        seen |= gemm_rows(g, table.data(), e, row_codes(g, n0, std::min<int64_t>(kTileN, g.n - n0), buf), n0,
                          wt.data());
      }
    }
    return seen;
  }
  const int64_t chunks = (g.n + kRowChunk - 1) / kRowChunk;
#pragma omp parallel reduction(| : seen)
  {
    std::vector<uint16_t> buf;
#pragma omp for schedule(dynamic)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t n0 = c * kRowChunk, n1 = std::min(g.n, n0 + kRowChunk);
      const VqGemm rows = rows_from(g, n0, row_codes(g, n0, n1 - n0, buf));
#ifdef LOWBIT_VQ_X86
      if (fp16_reads) {
        seen |= rows_f16(rows, codebooks, e, 0, n1 - n0);
        continue;
      }
#endif
      seen |= rows_f32(rows, table.data(), e, 0, n1 - n0);
    }
  }
  return seen;
}

uint32_t run_lut(const VqGemm& g, const uint16_t* codebooks, int64_t e) {
  const int64_t p = g.j * g.r;
  if (p * e > int64_t(INT32_MAX))
    throw std::invalid_argument("vq_gemm: the lut strategy indexes K / 8 * R * E = " + std::to_string(p * e) +
                                " table entries per row of x, more than 2^31 - 1; use the decode strategy");
  const std::vector<float> cbt = codebooks_f32(codebooks, g.r, e, true);
  const int64_t mc_max = std::max<int64_t>(1, std::min(g.m, kLutBudget / (p * e * int64_t(sizeof(float)))));
  std::vector<float> owned;
  float* const tdata = scratch_floats(size_t(mc_max * p * e), owned);
  const bool avx512 = cpu_has_avx512();
  uint32_t seen = 0;
  for (int64_t m0 = 0; m0 < g.m; m0 += mc_max) {
    const int64_t mc = std::min(mc_max, g.m - m0);
    const int64_t build_chunk = std::max<int64_t>(1, 8192 / e);  // vectors per work item
    const int64_t items = (p + build_chunk - 1) / build_chunk;
#pragma omp parallel for schedule(static) collapse(2)
    for (int64_t m = 0; m < mc; ++m)
      for (int64_t it = 0; it < items; ++it)
        lut_build(g.x + (m0 + m) * g.k, cbt.data(), g.r, e, it * build_chunk, std::min(p, (it + 1) * build_chunk),
                  tdata + m * p * e);
    const int64_t chunk = avx512 ? kLutRowBlock : kRowChunk, chunks = (g.n + chunk - 1) / chunk;
#pragma omp parallel reduction(| : seen)
    {
      std::vector<uint16_t> buf;
#pragma omp for schedule(dynamic)
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t n0 = c * chunk, n1 = std::min(g.n, n0 + chunk);
        // These rows as rows 0.. (their codes, scales and outputs; y's row stride stays g.n).
        const VqLut a{tdata, row_codes(g, n0, n1 - n0, buf), g.scales + n0, g.y + m0 * g.n + n0, mc, g.n, p, e,
                      g.mask};
#ifdef LOWBIT_VQ_X86
        if (avx512) {
          seen |= lut_rows_avx512(a, 0, n1 - n0);
          continue;
        }
#endif
        seen |= lut_rows_scalar(a, 0, n1 - n0);
      }
    }
  }
  return seen;
}

template <typename IO>
void run(const TensorView& x, const TensorView& codes, const TensorView& codebooks, const TensorView& scales,
         const TensorView& out, VqStrategy strategy) {
  const int64_t m = x.size(0), k = x.size(1), n = codes.size(0), r = codes.size(2), e = codebooks.size(1);
  if (m == 0 || n == 0) return;
  std::vector<float> xbuf, ybuf;
  const float* xf = std::is_same<IO, F32>::value ? x.ptr<float>() : stage_x<IO>(x, xbuf);
  if (!std::is_same<IO, F32>::value) ybuf.resize(size_t(m * n));
  float* y = std::is_same<IO, F32>::value ? out.ptr<float>() : ybuf.data();
  const bool bytes = codes.dtype == DType::u8;
  const VqGemm g{xf,    bytes ? nullptr : codes.ptr<uint16_t>(), bytes ? codes.ptr<uint8_t>() : nullptr,
                 scales.ptr<uint16_t>(), y, m, n, k, k / kVqVecLen, int(r), uint32_t(e - 1)};
  if (strategy == VqStrategy::kAuto) strategy = vq_gemm_cpu_choice(m, n, k, int(r), e);
  const uint32_t seen = strategy == VqStrategy::kLut ? run_lut(g, codebooks.ptr<uint16_t>(), e)
                                                      : run_decode(g, codebooks.ptr<uint16_t>(), e);
  if (seen & ~g.mask) throw_bad_index("vq_gemm", g.codes, n, g.j, int(r), e);  // 16-bit codes only: bytes are < E
  if (!std::is_same<IO, F32>::value) {
    auto* dst = out.ptr<typename IO::storage>();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < m * n; ++i) IO::store(dst, i, y[i]);
  }
}

template <typename IO, typename C>
void dequantize(const TensorView& codes, const TensorView& codebooks, const TensorView& scales, const TensorView& out) {
  const int64_t n = codes.size(0), j = codes.size(1), e = codebooks.size(1);
  const int r = int(codes.size(2));
  const auto* c = codes.ptr<C>();
  auto* dst = out.ptr<typename IO::storage>();
  uint32_t seen = 0;
#pragma omp parallel for schedule(static) reduction(| : seen)
  for (int64_t row = 0; row < n; ++row)
    for (int64_t v = 0; v < j; ++v) {
      float w[kVqVecLen];
      vq_decode_vector(c, codebooks.ptr<uint16_t>(), scales.ptr<uint16_t>(), row, v, j, r, uint32_t(e), w);
      for (int d = 0; d < kVqVecLen; ++d) IO::store(dst, (row * j + v) * kVqVecLen + d, w[d]);
      for (int q = 0; q < r; ++q) seen |= c[vq_code_offset(row, v, q, j, r)];
    }
  if constexpr (sizeof(C) == 2) {
    if (seen & ~uint32_t(e - 1)) throw_bad_index("vq_dequantize", c, n, j, r, e);
  }
}

template <typename IO>
void dequantize(const TensorView& codes, const TensorView& codebooks, const TensorView& scales, const TensorView& out) {
  codes.dtype == DType::u8 ? dequantize<IO, uint8_t>(codes, codebooks, scales, out)
                           : dequantize<IO, uint16_t>(codes, codebooks, scales, out);
}

}  // namespace

VqStrategy vq_gemm_cpu_choice(int64_t m, int64_t n, int64_t k, int codebooks_r, int64_t entries) {
  const double vectors = double(n) * double(k / kVqVecLen);
  const double decode =
      vectors * (codebooks_r * kCostCodeword * double((m + 3) / 4) + kCostFma * double(m));
  const double lookup = cpu_has_avx512() ? kCostLookup : 3.0 * kCostLookup;
  const double lut = double(m) * double(k / kVqVecLen) * codebooks_r *
                     (double(entries) * kCostLutEntry + double(n) * lookup);
  const bool fits = double(k / kVqVecLen) * codebooks_r * double(entries) * sizeof(float) <= double(kLutBudget);
  return m < kGemmM && fits && lut < decode ? VqStrategy::kLut : VqStrategy::kDecode;
}

void vq_gemm_cpu(const TensorView& x, const TensorView& codes, const TensorView& codebooks, const TensorView& scales,
                 const TensorView& out, VqStrategy strategy) {
  switch (x.dtype) {
    case DType::f32: run<F32>(x, codes, codebooks, scales, out, strategy); break;
    case DType::f16: run<F16>(x, codes, codebooks, scales, out, strategy); break;
    case DType::bf16: run<BF16>(x, codes, codebooks, scales, out, strategy); break;
    default: throw type_error("vq_gemm: x must be float32, float16 or bfloat16");
  }
}

void vq_dequantize_cpu(const TensorView& codes, const TensorView& codebooks, const TensorView& scales,
                       const TensorView& out) {
  switch (out.dtype) {
    case DType::f32: dequantize<F32>(codes, codebooks, scales, out); break;
    case DType::f16: dequantize<F16>(codes, codebooks, scales, out); break;
    case DType::bf16: dequantize<BF16>(codes, codebooks, scales, out); break;
    default: throw type_error("vq_dequantize: out must be float32, float16 or bfloat16");
  }
}

}  // namespace lowbit
