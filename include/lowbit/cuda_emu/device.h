// CUDA emulation, device side: what a kernel in csrc/cuda sees when the host compiler builds it for the test-only
// module lowbit._cuda_emu. CUDA's keywords become plain C++, the built-in variables read the state of the
// emulated thread running now (a fiber, see csrc/cuda_emu/scheduler.cpp), and the synchronizing intrinsics
// (__syncthreads, __syncwarp, warp shuffles, cp.async) hand control to the scheduler. The pure intrinsics
// (__dp4a, __byte_perm, bit casts, fp16 conversions, atomics) are computed here from CUDA's documented semantics.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

namespace lowbit {
namespace emu {

// The emulated thread running now: its indices and the launch's shape.
struct ThreadCtx {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
// Each emulated thread runs on a stack in a region aligned to its size whose first bytes say whose stack it is:
// the running thread is found from the stack pointer, with no thread-local storage (which a
// dlopen'ed module reaches through __tls_get_addr, a call per intrinsic).
constexpr uintptr_t kFiberRegionBytes = uintptr_t(128) << 10;
struct FiberHeader {
  ThreadCtx* ctx;
  const uint64_t* block_serial;  // distinct per block run, so that shared-memory slots know when to re-allocate
  void* thread;                  // the scheduler's record of the thread
};
inline FiberHeader& this_fiber() {
  // The stack pointer as a plain integer: an address taken from a local would carry that local's provenance, and
  // the compiler could then drop stores through the header's pointers as stores to a dead stack object.
  uintptr_t sp;
#if defined(__x86_64__)
  asm("movq %%rsp, %0" : "=r"(sp));
#else
  sp = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
  asm("" : "+r"(sp));
#endif
  return *reinterpret_cast<FiberHeader*>(sp & ~(kFiberRegionBytes - 1));
}
inline ThreadCtx& this_thread() { return *this_fiber().ctx; }

enum class WarpOp : uint8_t { sync, shfl_idx, shfl_up, shfl_down, shfl_xor };
// Every lane named in mask meets the others here; returns the value this lane reads (see scheduler.cpp).
uint64_t warp_meet(WarpOp op, unsigned mask, uint64_t value, int operand, int width);
void syncthreads(const char* file, int line);
void async_copy(void* shared_dst, const void* global_src, int bytes);
void async_copy_commit();
void async_copy_wait(int pending);
// Shared memory of the running block: the dynamic region, and a fresh slot for a static __shared__ variable.
void* dynamic_shared();
void* static_shared(size_t bytes, size_t align);
inline uint64_t block_serial() { return *this_fiber().block_serial; }

// One static __shared__ variable: the same storage for every thread of a block, new (and poisoned) per block.
// Tag is the closure type of a lambda at the declaration, so each declaration (and instantiation) has its own.
template <typename T, typename Tag>
T& shared_variable(Tag) {
  static thread_local uint64_t serial = ~0ull;
  static thread_local T* slot = nullptr;
  if (serial != block_serial()) {
    slot = static_cast<T*>(static_shared(sizeof(T), alignof(T)));
    serial = block_serial();
  }
  return *slot;
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp shuffles move 4- or 8-byte values");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace emu
}  // namespace lowbit

#define threadIdx (::lowbit::emu::this_thread().thread_idx)
#define blockIdx (::lowbit::emu::this_thread().block_idx)
#define blockDim (::lowbit::emu::this_thread().block_dim)
#define gridDim (::lowbit::emu::this_thread().grid_dim)
#define __syncthreads() ::lowbit::emu::syncthreads(__FILE__, __LINE__)

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::lowbit::emu::warp_meet(::lowbit::emu::WarpOp::sync, mask, 0, 0, 32);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  using namespace ::lowbit::emu;
  return from_bits<T>(warp_meet(WarpOp::shfl_idx, mask, to_bits(v), src_lane, width));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  using namespace ::lowbit::emu;
  return from_bits<T>(warp_meet(WarpOp::shfl_up, mask, to_bits(v), int(delta), width));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  using namespace ::lowbit::emu;
  return from_bits<T>(warp_meet(WarpOp::shfl_down, mask, to_bits(v), int(delta), width));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  using namespace ::lowbit::emu;
  return from_bits<T>(warp_meet(WarpOp::shfl_xor, mask, to_bits(v), lane_mask, width));
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// dp4a: the four products of signed bytes summed into c (PTX dp4a.s32.s32).
inline int __dp4a(int a, int b, int c) {
  for (int i = 0; i < 4; ++i) c += int(int8_t(uint32_t(a) >> (8 * i))) * int(int8_t(uint32_t(b) >> (8 * i)));
  return c;
}
inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) {  // dp4a.u32.u32: unsigned bytes
  for (int i = 0; i < 4; ++i) c += ((a >> (8 * i)) & 0xffu) * ((b >> (8 * i)) & 0xffu);
  return c;
}
// byte_perm: byte i of the result is byte (s >> 4i) & 7 of the 8 bytes y:x (x the low word).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = uint64_t(y) << 32 | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= unsigned((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
  return r;
}

inline float __uint_as_float(unsigned u) { return ::lowbit::emu::from_bits<float>(u); }
inline float __int_as_float(int i) { return ::lowbit::emu::from_bits<float>(uint32_t(i)); }
inline unsigned __float_as_uint(float f) { return unsigned(::lowbit::emu::to_bits(f)); }
inline int __float_as_int(float f) { return int(uint32_t(::lowbit::emu::to_bits(f))); }

// fp16 storage and its exact conversions (the hardware's round-to-nearest-even), through the compiler's _Float16.
struct __half {
  unsigned short x;
};
inline __half __ushort_as_half(unsigned short h) { return __half{h}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline float __half2float(__half h) {  // exact: normal and subnormal values, infinities, NaN payloads
  const uint32_t sign = uint32_t(h.x & 0x8000u) << 16, exp = (h.x >> 10) & 0x1fu, man = h.x & 0x3ffu;
  if (exp == 0x1f) return ::lowbit::emu::from_bits<float>(sign | 0x7f800000u | man << 13);
  if (exp != 0) return ::lowbit::emu::from_bits<float>(sign | (exp + 112u) << 23 | man << 13);
  const float mag = float(man) * 5.9604644775390625e-8f;  // man * 2^-24
  return sign ? -mag : mag;
}
inline __half __float2half_rn(float v) {
  const _Float16 f = _Float16(v);
  __half h;
  std::memcpy(&h.x, &f, 2);
  return h;
}
inline __half __float2half(float v) { return __float2half_rn(v); }

// Atomics: blocks run one at a time per OS thread, several OS threads may run blocks at once.
template <typename T>
T atomicAdd(T* p, T v) {
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline float atomicAdd(float* p, float v) {
  float old, sum;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  do {
    sum = old + v;
  } while (!__atomic_compare_exchange(p, &old, &sum, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return old;
}
template <typename T>
T atomicMin(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T>
T atomicMax(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (v > old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
// CUDA's integer min/max overloads of device code.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
