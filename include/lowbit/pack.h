// The canonical packed layout of low-bit codes, its element logic (shared by CPU and CUDA kernels), and the
// packing / dequantization entry points.
//
// Layout ("canonical", what checkpoints store): a weight W [N, K] has codes q[n, k] of b = 2, 3 or 4 bits.
// Row n is cut along K into blocks of 32 codes; block j is stored in b consecutive 32-bit words that together
// form one little-endian 32*b-bit integer, code i of the block at bits [i*b, i*b + b). A row therefore holds
// words_per_row(K, b) = ceil(K / 32) * b words (3-bit: 32 codes in 3 words, codes 10 and 21 straddle words);
// codes past K in the last block are zero. Torch stores the words as int32 (same bits).
//
// Groups run along K: group g covers k in [g*G, min(K, (g+1)*G)) for a group size G in {32, 64, 128}; when G
// does not divide K the last group is short (not padded), so scales/zeros have ceil(K / G) columns.
//   uniform: w = scale[n, g] * (q - zero[n, g])        scale, zero: fp16 [N, ceil(K/G)]
//   lut:     w = scale[n, g] * table[q]                table: fp32 [2^b]
//   mixed:   each K-group g has its own width bits[g] in {2, 4} (uint8 [ceil(K/G)], shared by all rows);
//            a row is the concatenation of its groups, group g packed as above with bits[g] over its own
//            ceil(len_g / 32) blocks, so group g starts at word sum_{g' < g} ceil(len_g' / 32) * bits[g'].
//            w = scale[n, g] * (q - zero[n, g]).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "lowbit/common.h"
#include "lowbit/tensor_view.h"

namespace lowbit {

constexpr int kCodesPerBlock = 32;

LOWBIT_HD int64_t blocks_for(int64_t k) { return (k + kCodesPerBlock - 1) / kCodesPerBlock; }
LOWBIT_HD int64_t words_per_row(int64_t k, int bits) { return blocks_for(k) * bits; }
LOWBIT_HD int64_t groups_for(int64_t k, int group_size) { return (k + group_size - 1) / group_size; }

// Code i (0..31) of the block whose b words start at `block`.
LOWBIT_HD uint32_t extract_code(const uint32_t* block, int i, int bits) {
  const int bit = i * bits;
  const int w = bit >> 5;
  const int s = bit & 31;
  uint32_t v = block[w] >> s;
  if (s + bits > 32) v |= block[w + 1] << (32 - s);
  return v & ((1u << bits) - 1u);
}

// All 32 codes of a block, unrolled for a compile-time width (no word-straddling branch for 2 and 4 bits).
template <int BITS>
LOWBIT_HD void unpack_block(const uint32_t* block, uint8_t* codes) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < kCodesPerBlock; ++i) codes[i] = uint8_t(extract_code(block, i, BITS));
}

// Writes codes[0..count) (count <= 32, the rest taken as zero) into the b words of one block.
LOWBIT_HD void pack_block(const uint8_t* codes, int count, int bits, uint32_t* block) {
  for (int w = 0; w < bits; ++w) block[w] = 0u;
  for (int i = 0; i < count; ++i) {
    const uint32_t c = codes[i];
    const int bit = i * bits;
    const int w = bit >> 5;
    const int s = bit & 31;
    block[w] |= c << s;
    if (s + bits > 32) block[w + 1] |= c >> (32 - s);
  }
}

// Affine and table dequantization of one code.
LOWBIT_HD float dequant_uniform(uint32_t q, float scale, float zero) { return scale * (float(q) - zero); }
LOWBIT_HD float dequant_lut(uint32_t q, float scale, const float* table) { return scale * table[q]; }

// Word offset of K-group g inside a mixed-format row (group_bits: width of each group).
LOWBIT_HD int64_t mixed_group_word_offset(const uint8_t* group_bits, int g, int group_size) {
  int64_t off = 0;
  for (int i = 0; i < g; ++i) off += int64_t(group_size / kCodesPerBlock) * group_bits[i];
  return off;
}

// Words of one mixed-format row: sum over groups of ceil(len_g / 32) * bits[g].
LOWBIT_HD int64_t mixed_words_per_row(const uint8_t* group_bits, int64_t k, int group_size) {
  const int64_t groups = groups_for(k, group_size);
  if (groups == 0) return 0;
  const int64_t last = k - (groups - 1) * group_size;
  return mixed_group_word_offset(group_bits, int(groups - 1), group_size) + blocks_for(last) * group_bits[groups - 1];
}

// Host: the message for a code that does not fit its width (group >= 0 names the group of a mixed layout).
inline std::string bad_code_message(const char* op, int64_t row, int64_t col, int value, int bits, int64_t group) {
  std::string s = std::string(op) + ": codes[" + std::to_string(row) + ", " + std::to_string(col) +
                  "] = " + std::to_string(value) + " does not fit in " + std::to_string(bits) + " bits";
  if (group >= 0) s += " (group " + std::to_string(group) + ")";
  return s + "; codes must be < " + std::to_string(1 << bits);
}

// Host: throws std::invalid_argument naming the first entry of group_bits that is not 2 or 4.
inline void check_group_bits_values(const uint8_t* group_bits, int64_t groups, const char* op) {
  for (int64_t g = 0; g < groups; ++g)
    if (group_bits[g] != 2 && group_bits[g] != 4)
      throw std::invalid_argument(std::string(op) + ": group_bits must contain only 2 and 4, got group_bits[" +
                                  std::to_string(g) + "] = " + std::to_string(int(group_bits[g])));
}

// Entry points. Every tensor is contiguous and on one device; the bindings check shapes and dtypes first.
//   codes: uint8 [N, K]; packed: int32 or uint32 [N, words] (words_per_row, or mixed_words_per_row);
//   scales, zeros: fp16 [N, ceil(K/G)]; table: fp32 [2^bits]; group_bits: uint8 [ceil(K/G)] of 2 or 4;
//   out: fp32, fp16 or bf16 [N, K]. pack_* throw std::invalid_argument naming the first code (row, col) that
//   does not fit its width, before writing anything (CUDA: a reduction kernel, then a stream sync).
void pack_uniform_cpu(const TensorView& codes, const TensorView& packed, int bits);
void unpack_cpu(const TensorView& packed, const TensorView& codes, int bits);
void dequantize_uniform_cpu(const TensorView& packed, const TensorView& scales, const TensorView& zeros,
                            const TensorView& out, int bits, int group_size);
void dequantize_lut_cpu(const TensorView& packed, const TensorView& scales, const TensorView& table,
                        const TensorView& out, int bits, int group_size);
void pack_mixed_cpu(const TensorView& codes, const TensorView& group_bits, const TensorView& packed, int group_size);
void unpack_mixed_cpu(const TensorView& packed, const TensorView& group_bits, const TensorView& codes, int group_size);
void dequantize_mixed_cpu(const TensorView& packed, const TensorView& scales, const TensorView& zeros,
                          const TensorView& group_bits, const TensorView& out, int group_size);

void pack_uniform_cuda(const TensorView& codes, const TensorView& packed, int bits, int64_t stream);
void unpack_cuda(const TensorView& packed, const TensorView& codes, int bits, int64_t stream);
void dequantize_uniform_cuda(const TensorView& packed, const TensorView& scales, const TensorView& zeros,
                             const TensorView& out, int bits, int group_size, int64_t stream);
void dequantize_lut_cuda(const TensorView& packed, const TensorView& scales, const TensorView& table,
                         const TensorView& out, int bits, int group_size, int64_t stream);
void pack_mixed_cuda(const TensorView& codes, const TensorView& group_bits, const TensorView& packed, int group_size,
                     int64_t stream);
void unpack_mixed_cuda(const TensorView& packed, const TensorView& group_bits, const TensorView& codes,
                       int group_size, int64_t stream);
void dequantize_mixed_cuda(const TensorView& packed, const TensorView& scales, const TensorView& zeros,
                           const TensorView& group_bits, const TensorView& out, int group_size, int64_t stream);

}  // namespace lowbit
