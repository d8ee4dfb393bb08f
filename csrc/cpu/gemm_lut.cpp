// CPU LUT GEMM: x is converted once per call to fp32 in "lane order" (within every 16 values along K, lane p
// holds k = (p & 1) * 8 + (p >> 1), the order in which the codes of a half block come out of one broadcast word
// pair and one variable shift), then
//   M < kLargeM: rows of W in parallel (OpenMP), NR rows at a time; each 16 codes are unpacked with shifts,
//                looked up in the row's fused 16-entry table with one permute, and FMA'd into up to MR rows of x;
//   M >= kLargeM: tiles of 64 rows x 1024 codes of W dequantized to fp32 in a thread-local buffer, then a
//                register-blocked dot-product GEMM over the tile.
// One kernel set per instruction set (AVX-512, AVX2 + FMA, portable C++), from gemm_lut_isa.inc, chosen at
// run time (cpu_isa.h). 2-bit codes with at most kLutPairMaxRows rows of x (and at least kLutPairMinN weight
// rows) on AVX-512 take the pair-table GEMV of gemm_lut_pairs.cpp instead, which also reads the interleaved
// code layout (lut_gemm.h); the other paths read canonical codes, converted per call from an interleaved weight.
#include "lowbit/lut_gemm.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LOWBIT_LUT_X86 1
#include <immintrin.h>
#endif

#include "lowbit/cpu_isa.h"
#include "lowbit/element_io.h"
#include "lowbit/half.h"
#include "lut_pairs.h"

namespace lowbit {
namespace {

constexpr int64_t kLargeM = 64;     // from this many rows of x on, dequantize tiles and run the dense GEMM
constexpr int kTileN = 64;          // weight rows per dequantized tile
constexpr int64_t kTileBlocks = 32; // 32-code blocks per dequantized tile (1024 codes: 256 KiB of fp32)
constexpr int64_t kTileM = 128;     // rows of x per large-M task
constexpr int kPrefetchLocality = 3; // __builtin_prefetch hint for the next weight rows: 2 = into L2

struct LutArgs {
  const uint32_t* packed;
  int64_t wpr;  // words per row
  const uint16_t* scales;
  const uint16_t* zeros;  // nullptr: zero = 0
  int64_t groups;
  const float* table16;  // the table replicated to 16 entries (entry i holds table[i mod 2^bits])
  const float* xs;       // staged x: [round_up(M, 4), kp] fp32 in lane order, zero-padded
  int64_t kp;
  float* y;  // [M, N] fp32
  int64_t m, n, blocks, bpg;  // bpg: blocks per group
};

struct LutKernels {
  const char* name;
  void (*gemv[3])(const LutArgs&, int64_t n0);                                    // by bits - 2
  void (*gemm[3])(const LutArgs&, int64_t n0, int64_t m0, int64_t m1, float* w);  // by bits - 2
  void (*stage[3])(const void* src, int64_t k, float* dst, int64_t kp);          // f32, f16, bf16
  int nr;                                                                         // weight rows per gemv call
};

// Code index held by lane p (0..15) of a half block, and the right shift that brings it to bit 0 of the
// 32-bit lane after the half block's raw words are broadcast (see lut_raw below).
constexpr int lane_code(int p) { return (p & 1) * 8 + (p >> 1); }
template <int B>
constexpr int lane_shift(int p) {
  return (p & 1 ? (B == 2 ? 16 : 0) : (B == 3 ? 8 : 0)) + B * (p >> 1);
}

// The 64 bits whose low 32 bits hold codes 0..7 of half h of a block and whose high 32 bits hold codes 8..15
// (2-bit: both halves are the half's word; 4-bit: its two words; 3-bit: the 48 bits realigned by 8).
template <int B>
inline uint64_t lut_raw(const uint32_t* blk, int h) {
  if constexpr (B == 2) return uint64_t(blk[h]) * 0x100000001ull;
  uint64_t v;
  std::memcpy(&v, blk + (B == 4 ? 2 * h : h), 8);
  if constexpr (B == 3) v = h ? v >> 8 : v << 8;
  return v;
}

// Where one 8-byte load gives lut_raw<3>(blk, h) without the shift: one byte before the block (h = 0) or its
// byte 5 (h = 1). The extra byte (before, resp. after, the 12-byte block) lands in bits that no lane's index
// uses (bits 0-7, resp. bit 3 of the last odd lane's index, which the replicated table ignores), so the lookups
// are the same. Only for blocks with that byte inside the packed tensor (the kernels pass kAround = false for
// the first and the last block of every row); the shift and the broadcast from a register cost a port-5 uop per
// 16 codes that a broadcast from memory does not.
inline const void* lut3_raw_address(const uint32_t* blk, int h) {
  return reinterpret_cast<const char*>(blk) + (h ? 5 : -1);
}

// ---- portable C++ ----------------------------------------------------------------------------------------
namespace portable {
struct V {
  static constexpr const char* kName = "scalar";
  static constexpr int NR = 2, MR = 2, MM = 2, MN = 2;
  struct F {
    float v[16];
  };
  using T = F;
  static F zero() { return F{}; }
  static F load(const float* p) {
    F f;
    for (int i = 0; i < 16; ++i) f.v[i] = p[i];
    return f;
  }
  static void store(float* p, const F& f) {
    for (int i = 0; i < 16; ++i) p[i] = f.v[i];
  }
  static F fma(const F& a, const F& b, F c) {
    for (int i = 0; i < 16; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
  }
  static float hsum(const F& f) {
    float s = 0.0f;
    for (int i = 0; i < 16; ++i) s += f.v[i];
    return s;
  }
  static F interleave(const F& f) {
    F o;
    for (int p = 0; p < 16; ++p) o.v[p] = f.v[lane_code(p)];
    return o;
  }
  static F load_f16(const uint16_t* p) {
    F f;
    for (int i = 0; i < 16; ++i) f.v[i] = half_to_float(p[i]);
    return f;
  }
  static F load_bf16(const uint16_t* p) {
    F f;
    for (int i = 0; i < 16; ++i) f.v[i] = bf16_to_float(p[i]);
    return f;
  }
  static float h2f(uint16_t h) { return half_to_float(h); }
  static T table(const float* t16, float s, float z) {
    T t;
    for (int i = 0; i < 16; ++i) t.v[i] = lut_fused_entry(t16[i], s, z);
    return t;
  }
  template <int B, bool kAround>
  static F lookup(const uint32_t* blk, int h, const T& t) {
    F f;
    for (int p = 0; p < 16; ++p) f.v[p] = t.v[extract_code(blk, 16 * h + lane_code(p), B)];
    return f;
  }
};
#include "gemm_lut_isa.inc"
}  // namespace portable

#if LOWBIT_LUT_X86
// ---- AVX2 + FMA ------------------------------------------------------------------------------------------
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
namespace avx2 {
template <int B, int base>
__m256i shifts8() {
  return _mm256_setr_epi32(lane_shift<B>(base), lane_shift<B>(base + 1), lane_shift<B>(base + 2),
                           lane_shift<B>(base + 3), lane_shift<B>(base + 4), lane_shift<B>(base + 5),
                           lane_shift<B>(base + 6), lane_shift<B>(base + 7));
}
struct V {
  static constexpr const char* kName = "avx2";
  static constexpr int NR = 2, MR = 2, MM = 2, MN = 2;
  struct F {
    __m256 lo, hi;  // lanes 0..7 and 8..15
  };
  using T = F;  // table entries 0..7 and 8..15
  static F zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static F load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static void store(float* p, F f) {
    _mm256_storeu_ps(p, f.lo);
    _mm256_storeu_ps(p + 8, f.hi);
  }
  static F fma(F a, F b, F c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
  static float hsum(F f) {
    const __m256 s = _mm256_add_ps(f.lo, f.hi);
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
  }
  static F interleave(F f) {
    const __m256 u0 = _mm256_unpacklo_ps(f.lo, f.hi), u1 = _mm256_unpackhi_ps(f.lo, f.hi);
    return {_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)};
  }
  static F load_f16(const uint16_t* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
  }
  static __m256 bf16x8(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static F load_bf16(const uint16_t* p) { return {bf16x8(p), bf16x8(p + 8)}; }
  static float h2f(uint16_t h) { return _cvtsh_ss(h); }
  static T table(const float* t16, float s, float z) {
    const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
    return {_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(t16), vz), vs),
            _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(t16 + 8), vz), vs)};
  }
  template <int B>
  static __m256 lookup8(__m256i idx, const T& t) {
    // 2-bit: the in-lane vpermilps (bits 0..1 of each index) is enough, as entries 4..7 repeat 0..3, and it is
    // cheaper than the lane-crossing vpermps on AMD cores.
    if constexpr (B == 2) return _mm256_permutevar_ps(t.lo, idx);
    const __m256 lo = _mm256_permutevar8x32_ps(t.lo, idx);  // uses bits 0..2; entries 0..7 replicate for B == 3
    if constexpr (B < 4) return lo;
    const __m256 hi = _mm256_permutevar8x32_ps(t.hi, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3 picks the half
  }
  template <int B, bool kAround>
  static F lookup(const uint32_t* blk, int h, const T& t) {
    const __m256i v =
        B == 2 ? _mm256_set1_epi32(int(blk[h]))
        : B == 3 && kAround
            ? _mm256_broadcastq_epi64(_mm_loadl_epi64(static_cast<const __m128i*>(lut3_raw_address(blk, h))))
            : _mm256_set1_epi64x(int64_t(lut_raw<B>(blk, h)));
    return {lookup8<B>(_mm256_srlv_epi32(v, shifts8<B, 0>()), t), lookup8<B>(_mm256_srlv_epi32(v, shifts8<B, 8>()), t)};
  }
};
#include "gemm_lut_isa.inc"
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ---- AVX-512 ---------------------------------------------------------------------------------------------
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
#endif
namespace avx512 {
template <int B>
__m512i shifts16() {
  return _mm512_setr_epi32(lane_shift<B>(0), lane_shift<B>(1), lane_shift<B>(2), lane_shift<B>(3), lane_shift<B>(4),
                           lane_shift<B>(5), lane_shift<B>(6), lane_shift<B>(7), lane_shift<B>(8), lane_shift<B>(9),
                           lane_shift<B>(10), lane_shift<B>(11), lane_shift<B>(12), lane_shift<B>(13),
                           lane_shift<B>(14), lane_shift<B>(15));
}
struct V {
  static constexpr const char* kName = "avx512";
  static constexpr int NR = 4, MR = 4, MM = 4, MN = 4;
  using F = __m512;
  using T = __m512;
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F f) { _mm512_storeu_ps(p, f); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(F f) { return _mm512_reduce_add_ps(f); }
  static F interleave(F f) {
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15), f);
  }
  static F load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static F load_bf16(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static float h2f(uint16_t h) { return _cvtsh_ss(h); }
  static T table(const float* t16, float s, float z) {
    return _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(t16), _mm512_set1_ps(z)), _mm512_set1_ps(s));
  }
  template <int B, bool kAround>
  static F lookup(const uint32_t* blk, int h, T t) {
    const __m512i v =
        B == 2 ? _mm512_set1_epi32(int(blk[h]))
        : B == 3 && kAround
            ? _mm512_broadcastq_epi64(_mm_loadl_epi64(static_cast<const __m128i*>(lut3_raw_address(blk, h))))
            : _mm512_set1_epi64(int64_t(lut_raw<B>(blk, h)));
    return _mm512_permutexvar_ps(_mm512_srlv_epi32(v, shifts16<B>()), t);  // uses bits 0..3 of each index
  }
};
#include "gemm_lut_isa.inc"
}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // LOWBIT_LUT_X86

// ---- path selection (cpu_isa.h) --------------------------------------------------------------------------
const LutKernels& kernels_for(int isa) {
#if LOWBIT_LUT_X86
  if (isa >= kIsaAvx512) return avx512::kernels;
  if (isa == kIsaAvx2) return avx2::kernels;
#endif
  return portable::kernels;
}

template <typename IO>
void store_out(const float* y, void* out, int64_t count) {
  auto* o = static_cast<typename IO::storage*>(out);
#pragma omp parallel for schedule(static) if (count > (1 << 16))
  for (int64_t i = 0; i < count; ++i) IO::store(o, i, y[i]);
}

}  // namespace

void lut_gemm_cpu(const TensorView& x, const TensorView& packed, const TensorView& scales, const TensorView* zeros,
                  const TensorView& table, const TensorView& out, int bits, int group_size) {
  if (!lut_gemm_bits_ok(bits)) throw std::invalid_argument("lut_gemm: bits must be 2, 3 or 4, got " + std::to_string(bits));
  if (!lut_gemm_group_ok(group_size))
    throw std::invalid_argument("lut_gemm: group_size must be 32, 64 or 128, got " + std::to_string(group_size));
  const int isa = cpu_isa();
  const LutKernels& kern = kernels_for(isa);
  const int64_t m = x.size(0), k = x.size(1), n = scales.size(0), wpr = words_per_row(k, bits);
  if (m == 0 || n == 0) return;
  const int64_t blocks = blocks_for(k), kp = blocks * kCodesPerBlock, mpad = (m + 3) / 4 * 4;
  const bool interleaved = packed.ndim() == 3;
  const bool pairs = bits == 2 && m <= kLutPairMaxRows && n >= kLutPairMinN && isa >= kIsaAvx512;
  std::vector<uint32_t> canonical;  // the interleaved layout, for the paths that read the canonical one
  const uint32_t* codes = packed.ptr<uint32_t>();
  if (interleaved && !pairs && blocks > 0) {
    canonical.resize(size_t(n * wpr));
#pragma omp parallel for schedule(static) if (n * wpr > (1 << 16))
    for (int64_t r = 0; r < n; ++r)
      for (int64_t w = 0; w < wpr; ++w)
        canonical[size_t(r * wpr + w)] = codes[(r / kLutInterleaveRows * wpr + w) * kLutInterleaveRows +
                                               r % kLutInterleaveRows];
    codes = canonical.data();
  }
  const int dt = x.dtype == DType::f32 ? 0 : x.dtype == DType::f16 ? 1 : 2;

  std::vector<float> ybuf(out.dtype == DType::f32 ? 0 : size_t(m * n));
  float* y = out.dtype == DType::f32 ? out.ptr<float>() : ybuf.data();
  if (blocks == 0) {
    std::fill(y, y + m * n, 0.0f);
  } else if (pairs) {
    std::vector<float> xn(size_t(m * kp), 0.0f);  // x in fp32, natural order, zero-padded to kp
    by_dtype(x.dtype, "lut_gemm", "x", [&](auto io) {
      using IO = decltype(io);
      const auto* src = static_cast<const typename IO::storage*>(x.data);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t c = 0; c < k; ++c) xn[i * kp + c] = IO::load(src, i * k + c);
    });
    lut2_pairs_gemv_avx512({codes, interleaved, wpr, scales.ptr<uint16_t>(),
                            zeros ? zeros->ptr<uint16_t>() : nullptr, groups_for(k, group_size), group_size,
                            table.ptr<float>(), xn.data(), y, m, n});
  } else {
    std::vector<float> xs(size_t(mpad * kp), 0.0f);
    const char* xsrc = static_cast<const char*>(x.data);
    const int esize = dtype_size(x.dtype);
#pragma omp parallel for schedule(static) if (m * k > (1 << 16))
    for (int64_t i = 0; i < m; ++i) kern.stage[dt](xsrc + i * k * esize, k, xs.data() + i * kp, kp);

    float table16[kLutMaxEntries];
    const float* tv = table.ptr<float>();
    for (int i = 0; i < kLutMaxEntries; ++i) table16[i] = tv[i & ((1 << bits) - 1)];
    const LutArgs args{codes, wpr, scales.ptr<uint16_t>(),
                       zeros ? zeros->ptr<uint16_t>() : nullptr, groups_for(k, group_size), table16, xs.data(), kp,
                       y, m, n, blocks, group_size / kCodesPerBlock};
    if (m < kLargeM) {
      const int64_t tiles = (n + kern.nr - 1) / kern.nr;
      const auto gemv = kern.gemv[bits - 2];
#pragma omp parallel for schedule(static)
      for (int64_t t = 0; t < tiles; ++t) gemv(args, t * kern.nr);
    } else {
      const int64_t ntiles = (n + kTileN - 1) / kTileN, mtiles = (m + kTileM - 1) / kTileM;
      const auto gemm = kern.gemm[bits - 2];
#pragma omp parallel
      {
        std::vector<float> w(size_t(kTileN * kTileBlocks * kCodesPerBlock));
#pragma omp for schedule(dynamic)
        for (int64_t t = 0; t < ntiles * mtiles; ++t) {
          const int64_t m0 = (t % mtiles) * kTileM;
          gemm(args, (t / mtiles) * kTileN, m0, std::min(m, m0 + kTileM), w.data());
        }
      }
    }
  }
  if (out.dtype == DType::f16) store_out<F16>(y, out.data, m * n);
  if (out.dtype == DType::bf16) store_out<BF16>(y, out.data, m * n);
}

}  // namespace lowbit
