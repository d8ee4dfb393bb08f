// Device memory of the CUDA emulator. Every device allocation (cudaMalloc*, and the shadow copy of each tensor a
// binding receives) ends exactly at a PROT_NONE guard page, so a kernel's read or write one element past it
// faults; the fault is turned into an error naming the allocation (allocation_fault). An allocation starts at
// `misalign` past a 16-byte boundary (a tensor's copy keeps the host pointer's alignment, so misaligned views stay
// misaligned); when it does not end on one, the few bytes up to the guard are filled with 0xff (NaN in every
// float format): a read there gives NaN instead of a fault, and a write is reported when the allocation is
// released.
#pragma once
#include <setjmp.h>
#include <cstddef>
#include <string>

namespace lowbit {
namespace emu {

void* device_alloc(size_t bytes, const std::string& what, size_t misalign = 0);
// Releases p; returns an error message when a kernel wrote into its padding (past the end), else "".
std::string device_free(void* p);

// An error found where nothing can throw (a release in a destructor), raised by the next end_call.
void defer_error(const std::string& message);

// Bindings: the device copy of a tensor argument for the current call (begin_call .. end_call).
void* shadow_tensor(void* host, size_t bytes, bool writable, const std::string& what);
void begin_call();
// Copies writable shadows back (when ok) and frees all; throws std::runtime_error when a kernel wrote past an
// argument's end or into an argument that the binding reads only.
void end_call(bool ok);

// While armed (a kernel runs on this OS thread), SIGSEGV/SIGBUS record the fault and siglongjmp to target
// instead of killing the process; the previous handlers are back once disarmed.
struct Fault {
  const void* addr = nullptr;
  bool write = false;
};
void arm_fault_jump(sigjmp_buf* target);
void disarm_fault_jump();
Fault last_fault();
// Which allocation a fault at addr ran past ("" when addr is in no allocation's guard page).
std::string allocation_fault(const void* addr, bool write);

}  // namespace emu
}  // namespace lowbit
