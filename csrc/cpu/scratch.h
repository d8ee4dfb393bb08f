// Per-thread scratch memory reused across kernel calls: the per-call tables of the GEMV kernels (the pair tables
// of lut_gemm, the x . codeword tables of vq_gemm: hundreds of KB to a few MB per row of x) would otherwise be
// fresh pages, page-faulted in and zeroed on every call (about 40 us per MB here).
#pragma once
#include <cstddef>
#include <vector>

namespace lowbit {

//! Scratch sizes up to this stay allocated in the calling thread between calls; larger ones are freed after use.
constexpr size_t kScratchKeepBytes = size_t(8) << 20;

// `count` floats of uninitialized-for-the-caller scratch, valid until the next call from this thread: the
// thread's kept buffer when it is small enough, else `owned` (resized), which the caller frees.
inline float* scratch_floats(size_t count, std::vector<float>& owned) {
  static thread_local std::vector<float> kept;
  std::vector<float>& buffer = count * sizeof(float) <= kScratchKeepBytes ? kept : owned;
  if (buffer.size() < count) buffer.resize(count);
  return buffer.data();
}

}  // namespace lowbit
