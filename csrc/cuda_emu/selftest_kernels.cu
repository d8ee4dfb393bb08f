// The emulator's planted-bug kernels (selftest.h), written as the kernels in csrc/cuda are (launch_kernel,
// LOWBIT_SHARED, the cp.async wrappers), each beside its correct twin. One block of 64 threads; x and out hold
// 64 floats. The expected output of every correct kernel is in tests/test_cuda_emulator.py.
#include <stdexcept>

#include "cuda_emu/selftest.h"
#include "lowbit/cuda_ptx.cuh"
#include "lowbit/cuda_utils.cuh"

namespace lowbit {
namespace emu {
namespace {

constexpr int kThreads = 64;

// out[t] = x[(t + 1) % 64] through shared memory; BARRIER false drops the __syncthreads between write and read.
template <bool BARRIER>
__global__ void neighbour_kernel(const float* x, float* out) {
  LOWBIT_SHARED(float, s, [kThreads]);
  const int t = threadIdx.x;
  s[t] = x[t];
  if (BARRIER) __syncthreads();
  out[t] = s[(t + 1) % kThreads];
}

// Threads 0..15 copy 16 bytes each of x into shared memory with cp.async; out[t] = x[t] after the barrier.
// WAIT false reads the stage without cp.async.wait_group.
template <bool WAIT>
__global__ void staged_copy_kernel(const float* x, float* out) {
  LOWBIT_SHARED(float, s, [kThreads]);
  const int t = threadIdx.x;
  if (t < kThreads / 4) cp_async16(&s[4 * t], &x[4 * t]);
  cp_async_commit();
  if (WAIT) cp_async_wait<0>();
  __syncthreads();
  out[t] = s[t];
}

// out[t] = x[t] + x[t ^ 16] within each warp, through a shuffle with `mask`.
template <unsigned MASK>
__global__ void xor_shuffle_kernel(const float* x, float* out) {
  const int t = threadIdx.x;
  out[t] = x[t] + __shfl_xor_sync(MASK, x[t], 16);
}

// The full-mask shuffle above, called by lanes 0..15 only.
__global__ void half_warp_shuffle_kernel(const float* x, float* out) {
  const int t = threadIdx.x;
  if (t % 32 < 16) out[t] = x[t] + __shfl_xor_sync(0xffffffffu, x[t], 1);
}

// A barrier inside a branch that only the first warp takes.
__global__ void divergent_barrier_kernel(const float* x, float* out) {
  const int t = threadIdx.x;
  if (t < 32) __syncthreads();
  out[t] = x[t];
}

// Threads 60..63 return before the block's barrier.
__global__ void early_return_kernel(const float* x, float* out) {
  const int t = threadIdx.x;
  if (t >= 60) return;
  __syncthreads();
  out[t] = x[t];
}

// out[t] = x[t + READ] and out[t + WRITE] = x[t]: READ = 1 reads one element past x, WRITE = 1 writes past out.
template <int READ, int WRITE>
__global__ void shifted_copy_kernel(const float* x, float* out) {
  const int t = threadIdx.x;
  out[t + WRITE] = x[t + READ];
}

template <typename... P>
void run(const char* name, void (*kernel)(P...), const TensorView& x, const TensorView& out) {
  launch_kernel(name, kernel, 1, kThreads, 0, nullptr, x.ptr<float>(), out.ptr<float>());
}

}  // namespace

void run_selftest(const std::string& name, const TensorView& x, const TensorView& out) {
  if (name == "barrier") return run("neighbour_kernel", neighbour_kernel<true>, x, out);
  if (name == "missing_barrier") return run("neighbour_kernel", neighbour_kernel<false>, x, out);
  if (name == "cp_async_wait") return run("staged_copy_kernel", staged_copy_kernel<true>, x, out);
  if (name == "read_before_wait") return run("staged_copy_kernel", staged_copy_kernel<false>, x, out);
  if (name == "shuffle") return run("xor_shuffle_kernel", xor_shuffle_kernel<0xffffffffu>, x, out);
  if (name == "wrong_mask") return run("xor_shuffle_kernel", xor_shuffle_kernel<0x0000ffffu>, x, out);
  if (name == "half_warp_shuffle") return run("half_warp_shuffle_kernel", half_warp_shuffle_kernel, x, out);
  if (name == "divergent_barrier") return run("divergent_barrier_kernel", divergent_barrier_kernel, x, out);
  if (name == "early_return") return run("early_return_kernel", early_return_kernel, x, out);
  if (name == "in_bounds") return run("shifted_copy_kernel", shifted_copy_kernel<0, 0>, x, out);
  if (name == "read_past_end") return run("shifted_copy_kernel", shifted_copy_kernel<1, 0>, x, out);
  if (name == "write_past_end") return run("shifted_copy_kernel", shifted_copy_kernel<0, 1>, x, out);
  throw std::invalid_argument("run_selftest: unknown self-test " + name);
}

}  // namespace emu
}  // namespace lowbit
