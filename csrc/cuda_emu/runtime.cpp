// The CUDA runtime API of the emulator (lowbit/cuda_emu/runtime.h): one device with an H100 SXM's attributes,
// host memory behind guard pages, synchronous streams, a sticky last error as the real runtime keeps it.
#include "lowbit/cuda_emu/runtime.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <new>

#include "cuda_emu/memory.h"

namespace lowbit {
namespace emu {
namespace {

constexpr int kSms = 132;
constexpr int kMaxThreadsPerSm = 2048;
constexpr int kMaxBlocksPerSm = 32;
constexpr int kSharedPerSm = 228 << 10;
constexpr int kSharedPerBlockOptin = 227 << 10;
constexpr int kSharedPerBlockDefault = 48 << 10;
constexpr int kSharedReservedPerBlock = 1 << 10;

thread_local cudaError_t t_last_error = cudaSuccess;
std::mutex g_mutex;
std::map<const void*, int> g_max_dynamic_shared;

cudaError_t fail(cudaError_t e) {
  t_last_error = e;
  return e;
}

}  // namespace

void set_last_error(cudaError_t e) { t_last_error = e; }

cudaError_t set_max_dynamic_shared(const void* kernel, int bytes) {
  if (bytes < 0 || bytes > kSharedPerBlockOptin) return fail(cudaErrorInvalidValue);
  std::lock_guard<std::mutex> lock(g_mutex);
  g_max_dynamic_shared[kernel] = bytes;
  return cudaSuccess;
}

int max_dynamic_shared(const void* kernel) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const auto it = g_max_dynamic_shared.find(kernel);
  return it == g_max_dynamic_shared.end() ? kSharedPerBlockDefault : it->second;
}

int occupancy_blocks_per_sm(int block_threads, size_t dynamic_shared_bytes) {
  if (block_threads <= 0 || block_threads > 1024) return 0;
  const int by_threads = kMaxThreadsPerSm / ((block_threads + 31) / 32 * 32);
  const int by_shared = kSharedPerSm / int(dynamic_shared_bytes + kSharedReservedPerBlock);
  return std::min({kMaxBlocksPerSm, by_threads, by_shared});
}

}  // namespace emu
}  // namespace lowbit

using lowbit::emu::device_alloc;
using lowbit::emu::device_free;

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
  }
  return "unknown error";
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = lowbit::emu::t_last_error;
  lowbit::emu::t_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return lowbit::emu::t_last_error; }

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : lowbit::emu::fail(cudaErrorInvalidDevice); }

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  using namespace lowbit::emu;
  if (device != 0) return fail(cudaErrorInvalidDevice);
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = kSharedPerBlockDefault; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMultiProcessorCount: *value = kSms; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = kSharedPerSm; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = kSharedPerBlockOptin; break;
    default: return fail(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  try {
    *ptr = device_alloc(bytes, "a cudaMalloc allocation");
  } catch (const std::bad_alloc&) {
    return lowbit::emu::fail(cudaErrorMemoryAllocation);
  }
  return cudaSuccess;
}
cudaError_t cudaMallocAsync(void** ptr, size_t bytes, cudaStream_t) { return cudaMalloc(ptr, bytes); }

// Callers free in destructors and ignore the result: an overrun found at release is raised by the op's end_call
// (not left as the sticky last error, which the next, unrelated launch would report).
cudaError_t cudaFree(void* ptr) {
  const std::string overrun = device_free(ptr);
  if (!overrun.empty()) lowbit::emu::defer_error(overrun);
  return cudaSuccess;
}
cudaError_t cudaFreeAsync(void* ptr, cudaStream_t) { return cudaFree(ptr); }

cudaError_t cudaMemset(void* ptr, int value, size_t bytes) {
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) { return cudaMemset(ptr, value, bytes); }

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
  return cudaMemcpy(dst, src, bytes, kind);
}
