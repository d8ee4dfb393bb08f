// Quantized KV cache (KIVI-style): the packed layout, its element logic (shared by the CPU and CUDA kernels) and
// the entry points.
//
// Per sequence b and KV head h, with head_dim D in {64, 80, 96, 128, 256}, b = 2 or 4 bits:
//   keys, per channel over groups of G tokens (G in {32, 64, 128}): token group t, channel d has an fp16 scale and
//     zero from the min/max over its G tokens, and its G codes packed along tokens in the canonical layout of
//     pack.h (32 codes per b words, code i at bits [i*b, i*b + b)), G*b/32 words:
//       k_codes int32 [B, H, T_groups, D, G*b/32]     k_scale, k_zero fp16 [B, H, T_groups, D]
//   values, per token over groups of kKvValueGroup = 32 channels (the last group short when D = 80): each token's
//     D codes packed along channels in the canonical layout, words_per_row(D, b) = ceil(D/32)*b words (= D*b/32
//     except D = 80, whose last block is half padding: the row stays one canonical row, so pack.h's unpack and
//     dequantize ops read it as is):
//       v_codes int32 [B, H, T_q, ceil(D/32)*b]       v_scale, v_zero fp16 [B, H, T_q, ceil(D/32)]
//   with T_q = T_groups * G, plus a full-precision window k_res, v_res [B, H, R, D] of the newest tokens.
//   Sequence b holds lengths_q[b] quantized tokens (a multiple of G, <= T_q) followed by lengths_res[b] <= R
//   window tokens. Value groups of 32 (not D): at 2 bits a per-token scale over 128 channels loses too much to
//   the largest channel; 32 costs the same 1 bit/value of fp16 metadata as key groups of 32 tokens.
//
// Dequantization: x = scale * (q - zero), the uniform format of pack.h, with a real-valued zero (the zero point is
// not rounded to an integer: key channels often sit far from 0, and an integer zero would force 0 into the range).
// Quantization of a group with extremes lo, hi (amax = max(|lo|, |hi|), qmax = 2^b - 1):
//   scale = fp16(clamp(max((hi - lo) / qmax, amax * 2^-14, 2^-24), <= 65504)),  zero = fp16(-lo / scale),
//   q = clamp(rint(x / scale + zero), 0, qmax)          (scale and zero as stored, so codes match them).
// The floors keep |zero| <= 2^14 (no fp16 overflow for a channel far from 0 with a tiny range) and the scale > 0.
//
// Decode attention, for query head i of sequence b (kv head h = i / (H_q / H_kv)):
//   out = softmax(softmax_scale * q . K^T) V over the lengths_q[b] dequantized tokens and the lengths_res[b]
//   window tokens; a sequence with no tokens gets zeros. Scores are kept in log2 units (q is pre-scaled by
//   softmax_scale * log2(e)) so the online softmax uses exp2.
#pragma once
#include <cmath>
#include <cstdint>

#include "lowbit/common.h"
#include "lowbit/half.h"
#include "lowbit/pack.h"
#include "lowbit/tensor_view.h"

namespace lowbit {

constexpr int kKvValueGroup = 32;  // channels per value scale/zero
constexpr int kKvMaxHeadDim = 256;
constexpr int kKvMaxGroup = 128;
constexpr float kKvLog2e = 1.4426950408889634f;

LOWBIT_HD bool kv_bits_ok(int bits) { return bits == 2 || bits == 4; }
LOWBIT_HD bool kv_group_ok(int group) { return group == 32 || group == 64 || group == 128; }
LOWBIT_HD bool kv_head_dim_ok(int64_t d) { return d == 64 || d == 80 || d == 96 || d == 128 || d == 256; }

// Words of one key channel's G codes, of one token's D value codes; value groups per token.
LOWBIT_HD int64_t kv_key_words(int group, int bits) { return int64_t(group) * bits / 32; }
LOWBIT_HD int64_t kv_value_words(int64_t head_dim, int bits) { return words_per_row(head_dim, bits); }
LOWBIT_HD int64_t kv_value_groups(int64_t head_dim) { return groups_for(head_dim, kKvValueGroup); }

// Code i of a canonically packed run (b in {2, 4} never straddles a word).
LOWBIT_HD uint32_t kv_code(const uint32_t* words, int i, int bits) {
  return (words[(i * bits) >> 5] >> ((i * bits) & 31)) & ((1u << bits) - 1u);
}

// fp16 scale and zero (as stored, and as the floats they decode to) of a group with extremes lo, hi.
struct KvAffine {
  uint16_t scale_h, zero_h;
  float scale, zero;
};

LOWBIT_HD KvAffine kv_affine(float lo, float hi, int bits) {
  const float qmax = float((1 << bits) - 1);
  const float amax = fmaxf(fabsf(lo), fabsf(hi));
  float s = fmaxf(fmaxf((hi - lo) / qmax, amax * 0x1p-14f), 0x1p-24f);
  s = fminf(s, 65504.0f);
  KvAffine a;
  a.scale_h = float_to_half(s);
  a.scale = half_to_float(a.scale_h);
  a.zero_h = float_to_half(-lo / a.scale);
  a.zero = half_to_float(a.zero_h);
  return a;
}

LOWBIT_HD uint32_t kv_quantize(float x, float scale, float zero, int bits) {
  const float q = rintf(x / scale + zero);
  const float qmax = float((1 << bits) - 1);
  return uint32_t(fminf(fmaxf(q, 0.0f), qmax));
}

// Online softmax in log2 units: folding a block whose maximum score is block_max into the running (m, l) gives
// the new maximum; the old sum and accumulator are then scaled by exp2(m - m_new) (0 when m is -inf).
LOWBIT_HD float kv_rescale(float m_old, float m_new) { return m_old == -INFINITY ? 0.0f : exp2f(m_old - m_new); }

// Splits of the sequence in decode attention (flash-decoding): enough (batch * units * splits) blocks to fill
// `target` workers, each split at least `min_tokens` long.
LOWBIT_HD int64_t kv_decode_splits(int64_t batch, int64_t units, int64_t capacity, int64_t target,
                                   int64_t min_tokens) {
  const int64_t work = batch * units;
  int64_t s = work > 0 ? (target + work - 1) / work : 1;
  const int64_t most = (capacity + min_tokens - 1) / min_tokens;
  if (s > most) s = most;
  return s < 1 ? 1 : s;
}

// Entry points. The bindings check everything first: shapes as above (k, v, out: contiguous [B, H, T, D]),
// dtypes (k/v/out/q/k_res/v_res fp32, fp16 or bf16; codes int32; scales fp16; lengths int32), one device,
// lengths within capacity (CPU; the CUDA kernels clamp them instead of reading device memory on the host).
void kv_quantize_keys_cpu(const TensorView& k, const TensorView& codes, const TensorView& scale,
                          const TensorView& zero, int bits, int group);
void kv_quantize_values_cpu(const TensorView& v, const TensorView& codes, const TensorView& scale,
                            const TensorView& zero, int bits);
void kv_dequantize_keys_cpu(const TensorView& codes, const TensorView& scale, const TensorView& zero,
                            const TensorView& out, int bits, int group);
void kv_dequantize_values_cpu(const TensorView& codes, const TensorView& scale, const TensorView& zero,
                              const TensorView& out, int bits);

struct KvCache {
  TensorView k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res, lengths_q, lengths_res;
};

// q: [B, H_q, D]; out: [B, H_q, D] of q's dtype. workspace (CUDA only): fp32 [B, H_q, S, D + 2], S the number
// of splits (from kv_decode_splits with the device's SM count), holding each split's (acc[D], max, sum).
void kv_attention_decode_cpu(const TensorView& q, const KvCache& cache, const TensorView& out, int bits, int group,
                             float softmax_scale);
void kv_quantize_keys_cuda(const TensorView& k, const TensorView& codes, const TensorView& scale,
                           const TensorView& zero, int bits, int group, int64_t stream);
void kv_quantize_values_cuda(const TensorView& v, const TensorView& codes, const TensorView& scale,
                             const TensorView& zero, int bits, int64_t stream);
void kv_dequantize_keys_cuda(const TensorView& codes, const TensorView& scale, const TensorView& zero,
                             const TensorView& out, int bits, int group, int64_t stream);
void kv_dequantize_values_cuda(const TensorView& codes, const TensorView& scale, const TensorView& zero,
                               const TensorView& out, int bits, int64_t stream);
void kv_attention_decode_cuda(const TensorView& q, const KvCache& cache, const TensorView& out,
                              const TensorView& workspace, int bits, int group, float softmax_scale,
                              int64_t stream);

// Tokens per CUDA tile (one thread per token for scores) and query heads per CUDA block.
constexpr int kKvCudaTile = 128;
constexpr int kKvCudaHeads = 8;

}  // namespace lowbit
