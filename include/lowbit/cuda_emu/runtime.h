// CUDA emulation, host side: the part of the CUDA runtime API that csrc/cuda calls, on host memory, and the
// launch entry point that lowbit::launch_kernel (cuda_utils.cuh) calls instead of <<<>>>. One emulated device
// (an H100's attributes); streams are accepted and ignored (work runs when it is issued); device allocations
// end at a guard page (csrc/cuda_emu/memory.cpp).
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>

#include "lowbit/cuda_emu/device.h"

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
};
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;

const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaMalloc(void** ptr, size_t bytes);
cudaError_t cudaFree(void* ptr);
cudaError_t cudaMallocAsync(void** ptr, size_t bytes, cudaStream_t stream);
cudaError_t cudaFreeAsync(void* ptr, cudaStream_t stream);
cudaError_t cudaMemset(void* ptr, int value, size_t bytes);
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream = nullptr);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream = nullptr);

namespace lowbit {
namespace emu {
cudaError_t set_max_dynamic_shared(const void* kernel, int bytes);
int max_dynamic_shared(const void* kernel);
int occupancy_blocks_per_sm(int block_threads, size_t dynamic_shared_bytes);
// Runs grid x block emulated threads of `kernel` (each calls body()). A configuration error is left for
// cudaGetLastError, as a real launch does; an error while running (divergent barrier, bad shuffle mask, a read
// past a device allocation) throws std::runtime_error naming the kernel, block and thread.
void launch(const char* name, const void* kernel, dim3 grid, dim3 block, size_t dynamic_shared_bytes,
            const std::function<void()>& body);
}  // namespace emu
}  // namespace lowbit

template <typename T>
cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return ::lowbit::emu::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), value);
}
template <typename T>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, T* kernel, int block_threads,
                                                         size_t dynamic_shared_bytes) {
  *blocks = ::lowbit::emu::occupancy_blocks_per_sm(block_threads, dynamic_shared_bytes);
  return *blocks > 0 ? cudaSuccess : cudaErrorInvalidValue;
}
