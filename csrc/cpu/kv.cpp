// CPU quantized KV cache (include/lowbit/kv.h): key/value quantization and dequantization, and decode attention
// that reads the packed cache directly. Attention runs one work item per (sequence, kv head, split) under OpenMP;
// an item serves every query head of its kv head (GQA), so each packed word is read and unpacked once for all of
// them, and the splits (when there are fewer (sequence, kv head) pairs than threads) merge by log-sum-exp at the
// end. Inner loops run on 8-float GCC vectors in always_inline helpers, one clone per ISA for each driver.
#include "lowbit/kv.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/isa_clones.h"
#include "lowbit/element_io.h"

namespace lowbit {
namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

LOWBIT_INLINE v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
LOWBIT_INLINE void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }
LOWBIT_INLINE v8 splat(float x) { return v8{} + x; }
LOWBIT_INLINE v8 as_float(v8i v) {
  v8 f;
  std::memcpy(&f, &v, sizeof(f));
  return f;
}
LOWBIT_INLINE v8i as_int(v8 v) {
  v8i i;
  std::memcpy(&i, &v, sizeof(i));
  return i;
}
LOWBIT_INLINE float hsum(v8 v) {
  float s = 0.0f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}

// Eight fp16 values (raw bits) as floats, exactly (subnormals, inf and nan included), without branches.
LOWBIT_INLINE v8 half8_to_float(const uint16_t* p) {
  v8h h;
  std::memcpy(&h, p, sizeof(h));
  const v8i x = __builtin_convertvector(h, v8i);
  const v8i exp = x & 0x7c00, em = (x & 0x7fff) << 13;
  const v8i sub = as_int(__builtin_convertvector(x & 0x3ff, v8) * 0x1p-24f);
  const v8i bits = exp == 0 ? sub : (exp == 0x7c00 ? (em | 0x7f800000) : em + (112 << 23));
  return as_float(bits | ((x & 0x8000) << 16));
}

template <typename IO>
LOWBIT_INLINE v8 load8_as_float(const typename IO::storage* p) {
  if constexpr (std::is_same_v<IO, F32>) {
    return load8(p);
  } else if constexpr (std::is_same_v<IO, F16>) {
    return half8_to_float(p);
  } else {
    v8h h;
    std::memcpy(&h, p, sizeof(h));
    return as_float(__builtin_convertvector(h, v8i) << 16);
  }
}

// 2^x for x <= 0 (clamped at -126): round to nearest, degree-6 Taylor polynomial of 2^f on [-1/2, 1/2]
// (relative error < 1e-7), exponent built in the bits.
LOWBIT_INLINE v8 exp2_8(v8 x) {
  x = x < -126.0f ? splat(-126.0f) : x;
  const v8 r = (x + 12582912.0f) - 12582912.0f;  // 1.5 * 2^23: rounds to the nearest integer
  const v8 f = x - r;
  v8 p = splat(1.5403530393381608e-4f);
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.618129107628477e-3f;
  p = p * f + 5.550410866482158e-2f;
  p = p * f + 0.2402265069591007f;
  p = p * f + 0.6931471805599453f;
  p = p * f + 1.0f;
  return p * as_float((__builtin_convertvector(r, v8i) + 127) << 23);
}

// Codes first .. first + 7 (first a multiple of 8) of a canonically packed run, as floats.
template <int BITS>
LOWBIT_INLINE v8 codes8(const uint32_t* words, int first) {
  const int bit = first * BITS;
  const v8i shift = v8i{0, 1, 2, 3, 4, 5, 6, 7} * BITS + (bit & 31);
  const v8i w = v8i{} + int32_t(words[bit >> 5]);
  return __builtin_convertvector((w >> shift) & ((1 << BITS) - 1), v8);
}

// ---------------------------------------------------------------------------------------------------------------
// Quantization and dequantization

// One key group: G tokens x D channels at src -> per-channel scale/zero [D] and codes [D][G*b/32].
template <typename IO>
LOWBIT_ISA_CLONES void quantize_key_group(const typename IO::storage* src, int G, int D, int bits, uint32_t* codes,
                                          uint16_t* scale, uint16_t* zero, float* x, float* sc, float* zr,
                                          uint8_t* q) {
  float* lo = sc;  // lo/hi live in the scale/zero buffers until the parameters replace them
  float* hi = zr;
  for (int j = 0; j < G; ++j)
    for (int d = 0; d < D; d += 8) store8(x + j * D + d, load8_as_float<IO>(src + int64_t(j) * D + d));
  std::memcpy(lo, x, sizeof(float) * D);
  std::memcpy(hi, x, sizeof(float) * D);
  for (int j = 1; j < G; ++j)
    for (int d = 0; d < D; ++d) {
      lo[d] = std::min(lo[d], x[j * D + d]);
      hi[d] = std::max(hi[d], x[j * D + d]);
    }
  for (int d = 0; d < D; ++d) {
    const KvAffine a = kv_affine(lo[d], hi[d], bits);
    scale[d] = a.scale_h;
    zero[d] = a.zero_h;
    sc[d] = a.scale;
    zr[d] = a.zero;
  }
  for (int j = 0; j < G; ++j)
    for (int d = 0; d < D; ++d) q[d * G + j] = uint8_t(kv_quantize(x[j * D + d], sc[d], zr[d], bits));
  const int64_t wk = kv_key_words(G, bits);
  for (int d = 0; d < D; ++d)
    for (int b = 0; b < G / kCodesPerBlock; ++b)
      pack_block(q + d * G + b * kCodesPerBlock, kCodesPerBlock, bits, codes + d * wk + b * bits);
}

// One value token: D channels -> per-group scale/zero [ceil(D/32)] and codes [ceil(D/32) * b].
template <typename IO>
LOWBIT_ISA_CLONES void quantize_value_row(const typename IO::storage* src, int D, int bits, uint32_t* codes,
                                          uint16_t* scale, uint16_t* zero) {
  float x[kKvValueGroup];
  uint8_t q[kKvValueGroup];
  for (int g = 0; g * kKvValueGroup < D; ++g) {
    const int len = std::min(kKvValueGroup, D - g * kKvValueGroup);
    for (int i = 0; i < len; i += 8) store8(x + i, load8_as_float<IO>(src + g * kKvValueGroup + i));
    float lo = x[0], hi = x[0];
    for (int i = 1; i < len; ++i) {
      lo = std::min(lo, x[i]);
      hi = std::max(hi, x[i]);
    }
    const KvAffine a = kv_affine(lo, hi, bits);
    scale[g] = a.scale_h;
    zero[g] = a.zero_h;
    for (int i = 0; i < len; ++i) q[i] = uint8_t(kv_quantize(x[i], a.scale, a.zero, bits));
    pack_block(q, len, bits, codes + g * bits);
  }
}

template <typename IO>
void quantize_keys(const TensorView& k, const TensorView& codes, const TensorView& scale, const TensorView& zero,
                   int bits, int group) {
  const int D = int(k.size(3));
  const int64_t groups = k.size(0) * k.size(1) * (k.size(2) / group);
  const int64_t wk = kv_key_words(group, bits);
  const auto* src = k.ptr<typename IO::storage>();
#pragma omp parallel
  {
    std::vector<float> x(size_t(group) * D), sc(D), zr(D);
    std::vector<uint8_t> q(size_t(group) * D);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g)
      quantize_key_group<IO>(src + g * group * D, group, D, bits, codes.ptr<uint32_t>() + g * D * wk,
                             scale.ptr<uint16_t>() + g * D, zero.ptr<uint16_t>() + g * D, x.data(), sc.data(),
                             zr.data(), q.data());
  }
}

template <typename IO>
void quantize_values(const TensorView& v, const TensorView& codes, const TensorView& scale, const TensorView& zero,
                     int bits) {
  const int D = int(v.size(3));
  const int64_t rows = v.numel() / std::max<int64_t>(D, 1);
  const int64_t wv = kv_value_words(D, bits), gv = kv_value_groups(D);
  const auto* src = v.ptr<typename IO::storage>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    quantize_value_row<IO>(src + r * D, D, bits, codes.ptr<uint32_t>() + r * wv, scale.ptr<uint16_t>() + r * gv,
                           zero.ptr<uint16_t>() + r * gv);
}

template <typename IO>
void dequantize_keys(const TensorView& codes, const TensorView& scale, const TensorView& zero, const TensorView& out,
                     int bits, int group) {
  const int D = int(out.size(3));
  const int64_t groups = out.size(0) * out.size(1) * (out.size(2) / group);
  const int64_t wk = kv_key_words(group, bits);
  auto* dst = out.ptr<typename IO::storage>();
#pragma omp parallel
  {
    std::vector<float> sc(D), zr(D);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      const uint32_t* c = codes.ptr<uint32_t>() + g * D * wk;
      for (int d = 0; d < D; ++d) {
        sc[d] = half_to_float(scale.ptr<uint16_t>()[g * D + d]);
        zr[d] = half_to_float(zero.ptr<uint16_t>()[g * D + d]);
      }
      for (int j = 0; j < group; ++j)
        for (int d = 0; d < D; ++d)
          IO::store(dst, (g * group + j) * D + d, dequant_uniform(kv_code(c + d * wk, j, bits), sc[d], zr[d]));
    }
  }
}

template <typename IO>
void dequantize_values(const TensorView& codes, const TensorView& scale, const TensorView& zero,
                       const TensorView& out, int bits) {
  const int D = int(out.size(3));
  const int64_t rows = out.numel() / std::max(D, 1);
  const int64_t wv = kv_value_words(D, bits), gv = kv_value_groups(D);
  auto* dst = out.ptr<typename IO::storage>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    for (int d = 0; d < D; ++d) {
      const int64_t g = r * gv + d / kKvValueGroup;
      const float s = half_to_float(scale.ptr<uint16_t>()[g]), z = half_to_float(zero.ptr<uint16_t>()[g]);
      IO::store(dst, r * D + d, dequant_uniform(kv_code(codes.ptr<uint32_t>() + r * wv, d, bits), s, z));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Decode attention

// One (sequence, kv head): pointers to its part of every cache tensor, and the sizes.
template <typename IO>
struct HeadCache {
  const uint32_t* kc;  // [T_groups][D][wk]
  const uint16_t *ks, *kz;  // [T_groups][D]
  const uint32_t* vc;  // [T_q][wv]
  const uint16_t *vs, *vz;  // [T_q][gv]
  const typename IO::storage *kr, *vr;  // [R][D]
  int64_t lq, lr;  // quantized and window tokens
};

struct Dims {
  int D, Dp, G, n_rep, wk, wv, gv;  // Dp = gv * 32: value accumulators cover whole packed blocks
};

// Per-thread buffers. State of a query head r: running max m[r], sum l[r] and accumulator acc[r * Dp ..].
struct Scratch {
  std::vector<float> qf, qs, bias, s, acc, m, l, ksc, kzr, vsc, vzs, kf, vf;
  explicit Scratch(const Dims& d)
      : qf(size_t(d.n_rep) * d.D), qs(size_t(d.n_rep) * d.D), bias(d.n_rep), s(size_t(d.n_rep) * d.G),
        acc(size_t(d.n_rep) * d.Dp), m(d.n_rep), l(d.n_rep), ksc(d.D), kzr(d.D), vsc(size_t(d.G) * d.gv),
        vzs(size_t(d.G) * d.gv), kf(size_t(d.G) * d.D), vf(size_t(d.G) * d.D) {}
};

// Scores of the G tokens of one key group for query heads r0 .. r0 + NR: s = qs . codes - bias, qs = q * scale.
template <int BITS, int NR>
LOWBIT_INLINE void key_scores_tile(const uint32_t* kc, const Dims& dm, const float* qs, const float* bias, float* s) {
  for (int sub = 0; sub < dm.G / kCodesPerBlock; ++sub) {
    v8 acc[NR][4] = {};
    const uint32_t* w = kc + sub * BITS;
    for (int d = 0; d < dm.D; ++d, w += dm.wk) {
      v8 c[4];
      for (int k = 0; k < 4; ++k) c[k] = codes8<BITS>(w, 8 * k);
      for (int r = 0; r < NR; ++r) {
        const float qd = qs[r * dm.D + d];
        for (int k = 0; k < 4; ++k) acc[r][k] += qd * c[k];
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int k = 0; k < 4; ++k) store8(s + r * dm.G + sub * kCodesPerBlock + 8 * k, acc[r][k] - bias[r]);
  }
}

// acc[r] += sum_j p[r][j] * v_j over the n tokens of a quantized block (v = scale * code - scale * zero), heads
// r0 .. r0 + NR, eight channels at a time with the NR accumulators in registers.
template <int BITS, int NR>
LOWBIT_INLINE void value_accum_tile(const uint32_t* vc, const Dims& dm, int n, const float* vsc, const float* vzs,
                                    const float* p, float* acc) {
  for (int c = 0; c < dm.Dp / 8; ++c) {
    v8 a[NR];
    for (int r = 0; r < NR; ++r) a[r] = load8(acc + r * dm.Dp + 8 * c);
    const int g = c / (kKvValueGroup / 8);
    const uint32_t* w = vc;
    for (int j = 0; j < n; ++j, w += dm.wv) {
      const v8 val = vsc[j * dm.gv + g] * codes8<BITS>(w, 8 * c) - vzs[j * dm.gv + g];
      for (int r = 0; r < NR; ++r) a[r] += p[r * dm.G + j] * val;
    }
    for (int r = 0; r < NR; ++r) store8(acc + r * dm.Dp + 8 * c, a[r]);
  }
}

// Same for n window tokens already converted to floats (vf: [n][D]).
template <int NR>
LOWBIT_INLINE void window_accum_tile(const float* vf, const Dims& dm, int n, const float* p, float* acc) {
  for (int c = 0; c < dm.D / 8; ++c) {
    v8 a[NR];
    for (int r = 0; r < NR; ++r) a[r] = load8(acc + r * dm.Dp + 8 * c);
    for (int j = 0; j < n; ++j) {
      const v8 val = load8(vf + j * dm.D + 8 * c);
      for (int r = 0; r < NR; ++r) a[r] += p[r * dm.G + j] * val;
    }
    for (int r = 0; r < NR; ++r) store8(acc + r * dm.Dp + 8 * c, a[r]);
  }
}

// Runs f.template operator()<NR>(r0) over the query heads in tiles of 4, then 2, then 1.
template <typename F>
LOWBIT_INLINE void over_head_tiles(int n_rep, F&& f) {
  int r = 0;
  for (; r + 4 <= n_rep; r += 4) f(std::integral_constant<int, 4>(), r);
  for (; r + 2 <= n_rep; r += 2) f(std::integral_constant<int, 2>(), r);
  for (; r < n_rep; ++r) f(std::integral_constant<int, 1>(), r);
}

// Online-softmax step for a block of n scores per head (s: [n_rep][G], in log2 units): updates (m, l), rescales
// acc, and turns s into the block's probabilities.
LOWBIT_INLINE void softmax_block(const Dims& dm, int n, Scratch& w) {
  for (int r = 0; r < dm.n_rep; ++r) {
    float* s = w.s.data() + r * dm.G;
    float mb = -INFINITY;
    for (int j = 0; j < n; ++j) mb = std::max(mb, s[j]);
    const float mn = std::max(w.m[r], mb);
    const float alpha = kv_rescale(w.m[r], mn);
    w.m[r] = mn;
    for (int j = 0; j < n; j += 8) store8(s + j, exp2_8(load8(s + j) - mn));  // n <= G, G a multiple of 8
    float ls = 0.0f;
    for (int j = 0; j < n; ++j) ls += s[j];
    w.l[r] = w.l[r] * alpha + ls;
    if (alpha != 1.0f)
      for (int d = 0; d < dm.Dp; ++d) w.acc[r * dm.Dp + d] *= alpha;
  }
}

// Blocks [blk0, blk1) of one (sequence, kv head): block i < lq / G is quantized key group i, the rest cover the
// window G tokens at a time. q: the n_rep query rows of this kv head. Writes (acc[D], m, l) per head to part.
template <typename IO, int BITS>
LOWBIT_ISA_CLONES void decode_item(const typename IO::storage* q, const HeadCache<IO>& hc, const Dims& dm,
                                   int64_t blk0, int64_t blk1, float q_scale, Scratch& w, float* part) {
  const int D = dm.D, G = dm.G;
  for (int i = 0; i < dm.n_rep * D; i += 8) store8(&w.qf[i], load8_as_float<IO>(q + i) * q_scale);
  std::fill(w.acc.begin(), w.acc.end(), 0.0f);
  std::fill(w.m.begin(), w.m.end(), -INFINITY);
  std::fill(w.l.begin(), w.l.end(), 0.0f);
  const int64_t qblocks = hc.lq / G;
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    if (blk < qblocks) {
      const uint16_t* ks = hc.ks + blk * D;
      const uint16_t* kz = hc.kz + blk * D;
      for (int d = 0; d < D; d += 8) {
        store8(&w.ksc[d], half8_to_float(ks + d));
        store8(&w.kzr[d], half8_to_float(kz + d));
      }
      for (int r = 0; r < dm.n_rep; ++r) {
        v8 b = {};
        for (int d = 0; d < D; d += 8) {
          const v8 qs = load8(&w.qf[r * D + d]) * load8(&w.ksc[d]);
          store8(&w.qs[r * D + d], qs);
          b += qs * load8(&w.kzr[d]);
        }
        w.bias[r] = hsum(b);
      }
      const uint32_t* kc = hc.kc + blk * D * dm.wk;
      over_head_tiles(dm.n_rep, [&](auto nr, int r0) {
        key_scores_tile<BITS, nr()>(kc, dm, &w.qs[r0 * D], &w.bias[r0], &w.s[r0 * G]);
      });
      softmax_block(dm, G, w);
      const int64_t t0 = blk * G;
      const int vn = G * dm.gv;
      for (int i = 0; i < vn; i += 8) {
        const v8 s = half8_to_float(hc.vs + t0 * dm.gv + i);
        store8(&w.vsc[i], s);
        store8(&w.vzs[i], s * half8_to_float(hc.vz + t0 * dm.gv + i));
      }
      const uint32_t* vc = hc.vc + t0 * dm.wv;
      over_head_tiles(dm.n_rep, [&](auto nr, int r0) {
        value_accum_tile<BITS, nr()>(vc, dm, G, w.vsc.data(), w.vzs.data(), &w.s[r0 * G], &w.acc[r0 * dm.Dp]);
      });
    } else {
      const int64_t j0 = (blk - qblocks) * G;
      const int n = int(std::min<int64_t>(G, hc.lr - j0));
      for (int j = 0; j < n; ++j)
        for (int d = 0; d < D; d += 8) {
          store8(&w.kf[j * D + d], load8_as_float<IO>(hc.kr + (j0 + j) * D + d));
          store8(&w.vf[j * D + d], load8_as_float<IO>(hc.vr + (j0 + j) * D + d));
        }
      for (int r = 0; r < dm.n_rep; ++r)
        for (int j = 0; j < n; ++j) {
          v8 a = {};
          for (int d = 0; d < D; d += 8) a += load8(&w.qf[r * D + d]) * load8(&w.kf[j * D + d]);
          w.s[r * G + j] = hsum(a);
        }
      softmax_block(dm, n, w);
      over_head_tiles(dm.n_rep, [&](auto nr, int r0) {
        window_accum_tile<nr()>(w.vf.data(), dm, n, &w.s[r0 * G], &w.acc[r0 * dm.Dp]);
      });
    }
  }
  for (int r = 0; r < dm.n_rep; ++r) {
    float* o = part + r * (D + 2);
    std::memcpy(o, &w.acc[r * dm.Dp], sizeof(float) * D);
    o[D] = w.m[r];
    o[D + 1] = w.l[r];
  }
}

template <typename IO, int BITS>
void attention(const TensorView& qv, const KvCache& c, const TensorView& out, int group, float softmax_scale) {
  const int64_t B = qv.size(0), Hq = qv.size(1), Hkv = c.k_codes.size(1);
  const int64_t Tg = c.k_codes.size(2), Tq = c.v_codes.size(2), R = c.k_res.size(2);
  Dims dm;
  dm.D = int(qv.size(2));
  dm.G = group;
  dm.n_rep = int(Hq / Hkv);
  dm.wk = int(kv_key_words(group, BITS));
  dm.wv = int(kv_value_words(dm.D, BITS));
  dm.gv = int(kv_value_groups(dm.D));
  dm.Dp = dm.gv * kKvValueGroup;
  const int D = dm.D;
  const int threads = omp_get_max_threads();
  const int64_t max_blocks = Tg + (R + group - 1) / group;
  const int64_t splits = B * Hkv >= threads ? 1 : kv_decode_splits(B, Hkv, max_blocks, 2 * threads, 4);
  std::vector<float> part(size_t(B * Hq * splits) * (D + 2));
  const int32_t* lengths_q = c.lengths_q.ptr<int32_t>();
  const int32_t* lengths_res = c.lengths_res.ptr<int32_t>();
  const auto* q = qv.ptr<typename IO::storage>();
  const float q_scale = softmax_scale * kKvLog2e;
#pragma omp parallel
  {
    Scratch w(dm);
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < B * Hkv * splits; ++item) {
      const int64_t split = item % splits, bh = item / splits, b = bh / Hkv;
      HeadCache<IO> hc;
      hc.kc = c.k_codes.ptr<uint32_t>() + bh * Tg * D * dm.wk;
      hc.ks = c.k_scale.ptr<uint16_t>() + bh * Tg * D;
      hc.kz = c.k_zero.ptr<uint16_t>() + bh * Tg * D;
      hc.vc = c.v_codes.ptr<uint32_t>() + bh * Tq * dm.wv;
      hc.vs = c.v_scale.ptr<uint16_t>() + bh * Tq * dm.gv;
      hc.vz = c.v_zero.ptr<uint16_t>() + bh * Tq * dm.gv;
      hc.kr = c.k_res.ptr<typename IO::storage>() + bh * R * D;
      hc.vr = c.v_res.ptr<typename IO::storage>() + bh * R * D;
      hc.lq = lengths_q[b];
      hc.lr = lengths_res[b];
      const int64_t blocks = hc.lq / group + (hc.lr + group - 1) / group;
      const int64_t per = (blocks + splits - 1) / splits;
      const int64_t blk0 = std::min(blocks, split * per), blk1 = std::min(blocks, blk0 + per);
      decode_item<IO, BITS>(q + bh * dm.n_rep * D, hc, dm, blk0, blk1, q_scale, w,
                            part.data() + (bh * splits + split) * dm.n_rep * (D + 2));
    }
  }
  auto* o = out.ptr<typename IO::storage>();
#pragma omp parallel for schedule(static)
  for (int64_t bhq = 0; bhq < B * Hq; ++bhq) {
    const int64_t bh = bhq / dm.n_rep, r = bhq % dm.n_rep;
    auto split_part = [&](int64_t s) { return part.data() + ((bh * splits + s) * dm.n_rep + r) * (D + 2); };
    float mx = -INFINITY;
    for (int64_t s = 0; s < splits; ++s) mx = std::max(mx, split_part(s)[D]);
    std::vector<float> acc(D, 0.0f);
    float den = 0.0f;
    for (int64_t s = 0; s < splits; ++s) {
      const float* p = split_part(s);
      const float wgt = kv_rescale(p[D], mx);
      den += wgt * p[D + 1];
      for (int d = 0; d < D; ++d) acc[d] += wgt * p[d];
    }
    const float inv = den > 0.0f ? 1.0f / den : 0.0f;
    for (int d = 0; d < D; ++d) IO::store(o, bhq * D + d, acc[d] * inv);
  }
}

}  // namespace

void kv_quantize_keys_cpu(const TensorView& k, const TensorView& codes, const TensorView& scale,
                          const TensorView& zero, int bits, int group) {
  by_dtype(k.dtype, "kv_quantize_keys", "k",
           [&](auto io) { quantize_keys<decltype(io)>(k, codes, scale, zero, bits, group); });
}

void kv_quantize_values_cpu(const TensorView& v, const TensorView& codes, const TensorView& scale,
                            const TensorView& zero, int bits) {
  by_dtype(v.dtype, "kv_quantize_values", "v",
           [&](auto io) { quantize_values<decltype(io)>(v, codes, scale, zero, bits); });
}

void kv_dequantize_keys_cpu(const TensorView& codes, const TensorView& scale, const TensorView& zero,
                            const TensorView& out, int bits, int group) {
  by_dtype(out.dtype, "kv_dequantize_keys", "out",
           [&](auto io) { dequantize_keys<decltype(io)>(codes, scale, zero, out, bits, group); });
}

void kv_dequantize_values_cpu(const TensorView& codes, const TensorView& scale, const TensorView& zero,
                              const TensorView& out, int bits) {
  by_dtype(out.dtype, "kv_dequantize_values", "out",
           [&](auto io) { dequantize_values<decltype(io)>(codes, scale, zero, out, bits); });
}

void kv_attention_decode_cpu(const TensorView& q, const KvCache& cache, const TensorView& out, int bits, int group,
                             float softmax_scale) {
  by_dtype(q.dtype, "quantized_attention_decode", "q", [&](auto io) {
    using IO = decltype(io);
    if (bits == 2)
      attention<IO, 2>(q, cache, out, group, softmax_scale);
    else
      attention<IO, 4>(q, cache, out, group, softmax_scale);
  });
}

}  // namespace lowbit
