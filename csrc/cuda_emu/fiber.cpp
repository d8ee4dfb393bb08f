// Fiber stacks and the context switch of the CUDA emulator (fiber.h).
#include "cuda_emu/fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <new>

namespace lowbit {
namespace emu {

FiberStack::FiberStack(size_t region) : region_(region) {
  // Map twice the region and keep its aligned half.
  void* p = mmap(nullptr, 2 * region, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  char* raw = static_cast<char*>(p);
  base_ = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(raw) + region - 1) & ~uintptr_t(region - 1));
  if (base_ > raw) munmap(raw, size_t(base_ - raw));
  if (base_ + region < raw + 2 * region) munmap(base_ + region, size_t(raw + 2 * region - (base_ + region)));
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  mprotect(base_ + page, page, PROT_NONE);
}

FiberStack::~FiberStack() { munmap(base_, region_); }

bool FiberStack::guards(const void* addr) const {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const char* a = static_cast<const char*>(addr);
  return a >= base_ + page && a < base_ + 2 * page;
}

#if defined(__x86_64__)

// lowbit_emu_switch(void** save_sp, void* load_sp): pushes rbp, rbx and r12-r15, stores rsp, loads the other
// stack's rsp and pops the same. The MXCSR and x87 control words are not switched: kernels never change them, and
// ldmxcsr / fldcw cost more than the rest of a switch (they were 13% of an emulated GEMM). A new fiber's stack
// is laid out so that the pops leave entry in r13, arg in r12, and `ret` goes to lowbit_emu_start, which calls
// entry(arg).
extern "C" void lowbit_emu_switch(void** save_sp, void* load_sp);
extern "C" void lowbit_emu_start();
asm(R"(
  .text
  .globl lowbit_emu_switch
  .hidden lowbit_emu_switch
  .type lowbit_emu_switch, @function
lowbit_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size lowbit_emu_switch, .-lowbit_emu_switch

  .globl lowbit_emu_start
  .hidden lowbit_emu_start
  .type lowbit_emu_start, @function
lowbit_emu_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size lowbit_emu_start, .-lowbit_emu_start
)");

void make_context(Context& fiber, FiberStack& stack, void (*entry)(void*), void* arg, Context&) {
  // 7 slots popped by lowbit_emu_switch (r15, r14, r13, r12, rbx, rbp, return address) under two of padding, from
  // a 16-byte aligned top: lowbit_emu_start then has rsp = 0 (mod 16) and entry starts at 8, as after a call.
  uint64_t* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack.top()) & ~uintptr_t(15)) - 9;
  sp[0] = 0;                                     // r15
  sp[1] = 0;                                     // r14
  sp[2] = reinterpret_cast<uint64_t>(entry);     // r13
  sp[3] = reinterpret_cast<uint64_t>(arg);       // r12
  sp[4] = 0;                                     // rbx
  sp[5] = 0;                                     // rbp
  sp[6] = reinterpret_cast<uint64_t>(&lowbit_emu_start);
  sp[7] = sp[8] = 0;                             // padding
  fiber.sp = sp;
}

void switch_context(Context& from, Context& to) { lowbit_emu_switch(&from.sp, to.sp); }

#else

void make_context(Context& fiber, FiberStack& stack, void (*entry)(void*), void* arg, Context& return_to) {
  getcontext(&fiber.uc);
  fiber.uc.uc_stack.ss_sp = stack.top() - (1 << 16);
  fiber.uc.uc_stack.ss_size = 1 << 16;
  fiber.uc.uc_link = &return_to.uc;
  makecontext(&fiber.uc, reinterpret_cast<void (*)()>(entry), 1, arg);
}

void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

#endif

}  // namespace emu
}  // namespace lowbit
