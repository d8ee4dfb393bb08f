// Guarded device allocations, the per-call shadow copies of tensor arguments, and the fault handler of the CUDA
// emulator (memory.h).
#include "cuda_emu/memory.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <stdexcept>
#include <vector>

namespace lowbit {
namespace emu {
namespace {

constexpr unsigned char kPoison = 0xff;

struct Allocation {
  char* map = nullptr;  // mapping start
  size_t mapped = 0;
  char* data = nullptr;
  size_t bytes = 0;
  char* guard = nullptr;  // first byte of the PROT_NONE page, = data + bytes rounded up to 16
  std::string what;
};

size_t page_size() {
  static const size_t page = size_t(sysconf(_SC_PAGESIZE));
  return page;
}

std::mutex g_mutex;
std::map<const char*, Allocation> g_allocations;  // by data pointer

const Allocation* find_by_guard(const void* addr) {
  const char* a = static_cast<const char*>(addr);
  for (const auto& [data, al] : g_allocations)
    if (a >= al.guard && a < al.guard + page_size()) return &al;
  return nullptr;
}

struct Shadow {
  void* host;
  char* device;
  size_t bytes;
  bool writable;
  std::string what;
};
thread_local std::vector<Shadow> t_shadows;
thread_local std::string t_deferred;

thread_local sigjmp_buf* t_jump = nullptr;
thread_local Fault t_fault;
thread_local std::vector<char> t_alt_stack;
struct sigaction g_old_segv, g_old_bus;
std::once_flag g_handler_installed;

void on_fault(int sig, siginfo_t* info, void* uc) {
  if (!t_jump) {  // not from a kernel: give the signal back to the handler before ours (or the default) for good
    sigaction(sig, sig == SIGSEGV ? &g_old_segv : &g_old_bus, nullptr);
    return;       // the faulting instruction runs again and faults into it
  }
  t_fault.addr = info->si_addr;
#if defined(__x86_64__)
  t_fault.write = (static_cast<ucontext_t*>(uc)->uc_mcontext.gregs[REG_ERR] & 2) != 0;
#else
  t_fault.write = false;
#endif
  sigjmp_buf* target = t_jump;
  t_jump = nullptr;
  siglongjmp(*target, 1);
}

}  // namespace

void* device_alloc(size_t bytes, const std::string& what, size_t misalign) {
  const size_t page = page_size();
  const size_t padded = (misalign + bytes + 15) / 16 * 16;
  const size_t data_pages = (padded + page - 1) / page;
  const size_t mapped = (data_pages + 1) * page;
  void* p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  Allocation al;
  al.map = static_cast<char*>(p);
  al.mapped = mapped;
  al.guard = al.map + data_pages * page;
  mprotect(al.guard, page, PROT_NONE);
  al.data = al.guard - padded + misalign;
  al.bytes = bytes;
  al.what = what;
  std::memset(al.data + bytes, kPoison, size_t(al.guard - (al.data + bytes)));
  std::lock_guard<std::mutex> lock(g_mutex);
  g_allocations[al.data] = al;
  return al.data;
}

std::string device_free(void* p) {
  if (!p) return "";
  Allocation al;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_allocations.find(static_cast<const char*>(p));
    if (it == g_allocations.end()) return "cudaFree of a pointer that is no emulated device allocation";
    al = it->second;
    g_allocations.erase(it);
  }
  std::string error;
  for (const char* b = al.data + al.bytes; b < al.guard; ++b)
    if (static_cast<unsigned char>(*b) != kPoison) {
      error = "a kernel wrote " + std::to_string(b - al.data - al.bytes + 1) + " byte(s) past the end of " + al.what +
              " (" + std::to_string(al.bytes) + " bytes)";
      break;
    }
  munmap(al.map, al.mapped);
  return error;
}

void defer_error(const std::string& message) {
  if (t_deferred.empty()) t_deferred = message;
}

void* shadow_tensor(void* host, size_t bytes, bool writable, const std::string& what) {
  char* device = static_cast<char*>(device_alloc(bytes, what, reinterpret_cast<uintptr_t>(host) % 16));
  if (bytes) std::memcpy(device, host, bytes);
  t_shadows.push_back({host, device, bytes, writable, what});
  return device;
}

void begin_call() {
  for (const Shadow& s : t_shadows) device_free(s.device);
  t_shadows.clear();
  t_deferred.clear();
}

void end_call(bool ok) {
  std::string error = t_deferred;
  t_deferred.clear();
  for (const Shadow& s : t_shadows) {
    if (ok && s.bytes) {
      if (s.writable)
        std::memcpy(s.host, s.device, s.bytes);
      else if (std::memcmp(s.host, s.device, s.bytes) != 0 && error.empty())
        error = "a kernel wrote into " + s.what + ", which the op only reads";
    }
    const std::string overrun = device_free(s.device);
    if (error.empty()) error = overrun;
  }
  t_shadows.clear();
  if (!error.empty()) throw std::runtime_error("CUDA emulation: " + error);
}

// The handler is installed once (per process) and stays: arming is a thread-local pointer, so launches on
// several threads never save and restore each other's handlers. It runs on its own stack (a fiber's may be the
// one that overflowed), set per thread.
void arm_fault_jump(sigjmp_buf* target) {
  if (t_alt_stack.empty()) {
    t_alt_stack.resize(1 << 16);
    stack_t ss{};
    ss.ss_sp = t_alt_stack.data();
    ss.ss_size = t_alt_stack.size();
    sigaltstack(&ss, nullptr);
  }
  std::call_once(g_handler_installed, [] {
    struct sigaction sa{};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
  });
  t_fault = Fault{};
  t_jump = target;
}

void disarm_fault_jump() { t_jump = nullptr; }

Fault last_fault() { return t_fault; }

std::string allocation_fault(const void* addr, bool write) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const Allocation* al = find_by_guard(addr);
  if (!al) return "";
  const size_t past = size_t(static_cast<const char*>(addr) - (al->data + al->bytes));
  return std::string(write ? "wrote" : "read") + " past the end of " + al->what + " (" + std::to_string(al->bytes) +
         " bytes), at its end + " + std::to_string(past) + " bytes";
}

}  // namespace emu
}  // namespace lowbit
