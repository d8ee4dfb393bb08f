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
//
// Table mode (the `lut` format, W_hat = scale * (table[q] - zero), NF tables): the 2^b fp32 table values are
// rounded once (at load time, lowbit.ops.prepare_lut_table) to int8: table_scale = max |table| / 127 (1 for an
// all-zero table), tq[i] = rint(table[i] / table_scale), held as 16 bytes (entry i at byte i, entries past 2^b
// repeating the table) in 4 little-endian words. The inner loop then looks a code's int8 value up in registers
// (pshufb on CPU, prmt on CUDA) and the GEMM computes, exactly in integers inside a group,
//   y[m, n] = sum_g scale[n, g] * d[m, g] * (table_scale * sum_{k in g} tq[q[n, k]] * xq[m, k]
//                                            - zero[n, g] * sum_{k in g} xq[m, k]).
// Without a table, tq[q] = q and table_scale = 1: the formula above.
#pragma once
#include <cmath>
#include <cstdint>

#include "lowbit/common.h"
#include "lowbit/tensor_view.h"

namespace lowbit {

constexpr int kAlignedChunkWords = 8;
constexpr int kActQuantPad = 128;  // xq rows are padded to a multiple of this (the largest chunk)
constexpr int kActQuantMax = 127;
constexpr int kTableBytes = 16;  // the int8 table of table mode, entries past 2^bits repeating

LOWBIT_HD bool async_bits_ok(int bits) { return bits == 2 || bits == 4; }
LOWBIT_HD int aligned_chunk_codes(int bits) { return 256 / bits; }
LOWBIT_HD int aligned_runs_per_chunk(int bits) { return 8 / bits; }
LOWBIT_HD int64_t aligned_chunks(int64_t k, int bits) {
  return (k + aligned_chunk_codes(bits) - 1) / aligned_chunk_codes(bits);
}
LOWBIT_HD int64_t aligned_words_per_row(int64_t k, int bits) { return aligned_chunks(k, bits) * kAlignedChunkWords; }
LOWBIT_HD int64_t aligned_padded_k(int64_t k) { return (k + kActQuantPad - 1) / kActQuantPad * kActQuantPad; }

// Byte offset (inside a row) and bit shift of the codes of column k in the aligned layout.
LOWBIT_HD int64_t aligned_byte(int64_t k, int bits) { return k / aligned_chunk_codes(bits) * 32 + (k & 31); }
LOWBIT_HD int aligned_shift(int64_t k, int bits) { return int((k >> 5) % aligned_runs_per_chunk(bits)) * bits; }

// Activation quantization of one group: the multiplier 127 / amax (0 when amax = 0), the stored scale
// amax / 127, and one value's int8 code.
LOWBIT_HD float act_quant_multiplier(float amax) { return amax > 0.0f ? float(kActQuantMax) / amax : 0.0f; }
LOWBIT_HD float act_quant_scale(float amax) { return amax / float(kActQuantMax); }
LOWBIT_HD int8_t act_quant_code(float x, float multiplier) {
  float q = rintf(x * multiplier);
  q = q > float(kActQuantMax) ? float(kActQuantMax) : (q < -float(kActQuantMax) ? -float(kActQuantMax) : q);
  return int8_t(q);
}

// One group's contribution to y[m, n]: scale * d * (table_scale * dot - zero * xsum), dot and xsum exact
// integers (table_scale = 1 without a table).
LOWBIT_HD float async_group_term(float scale, float zero, float d, float table_scale, int32_t dot, int32_t xsum) {
  return scale * d * (table_scale * float(dot) - zero * float(xsum));
}

// The 4 codes of columns k .. k + 3 (k a multiple of 4) of an aligned row, one per byte: the 4 bytes at
// aligned_byte(k) shifted by aligned_shift(k) and masked (the codes of 4 consecutive columns share a shift).
LOWBIT_HD uint32_t aligned_codes4(const uint8_t* row, int64_t k, int bits) {
  const uint8_t* p = row + aligned_byte(k, bits);
  const uint32_t word = uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
  const uint32_t mask = bits == 2 ? 0x03030303u : 0x0f0f0f0fu;
  return (word >> aligned_shift(k, bits)) & mask;
}

// Byte i of the result is byte ((sel >> 4 i) & 7) of the 8 bytes hi:lo (lo the low word), for selectors whose
// nibbles are below 8: CUDA's __byte_perm (one prmt) on the device, the same bytes on the host.
LOWBIT_HD uint32_t byte_select(uint32_t lo, uint32_t hi, uint32_t sel) {
#ifdef __CUDA_ARCH__
  return __byte_perm(lo, hi, sel);
#else
  const uint64_t v = uint64_t(hi) << 32 | lo;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= uint32_t((v >> (8 * ((sel >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
  return r;
#endif
}

// The int8 table values of 4 codes (< 16) held one per byte of `codes`, one per byte of the result:
// byte i = tq[byte i of codes], tq the 16 table bytes as 4 words. Two byte selections (entries 0..7 and
// 8..15, by the codes' low 3 bits) and a per-byte pick by bit 3.
LOWBIT_HD uint32_t table_bytes4(uint32_t codes, const uint32_t tq[4]) {
  const uint32_t low3 = codes & 0x07070707u;
  const uint32_t pairs = low3 | (low3 >> 4);  // byte 0: code0 | code1 << 4, byte 2: code2 | code3 << 4
  const uint32_t sel = (pairs & 0xffu) | ((pairs >> 8) & 0xff00u);
  const uint32_t lo = byte_select(tq[0], tq[1], sel), hi = byte_select(tq[2], tq[3], sel);
  const uint32_t pick = ((codes >> 3) & 0x01010101u) * 0xffu;  // 0xff in the bytes whose code is >= 8
  return (lo & ~pick) | (hi & pick);
}

// The sum over 4 byte pairs of int8(a_i) * int8(b_i): CUDA's __dp4a on the device.
LOWBIT_HD int32_t dot4_i8(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __dp4a(int(a), int(b), 0);
#else
  int32_t s = 0;
  for (int i = 0; i < 4; ++i) s += int32_t(int8_t(uint8_t(a >> (8 * i)))) * int32_t(int8_t(uint8_t(b >> (8 * i))));
  return s;
#endif
}

// Mixed layout (the `mixed` format, each K-group 2 or 4 bits wide by group_bits; made once by
// lowbit.ops.prepare_mixed_gemm): the 32-column runs of the 4-bit groups, in K order, form a 4-bit aligned
// segment of R4 runs (aligned_words_per_row(32 R4, 4) words), followed by the runs of the 2-bit groups as a
// 2-bit aligned segment of R2 runs; run s of a segment multiplies the 32 activations of K-run runs[s] (xq columns
// 32 runs[s] .. + 31, group 32 runs[s] / group_size). Each map is increasing and holds whole K-groups (a short
// last group of K ends in a zero-padded run, against the zero padding of xq), so one weight row is one pass over
// both segments: one kernel, the width fixed per segment, no branch per element.
LOWBIT_HD int64_t mixed_aligned_words(int64_t runs4, int64_t runs2) {
  return aligned_words_per_row(32 * runs4, 4) + aligned_words_per_row(32 * runs2, 2);
}

// The operands of the GEMM. xq: int8 [M, aligned_padded_k(K)]; d: fp32 [M, groups]; packed: int32
// [N, aligned_words_per_row(K, bits)]; scales, zeros: fp16 [N, groups] (zeros nullptr: zero = 0); table_q: int8
// [16] and table_scale: fp32 [1] (both nullptr: no table); out: [M, N] fp32/fp16/bf16. K comes from the
// caller, since xq is padded.
struct AsyncGemmOperands {
  const TensorView& xq;
  const TensorView& d;
  const TensorView& packed;
  const TensorView& scales;
  const TensorView* zeros;
  const TensorView* table_q;
  const TensorView* table_scale;
  const TensorView& out;
  int64_t k;
  int bits, group_size;
};

// The operands of the mixed GEMM: xq, d, scales, zeros, out as above; packed: int32 [N, mixed_aligned_words(R4,
// R2)]; runs4, runs2: int32 [R4], [R2], the K-run of each segment run (each < ceil(K / 32)).
struct MixedGemmOperands {
  const TensorView& xq;
  const TensorView& d;
  const TensorView& packed;
  const TensorView& runs4;
  const TensorView& runs2;
  const TensorView& scales;
  const TensorView& zeros;
  const TensorView& out;
  int64_t k;
  int group_size;
};

// Entry points. x: contiguous [M, K] fp32/fp16/bf16.
void quantize_activations_cpu(const TensorView& x, const TensorView& xq, const TensorView& d, int group_size);
void async_dequant_gemm_cpu(const AsyncGemmOperands& op);
void quantize_activations_cuda(const TensorView& x, const TensorView& xq, const TensorView& d, int group_size,
                               int64_t stream);
void async_dequant_gemm_cuda(const AsyncGemmOperands& op, int64_t stream);
void mixed_gemm_cpu(const MixedGemmOperands& op);
void mixed_gemm_cuda(const MixedGemmOperands& op, int64_t stream);

}  // namespace lowbit
