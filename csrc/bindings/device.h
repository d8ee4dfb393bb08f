// What was built and what is present: CUDA build flag, device count, and the guard CUDA ops call first.
#pragma once
#include <string>

namespace lowbit {

bool cuda_built();
int cuda_device_count();  // 0 when not built with CUDA, or without driver or GPU
// Throws std::runtime_error naming the op when a CUDA kernel cannot run here.
void require_cuda(const char* op);
std::string cpu_features();

}  // namespace lowbit

// Runs the statement (a CUDA entry point) after require_cuda; without a CUDA build, only raises.
#ifdef LOWBIT_WITH_CUDA
#define LOWBIT_RUN_CUDA(op, ...)    \
  do {                              \
    ::lowbit::require_cuda(op);     \
    __VA_ARGS__;                    \
  } while (0)
#else
#define LOWBIT_RUN_CUDA(op, ...) ::lowbit::require_cuda(op)
#endif
