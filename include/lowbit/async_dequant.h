// The "aligned" weight layout of the asynchronous-dequantization GEMM (2 or 4 bits), the int8 activation format
// it multiplies, their element logic (shared by the CPU and CUDA kernels) and the entry points.
//
// Aligned layout (made once from the canonical layout by lowbit.ops.prepare_async_dequant): row n of a b-bit
// weight [N, K] (b = 2 or 4) is cut along K into chunks of 256 / b codes (128 or 64), each stored in 32 bytes
// (8 int32 words): byte j (0..31) of chunk t holds, at bits [b c, b c + b), the code of k = (256 / b) t + 32 c + j
// (c < 8 / b). A row is aligned_words_per_row(K, b) = ceil(K b / 256) * 8 words; codes past K are 0. So a chunk is
// one 32-byte load, every row starts 32-byte aligned, and one shift + mask of a chunk gives the 32 codes of the
// consecutive run k = (256 / b) t + 32 c .. + 31 as bytes: the order in which a SIMD lane or a CUDA thread meets
// contiguous activations.
//
// Activations are quantized on the fly, per row m and weight group g (G = 32, 64 or 128 columns, the last group
// short when G does not divide K), symmetrically to int8:
//   amax = max |x[m, k]| over the group, d[m, g] = amax / 127, xq[m, k] = clamp(rint(x[m, k] * (127 / amax)))
//   (all zero when amax = 0), stored as xq int8 [M, ceil(K / 128) * 128] (zero past K) and d fp32 [M, groups].
// The GEMM then computes, exactly in integers inside a group and in fp32 across groups,
//   y[m, n] = sum_g scale[n, g] * d[m, g] * (sum_{k in g} q[n, k] * xq[m, k] - zero[n, g] * sum_{k in g} xq[m, k])
// i.e. y = xq_dequantized . W_hat^T with W_hat = scale * (q - zero), the `uniform` format of pack.h.
#pragma once
#include <cmath>
#include <cstdint>

#include "lowbit/common.h"
#include "lowbit/tensor_view.h"

namespace lowbit {

constexpr int kAlignedChunkWords = 8;
constexpr int kActQuantPad = 128;  // xq rows are padded to a multiple of this (the largest chunk)
constexpr int kActQuantMax = 127;

LOWBIT_HD bool async_bits_ok(int bits) { return bits == 2 || bits == 4; }
LOWBIT_HD int aligned_chunk_codes(int bits) { return 256 / bits; }
LOWBIT_HD int aligned_runs_per_chunk(int bits) { return 8 / bits; }
LOWBIT_HD int64_t aligned_chunks(int64_t k, int bits) {
  return (k + aligned_chunk_codes(bits) - 1) / aligned_chunk_codes(bits);
}
LOWBIT_HD int64_t aligned_words_per_row(int64_t k, int bits) { return aligned_chunks(k, bits) * kAlignedChunkWords; }
LOWBIT_HD int64_t aligned_padded_k(int64_t k) { return (k + kActQuantPad - 1) / kActQuantPad * kActQuantPad; }

// Byte offset (inside a row) and bit shift of the code of column k in the aligned layout.
LOWBIT_HD int64_t aligned_byte(int64_t k, int bits) { return k / aligned_chunk_codes(bits) * 32 + (k & 31); }
LOWBIT_HD int aligned_shift(int64_t k, int bits) { return int((k >> 5) % aligned_runs_per_chunk(bits)) * bits; }
LOWBIT_HD uint32_t aligned_code(const uint8_t* row, int64_t k, int bits) {
  return (uint32_t(row[aligned_byte(k, bits)]) >> aligned_shift(k, bits)) & ((1u << bits) - 1u);
}

// Activation quantization of one group: the multiplier 127 / amax (0 when amax = 0), the stored scale
// amax / 127, and one value's int8 code.
LOWBIT_HD float act_quant_multiplier(float amax) { return amax > 0.0f ? float(kActQuantMax) / amax : 0.0f; }
LOWBIT_HD float act_quant_scale(float amax) { return amax / float(kActQuantMax); }
LOWBIT_HD int8_t act_quant_code(float x, float multiplier) {
  float q = rintf(x * multiplier);
  q = q > float(kActQuantMax) ? float(kActQuantMax) : (q < -float(kActQuantMax) ? -float(kActQuantMax) : q);
  return int8_t(q);
}

// One group's contribution to y[m, n]: scale * d * (dot - zero * xsum), dot and xsum exact integers.
LOWBIT_HD float async_group_term(float scale, float zero, float d, int32_t dot, int32_t xsum) {
  return scale * d * (float(dot) - zero * float(xsum));
}

// Entry points. x: contiguous [M, K] fp32/fp16/bf16; xq: int8 [M, aligned_padded_k(K)]; d: fp32 [M, groups];
// packed: int32 [N, aligned_words_per_row(K, bits)]; scales, zeros: fp16 [N, groups]; out: [M, N] of x's dtype
// (the GEMM takes K from the caller, since xq is padded).
void quantize_activations_cpu(const TensorView& x, const TensorView& xq, const TensorView& d, int group_size);
void async_dequant_gemm_cpu(const TensorView& xq, const TensorView& d, const TensorView& packed,
                            const TensorView& scales, const TensorView& zeros, const TensorView& out, int64_t k,
                            int bits, int group_size);
void quantize_activations_cuda(const TensorView& x, const TensorView& xq, const TensorView& d, int group_size,
                               int64_t stream);
void async_dequant_gemm_cuda(const TensorView& xq, const TensorView& d, const TensorView& packed,
                             const TensorView& scales, const TensorView& zeros, const TensorView& out, int64_t k,
                             int bits, int group_size, int64_t stream);

}  // namespace lowbit
