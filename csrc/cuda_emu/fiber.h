// Cooperative fibers for the CUDA emulator: each emulated thread of a block runs on its own stack and gives
// control back at every synchronizing intrinsic. On x86-64 a switch saves the callee-saved registers and swaps
// stack pointers (no system call); elsewhere it falls back to ucontext.
#pragma once
#include <cstddef>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace lowbit {
namespace emu {

// A stack in a region of `region` bytes aligned to its size (a power of 2): the region's first page holds the
// caller's header (found from any address on the stack, lowbit/cuda_emu/device.h), the second is a PROT_NONE
// guard (an overflow faults instead of corrupting the header), the rest is the stack.
class FiberStack {
 public:
  explicit FiberStack(size_t region);
  ~FiberStack();
  FiberStack(const FiberStack&) = delete;
  FiberStack& operator=(const FiberStack&) = delete;
  void* header() const { return base_; }
  char* top() const { return base_ + region_; }
  bool guards(const void* addr) const;  // addr lies in the guard page

 private:
  char* base_ = nullptr;
  size_t region_ = 0;
};

// A point to switch to: a suspended fiber, or the scheduler's own context.
struct Context {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

// Prepares `fiber` to run entry(arg) on `stack` at its first switch_to; entry must never return.
void make_context(Context& fiber, FiberStack& stack, void (*entry)(void*), void* arg, Context& return_to);
// Saves the running context into `from` and resumes `to`.
void switch_context(Context& from, Context& to);

}  // namespace emu
}  // namespace lowbit
