// CUDA packing, unpacking and dequantization of the canonical layout (include/lowbit/pack.h).
// Decoding runs one thread per (row, 32-code block): the thread unpacks its block with unpack_block<BITS>, maps
// the codes, and stages the values in shared memory so that each warp then writes its 1024 consecutive outputs
// coalesced. A CUDA block covers 256 consecutive blocks of one row; in the mixed layout it finds the word offsets
// of its groups with a block-wide sum and prefix sum over group_bits. pack_* first run a reduction that finds
// the first code out of range (atomicMin of its index), sync the stream and throw before packing anything.
#include <algorithm>
#include <string>
#include <vector>

#include "lowbit/cuda_utils.cuh"
#include "lowbit/element_io.h"
#include "lowbit/pack.h"

namespace lowbit {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kStride = kCodesPerBlock + 1;  // padded staging row: lanes write different banks
constexpr int kWarpCodes = 32 * kCodesPerBlock;

const uint32_t* words_in(const TensorView& t) { return static_cast<const uint32_t*>(t.data); }

struct U8 {  // unpacked codes, staged as (exact) small floats
  using storage = uint8_t;
  static __device__ void store(storage* p, int64_t i, float v) { p[i] = uint8_t(v); }
};

// Code -> value maps: map(row, g) is the one of group g of a row; invalid() is what the mixed kernel writes for a
// block whose width is not 2 or 4 or whose words lie past the row (input the bindings could not check).
struct CodeParams {
  struct Map {
    __device__ float operator()(uint32_t q) const { return float(q); }
  };
  __device__ Map map(int64_t, int64_t) const { return {}; }
  static __device__ float invalid() { return 255.0f; }
};
struct AffineParams {
  const uint16_t* scales;
  const uint16_t* zeros;
  int64_t groups;
  struct Map {
    float scale, zero;
    __device__ float operator()(uint32_t q) const { return dequant_uniform(q, scale, zero); }
  };
  __device__ Map map(int64_t row, int64_t g) const {
    return {half_to_float(scales[row * groups + g]), half_to_float(zeros[row * groups + g])};
  }
  static __device__ float invalid() { return __int_as_float(0x7fc00000); }
};
struct TableParams {
  const uint16_t* scales;
  const float* table;
  int64_t groups;
  struct Map {
    const float* table;
    float scale;
    __device__ float operator()(uint32_t q) const { return dequant_lut(q, scale, table); }
  };
  __device__ Map map(int64_t row, int64_t g) const { return {table, half_to_float(scales[row * groups + g])}; }
};

// Writes the warp's staged values (its 32 blocks, block b at st[b * kStride]) to out[0, count).
template <typename IO>
__device__ void store_warp(const float* st, typename IO::storage* out, int64_t count) {
  __syncwarp();
  for (int e = threadIdx.x & 31; e < count; e += 32) IO::store(out, e, st[(e >> 5) * kStride + (e & 31)]);
}

template <typename Map>
__device__ void stage_block(const uint8_t* q, const Map& map, float* st) {
#pragma unroll
  for (int i = 0; i < kCodesPerBlock; ++i) st[i] = map(q[i]);
}

__device__ int block_sum(int v, int* warp_sums) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
  __syncthreads();
  int total = 0;
  for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
  __syncthreads();
  return total;
}

__device__ int block_exclusive_sum(int v, int* warp_sums) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int inclusive = v;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int t = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane >= d) inclusive += t;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  int before = 0;
  for (int w = 0; w < warp; ++w) before += warp_sums[w];
  __syncthreads();
  return before + inclusive - v;
}

// Word offsets in a mixed row of groups g0 .. g0 + kThreads - 1 (those a CUDA block's 256 code blocks fall in);
// every thread of the block calls it. Groups before the last are full: group g starts at bpg * sum(bits[< g]).
__device__ void mixed_group_offsets(const uint8_t* group_bits, int64_t groups, int64_t g0, int bpg, int* offsets,
                                    int* warp_sums) {
  int before = 0;
  for (int64_t g = threadIdx.x; g < g0; g += kThreads) before += group_bits[g];
  before = block_sum(before, warp_sums);
  const int64_t g = g0 + threadIdx.x;
  const int width = g < groups ? group_bits[g] : 0;
  offsets[threadIdx.x] = (before + block_exclusive_sum(width, warp_sums)) * bpg;
  __syncthreads();
}

// Blocks per row, CUDA blocks per row, and the flat grid (rows * chunks) of the decoding and packing kernels.
struct RowGrid {
  int64_t blocks, chunks, grid;
  explicit RowGrid(int64_t rows, int64_t k)
      : blocks(blocks_for(k)), chunks((blocks_for(k) + kThreads - 1) / kThreads), grid(rows * chunks) {}
};

template <int BITS, typename IO, typename Params>
__global__ void __launch_bounds__(kThreads) decode_uniform_kernel(const uint32_t* __restrict__ words, Params params,
                                                                  typename IO::storage* __restrict__ out, int64_t k,
                                                                  int group_size, int64_t chunks) {
  LOWBIT_SHARED(float, stage, [kWarps * 32 * kStride]);
  const int64_t row = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t blocks = blocks_for(k);
  const int64_t j = chunk * kThreads + threadIdx.x;
  float* st = stage + warp * 32 * kStride;
  if (j < blocks) {
    uint8_t q[kCodesPerBlock];
    unpack_block<BITS>(words + (row * blocks + j) * BITS, q);
    stage_block(q, params.map(row, j * kCodesPerBlock / group_size), st + lane * kStride);
  }
  const int64_t first = (chunk * kThreads + warp * 32) * kCodesPerBlock;
  store_warp<IO>(st, out + row * k + first, std::min<int64_t>(kWarpCodes, k - first));
}

template <typename IO, typename Params>
__global__ void __launch_bounds__(kThreads) decode_mixed_kernel(const uint32_t* __restrict__ words,
                                                                const uint8_t* __restrict__ group_bits, Params params,
                                                                typename IO::storage* __restrict__ out, int64_t k,
                                                                int group_size, int64_t words_per_row, int64_t chunks) {
  LOWBIT_SHARED(float, stage, [kWarps * 32 * kStride]);
  LOWBIT_SHARED(int, offsets, [kThreads]);
  LOWBIT_SHARED(int, warp_sums, [kWarps]);
  const int64_t row = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int bpg = group_size / kCodesPerBlock;
  const int64_t blocks = blocks_for(k), j0 = chunk * kThreads, g0 = j0 / bpg;
  mixed_group_offsets(group_bits, groups_for(k, group_size), g0, bpg, offsets, warp_sums);
  const int64_t j = j0 + threadIdx.x;
  float* st = stage + warp * 32 * kStride + lane * kStride;
  if (j < blocks) {
    const int64_t g = j / bpg;
    const int b = group_bits[g];
    const int64_t off = offsets[g - g0] + (j - g * bpg) * b;
    uint8_t q[kCodesPerBlock];
    if ((b == 2 || b == 4) && off + b <= words_per_row) {
      if (b == 2)
        unpack_block<2>(words + row * words_per_row + off, q);
      else
        unpack_block<4>(words + row * words_per_row + off, q);
      stage_block(q, params.map(row, g), st);
    } else {
      for (int i = 0; i < kCodesPerBlock; ++i) st[i] = Params::invalid();
    }
  }
  const int64_t first = (j0 + warp * 32) * kCodesPerBlock;
  store_warp<IO>(stage + warp * 32 * kStride, out + row * k + first, std::min<int64_t>(kWarpCodes, k - first));
}

// Sets *first to the lowest row-major index of a code >= 2^width (width: bits, or group_bits[col / G]).
__global__ void find_bad_code_kernel(const uint8_t* __restrict__ codes, int64_t n, int64_t k, int bits,
                                     const uint8_t* __restrict__ group_bits, int group_size,
                                     unsigned long long* first) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int width = group_bits ? group_bits[i % k / group_size] : bits;
    if (codes[i] >> width) atomicMin(first, static_cast<unsigned long long>(i));
  }
}

__global__ void __launch_bounds__(kThreads) pack_uniform_kernel(const uint8_t* __restrict__ codes,
                                                                uint32_t* __restrict__ words, int64_t k, int bits,
                                                                int64_t chunks) {
  const int64_t row = blockIdx.x / chunks, j = blockIdx.x % chunks * kThreads + threadIdx.x;
  const int64_t blocks = blocks_for(k);
  if (j >= blocks) return;
  pack_block(codes + row * k + j * kCodesPerBlock, int(std::min<int64_t>(kCodesPerBlock, k - j * kCodesPerBlock)),
             bits, words + (row * blocks + j) * bits);
}

__global__ void __launch_bounds__(kThreads) pack_mixed_kernel(const uint8_t* __restrict__ codes,
                                                              const uint8_t* __restrict__ group_bits,
                                                              uint32_t* __restrict__ words, int64_t k, int group_size,
                                                              int64_t words_per_row, int64_t chunks) {
  LOWBIT_SHARED(int, offsets, [kThreads]);
  LOWBIT_SHARED(int, warp_sums, [kWarps]);
  const int64_t row = blockIdx.x / chunks, j0 = blockIdx.x % chunks * kThreads;
  const int bpg = group_size / kCodesPerBlock;
  const int64_t g0 = j0 / bpg, j = j0 + threadIdx.x;
  mixed_group_offsets(group_bits, groups_for(k, group_size), g0, bpg, offsets, warp_sums);
  if (j >= blocks_for(k)) return;
  const int64_t g = j / bpg;
  const int b = group_bits[g];
  pack_block(codes + row * k + j * kCodesPerBlock, int(std::min<int64_t>(kCodesPerBlock, k - j * kCodesPerBlock)),
             b, words + row * words_per_row + offsets[g - g0] + (j - g * bpg) * b);
}

// Device scratch on the stream, freed on the stream when it goes out of scope.
class StreamBuffer {
 public:
  StreamBuffer(size_t bytes, cudaStream_t stream) : stream_(stream) {
    cuda_check(cudaMallocAsync(&ptr_, bytes, stream), "pack (scratch allocation)");
  }
  ~StreamBuffer() { cudaFreeAsync(ptr_, stream_); }
  StreamBuffer(const StreamBuffer&) = delete;
  StreamBuffer& operator=(const StreamBuffer&) = delete;
  template <typename T> T* get() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

// The range check of pack_*: throws std::invalid_argument naming the first code that does not fit (syncs).
void check_codes_fit(const char* op, const TensorView& codes, int bits, const uint8_t* d_group_bits,
                     const std::vector<uint8_t>& h_group_bits, int group_size, cudaStream_t stream) {
  const int64_t n = codes.numel(), k = codes.size(1);
  if (n == 0) return;
  StreamBuffer first(sizeof(unsigned long long), stream);
  cuda_check(cudaMemsetAsync(first.get<void>(), 0xff, sizeof(unsigned long long), stream), op);
  const int grid = int(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096));
  launch_kernel("find_bad_code_kernel", find_bad_code_kernel, grid, kThreads, 0, stream, codes.ptr<uint8_t>(), n, k,
                bits, d_group_bits, group_size, first.get<unsigned long long>());
  unsigned long long index = 0;
  cuda_check(cudaMemcpyAsync(&index, first.get<void>(), sizeof(index), cudaMemcpyDeviceToHost, stream), op);
  cuda_check(cudaStreamSynchronize(stream), op);
  if (index == ~0ull) return;
  uint8_t value = 0;
  cuda_check(cudaMemcpy(&value, codes.ptr<uint8_t>() + index, 1, cudaMemcpyDeviceToHost), op);
  const int64_t col = int64_t(index) % k, group = d_group_bits ? col / group_size : -1;
  throw std::invalid_argument(
      bad_code_message(op, int64_t(index) / k, col, value, d_group_bits ? h_group_bits[group] : bits, group));
}

template <typename IO, typename Params>
void launch_uniform(const TensorView& packed, const TensorView& out, int bits, int group_size, Params params,
                    cudaStream_t stream) {
  const RowGrid grid(out.size(0), out.size(1));
  if (grid.grid == 0) return;
  const uint32_t* words = words_in(packed);
  auto* dst = out.ptr<typename IO::storage>();
  const int64_t k = out.size(1);
  auto kernel = bits == 2 ? decode_uniform_kernel<2, IO, Params>
                : bits == 3 ? decode_uniform_kernel<3, IO, Params> : decode_uniform_kernel<4, IO, Params>;
  launch_kernel("decode_uniform_kernel", kernel, unsigned(grid.grid), kThreads, 0, stream, words, params, dst, k,
                group_size, grid.chunks);
}

template <typename IO, typename Params>
void launch_mixed(const TensorView& packed, const TensorView& group_bits, const TensorView& out, int group_size,
                  Params params, cudaStream_t stream) {
  const RowGrid grid(out.size(0), out.size(1));
  if (grid.grid == 0) return;
  launch_kernel("decode_mixed_kernel", decode_mixed_kernel<IO, Params>, unsigned(grid.grid), kThreads, 0, stream,
                words_in(packed), group_bits.ptr<uint8_t>(), params, out.ptr<typename IO::storage>(), out.size(1),
                group_size, packed.size(1), grid.chunks);
}

template <typename Params>
void dispatch_float_out(const char* op, const TensorView& out, Params params, const TensorView& packed, int bits,
                        int group_size, cudaStream_t stream) {
  switch (out.dtype) {
    case DType::f32: launch_uniform<F32>(packed, out, bits, group_size, params, stream); break;
    case DType::f16: launch_uniform<F16>(packed, out, bits, group_size, params, stream); break;
    case DType::bf16: launch_uniform<BF16>(packed, out, bits, group_size, params, stream); break;
    default: throw type_error(std::string(op) + ": out must be float32, float16 or bfloat16");
  }
}

void check_bits(const char* op, int bits) {
  if (bits < 2 || bits > 4)
    throw std::invalid_argument(std::string(op) + ": bits must be 2, 3 or 4, got " + std::to_string(bits));
}

}  // namespace

void pack_uniform_cuda(const TensorView& codes, const TensorView& packed, int bits, int64_t stream) {
  check_bits("pack_uniform", bits);
  DeviceGuard guard(codes.device_id);
  const cudaStream_t s = as_stream(stream);
  check_codes_fit("pack_uniform", codes, bits, nullptr, {}, 0, s);
  const RowGrid grid(codes.size(0), codes.size(1));
  if (grid.grid == 0) return;
  launch_kernel("pack_uniform_kernel", pack_uniform_kernel, unsigned(grid.grid), kThreads, 0, s, codes.ptr<uint8_t>(),
                static_cast<uint32_t*>(packed.data), codes.size(1), bits, grid.chunks);
}

void unpack_cuda(const TensorView& packed, const TensorView& codes, int bits, int64_t stream) {
  check_bits("unpack", bits);
  DeviceGuard guard(codes.device_id);
  launch_uniform<U8>(packed, codes, bits, kCodesPerBlock, CodeParams{}, as_stream(stream));
}

void dequantize_uniform_cuda(const TensorView& packed, const TensorView& scales, const TensorView& zeros,
                             const TensorView& out, int bits, int group_size, int64_t stream) {
  check_bits("dequantize_uniform", bits);
  DeviceGuard guard(out.device_id);
  const AffineParams params{scales.ptr<uint16_t>(), zeros.ptr<uint16_t>(), scales.size(1)};
  dispatch_float_out("dequantize_uniform", out, params, packed, bits, group_size, as_stream(stream));
}

void dequantize_lut_cuda(const TensorView& packed, const TensorView& scales, const TensorView& table,
                         const TensorView& out, int bits, int group_size, int64_t stream) {
  check_bits("dequantize_lut", bits);
  DeviceGuard guard(out.device_id);
  const TableParams params{scales.ptr<uint16_t>(), table.ptr<float>(), scales.size(1)};
  dispatch_float_out("dequantize_lut", out, params, packed, bits, group_size, as_stream(stream));
}

void pack_mixed_cuda(const TensorView& codes, const TensorView& group_bits, const TensorView& packed, int group_size,
                     int64_t stream) {
  constexpr const char* op = "pack_mixed";
  DeviceGuard guard(codes.device_id);
  const cudaStream_t s = as_stream(stream);
  const int64_t k = codes.size(1);
  std::vector<uint8_t> host_bits(size_t(group_bits.numel()));
  cuda_check(cudaMemcpyAsync(host_bits.data(), group_bits.data, host_bits.size(), cudaMemcpyDeviceToHost, s), op);
  cuda_check(cudaStreamSynchronize(s), op);
  check_group_bits_values(host_bits.data(), int64_t(host_bits.size()), op);
  const int64_t words = mixed_words_per_row(host_bits.data(), k, group_size);
  check_shape(packed, op, "packed", {codes.size(0), words});
  check_codes_fit(op, codes, 0, group_bits.ptr<uint8_t>(), host_bits, group_size, s);
  const RowGrid grid(codes.size(0), k);
  if (grid.grid == 0) return;
  launch_kernel("pack_mixed_kernel", pack_mixed_kernel, unsigned(grid.grid), kThreads, 0, s, codes.ptr<uint8_t>(),
                group_bits.ptr<uint8_t>(), static_cast<uint32_t*>(packed.data), k, group_size, words, grid.chunks);
}

void unpack_mixed_cuda(const TensorView& packed, const TensorView& group_bits, const TensorView& codes,
                       int group_size, int64_t stream) {
  DeviceGuard guard(codes.device_id);
  launch_mixed<U8>(packed, group_bits, codes, group_size, CodeParams{}, as_stream(stream));
}

void dequantize_mixed_cuda(const TensorView& packed, const TensorView& scales, const TensorView& zeros,
                           const TensorView& group_bits, const TensorView& out, int group_size, int64_t stream) {
  DeviceGuard guard(out.device_id);
  const AffineParams params{scales.ptr<uint16_t>(), zeros.ptr<uint16_t>(), scales.size(1)};
  const cudaStream_t s = as_stream(stream);
  switch (out.dtype) {
    case DType::f32: launch_mixed<F32>(packed, group_bits, out, group_size, params, s); break;
    case DType::f16: launch_mixed<F16>(packed, group_bits, out, group_size, params, s); break;
    case DType::bf16: launch_mixed<BF16>(packed, group_bits, out, group_size, params, s); break;
    default: throw type_error("dequantize_mixed: out must be float32, float16 or bfloat16");
  }
}

}  // namespace lowbit
