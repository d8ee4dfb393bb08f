// The inline PTX the kernels use, one small __device__ wrapper per instruction, with the emulated body (CUDA
// emulation build, csrc/cuda_emu) beside the PTX one and the pre-sm_80 fallback where there is one.
#pragma once
#include "lowbit/cuda_utils.cuh"

namespace lowbit {

// cp.async.cg.shared.global [smem], [gmem], 16: a 16-byte asynchronous copy into shared memory (both 16-byte
// aligned). Before sm_80: a plain load and store. Emulated: the source is read now, the shared memory is written
// only at the cp_async_wait that covers the copy's group.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(LOWBIT_CUDA_EMULATION)
  emu::async_copy(smem, gmem, 16);
#elif __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
#else
  *reinterpret_cast<uint4*>(smem) = __ldg(reinterpret_cast<const uint4*>(gmem));
#endif
}

// cp.async.commit_group: the copies issued since the last commit become one group.
__device__ __forceinline__ void cp_async_commit() {
#if defined(LOWBIT_CUDA_EMULATION)
  emu::async_copy_commit();
#elif __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// cp.async.wait_group N: waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(LOWBIT_CUDA_EMULATION)
  emu::async_copy_wait(N);
#elif __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

}  // namespace lowbit
