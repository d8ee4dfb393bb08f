// CUDA asynchronous-dequantization 2/4-bit GEMM over the aligned layout (async_dequant.h), after "Enabling Fast
// 2-bit LLM on GPUs: Memory Alignment and Asynchronous Dequantization", and the int8 activation quantization.
// GEMM: a CUDA block of 128 threads owns 16 weight rows and up to 4 rows of x (grid.y walks further rows of x).
// K is walked in tiles of 4 chunks (512 codes at 2 bits, 256 at 4), two shared-memory stages deep: while tile t
// is multiplied, tile t + 1's codes (16 rows x 128 bytes) and activations (4 rows x the tile's int8) are in flight
// as 16-byte cp.async copies, and tile t's scales and zeros are loaded into registers before the wait. Thread
// (row r = tid / 8, piece j = tid % 8) owns 16 bytes of chunk j / 2 of its row: for each of the chunk's runs c
// (4 at 2 bits, 2 at 4) one shift + mask per word gives 4 codes as bytes,
// multiplied with 4 int8 activations by dp4a (exact int32), then scaled by scale * d in fp32 (table mode: the
// 4 codes first become their int8 table values by two prmt byte selections, table_bytes4). Activation chunks
// sit 160 bytes apart in shared memory, so the 8 pieces of a row hit 8 distinct bank quads. The 8 threads of a
// row are reduced by shuffles. Before sm_80 (no cp.async) the copies are plain 16-byte loads and stores.
// Mixed 2/4-bit GEMM over the mixed aligned layout: one warp per weight row over both segments (see the kernel).
// Activation quantization: one warp per (row of x, group), a max reduction over shuffles, then the codes.
#include <algorithm>

#include "lowbit/async_dequant.h"
#include "lowbit/cuda_ptx.cuh"
#include "lowbit/cuda_utils.cuh"
#include "lowbit/element_io.h"
#include "lowbit/half.h"

namespace lowbit {
namespace {

constexpr int kThreads = 128;
constexpr int kRows = 16;          // weight rows per CUDA block
constexpr int kPieces = 8;         // 16-byte pieces per row and tile
constexpr int kMb = 4;             // rows of x per CUDA block
constexpr int kTileChunks = 4;     // 32-byte chunks per tile
constexpr int kXChunkStride = 160; // bytes between activation chunks in shared memory (128 + 32 of padding)

struct Stage {
  uint8_t codes[kRows][kPieces * 16];
  uint8_t x[kMb][kTileChunks * kXChunkStride];
};

template <typename IO, int BITS, bool TABLE>
__global__ void __launch_bounds__(kThreads) async_dequant_gemm_kernel(
    const int8_t* __restrict__ xq, const float* __restrict__ d, const uint8_t* __restrict__ packed,
    const uint16_t* __restrict__ scales, const uint16_t* __restrict__ zeros, const uint32_t* __restrict__ table_q,
    const float* __restrict__ table_scale, typename IO::storage* __restrict__ out, int m, int n, int k, int kp,
    int groups, int group_size) {
  LOWBIT_SHARED(Stage, stages, [2]);
  uint32_t tq[4] = {0u, 0u, 0u, 0u};
  float ts = 1.0f;
  if constexpr (TABLE) {
#pragma unroll
    for (int i = 0; i < 4; ++i) tq[i] = __ldg(table_q + i);
    ts = __ldg(table_scale);
  }
  const int tid = threadIdx.x;
  const int r = tid / kPieces, j = tid % kPieces;
  const int row = blockIdx.x * kRows + r;
  const int m0 = blockIdx.y * kMb;
  const int mb = min(kMb, m - m0);
  constexpr int kCodes = 256 / BITS, kRuns = 8 / BITS;  // codes and 32-code runs per chunk
  constexpr int kXPieces = kCodes / 16;                  // 16-byte activation pieces per chunk
  constexpr uint32_t kMask = BITS == 2 ? 0x03030303u : 0x0f0f0f0fu;
  const int chunks = int(aligned_chunks(k, BITS));
  const int tiles = (chunks + kTileChunks - 1) / kTileChunks;
  const int64_t row_bytes = int64_t(chunks) * 32;

  auto load_tile = [&](int t, Stage& s) {
    const int ch = t * kTileChunks + j / 2;
    if (row < n && ch < chunks) cp_async16(&s.codes[r][j * 16], packed + row * row_bytes + ch * 32 + (j % 2) * 16);
    const int xm = tid / 32, piece = tid % 32, xch = t * kTileChunks + piece / kXPieces;
    if (xm < mb && piece < kTileChunks * kXPieces && xch < chunks)
      cp_async16(&s.x[xm][(piece / kXPieces) * kXChunkStride + (piece % kXPieces) * 16],
             xq + int64_t(m0 + xm) * kp + int64_t(xch) * kCodes + (piece % kXPieces) * 16);
    cp_async_commit();
  };

  float acc[kMb] = {0.0f, 0.0f, 0.0f, 0.0f};
  load_tile(0, stages[0]);
  for (int t = 0; t < tiles; ++t) {
    if (t + 1 < tiles)
      load_tile(t + 1, stages[(t + 1) & 1]);
    else
      cp_async_commit();  // an empty group keeps "all but one" meaning "tile t has landed"
    const int ch = t * kTileChunks + j / 2;
    const bool live = row < n && ch < chunks;
    // Scales and zeros of the thread's runs, issued before the wait so that they overlap it.
    float sc[kRuns], zc[kRuns];
    int gc[kRuns];
#pragma unroll
    for (int c = 0; c < kRuns; ++c) {
      const int krun = ch * kCodes + 32 * c;
      gc[c] = live && krun < k ? krun / group_size : -1;
      sc[c] = gc[c] >= 0 ? half_to_float(scales[int64_t(row) * groups + gc[c]]) : 0.0f;
      zc[c] = gc[c] >= 0 && zeros ? half_to_float(zeros[int64_t(row) * groups + gc[c]]) : 0.0f;
    }
    cp_async_wait<1>();
    __syncthreads();
    const Stage& s = stages[t & 1];
    if (live) {
      const uint4 cw = *reinterpret_cast<const uint4*>(&s.codes[r][j * 16]);
#pragma unroll
      for (int c = 0; c < kRuns; ++c) {
        if (gc[c] < 0) continue;
        uint32_t q0 = (cw.x >> (BITS * c)) & kMask, q1 = (cw.y >> (BITS * c)) & kMask;
        uint32_t q2 = (cw.z >> (BITS * c)) & kMask, q3 = (cw.w >> (BITS * c)) & kMask;
        if constexpr (TABLE) {
          q0 = table_bytes4(q0, tq);
          q1 = table_bytes4(q1, tq);
          q2 = table_bytes4(q2, tq);
          q3 = table_bytes4(q3, tq);
        }
#pragma unroll
        for (int i = 0; i < kMb; ++i) {
          if (i >= mb) break;
          const uint4 xw = *reinterpret_cast<const uint4*>(&s.x[i][(j / 2) * kXChunkStride + 32 * c + (j % 2) * 16]);
          int dot = __dp4a(int(q0), int(xw.x), 0);
          dot = __dp4a(int(q1), int(xw.y), dot);
          dot = __dp4a(int(q2), int(xw.z), dot);
          dot = __dp4a(int(q3), int(xw.w), dot);
          int xs = __dp4a(0x01010101, int(xw.x), 0);
          xs = __dp4a(0x01010101, int(xw.y), xs);
          xs = __dp4a(0x01010101, int(xw.z), xs);
          xs = __dp4a(0x01010101, int(xw.w), xs);
          acc[i] += async_group_term(sc[c], zc[c], d[int64_t(m0 + i) * groups + gc[c]], ts, dot, xs);
        }
      }
    }
    __syncthreads();  // the stage is refilled by the next iteration's copies
  }
#pragma unroll
  for (int i = 0; i < kMb; ++i) {
#pragma unroll
    for (int off = kPieces / 2; off > 0; off >>= 1) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], off);
    if (j == 0 && row < n && i < mb) IO::store(out, int64_t(m0 + i) * n + row, acc[i]);
  }
}

// Mixed layout: one warp per weight row, lane (r, j) = (lane / 8, lane % 8) takes word j of segment run s0 + r,
// 4 runs per step: 4 codes by one 32-bit load, shift and mask, dp4a against the 4 activations of its K-run, the
// group's scale, zero and d applied per run.
constexpr int kMixedWarps = 4;  // weight rows per CUDA block

template <typename IO>
__global__ void __launch_bounds__(kMixedWarps * 32) mixed_gemm_kernel(
    const int8_t* __restrict__ xq, const float* __restrict__ d, const uint8_t* __restrict__ packed,
    const int32_t* __restrict__ runs4, const int32_t* __restrict__ runs2, int r4, int r2,
    const uint16_t* __restrict__ scales, const uint16_t* __restrict__ zeros, typename IO::storage* __restrict__ out,
    int m, int n, int kp, int groups, int group_size) {
  const int lane = threadIdx.x % 32, row = blockIdx.x * kMixedWarps + threadIdx.x / 32;
  if (row >= n) return;  // a whole warp: no block-wide synchronization below
  const int m0 = blockIdx.y * kMb, mb = min(kMb, m - m0);
  const int j = lane % 8, rl = lane / 8;
  const int64_t seg2 = aligned_words_per_row(32 * int64_t(r4), 4) * 4;
  const uint8_t* base = packed + int64_t(row) * (mixed_aligned_words(r4, r2) * 4);
  float acc[kMb] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int sg = 0; sg < 2; ++sg) {
    const int bits = sg == 0 ? 4 : 2, count = sg == 0 ? r4 : r2;
    const int32_t* runs = sg == 0 ? runs4 : runs2;
    const uint8_t* codes = base + (sg == 0 ? 0 : seg2);
    const uint32_t mask = bits == 2 ? 0x03030303u : 0x0f0f0f0fu;
    for (int s0 = 0; s0 < count; s0 += 4) {
      const int sr = s0 + rl;
      if (sr >= count) break;
      const int64_t col = 32 * int64_t(sr) + 4 * j;  // column inside the segment
      const uint32_t w = (__ldg(reinterpret_cast<const uint32_t*>(codes + aligned_byte(col, bits))) >>
                          aligned_shift(col, bits)) & mask;
      const int kr = __ldg(runs + sr), g = kr * 32 / group_size;
      const float sc = half_to_float(scales[int64_t(row) * groups + g]);
      const float zc = half_to_float(zeros[int64_t(row) * groups + g]);
#pragma unroll
      for (int i = 0; i < kMb; ++i) {
        if (i >= mb) break;
        const uint32_t x4 = *reinterpret_cast<const uint32_t*>(xq + int64_t(m0 + i) * kp + 32 * int64_t(kr) + 4 * j);
        acc[i] += async_group_term(sc, zc, d[int64_t(m0 + i) * groups + g], 1.0f, dot4_i8(w, x4),
                                   dot4_i8(0x01010101u, x4));
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kMb; ++i) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], off);
    if (lane == 0 && i < mb) IO::store(out, int64_t(m0 + i) * n + row, acc[i]);
  }
}

template <typename IO>
__global__ void quantize_activations_kernel(const typename IO::storage* __restrict__ x, int8_t* __restrict__ xq,
                                            float* __restrict__ d, int m, int k, int kp, int groups,
                                            int group_size) {
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
  if (warp >= m * groups) return;
  const int i = warp / groups, g = warp % groups;
  const int k0 = g * group_size, k1 = min(k, k0 + group_size);
  float amax = 0.0f;
  for (int c = k0 + lane; c < k1; c += 32) amax = fmaxf(amax, fabsf(IO::load(x, int64_t(i) * k + c)));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const float mul = act_quant_multiplier(amax);
  if (lane == 0) d[int64_t(i) * groups + g] = act_quant_scale(amax);
  for (int c = k0 + lane; c < k1; c += 32) xq[int64_t(i) * kp + c] = act_quant_code(IO::load(x, int64_t(i) * k + c), mul);
  if (g == groups - 1)
    for (int c = k + lane; c < kp; c += 32) xq[int64_t(i) * kp + c] = 0;
}

template <typename IO>
void quantize(const TensorView& x, const TensorView& xq, const TensorView& d, int group_size, cudaStream_t stream) {
  const int m = int(x.size(0)), k = int(x.size(1)), groups = int(d.size(1));
  const int64_t warps = int64_t(m) * groups;
  if (warps == 0) return;
  const int threads = 256;
  launch_kernel("quantize_activations_kernel", quantize_activations_kernel<IO>,
                unsigned((warps * 32 + threads - 1) / threads), threads, 0, stream,
                static_cast<const typename IO::storage*>(x.data), xq.ptr<int8_t>(), d.ptr<float>(), m, k,
                int(xq.size(1)), groups, group_size);
}

template <typename IO, int BITS, bool TABLE>
void launch(const AsyncGemmOperands& op, cudaStream_t stream) {
  const int m = int(op.xq.size(0)), n = int(op.packed.size(0));
  const dim3 grid(unsigned((n + kRows - 1) / kRows), unsigned((m + kMb - 1) / kMb));
  launch_kernel(
      "async_dequant_gemm_kernel", async_dequant_gemm_kernel<IO, BITS, TABLE>, grid, kThreads, 0, stream,
      op.xq.ptr<int8_t>(), op.d.ptr<float>(), static_cast<const uint8_t*>(op.packed.data),
      op.scales.ptr<uint16_t>(), op.zeros ? op.zeros->ptr<uint16_t>() : nullptr,
      TABLE ? static_cast<const uint32_t*>(op.table_q->data) : nullptr,
      TABLE ? op.table_scale->ptr<float>() : nullptr, static_cast<typename IO::storage*>(op.out.data), m, n,
      int(op.k), int(op.xq.size(1)), int(op.d.size(1)), op.group_size);
}

template <typename IO>
void gemm(const AsyncGemmOperands& op, cudaStream_t stream) {
  const bool table = op.table_q != nullptr;
  if (op.bits == 2)
    table ? launch<IO, 2, true>(op, stream) : launch<IO, 2, false>(op, stream);
  else
    table ? launch<IO, 4, true>(op, stream) : launch<IO, 4, false>(op, stream);
}

template <typename IO>
void mixed(const MixedGemmOperands& op, cudaStream_t stream) {
  const int m = int(op.xq.size(0)), n = int(op.packed.size(0));
  const dim3 grid(unsigned((n + kMixedWarps - 1) / kMixedWarps), unsigned((m + kMb - 1) / kMb));
  launch_kernel(
      "mixed_gemm_kernel", mixed_gemm_kernel<IO>, grid, kMixedWarps * 32, 0, stream, op.xq.ptr<int8_t>(), op.d.ptr<float>(), static_cast<const uint8_t*>(op.packed.data), op.runs4.ptr<int32_t>(),
      op.runs2.ptr<int32_t>(), int(op.runs4.size(0)), int(op.runs2.size(0)), op.scales.ptr<uint16_t>(),
      op.zeros.ptr<uint16_t>(), static_cast<typename IO::storage*>(op.out.data), m, n, int(op.xq.size(1)),
      int(op.d.size(1)), op.group_size);
}

}  // namespace

void quantize_activations_cuda(const TensorView& x, const TensorView& xq, const TensorView& d, int group_size,
                               int64_t stream) {
  DeviceGuard guard(x.device_id);
  switch (x.dtype) {
    case DType::f32: quantize<F32>(x, xq, d, group_size, as_stream(stream)); break;
    case DType::f16: quantize<F16>(x, xq, d, group_size, as_stream(stream)); break;
    case DType::bf16: quantize<BF16>(x, xq, d, group_size, as_stream(stream)); break;
    default: throw type_error("quantize_activations: x must be float32, float16 or bfloat16");
  }
}

void async_dequant_gemm_cuda(const AsyncGemmOperands& op, int64_t stream) {
  if (op.xq.size(0) == 0 || op.packed.size(0) == 0) return;
  DeviceGuard guard(op.xq.device_id);
  switch (op.out.dtype) {
    case DType::f32: gemm<F32>(op, as_stream(stream)); break;
    case DType::f16: gemm<F16>(op, as_stream(stream)); break;
    case DType::bf16: gemm<BF16>(op, as_stream(stream)); break;
    default: throw type_error("async_dequant_gemm: out must be float32, float16 or bfloat16");
  }
}

void mixed_gemm_cuda(const MixedGemmOperands& op, int64_t stream) {
  if (op.xq.size(0) == 0 || op.packed.size(0) == 0) return;
  DeviceGuard guard(op.xq.device_id);
  switch (op.out.dtype) {
    case DType::f32: mixed<F32>(op, as_stream(stream)); break;
    case DType::f16: mixed<F16>(op, as_stream(stream)); break;
    case DType::bf16: mixed<BF16>(op, as_stream(stream)); break;
    default: throw type_error("mixed_gemm: out must be float32, float16 or bfloat16");
  }
}

}  // namespace lowbit
