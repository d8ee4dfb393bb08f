// CUDA presence checks (the driver is only touched here, lazily) and CPU feature detection.
#include "bindings/device.h"

#include <stdexcept>

#if defined(LOWBIT_CUDA_EMULATION)
#include "lowbit/cuda_emu/runtime.h"
#elif defined(LOWBIT_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace lowbit {

bool cuda_built() {
#ifdef LOWBIT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int cuda_device_count() {
#ifdef LOWBIT_WITH_CUDA
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" / "no device" error
    return 0;
  }
  return count;
#else
  return 0;
#endif
}

void require_cuda(const char* op) {
  if (!cuda_built())
    throw std::runtime_error(std::string(op) + ": got CUDA tensors, but this lowbit build has no CUDA kernels "
                             "(rebuild with a CUDA compiler and LOWBIT_CUDA=ON)");
  if (cuda_device_count() == 0)
    throw std::runtime_error(std::string(op) + ": got CUDA tensors, but no CUDA device or driver is available");
}

std::string cpu_features() {
  std::string f;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) f += "avx2 ";
  if (__builtin_cpu_supports("fma")) f += "fma ";
  if (__builtin_cpu_supports("f16c")) f += "f16c ";
  if (__builtin_cpu_supports("avx512f")) f += "avx512f ";
  if (__builtin_cpu_supports("avx512bw")) f += "avx512bw ";
  if (__builtin_cpu_supports("avx512vl")) f += "avx512vl ";
  if (__builtin_cpu_supports("avx512vnni")) f += "avx512vnni ";
  if (__builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8")) f += "amx-int8 ";
#endif
  if (!f.empty()) f.pop_back();
  return f.empty() ? "baseline" : f;
}

}  // namespace lowbit
