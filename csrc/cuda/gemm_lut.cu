// CUDA LUT GEMM (y = x . W_hat^T, W_hat[n, k] = scale[n, g] * (table[q[n, k]] - zero[n, g]); lut_gemm.h).
// One warp per weight row (rows strided over the grid), 8 warps per CUDA block. Lane l takes the row's 32-code
// blocks j = l, l + 32, ...: it loads the block's `bits` words, unpacks them with unpack_block<BITS> (pack.h),
// looks each code up in the table (shared memory: 16 floats, one bank each, so lanes never conflict) and
// accumulates, per row m of x, dot = sum table[q] * x and sum x over the block. A block lies in one group, so the
// group's scale and zero are applied once per block: acc += scale * (dot - zero * sum_x), which is the fused
// table entry lut_fused_entry of lut_gemm.h distributed over the block. A shuffle reduction gives y[m, n].
// Rows of x beyond MB are done in further passes over the row's codes. The loop over blocks takes the full blocks
// only, so its unrolled body has no bound per code and ptxas no partial-block path to keep registers for (with one
// inside, some instantiations spilled); when K is not a multiple of 32 the partial last block is done after the
// loop by the lane it falls to (that lane's last block anyway, so every sum keeps its order), skipping the codes
// past K.
#include "lowbit/cuda_utils.cuh"
#include "lowbit/element_io.h"
#include "lowbit/lut_gemm.h"

namespace lowbit {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

// acc[i] += the contribution of block j (its codes c < count; count = 32 when kFull) to row m0 + i of y, i < rows.
template <typename IO, int BITS, int MB, bool kFull>
__device__ __forceinline__ void accumulate_block(const typename IO::storage* __restrict__ x,
                                                 const uint32_t* __restrict__ codes_row,
                                                 const uint16_t* __restrict__ scales,
                                                 const uint16_t* __restrict__ zeros, const float* lut, int k,
                                                 int groups, int blocks_per_group, int row, int m0, int rows, int j,
                                                 int count, float (&acc)[MB]) {
  uint32_t words[BITS];
#pragma unroll
  for (int w = 0; w < BITS; ++w) words[w] = __ldg(codes_row + j * BITS + w);
  uint8_t q[kCodesPerBlock];
  unpack_block<BITS>(words, q);
  const int g = j / blocks_per_group;
  const float scale = half_to_float(scales[int64_t(row) * groups + g]);
  const float zero = zeros ? half_to_float(zeros[int64_t(row) * groups + g]) : 0.0f;
#pragma unroll
  for (int i = 0; i < MB; ++i) {
    if (i >= rows) break;
    const typename IO::storage* xr = x + int64_t(m0 + i) * k + int64_t(j) * kCodesPerBlock;
    float dot = 0.0f, sum = 0.0f;
#pragma unroll
    for (int c = 0; c < kCodesPerBlock; ++c) {
      if (!kFull && c >= count) break;
      const float xv = IO::load(xr, c);
      dot += lut[q[c]] * xv;
      sum += xv;
    }
    acc[i] += scale * (dot - zero * sum);
  }
}

template <typename IO, int BITS, int MB>
__global__ void __launch_bounds__(kThreads) lut_gemm_kernel(const typename IO::storage* __restrict__ x,
                                                            const uint32_t* __restrict__ packed,
                                                            const uint16_t* __restrict__ scales,
                                                            const uint16_t* __restrict__ zeros,
                                                            const float* __restrict__ table,
                                                            typename IO::storage* __restrict__ out, int m, int n,
                                                            int k, int groups, int blocks_per_group) {
  LOWBIT_SHARED(float, lut, [kLutMaxEntries]);
  if (threadIdx.x < (1 << BITS)) lut[threadIdx.x] = table[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int blocks = int(blocks_for(k));
  const int full_blocks = k / kCodesPerBlock;
  const int wpr = blocks * BITS;
  for (int row = blockIdx.x * kWarps + (threadIdx.x >> 5); row < n; row += gridDim.x * kWarps) {
    const uint32_t* codes_row = packed + int64_t(row) * wpr;
    for (int m0 = 0; m0 < m; m0 += MB) {
      const int rows = min(MB, m - m0);
      float acc[MB];
#pragma unroll
      for (int i = 0; i < MB; ++i) acc[i] = 0.0f;
      for (int j = lane; j < full_blocks; j += 32)
        accumulate_block<IO, BITS, MB, true>(x, codes_row, scales, zeros, lut, k, groups, blocks_per_group,
                                             row, m0, rows, j, kCodesPerBlock, acc);
      if (full_blocks < blocks && lane == full_blocks % 32)
        accumulate_block<IO, BITS, MB, false>(x, codes_row, scales, zeros, lut, k, groups, blocks_per_group,
                                              row, m0, rows, full_blocks, k - full_blocks * kCodesPerBlock, acc);
#pragma unroll
      for (int i = 0; i < MB; ++i) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], off);
        if (lane == 0 && i < rows) IO::store(out, int64_t(m0 + i) * n + row, acc[i]);
      }
    }
  }
}

template <typename IO, int BITS, int MB>
void launch(const TensorView& x, const TensorView& packed, const TensorView& scales, const TensorView* zeros,
            const TensorView& table, const TensorView& out, int group_size, cudaStream_t stream) {
  const int m = int(x.size(0)), k = int(x.size(1)), n = int(packed.size(0));
  const int blocks = (n + kWarps - 1) / kWarps;
  launch_kernel("lut_gemm_kernel", lut_gemm_kernel<IO, BITS, MB>, blocks, kThreads, 0, stream,
                static_cast<const typename IO::storage*>(x.data), static_cast<const uint32_t*>(packed.data),
                scales.ptr<uint16_t>(), zeros ? zeros->ptr<uint16_t>() : nullptr, table.ptr<float>(),
                static_cast<typename IO::storage*>(out.data), m, n, k, int(groups_for(k, group_size)),
                group_size / kCodesPerBlock);
}

template <typename IO, int BITS>
void by_rows(const TensorView& x, const TensorView& packed, const TensorView& scales, const TensorView* zeros,
             const TensorView& table, const TensorView& out, int group_size, cudaStream_t stream) {
  const int64_t m = x.size(0);
  if (m == 1)
    launch<IO, BITS, 1>(x, packed, scales, zeros, table, out, group_size, stream);
  else if (m <= 4)
    launch<IO, BITS, 4>(x, packed, scales, zeros, table, out, group_size, stream);
  else
    launch<IO, BITS, 8>(x, packed, scales, zeros, table, out, group_size, stream);
}

template <typename IO>
void by_bits(const TensorView& x, const TensorView& packed, const TensorView& scales, const TensorView* zeros,
             const TensorView& table, const TensorView& out, int bits, int group_size, cudaStream_t stream) {
  switch (bits) {
    case 2: by_rows<IO, 2>(x, packed, scales, zeros, table, out, group_size, stream); break;
    case 3: by_rows<IO, 3>(x, packed, scales, zeros, table, out, group_size, stream); break;
    case 4: by_rows<IO, 4>(x, packed, scales, zeros, table, out, group_size, stream); break;
    default: throw std::invalid_argument("lut_gemm: bits must be 2, 3 or 4");
  }
}

}  // namespace

void lut_gemm_cuda(const TensorView& x, const TensorView& packed, const TensorView& scales, const TensorView* zeros,
                   const TensorView& table, const TensorView& out, int bits, int group_size, int64_t stream) {
  if (x.size(0) == 0 || packed.size(0) == 0) return;
  DeviceGuard guard(x.device_id);
  switch (x.dtype) {
    case DType::f32: by_bits<F32>(x, packed, scales, zeros, table, out, bits, group_size, as_stream(stream)); break;
    case DType::f16: by_bits<F16>(x, packed, scales, zeros, table, out, bits, group_size, as_stream(stream)); break;
    case DType::bf16: by_bits<BF16>(x, packed, scales, zeros, table, out, bits, group_size, as_stream(stream)); break;
    default: throw type_error("lut_gemm: x must be float32, float16 or bfloat16");
  }
}

}  // namespace lowbit
