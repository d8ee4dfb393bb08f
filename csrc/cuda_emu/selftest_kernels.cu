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

// Four rounds through one 16-float stage: threads 0..3 refill it with cp.async (16 bytes each), then threads
// 0..15 read it reversed: out[16 r + t] = x[16 r + 15 - t]. BARRIER false drops the barrier that keeps the next
// round's copies from landing while others still read the stage.
template <bool BARRIER>
__global__ void stage_reuse_kernel(const float* x, float* out) {
  LOWBIT_SHARED(float, s, [16]);
  const int t = threadIdx.x;
  for (int r = 0; r < 4; ++r) {
    if (t < 4) cp_async16(&s[4 * t], &x[16 * r + 4 * t]);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    if (t < 16) out[16 * r + t] = s[15 - t];
    if (BARRIER) __syncthreads();
  }
}

// out[t] = x[t] + x[t ^ 16] within each warp, through a shuffle with `mask`.
template <unsigned MASK>
__global__ void xor_shuffle_kernel(const float* x, float* out) {
  const int t = threadIdx.x;
  out[t] = x[t] + __shfl_xor_sync(MASK, x[t], 16);
}

// out[t] = the shuffle OP of x[t] across each warp, with CUDA's source-lane and width rules: 0 __shfl_up_sync by
// 3 in segments of 16 lanes, 1 __shfl_down_sync by 5 in segments of 8, 2 __shfl_sync from lane 6 of segments of 4
// (lane 9 mod 4 = 1), 3 __shfl_xor_sync with 20 in segments of 16.
template <int OP>
__global__ void shuffle_rules_kernel(const float* x, float* out) {
  const int t = threadIdx.x;
  const float v = x[t];
  float r = 0.0f;
  if (OP == 0) r = __shfl_up_sync(0xffffffffu, v, 3, 16);
  if (OP == 1) r = __shfl_down_sync(0xffffffffu, v, 5, 8);
  if (OP == 2) r = __shfl_sync(0xffffffffu, v, 9, 4);
  if (OP == 3) r = __shfl_xor_sync(0xffffffffu, v, 20, 16);
  out[t] = r;
}

// The pure intrinsics on bit patterns (x and out reinterpreted as 32-bit words w): threads 0..15 __dp4a(w[t],
// w[t + 1], t), 16..31 __byte_perm(w[t], w[t + 1], w[t + 2] & 0x7777), 32..47 __half2float of the low half of w[t]
// (as float bits), 48..63 __float2half_rn of x[t] (as the 16-bit pattern).
__global__ void intrinsics_kernel(const float* x, float* out) {
  const int t = threadIdx.x;
  const unsigned* w = reinterpret_cast<const unsigned*>(x);
  unsigned* o = reinterpret_cast<unsigned*>(out);
  if (t < 16)
    o[t] = unsigned(__dp4a(int(w[t]), int(w[t + 1]), t));
  else if (t < 32)
    o[t] = __byte_perm(w[t], w[t + 1], w[t + 2] & 0x7777u);
  else if (t < 48)
    out[t] = __half2float(__ushort_as_half((unsigned short)(w[t] & 0xffffu)));
  else
    o[t] = __half_as_ushort(__float2half_rn(x[t]));
}

// Every thread adds x[t] into out[0] (float atomicAdd), 1 into word 1 (unsigned atomicAdd), and its index into
// words 2 and 3 by atomicMin and atomicMax (out's words as integers, set to 64 and 0 by thread 0 first).
__global__ void atomics_kernel(const float* x, float* out) {
  const int t = threadIdx.x;
  unsigned* o = reinterpret_cast<unsigned*>(out);
  if (t == 0) {
    out[0] = 0.0f;
    o[1] = 0u;
    o[2] = 64u;
    o[3] = 0u;
  }
  __syncthreads();
  atomicAdd(&out[0], x[t]);
  atomicAdd(&o[1], 1u);
  atomicMin(&o[2], unsigned(t + 5));
  atomicMax(&o[3], unsigned(t));
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
  if (name == "stage_reuse") return run("stage_reuse_kernel", stage_reuse_kernel<true>, x, out);
  if (name == "stage_refilled_while_read") return run("stage_reuse_kernel", stage_reuse_kernel<false>, x, out);
  if (name == "shuffle") return run("xor_shuffle_kernel", xor_shuffle_kernel<0xffffffffu>, x, out);
  if (name == "wrong_mask") return run("xor_shuffle_kernel", xor_shuffle_kernel<0x0000ffffu>, x, out);
  if (name == "shfl_up") return run("shuffle_rules_kernel", shuffle_rules_kernel<0>, x, out);
  if (name == "shfl_down") return run("shuffle_rules_kernel", shuffle_rules_kernel<1>, x, out);
  if (name == "shfl_idx") return run("shuffle_rules_kernel", shuffle_rules_kernel<2>, x, out);
  if (name == "shfl_xor") return run("shuffle_rules_kernel", shuffle_rules_kernel<3>, x, out);
  if (name == "atomics") return run("atomics_kernel", atomics_kernel, x, out);
  if (name == "intrinsics") return run("intrinsics_kernel", intrinsics_kernel, x, out);
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
