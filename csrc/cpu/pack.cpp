// CPU packing, unpacking and dequantization of the canonical layout (include/lowbit/pack.h). Rows run in
// parallel (OpenMP); inside a row each 32-code block is unpacked by unpack_block<BITS> (the width a template
// argument, so the loop unrolls and vectorizes) and its values are mapped and stored by fixed-length loops the
// compiler vectorizes, one clone of each row function per ISA. pack_* check every code before writing.
#include "lowbit/pack.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/isa_clones.h"
#include "lowbit/element_io.h"

namespace lowbit {
namespace {

constexpr int64_t kNoBadCode = std::numeric_limits<int64_t>::max();

const uint32_t* words_in(const TensorView& t) { return static_cast<const uint32_t*>(t.data); }
uint32_t* words_out(const TensorView& t) { return static_cast<uint32_t*>(t.data); }

// Vector decoding of one 32-code block into two 16-lane halves (GCC/Clang vector extensions, so each ISA clone
// gets its own instructions: a permute, variable shifts and a mask). Lane i of half h holds code c = 16h + i:
// (w[lo] >> s) | (w[lo + 1] << (32 - s)) masked to BITS bits, with lo = c*BITS / 32 and s = c*BITS % 32 as in
// extract_code; the second term matters only for the 3-bit codes that straddle two words and is written as two
// shifts so that s = 0 stays defined. unpack (and CUDA) use the scalar unpack_block; tests compare both.
using u32x4 = uint32_t __attribute__((vector_size(16)));
using u32x16 = uint32_t __attribute__((vector_size(64)));
using f32x16 = float __attribute__((vector_size(64)));
constexpr int kHalf = kCodesPerBlock / 2;
using HalfLanes = std::make_index_sequence<kHalf>;

template <int BITS> constexpr int lo_word(int c) { return c * BITS / 32; }
template <int BITS> constexpr int hi_word(int c) { return std::min(lo_word<BITS>(c) + 1, BITS - 1); }
template <int BITS> constexpr uint32_t lane_shift(int c) { return uint32_t(c * BITS % 32); }

template <int BITS>
LOWBIT_INLINE u32x4 load_block(const uint32_t* block) {
  return u32x4{block[0], block[1], BITS > 2 ? block[2] : 0u, BITS > 3 ? block[3] : 0u};
}

template <int BITS, int H, size_t... I>
LOWBIT_INLINE u32x16 half_codes(u32x4 w, std::index_sequence<I...>) {
  const u32x16 shift = {lane_shift<BITS>(H * kHalf + I)...};
  u32x16 c = __builtin_shufflevector(w, w, lo_word<BITS>(H * kHalf + I)...) >> shift;
  if constexpr (BITS == 3) c |= (__builtin_shufflevector(w, w, hi_word<BITS>(H * kHalf + I)...) << 1) << (31 - shift);
  return c & ((1u << BITS) - 1u);
}

// Code -> value maps of one group, on 16 lanes (the same arithmetic as dequant_uniform / dequant_lut).
struct AffineMap {
  float scale, zero;
  LOWBIT_INLINE f32x16 operator()(u32x16 q) const { return scale * (__builtin_convertvector(q, f32x16) - zero); }
};
struct TableMap {
  const float* table;
  float scale;
  LOWBIT_INLINE f32x16 operator()(u32x16 q) const {
    f32x16 v;
    for (int i = 0; i < kHalf; ++i) v[i] = dequant_lut(q[i], scale, table);
    return v;
  }
};

// Per-group parameters. row(r, scratch) converts row r's fp16 parameters to fp32 once (into scratch, kScratch
// floats per group) and returns the row's view, whose map(g) is group g's map.
struct AffineRow {
  const float* scale;
  const float* zero;
  AffineMap map(int64_t g) const { return {scale[g], zero[g]}; }
};
struct AffineParams {
  static constexpr int kScratch = 2;
  const uint16_t* scales;
  const uint16_t* zeros;
  int64_t groups;
  LOWBIT_INLINE AffineRow row(int64_t r, float* scratch) const {
    const uint16_t* s = scales + r * groups;
    const uint16_t* z = zeros + r * groups;
    for (int64_t g = 0; g < groups; ++g) {
      scratch[g] = half_to_float(s[g]);
      scratch[groups + g] = half_to_float(z[g]);
    }
    return {scratch, scratch + groups};
  }
};
struct TableRow {
  const float* table;
  const float* scale;
  TableMap map(int64_t g) const { return {table, scale[g]}; }
};
struct TableParams {
  static constexpr int kScratch = 1;
  const uint16_t* scales;
  const float* table;
  int64_t groups;
  LOWBIT_INLINE TableRow row(int64_t r, float* scratch) const {
    const uint16_t* s = scales + r * groups;
    for (int64_t g = 0; g < groups; ++g) scratch[g] = half_to_float(s[g]);
    return {table, scratch};
  }
};

// Stores count fp32 values as IO's type. fp16 goes through _Float16, which the x86-64-v3/v4 clones compile to
// vcvtps2ph (the branchy software float_to_half does not vectorize); both round to nearest even.
template <typename IO>
LOWBIT_INLINE void store_values(typename IO::storage* d, const float* v, int64_t count) {
#if defined(__FLT16_MAX__)
  if constexpr (std::is_same_v<IO, F16>) {
    for (int64_t i = 0; i < count; ++i) {
      const _Float16 h = static_cast<_Float16>(v[i]);
      std::memcpy(d + i, &h, sizeof(h));
    }
    return;
  }
#endif
  for (int64_t i = 0; i < count; ++i) IO::store(d, i, v[i]);
}

// The `len` codes of one group (ceil(len / 32) blocks of BITS words at `words`) -> values at dst.
template <int BITS, typename IO, typename Map>
LOWBIT_INLINE void dequant_group(const uint32_t* words, int64_t len, const Map& map, typename IO::storage* dst) {
  for (int64_t j = 0; j * kCodesPerBlock < len; ++j) {
    const u32x4 w = load_block<BITS>(words + j * BITS);
    const f32x16 lo = map(half_codes<BITS, 0>(w, HalfLanes())), hi = map(half_codes<BITS, 1>(w, HalfLanes()));
    float v[kCodesPerBlock];
    std::memcpy(v, &lo, sizeof(lo));
    std::memcpy(v + kHalf, &hi, sizeof(hi));
    typename IO::storage* d = dst + j * kCodesPerBlock;
    const int64_t count = len - j * kCodesPerBlock;
    if (count >= kCodesPerBlock)
      store_values<IO>(d, v, kCodesPerBlock);
    else
      store_values<IO>(d, v, count);
  }
}

template <int BITS>
LOWBIT_INLINE void unpack_group(const uint32_t* words, int64_t len, uint8_t* dst) {
  for (int64_t j = 0; j * kCodesPerBlock < len; ++j) {
    uint8_t q[kCodesPerBlock];
    unpack_block<BITS>(words + j * BITS, q);
    std::memcpy(dst + j * kCodesPerBlock, q, size_t(std::min<int64_t>(kCodesPerBlock, len - j * kCodesPerBlock)));
  }
}

void pack_group(const uint8_t* codes, int64_t len, int bits, uint32_t* words) {
  for (int64_t j = 0; j * kCodesPerBlock < len; ++j)
    pack_block(codes + j * kCodesPerBlock, int(std::min<int64_t>(kCodesPerBlock, len - j * kCodesPerBlock)), bits,
               words + j * bits);
}

// One row of a uniform-width layout (every group BITS wide); scratch holds the row's fp32 parameters.
template <int BITS, typename IO, typename Params>
LOWBIT_ISA_CLONES void dequant_uniform_row(const uint32_t* words, int64_t r, int64_t k, int group_size,
                                           const Params& params, float* scratch, typename IO::storage* dst) {
  const auto row = params.row(r, scratch);
  const int64_t group_words = group_size / kCodesPerBlock * BITS;
  for (int64_t g = 0; g * group_size < k; ++g)
    dequant_group<BITS, IO>(words + g * group_words, std::min<int64_t>(group_size, k - g * group_size), row.map(g),
                            dst + g * group_size);
}

// One row of the mixed layout (group g is group_bits[g] wide, 2 or 4).
template <typename IO>
LOWBIT_ISA_CLONES void dequant_mixed_row(const uint32_t* words, const uint8_t* group_bits, int64_t r, int64_t k,
                                         int group_size, const AffineParams& params, float* scratch,
                                         typename IO::storage* dst) {
  const AffineRow row = params.row(r, scratch);
  int64_t offset = 0;
  for (int64_t g = 0; g * group_size < k; ++g) {
    const int64_t len = std::min<int64_t>(group_size, k - g * group_size);
    if (group_bits[g] == 2)
      dequant_group<2, IO>(words + offset, len, row.map(g), dst + g * group_size);
    else
      dequant_group<4, IO>(words + offset, len, row.map(g), dst + g * group_size);
    offset += blocks_for(len) * group_bits[g];
  }
}

template <int BITS>
LOWBIT_ISA_CLONES void unpack_row(const uint32_t* words, int64_t k, uint8_t* dst) {
  unpack_group<BITS>(words, k, dst);
}

LOWBIT_ISA_CLONES void unpack_mixed_row(const uint32_t* words, const uint8_t* group_bits, int64_t k, int group_size,
                                        uint8_t* dst) {
  int64_t offset = 0;
  for (int64_t g = 0; g * group_size < k; ++g) {
    const int64_t len = std::min<int64_t>(group_size, k - g * group_size);
    if (group_bits[g] == 2)
      unpack_group<2>(words + offset, len, dst + g * group_size);
    else
      unpack_group<4>(words + offset, len, dst + g * group_size);
    offset += blocks_for(len) * group_bits[g];
  }
}

// Rows in parallel (threads only when there are at least kParallelCodes codes: waking them costs more below):
// f(row, scratch) with `scratch_floats` floats of per-thread scratch.
constexpr int64_t kParallelCodes = int64_t(1) << 16;

template <typename F>
void for_rows(int64_t rows, int64_t k, int64_t scratch_floats, F f) {
#pragma omp parallel if (rows * k >= kParallelCodes)
  {
    std::vector<float> scratch(static_cast<size_t>(scratch_floats));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) f(r, scratch.data());
  }
}

// The row-major index of the first code that does not fit its width (bits_of(col)), or kNoBadCode.
template <typename BitsOf>
int64_t first_bad_code(const uint8_t* codes, int64_t rows, int64_t k, BitsOf bits_of) {
  int64_t first = kNoBadCode;
#pragma omp parallel for schedule(static) reduction(min : first) if (rows * k >= kParallelCodes)
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = codes + r * k;
    for (int64_t c = 0; c < k; ++c)
      if (row[c] >> bits_of(c)) {
        first = std::min(first, r * k + c);
        break;
      }
  }
  return first;
}

[[noreturn]] void throw_bad_code(const char* op, const uint8_t* codes, int64_t index, int64_t k, int bits,
                                 int64_t group) {
  throw std::invalid_argument(bad_code_message(op, index / k, index % k, codes[index], bits, group));
}

template <typename IO, typename Params>
void dequant_uniform_rows(const TensorView& packed, const TensorView& out, int bits, int group_size,
                          const Params& params) {
  const int64_t rows = out.size(0), k = out.size(1), wpr = words_per_row(k, bits);
  const uint32_t* words = words_in(packed);
  auto* dst = out.ptr<typename IO::storage>();
  for_rows(rows, k, params.groups * Params::kScratch, [&](int64_t r, float* scratch) {
    const uint32_t* w = words + r * wpr;
    typename IO::storage* d = dst + r * k;
    switch (bits) {
      case 2: dequant_uniform_row<2, IO>(w, r, k, group_size, params, scratch, d); break;
      case 3: dequant_uniform_row<3, IO>(w, r, k, group_size, params, scratch, d); break;
      default: dequant_uniform_row<4, IO>(w, r, k, group_size, params, scratch, d); break;
    }
  });
}

template <typename Params>
void dispatch_uniform(const char* op, const TensorView& packed, const TensorView& out, int bits, int group_size,
                      const Params& params) {
  switch (out.dtype) {
    case DType::f32: dequant_uniform_rows<F32>(packed, out, bits, group_size, params); break;
    case DType::f16: dequant_uniform_rows<F16>(packed, out, bits, group_size, params); break;
    case DType::bf16: dequant_uniform_rows<BF16>(packed, out, bits, group_size, params); break;
    default: throw type_error(std::string(op) + ": out must be float32, float16 or bfloat16");
  }
}

void check_bits(const char* op, int bits) {
  if (bits < 2 || bits > 4)
    throw std::invalid_argument(std::string(op) + ": bits must be 2, 3 or 4, got " + std::to_string(bits));
}

template <typename IO>
void dequant_mixed_rows(const TensorView& packed, const AffineParams& params, const uint8_t* group_bits,
                        const TensorView& out, int group_size) {
  const int64_t rows = out.size(0), k = out.size(1), wpr = mixed_words_per_row(group_bits, k, group_size);
  const uint32_t* words = words_in(packed);
  auto* dst = out.ptr<typename IO::storage>();
  for_rows(rows, k, params.groups * AffineParams::kScratch, [&](int64_t r, float* scratch) {
    dequant_mixed_row<IO>(words + r * wpr, group_bits, r, k, group_size, params, scratch, dst + r * k);
  });
}

}  // namespace

void pack_uniform_cpu(const TensorView& codes, const TensorView& packed, int bits) {
  check_bits("pack_uniform", bits);
  const int64_t rows = codes.size(0), k = codes.size(1), wpr = words_per_row(k, bits);
  const auto* q = codes.ptr<uint8_t>();
  const int64_t bad = first_bad_code(q, rows, k, [bits](int64_t) { return bits; });
  if (bad != kNoBadCode) throw_bad_code("pack_uniform", q, bad, k, bits, -1);
  uint32_t* words = words_out(packed);
  for_rows(rows, k, 0, [&](int64_t r, float*) { pack_group(q + r * k, k, bits, words + r * wpr); });
}

void unpack_cpu(const TensorView& packed, const TensorView& codes, int bits) {
  check_bits("unpack", bits);
  const int64_t rows = codes.size(0), k = codes.size(1), wpr = words_per_row(k, bits);
  const uint32_t* words = words_in(packed);
  auto* q = codes.ptr<uint8_t>();
  for_rows(rows, k, 0, [&](int64_t r, float*) {
    switch (bits) {
      case 2: unpack_row<2>(words + r * wpr, k, q + r * k); break;
      case 3: unpack_row<3>(words + r * wpr, k, q + r * k); break;
      default: unpack_row<4>(words + r * wpr, k, q + r * k); break;
    }
  });
}

void dequantize_uniform_cpu(const TensorView& packed, const TensorView& scales, const TensorView& zeros,
                            const TensorView& out, int bits, int group_size) {
  check_bits("dequantize_uniform", bits);
  dispatch_uniform("dequantize_uniform", packed, out, bits, group_size,
                   AffineParams{scales.ptr<uint16_t>(), zeros.ptr<uint16_t>(), scales.size(1)});
}

void dequantize_lut_cpu(const TensorView& packed, const TensorView& scales, const TensorView& table,
                        const TensorView& out, int bits, int group_size) {
  check_bits("dequantize_lut", bits);
  dispatch_uniform("dequantize_lut", packed, out, bits, group_size,
                   TableParams{scales.ptr<uint16_t>(), table.ptr<float>(), scales.size(1)});
}

void pack_mixed_cpu(const TensorView& codes, const TensorView& group_bits, const TensorView& packed, int group_size) {
  const int64_t rows = codes.size(0), k = codes.size(1);
  const auto* q = codes.ptr<uint8_t>();
  const auto* gb = group_bits.ptr<uint8_t>();
  const int64_t wpr = mixed_words_per_row(gb, k, group_size);
  const int64_t bad = first_bad_code(q, rows, k, [gb, group_size](int64_t c) { return int(gb[c / group_size]); });
  if (bad != kNoBadCode) {
    const int64_t g = bad % k / group_size;
    throw_bad_code("pack_mixed", q, bad, k, gb[g], g);
  }
  uint32_t* words = words_out(packed);
  for_rows(rows, k, 0, [&](int64_t r, float*) {
    int64_t offset = 0;
    for (int64_t g = 0; g * group_size < k; ++g) {
      const int64_t len = std::min<int64_t>(group_size, k - g * group_size);
      pack_group(q + r * k + g * group_size, len, gb[g], words + r * wpr + offset);
      offset += blocks_for(len) * gb[g];
    }
  });
}

void unpack_mixed_cpu(const TensorView& packed, const TensorView& group_bits, const TensorView& codes,
                      int group_size) {
  const int64_t rows = codes.size(0), k = codes.size(1);
  const auto* gb = group_bits.ptr<uint8_t>();
  const int64_t wpr = mixed_words_per_row(gb, k, group_size);
  const uint32_t* words = words_in(packed);
  auto* q = codes.ptr<uint8_t>();
  for_rows(rows, k, 0, [&](int64_t r, float*) { unpack_mixed_row(words + r * wpr, gb, k, group_size, q + r * k); });
}

void dequantize_mixed_cpu(const TensorView& packed, const TensorView& scales, const TensorView& zeros,
                          const TensorView& group_bits, const TensorView& out, int group_size) {
  const auto* gb = group_bits.ptr<uint8_t>();
  const AffineParams params{scales.ptr<uint16_t>(), zeros.ptr<uint16_t>(), scales.size(1)};
  switch (out.dtype) {
    case DType::f32: dequant_mixed_rows<F32>(packed, params, gb, out, group_size); break;
    case DType::f16: dequant_mixed_rows<F16>(packed, params, gb, out, group_size); break;
    case DType::bf16: dequant_mixed_rows<BF16>(packed, params, gb, out, group_size); break;
    default: throw type_error("dequantize_mixed: out must be float32, float16 or bfloat16");
  }
}

}  // namespace lowbit
