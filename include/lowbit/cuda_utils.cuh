// CUDA helpers for the kernels in csrc/cuda: error checks that raise naming the kernel, a device guard, the one
// launch helper (<<<>>> under nvcc, the emulator's launch in the test-only emulated build) and the declarations
// of shared memory, which the emulated build allocates per block and fills with a poison pattern.
#pragma once
#ifdef LOWBIT_CUDA_EMULATION
#include "lowbit/cuda_emu/runtime.h"
#else
#include <cuda_runtime.h>
#endif

#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace lowbit {

inline void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": CUDA error: " + cudaGetErrorString(e));
}

// Checks the launch just issued (configuration errors surface here; on a GPU faults surface at the next sync,
// under the emulator the launch itself throws).
inline void cuda_check_launch(const char* kernel) { cuda_check(cudaGetLastError(), kernel); }

// kernel<<<grid, block, shared_bytes, stream>>>(args...), then the launch check naming the kernel.
template <typename... Params, typename... Args>
void launch_kernel(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                   cudaStream_t stream, Args&&... args) {
#ifdef LOWBIT_CUDA_EMULATION
  // Converted to the parameter types once, as a launch does; every emulated thread gets its own copies.
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  emu::launch(name, reinterpret_cast<const void*>(kernel), grid, block, shared_bytes,
              [&] { std::apply(kernel, params); });
#else
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
#endif
  cuda_check_launch(name);
}

// Makes `device` current for the scope and restores the previous device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cuda_check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) cuda_check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

inline cudaStream_t as_stream(int64_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

}  // namespace lowbit

// LOWBIT_SHARED(float, lut, [16]) declares `__shared__ float lut[16]` (16-byte aligned);
// LOWBIT_DYNAMIC_SHARED(unsigned char, smem) the dynamic shared memory `extern __shared__ unsigned char smem[]`.
#ifdef LOWBIT_CUDA_EMULATION
#define LOWBIT_SHARED(type, name, dims) \
  type(&name) dims = ::lowbit::emu::shared_variable<type dims>([] {})
#define LOWBIT_DYNAMIC_SHARED(type, name) type* const name = static_cast<type*>(::lowbit::emu::dynamic_shared())
#else
#define LOWBIT_SHARED(type, name, dims) __shared__ __align__(16) type name dims
#define LOWBIT_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif
