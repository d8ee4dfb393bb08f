// CUDA VQ GEMM (y = x . W_hat^T, format in vq.h) and dequantization.
// GEMM: one warp per weight row (rows strided over the grid), 8 warps per block. Lanes take the row's vectors
// j = lane, lane + 32, ...: each gathers its R codewords (one 16-byte load each), sums them in fp32 and FMAs the
// 8 weights into up to MB rows of x; a shuffle reduction gives y[m, n]. The codebooks are staged in shared
// memory when R * E * 16 bytes <= kSmemBytes (E <= 4096 for R = 1, E <= 2048 for R = 2), otherwise read
// through the read-only cache (__ldg). Rows of x beyond MB are done in further passes over the row's codes; the
// row's scale multiplies each reduced sum as it is stored. R (1 or 2) and MB are template arguments, so the loops
// over codebooks and rows unroll with compile-time bounds and indices (a runtime R loop made ptxas spill).
// Invalid indices (>= E) are masked with E - 1 (vq_index): no out-of-bounds read, no error.
// Dequantization: one thread per vector (n, j), through vq_decode_vector.
#include <algorithm>

#include "lowbit/cuda_utils.cuh"
#include "lowbit/element_io.h"
#include "lowbit/vq.h"

namespace lowbit {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kSmemBytes = 96 * 1024;

// codeword[0..8) as fp32 from a 16-byte aligned fp16 codeword (shared or global memory).
template <bool kShared>
__device__ __forceinline__ void add_codeword(const uint16_t* cw, float* w) {
  uint4 raw;
  if (kShared)
    raw = *reinterpret_cast<const uint4*>(cw);
  else
    raw = __ldg(reinterpret_cast<const uint4*>(cw));
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    w[2 * i] += vq_half(uint16_t(words[i] & 0xffffu));
    w[2 * i + 1] += vq_half(uint16_t(words[i] >> 16));
  }
}

template <typename IO, int MB, int R, bool kShared, typename C>
__global__ void __launch_bounds__(kThreads) vq_gemm_kernel(const typename IO::storage* __restrict__ x,
                                                           const C* __restrict__ codes,
                                                           const uint16_t* __restrict__ codebooks,
                                                           const uint16_t* __restrict__ scales,
                                                           typename IO::storage* __restrict__ out, int m, int n,
                                                           int k, int entries) {
  LOWBIT_DYNAMIC_SHARED(uint16_t, smem_cb);
  const uint16_t* cb = codebooks;
  if (kShared) {
    const int words = R * entries * kVqVecLen / 8;  // uint4 units
    for (int i = threadIdx.x; i < words; i += blockDim.x)
      reinterpret_cast<uint4*>(smem_cb)[i] = __ldg(reinterpret_cast<const uint4*>(codebooks) + i);
    __syncthreads();
    cb = smem_cb;
  }
  const int lane = threadIdx.x & 31;
  const int vectors = k / kVqVecLen;
  for (int row = blockIdx.x * kWarps + (threadIdx.x >> 5); row < n; row += gridDim.x * kWarps) {
    const C* c = codes + int64_t(row) * vectors * R;
    for (int m0 = 0; m0 < m; m0 += MB) {
      const int rows = min(MB, m - m0);
      const typename IO::storage* xm = x + int64_t(m0) * k;
      float acc[MB];
#pragma unroll
      for (int i = 0; i < MB; ++i) acc[i] = 0.0f;
      for (int j = lane; j < vectors; j += 32) {
        float w[kVqVecLen] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint32_t idx = vq_index(c[j * R + r], uint32_t(entries));
          add_codeword<kShared>(cb + (int64_t(r) * entries + idx) * kVqVecLen, w);
        }
#pragma unroll
        for (int i = 0; i < MB; ++i) {
          if (i >= rows) break;
          const typename IO::storage* xr = xm + int64_t(i) * k + j * kVqVecLen;
#pragma unroll
          for (int d = 0; d < kVqVecLen; ++d) acc[i] += w[d] * IO::load(xr, d);
        }
      }
#pragma unroll
      for (int i = 0; i < MB; ++i) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], off);
        if (lane == 0 && i < rows) IO::store(out, int64_t(m0 + i) * n + row, vq_half(scales[row]) * acc[i]);
      }
    }
  }
}

template <typename IO, int MB, int R, bool kShared, typename C>
void launch_gemm(const TensorView& x, const TensorView& codes, const TensorView& codebooks, const TensorView& scales,
                 const TensorView& out, cudaStream_t stream) {
  const int m = int(x.size(0)), k = int(x.size(1)), n = int(codes.size(0));
  const int e = int(codebooks.size(1));
  const size_t smem = kShared ? size_t(R) * e * kVqVecLen * sizeof(uint16_t) : 0;
  auto kernel = vq_gemm_kernel<IO, MB, R, kShared, C>;
  int blocks = (n + kWarps - 1) / kWarps;
  if (kShared) {  // enough blocks to fill the GPU, each staging the codebooks once for many rows
    cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
               "vq_gemm (shared memory size)");
    int device = 0, sms = 0, per_sm = 0;
    cuda_check(cudaGetDevice(&device), "cudaGetDevice");
    cuda_check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    cuda_check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem),
               "vq_gemm (occupancy)");
    blocks = std::min(blocks, std::max(1, sms * std::max(1, per_sm)));
  }
  launch_kernel("vq_gemm_kernel", kernel, blocks, kThreads, smem, stream,
                static_cast<const typename IO::storage*>(x.data), codes.ptr<C>(), codebooks.ptr<uint16_t>(),
                scales.ptr<uint16_t>(), static_cast<typename IO::storage*>(out.data), m, n, k, e);
}

template <typename IO, int R, typename C>
void gemm_rows(const TensorView& x, const TensorView& codes, const TensorView& codebooks, const TensorView& scales,
               const TensorView& out, cudaStream_t stream) {
  const int64_t m = x.size(0);
  const bool shared = R * codebooks.size(1) * kVqVecLen * int64_t(sizeof(uint16_t)) <= kSmemBytes;
  if (m == 1)
    shared ? launch_gemm<IO, 1, R, true, C>(x, codes, codebooks, scales, out, stream)
           : launch_gemm<IO, 1, R, false, C>(x, codes, codebooks, scales, out, stream);
  else if (m <= 4)
    shared ? launch_gemm<IO, 4, R, true, C>(x, codes, codebooks, scales, out, stream)
           : launch_gemm<IO, 4, R, false, C>(x, codes, codebooks, scales, out, stream);
  else
    shared ? launch_gemm<IO, 8, R, true, C>(x, codes, codebooks, scales, out, stream)
           : launch_gemm<IO, 8, R, false, C>(x, codes, codebooks, scales, out, stream);
}

// R = 1 or 2 codebooks (the bindings check it), a template argument of the kernel.
template <typename IO, typename C>
void gemm_codes(const TensorView& x, const TensorView& codes, const TensorView& codebooks, const TensorView& scales,
                const TensorView& out, cudaStream_t stream) {
  codes.size(2) == 1 ? gemm_rows<IO, 1, C>(x, codes, codebooks, scales, out, stream)
                     : gemm_rows<IO, 2, C>(x, codes, codebooks, scales, out, stream);
}

// Byte codes (uint8) or 16-bit ones (int16/uint16, read as unsigned).
template <typename IO>
void gemm(const TensorView& x, const TensorView& codes, const TensorView& codebooks, const TensorView& scales,
          const TensorView& out, cudaStream_t stream) {
  codes.dtype == DType::u8 ? gemm_codes<IO, uint8_t>(x, codes, codebooks, scales, out, stream)
                           : gemm_codes<IO, uint16_t>(x, codes, codebooks, scales, out, stream);
}

template <typename IO, typename C>
__global__ void vq_dequantize_kernel(const C* __restrict__ codes, const uint16_t* __restrict__ codebooks,
                                     const uint16_t* __restrict__ scales, typename IO::storage* __restrict__ out,
                                     int64_t vectors_total, int vectors, int r_count, int entries) {
  const int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v >= vectors_total) return;
  float w[kVqVecLen];
  vq_decode_vector(codes, codebooks, scales, v / vectors, v % vectors, vectors, r_count, uint32_t(entries), w);
#pragma unroll
  for (int d = 0; d < kVqVecLen; ++d) IO::store(out, v * kVqVecLen + d, w[d]);
}

template <typename IO, typename C>
void dequantize_codes(const TensorView& codes, const TensorView& codebooks, const TensorView& scales,
                      const TensorView& out, cudaStream_t stream) {
  const int64_t total = codes.size(0) * codes.size(1);
  if (total == 0) return;
  const int threads = 256;
  launch_kernel("vq_dequantize_kernel", vq_dequantize_kernel<IO, C>, unsigned((total + threads - 1) / threads),
                threads, 0, stream, codes.ptr<C>(), codebooks.ptr<uint16_t>(), scales.ptr<uint16_t>(),
                static_cast<typename IO::storage*>(out.data), total, int(codes.size(1)), int(codes.size(2)),
                int(codebooks.size(1)));
}

template <typename IO>
void dequantize(const TensorView& codes, const TensorView& codebooks, const TensorView& scales, const TensorView& out,
                cudaStream_t stream) {
  codes.dtype == DType::u8 ? dequantize_codes<IO, uint8_t>(codes, codebooks, scales, out, stream)
                           : dequantize_codes<IO, uint16_t>(codes, codebooks, scales, out, stream);
}

}  // namespace

void vq_gemm_cuda(const TensorView& x, const TensorView& codes, const TensorView& codebooks,
                  const TensorView& scales, const TensorView& out, int64_t stream) {
  if (x.size(0) == 0 || codes.size(0) == 0) return;
  DeviceGuard guard(x.device_id);
  switch (x.dtype) {
    case DType::f32: gemm<F32>(x, codes, codebooks, scales, out, as_stream(stream)); break;
    case DType::f16: gemm<F16>(x, codes, codebooks, scales, out, as_stream(stream)); break;
    case DType::bf16: gemm<BF16>(x, codes, codebooks, scales, out, as_stream(stream)); break;
    default: throw type_error("vq_gemm: x must be float32, float16 or bfloat16");
  }
}

void vq_dequantize_cuda(const TensorView& codes, const TensorView& codebooks, const TensorView& scales,
                        const TensorView& out, int64_t stream) {
  DeviceGuard guard(codes.device_id);
  switch (out.dtype) {
    case DType::f32: dequantize<F32>(codes, codebooks, scales, out, as_stream(stream)); break;
    case DType::f16: dequantize<F16>(codes, codebooks, scales, out, as_stream(stream)); break;
    case DType::bf16: dequantize<BF16>(codes, codebooks, scales, out, as_stream(stream)); break;
    default: throw type_error("vq_dequantize: out must be float32, float16 or bfloat16");
  }
}

}  // namespace lowbit
