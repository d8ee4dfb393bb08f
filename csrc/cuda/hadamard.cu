// CUDA Hadamard transform: one block per row. Each thread keeps 8 contiguous values in registers for the
// first three butterfly stages, warp shuffles do the next five (strides 8..128), shared memory the rest;
// the H_m step reads the row from shared memory and writes the output directly.
#include "lowbit/cuda_utils.cuh"
#include "lowbit/element_io.h"
#include "lowbit/hadamard.h"

namespace lowbit {
namespace {

__device__ const uint64_t d_hadamard_row_bits[] = {LOWBIT_HADAMARD_ROW_BITS};

constexpr int kMaxThreads = 256;

template <typename IO>
__global__ void __launch_bounds__(kMaxThreads) hadamard_kernel(const typename IO::storage* __restrict__ x,
                                                               typename IO::storage* __restrict__ out,
                                                               const float* __restrict__ signs, float scale,
                                                               bool inverse, int log2_p, int m, int table_offset,
                                                               int words_per_row) {
  LOWBIT_DYNAMIC_SHARED(unsigned char, smem_raw);
  const int table_words = m > 1 ? m * words_per_row : 0;
  uint64_t* table = reinterpret_cast<uint64_t*>(smem_raw);
  float* buf = reinterpret_cast<float*>(table + table_words);
  const int p = 1 << log2_p;
  const int n = m << log2_p;
  const int tid = threadIdx.x;
  const int threads = blockDim.x;
  const int64_t row = blockIdx.x;
  const typename IO::storage* src = x + row * n;
  typename IO::storage* dst = out + row * n;
  for (int i = tid; i < table_words; i += threads) table[i] = d_hadamard_row_bits[table_offset + i];

  int done_log2 = 0;  // butterfly stages finished before the shared-memory stages
  if (log2_p >= 3) {
    const int chunks = n / 8;
    const int lane = tid & 31;
    for (int base = 0; base < chunks; base += threads) {  // uniform trip count: every lane joins the shuffles
      const int c = base + tid;
      const bool active = c < chunks;
      float v[8];
#pragma unroll
      for (int r = 0; r < 8; ++r) {
        const int i = c * 8 + r;
        v[r] = active ? IO::load(src, i) * (signs && !inverse ? signs[i] : 1.0f) : 0.0f;
      }
      fwht_inplace(v, 3);
#pragma unroll
      for (int j = 0; j < 5; ++j) {
        if ((16 << j) > p) break;  // partner must lie in the same 2^log2_p segment
#pragma unroll
        for (int r = 0; r < 8; ++r) {
          const float other = __shfl_xor_sync(0xffffffffu, v[r], 1 << j);
          v[r] = (lane & (1 << j)) ? other - v[r] : v[r] + other;
        }
      }
      if (active) {
#pragma unroll
        for (int r = 0; r < 8; ++r) buf[c * 8 + r] = v[r];
      }
    }
    done_log2 = log2_p < 8 ? log2_p : 8;
  } else {
    for (int i = tid; i < n; i += threads) buf[i] = IO::load(src, i) * (signs && !inverse ? signs[i] : 1.0f);
  }
  __syncthreads();
  for (int h = 1 << done_log2; h < p; h <<= 1) {
    for (int i = tid; i < n / 2; i += threads) {
      const int lo = (i / h) * 2 * h + (i % h);
      butterfly(buf[lo], buf[lo + h]);
    }
    __syncthreads();
  }
  for (int i = tid; i < n; i += threads) {
    float acc;
    if (m > 1) {
      const int a = i >> log2_p;
      const int b = i & (p - 1);
      acc = 0.0f;
      for (int a2 = 0; a2 < m; ++a2) {
        const float s = inverse ? hadamard_sign(table, words_per_row, a2, a) : hadamard_sign(table, words_per_row, a, a2);
        acc += s * buf[(a2 << log2_p) + b];
      }
    } else {
      acc = buf[i];
    }
    acc *= scale;
    if (signs && inverse) acc *= signs[i];
    IO::store(dst, i, acc);
  }
}

template <typename IO>
void launch(const TensorView& x, const TensorView& out, const float* signs, float scale, bool inverse, int log2_p,
            int m, cudaStream_t stream) {
  const int n = m << log2_p;
  const int64_t rows = x.numel() / n;
  if (rows == 0) return;
  const HadamardTable* t = hadamard_table(m);
  const int words_per_row = t ? t->words_per_row : 0;
  const int table_offset = t ? t->offset : 0;
  const size_t smem = size_t(m > 1 ? m * words_per_row : 0) * sizeof(uint64_t) + size_t(n) * sizeof(float);
  const int work = log2_p >= 3 ? n / 8 : n / 2;
  const int threads = std::min(kMaxThreads, std::max(32, (work + 31) / 32 * 32));
  auto kernel = hadamard_kernel<IO>;
  cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
             "hadamard_transform (shared memory size)");
  launch_kernel("hadamard_kernel", kernel, dim3(unsigned(rows)), threads, smem, stream,
                static_cast<const typename IO::storage*>(x.data), static_cast<typename IO::storage*>(out.data), signs,
                scale, inverse, log2_p, m, table_offset, words_per_row);
}

}  // namespace

void hadamard_transform_cuda(const TensorView& x, const TensorView& out, const TensorView* signs, float scale,
                             bool inverse, int64_t stream) {
  int log2_p = 0, m = 1;
  if (!hadamard_factor(x.size(-1), &log2_p, &m))
    throw std::invalid_argument("hadamard_transform: unsupported size " + std::to_string(x.size(-1)));
  DeviceGuard guard(x.device_id);
  const float* s = signs ? signs->ptr<float>() : nullptr;
  switch (x.dtype) {
    case DType::f32: launch<F32>(x, out, s, scale, inverse, log2_p, m, as_stream(stream)); break;
    case DType::f16: launch<F16>(x, out, s, scale, inverse, log2_p, m, as_stream(stream)); break;
    case DType::bf16: launch<BF16>(x, out, s, scale, inverse, log2_p, m, as_stream(stream)); break;
    default: throw type_error("hadamard_transform: x must be float32, float16 or bfloat16");
  }
}

}  // namespace lowbit
