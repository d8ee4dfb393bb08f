// Fiber stacks and the context switch of the CUDA emulator (fiber.h).
#include "cuda_emu/fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <new>

namespace lowbit {
namespace emu {

FiberStack::FiberStack(size_t bytes) {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t usable = (bytes + page - 1) / page * page;
  mapped_ = usable + page;
  void* p = mmap(nullptr, mapped_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  base_ = static_cast<char*>(p);
  mprotect(base_, page, PROT_NONE);
  top_ = base_ + mapped_;
}

FiberStack::~FiberStack() { munmap(base_, mapped_); }

bool FiberStack::guards(const void* addr) const {
  const char* a = static_cast<const char*>(addr);
  return a >= base_ && a < base_ + size_t(sysconf(_SC_PAGESIZE));
}

#if defined(__x86_64__)

// lowbit_emu_switch(void** save_sp, void* load_sp): pushes rbp, rbx, r12-r15 and the MXCSR / x87 control words,
// stores rsp, loads the other stack's rsp and pops the same. A new fiber's stack is laid out so that the pops
// leave entry in r13, arg in r12, and `ret` goes to lowbit_emu_start, which calls entry(arg).
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
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
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
  // 8 slots popped by lowbit_emu_switch (control words, r15, r14, r13, r12, rbx, rbp, return address); the top
  // is 16-byte aligned so that entry starts with rsp = 8 (mod 16), as after a call.
  uint64_t* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack.top()) & ~uintptr_t(15)) - 8;
  uint32_t mxcsr = 0;
  uint16_t fpucw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  sp[0] = uint64_t(mxcsr) | uint64_t(fpucw) << 32;
  sp[1] = 0;                                     // r15
  sp[2] = 0;                                     // r14
  sp[3] = reinterpret_cast<uint64_t>(entry);     // r13
  sp[4] = reinterpret_cast<uint64_t>(arg);       // r12
  sp[5] = 0;                                     // rbx
  sp[6] = 0;                                     // rbp
  sp[7] = reinterpret_cast<uint64_t>(&lowbit_emu_start);
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
