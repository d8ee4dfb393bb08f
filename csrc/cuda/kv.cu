// CUDA quantized KV cache (include/lowbit/kv.h): quantize/dequantize kernels (one thread per key channel group,
// per value channel group, per output element) and split-K decode attention (flash-decoding). The decode kernel
// runs one block per (split of the sequence, kv head, tile of up to 8 of its query heads, sequence): for each
// tile of 128 tokens every thread computes one token's scores for all heads of the tile, dequantizing the key in
// registers; a warp per head folds the tile into the running max/sum; then every thread accumulates P.V for its
// channels (at most two) and all heads, dequantizing each value once. The block writes (acc, max, sum) per head
// to the workspace and a second kernel merges the splits by log-sum-exp.
#include <algorithm>

#include "lowbit/cuda_utils.cuh"
#include "lowbit/element_io.h"
#include "lowbit/kv.h"

namespace lowbit {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = kKvCudaTile;
constexpr int kHeads = kKvCudaHeads;
constexpr int kChannelsPerThread = kKvMaxHeadDim / kTile;

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

unsigned grid_for(int64_t n) { return unsigned(std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 20)); }

#define GRID_STRIDE(i, n) \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

// Thread i: channel d of key group g = i / D (G tokens at k + g * G * D, row stride D).
template <typename IO>
__global__ void quantize_keys_kernel(const typename IO::storage* __restrict__ k, uint32_t* __restrict__ codes,
                                     uint16_t* __restrict__ scale, uint16_t* __restrict__ zero, int64_t groups,
                                     int D, int G, int bits) {
  GRID_STRIDE(i, groups * D) {
    const typename IO::storage* src = k + (i / D) * G * D + i % D;
    float lo = IO::load(src, 0), hi = lo;
    for (int j = 1; j < G; ++j) {
      const float x = IO::load(src, int64_t(j) * D);
      lo = fminf(lo, x);
      hi = fmaxf(hi, x);
    }
    const KvAffine a = kv_affine(lo, hi, bits);
    scale[i] = a.scale_h;
    zero[i] = a.zero_h;
    const int per = 32 / bits, words = G / per;
    for (int w = 0; w < words; ++w) {
      uint32_t word = 0;
      for (int c = 0; c < per; ++c)
        word |= kv_quantize(IO::load(src, int64_t(w * per + c) * D), a.scale, a.zero, bits) << (c * bits);
      codes[i * words + w] = word;
    }
  }
}

// Thread i: value group g = i % gv of token row i / gv (32 channels, fewer in the last group when D = 80).
template <typename IO>
__global__ void quantize_values_kernel(const typename IO::storage* __restrict__ v, uint32_t* __restrict__ codes,
                                       uint16_t* __restrict__ scale, uint16_t* __restrict__ zero, int64_t rows, int D,
                                       int bits) {
  const int gv = int(kv_value_groups(D));
  GRID_STRIDE(i, rows * gv) {
    const int g = int(i % gv);
    const int len = min(kKvValueGroup, D - g * kKvValueGroup);
    const typename IO::storage* src = v + (i / gv) * D + g * kKvValueGroup;
    float lo = IO::load(src, 0), hi = lo;
    for (int c = 1; c < len; ++c) {
      lo = fminf(lo, IO::load(src, c));
      hi = fmaxf(hi, IO::load(src, c));
    }
    const KvAffine a = kv_affine(lo, hi, bits);
    scale[i] = a.scale_h;
    zero[i] = a.zero_h;
    const int per = 32 / bits;
    for (int w = 0; w < bits; ++w) {  // block g is `bits` words: (row, g) -> word offset i * bits
      uint32_t word = 0;
      for (int c = 0; c < per && w * per + c < len; ++c)
        word |= kv_quantize(IO::load(src, w * per + c), a.scale, a.zero, bits) << (c * bits);
      codes[i * bits + w] = word;
    }
  }
}

// Thread i: element (row, d) of out [B, H, T, D], row = bh * T + token.
template <typename IO>
__global__ void dequantize_keys_kernel(const uint32_t* __restrict__ codes, const uint16_t* __restrict__ scale,
                                       const uint16_t* __restrict__ zero, typename IO::storage* __restrict__ out,
                                       int64_t n, int64_t T, int D, int G, int bits) {
  const int wk = int(kv_key_words(G, bits));
  GRID_STRIDE(i, n) {
    const int64_t row = i / D, tok = row % T;
    const int64_t gi = ((row / T) * (T / G) + tok / G) * D + i % D;
    const uint32_t q = kv_code(codes + gi * wk, int(tok % G), bits);
    IO::store(out, i, dequant_uniform(q, half_to_float(scale[gi]), half_to_float(zero[gi])));
  }
}

template <typename IO>
__global__ void dequantize_values_kernel(const uint32_t* __restrict__ codes, const uint16_t* __restrict__ scale,
                                         const uint16_t* __restrict__ zero, typename IO::storage* __restrict__ out,
                                         int64_t n, int D, int bits) {
  const int64_t wv = kv_value_words(D, bits), gv = kv_value_groups(D);
  GRID_STRIDE(i, n) {
    const int64_t row = i / D;
    const int d = int(i % D);
    const int64_t g = row * gv + d / kKvValueGroup;
    const uint32_t q = kv_code(codes + row * wv, d, bits);
    IO::store(out, i, dequant_uniform(q, half_to_float(scale[g]), half_to_float(zero[g])));
  }
}

template <typename IO>
struct DecodeParams {
  const typename IO::storage* q;
  const uint32_t* kc;
  const uint16_t *ks, *kz;
  const uint32_t* vc;
  const uint16_t *vs, *vz;
  const typename IO::storage *kr, *vr;
  const int32_t *lengths_q, *lengths_res;
  float* ws;  // [B, H_q, S, D + 2]
  int Hq, Hkv, n_rep, D, G, wk, wv, gv, S;
  int64_t Tg, Tq, R;
  float q_scale;
};

template <typename IO, int BITS>
__global__ void __launch_bounds__(kTile) decode_partial_kernel(const DecodeParams<IO> p) {
  LOWBIT_SHARED(float, qf, [kHeads][kKvMaxHeadDim]);
  LOWBIT_SHARED(float, sc, [kHeads][kTile]);
  LOWBIT_SHARED(float, m_s, [kHeads]);
  LOWBIT_SHARED(float, l_s, [kHeads]);
  LOWBIT_SHARED(float, alpha_s, [kHeads]);
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  const int tiles_per_kv = (p.n_rep + kHeads - 1) / kHeads;
  const int h = blockIdx.y / tiles_per_kv, r0 = (blockIdx.y % tiles_per_kv) * kHeads;
  const int nr = min(kHeads, p.n_rep - r0);
  const int b = blockIdx.z, split = blockIdx.x, tid = threadIdx.x, D = p.D;
  const int64_t bh = int64_t(b) * p.Hkv + h;
  const int64_t hq0 = int64_t(b) * p.Hq + int64_t(h) * p.n_rep + r0;  // first query row of the tile
  // lengths clamped to the capacity (the host cannot check device-resident lengths without a sync)
  int64_t lq = min64(max64(p.lengths_q[b], 0), p.Tq);
  lq -= lq % p.G;
  const int64_t lr = min64(max64(p.lengths_res[b], 0), p.R);
  const int64_t len = lq + lr;
  const int64_t per = ((len + kTile - 1) / kTile + p.S - 1) / p.S * kTile;
  const int64_t begin = min64(len, split * per), end = min64(len, begin + per);

  for (int i = tid; i < kHeads * kKvMaxHeadDim; i += kTile) {
    const int r = i / kKvMaxHeadDim, d = i % kKvMaxHeadDim;
    qf[r][d] = r < nr && d < D ? IO::load(p.q, (hq0 + r) * D + d) * p.q_scale : 0.0f;
  }
  if (tid < kHeads) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.0f;
  }
  float acc[kHeads][kChannelsPerThread] = {};
  __syncthreads();

  for (int64_t i0 = begin; i0 < end; i0 += kTile) {
    // scores: thread tid takes token i0 + tid
    const int64_t i = i0 + tid;
    float a[kHeads] = {};
    if (i < end && i < lq) {
      const int64_t g = bh * p.Tg + i / p.G;
      const int j = int(i % p.G);
      const uint32_t* w = p.kc + g * D * p.wk + ((j * BITS) >> 5);
      const int shift = (j * BITS) & 31;
      const uint16_t* ks = p.ks + g * D;
      const uint16_t* kz = p.kz + g * D;
      for (int d = 0; d < D; ++d) {
        const float code = float((__ldg(w + int64_t(d) * p.wk) >> shift) & kMask);
        const float kd = half_to_float(__ldg(ks + d)) * (code - half_to_float(__ldg(kz + d)));
#pragma unroll
        for (int r = 0; r < kHeads; ++r) a[r] += qf[r][d] * kd;
      }
    } else if (i < end) {
      const typename IO::storage* kr = p.kr + (bh * p.R + (i - lq)) * D;
      for (int d = 0; d < D; ++d) {
        const float kd = IO::load(kr, d);
#pragma unroll
        for (int r = 0; r < kHeads; ++r) a[r] += qf[r][d] * kd;
      }
    }
#pragma unroll
    for (int r = 0; r < kHeads; ++r) sc[r][tid] = i < end ? a[r] : -INFINITY;
    __syncthreads();

    // online softmax: warp w folds heads w, w + 4, ... (the tile holds at least one token, so the max is finite)
    const int warp = tid >> 5, lane = tid & 31;
    for (int r = warp; r < nr; r += kTile / 32) {
      float mx = -INFINITY;
      for (int k = lane; k < kTile; k += 32) mx = fmaxf(mx, sc[r][k]);
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float mn = fmaxf(m_s[r], mx);
      float sum = 0.0f;
      for (int k = lane; k < kTile; k += 32) {
        const float e = exp2f(sc[r][k] - mn);
        sc[r][k] = e;
        sum += e;
      }
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      if (lane == 0) {
        const float alpha = kv_rescale(m_s[r], mn);
        alpha_s[r] = alpha;
        l_s[r] = l_s[r] * alpha + sum;
        m_s[r] = mn;
      }
    }
    __syncthreads();

    // P.V: thread tid takes channels tid and tid + 128
    const int n = int(min64(kTile, end - i0));
#pragma unroll
    for (int c = 0; c < kChannelsPerThread; ++c) {
      const int d = tid + c * kTile;
      if (d >= D) continue;
#pragma unroll
      for (int r = 0; r < kHeads; ++r)
        if (r < nr) acc[r][c] *= alpha_s[r];
      for (int jj = 0; jj < n; ++jj) {
        const int64_t t = i0 + jj;
        float v;
        if (t < lq) {
          const int64_t row = bh * p.Tq + t;
          const uint32_t code = (__ldg(p.vc + row * p.wv + ((d * BITS) >> 5)) >> ((d * BITS) & 31)) & kMask;
          const int64_t g = row * p.gv + d / kKvValueGroup;
          v = half_to_float(__ldg(p.vs + g)) * (float(code) - half_to_float(__ldg(p.vz + g)));
        } else {
          v = IO::load(p.vr, (bh * p.R + (t - lq)) * D + d);
        }
#pragma unroll
        for (int r = 0; r < kHeads; ++r)
          if (r < nr) acc[r][c] += sc[r][jj] * v;
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int r = 0; r < kHeads; ++r) {
    if (r >= nr) break;
    float* out = p.ws + ((hq0 + r) * p.S + split) * (D + 2);
#pragma unroll
    for (int c = 0; c < kChannelsPerThread; ++c)
      if (tid + c * kTile < D) out[tid + c * kTile] = acc[r][c];
    if (tid == 0) {
      out[D] = m_s[r];
      out[D + 1] = l_s[r];
    }
  }
}

// One block per query row: merges the S partial (acc, max, sum) by log-sum-exp; no tokens at all gives zeros.
template <typename IO>
__global__ void decode_reduce_kernel(const float* __restrict__ ws, typename IO::storage* __restrict__ out, int D,
                                     int S) {
  const float* base = ws + int64_t(blockIdx.x) * S * (D + 2);
  float mx = -INFINITY;
  for (int s = 0; s < S; ++s) mx = fmaxf(mx, base[s * (D + 2) + D]);
  float den = 0.0f;
  for (int s = 0; s < S; ++s) den += kv_rescale(base[s * (D + 2) + D], mx) * base[s * (D + 2) + D + 1];
  const float inv = den > 0.0f ? 1.0f / den : 0.0f;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < S; ++s) acc += kv_rescale(base[s * (D + 2) + D], mx) * base[s * (D + 2) + d];
    IO::store(out, int64_t(blockIdx.x) * D + d, acc * inv);
  }
}

template <typename IO, int BITS>
void launch_decode(const TensorView& q, const KvCache& c, const TensorView& out, const TensorView& ws, int group,
                   float softmax_scale, cudaStream_t stream) {
  DecodeParams<IO> p;
  p.q = q.ptr<typename IO::storage>();
  p.kc = c.k_codes.ptr<uint32_t>();
  p.ks = c.k_scale.ptr<uint16_t>();
  p.kz = c.k_zero.ptr<uint16_t>();
  p.vc = c.v_codes.ptr<uint32_t>();
  p.vs = c.v_scale.ptr<uint16_t>();
  p.vz = c.v_zero.ptr<uint16_t>();
  p.kr = c.k_res.ptr<typename IO::storage>();
  p.vr = c.v_res.ptr<typename IO::storage>();
  p.lengths_q = c.lengths_q.ptr<int32_t>();
  p.lengths_res = c.lengths_res.ptr<int32_t>();
  p.ws = ws.ptr<float>();
  const int64_t B = q.size(0);
  p.Hq = int(q.size(1));
  p.Hkv = int(c.k_codes.size(1));
  p.n_rep = p.Hq / p.Hkv;
  p.D = int(q.size(2));
  p.G = group;
  p.wk = int(kv_key_words(group, BITS));
  p.wv = int(kv_value_words(p.D, BITS));
  p.gv = int(kv_value_groups(p.D));
  p.S = int(ws.size(2));
  p.Tg = c.k_codes.size(2);
  p.Tq = c.v_codes.size(2);
  p.R = c.k_res.size(2);
  p.q_scale = softmax_scale * kKvLog2e;
  if (B * p.Hq == 0) return;
  const dim3 grid(unsigned(p.S), unsigned(p.Hkv * ((p.n_rep + kHeads - 1) / kHeads)), unsigned(B));
  launch_kernel("kv decode_partial_kernel", decode_partial_kernel<IO, BITS>, grid, kTile, 0, stream, p);
  launch_kernel("kv decode_reduce_kernel", decode_reduce_kernel<IO>, unsigned(B * p.Hq), 128, 0, stream, p.ws,
                out.ptr<typename IO::storage>(), p.D, p.S);
}

}  // namespace

void kv_quantize_keys_cuda(const TensorView& k, const TensorView& codes, const TensorView& scale,
                           const TensorView& zero, int bits, int group, int64_t stream) {
  DeviceGuard guard(k.device_id);
  const int D = int(k.size(3));
  const int64_t groups = k.size(0) * k.size(1) * (k.size(2) / group);
  if (groups == 0) return;
  by_dtype(k.dtype, "kv_quantize_keys", "k", [&](auto io) {
    using IO = decltype(io);
    launch_kernel("kv quantize_keys_kernel", quantize_keys_kernel<IO>, grid_for(groups * D), kThreads, 0,
                  as_stream(stream), k.ptr<typename IO::storage>(), codes.ptr<uint32_t>(), scale.ptr<uint16_t>(),
                  zero.ptr<uint16_t>(), groups, D, group, bits);
  });
}

void kv_quantize_values_cuda(const TensorView& v, const TensorView& codes, const TensorView& scale,
                             const TensorView& zero, int bits, int64_t stream) {
  DeviceGuard guard(v.device_id);
  const int D = int(v.size(3));
  const int64_t rows = v.size(0) * v.size(1) * v.size(2);
  if (rows == 0) return;
  by_dtype(v.dtype, "kv_quantize_values", "v", [&](auto io) {
    using IO = decltype(io);
    launch_kernel("kv quantize_values_kernel", quantize_values_kernel<IO>, grid_for(rows * kv_value_groups(D)),
                  kThreads, 0, as_stream(stream), v.ptr<typename IO::storage>(), codes.ptr<uint32_t>(),
                  scale.ptr<uint16_t>(), zero.ptr<uint16_t>(), rows, D, bits);
  });
}

void kv_dequantize_keys_cuda(const TensorView& codes, const TensorView& scale, const TensorView& zero,
                             const TensorView& out, int bits, int group, int64_t stream) {
  DeviceGuard guard(out.device_id);
  const int64_t n = out.numel();
  if (n == 0) return;
  by_dtype(out.dtype, "kv_dequantize_keys", "out", [&](auto io) {
    using IO = decltype(io);
    launch_kernel("kv dequantize_keys_kernel", dequantize_keys_kernel<IO>, grid_for(n), kThreads, 0,
                  as_stream(stream), codes.ptr<uint32_t>(), scale.ptr<uint16_t>(), zero.ptr<uint16_t>(),
                  out.ptr<typename IO::storage>(), n, out.size(2), int(out.size(3)), group, bits);
  });
}

void kv_dequantize_values_cuda(const TensorView& codes, const TensorView& scale, const TensorView& zero,
                               const TensorView& out, int bits, int64_t stream) {
  DeviceGuard guard(out.device_id);
  const int64_t n = out.numel();
  if (n == 0) return;
  by_dtype(out.dtype, "kv_dequantize_values", "out", [&](auto io) {
    using IO = decltype(io);
    launch_kernel("kv dequantize_values_kernel", dequantize_values_kernel<IO>, grid_for(n), kThreads, 0,
                  as_stream(stream), codes.ptr<uint32_t>(), scale.ptr<uint16_t>(), zero.ptr<uint16_t>(),
                  out.ptr<typename IO::storage>(), n, int(out.size(3)), bits);
  });
}

void kv_attention_decode_cuda(const TensorView& q, const KvCache& cache, const TensorView& out,
                              const TensorView& workspace, int bits, int group, float softmax_scale,
                              int64_t stream) {
  DeviceGuard guard(q.device_id);
  by_dtype(q.dtype, "quantized_attention_decode", "q", [&](auto io) {
    using IO = decltype(io);
    if (bits == 2)
      launch_decode<IO, 2>(q, cache, out, workspace, group, softmax_scale, as_stream(stream));
    else
      launch_decode<IO, 4>(q, cache, out, workspace, group, softmax_scale, as_stream(stream));
  });
}

}  // namespace lowbit
