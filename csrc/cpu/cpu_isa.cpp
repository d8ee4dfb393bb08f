// The run-time choice of the CPU instruction-set level (cpu_isa.h): what the CPU supports, the LOWBIT_CPU_ISA
// environment variable, and a level forced from Python (lowbit.ops.cpu_isa).
#include "lowbit/cpu_isa.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace lowbit {
namespace {

constexpr const char* kIsaNames[] = {"scalar", "avx2", "avx512", "amx"};
constexpr int kIsaCount = 4;

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// AMX-TILE and AMX-INT8 (CPUID leaf 7: EDX bits 24, 25), and Linux's permission for this process to use the
// tile data state (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA), which it asks for here, once.
bool amx_usable() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx >> 24 & 1) || !(edx >> 25 & 1)) return false;
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
#endif

// Computed once: the AMX permission request is a system call.
int detect_best_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    return amx_usable() ? kIsaAmx : kIsaAvx512;
  if (avx2) return kIsaAvx2;
#endif
  return kIsaScalar;
}

int best_isa() {
  static const int best = detect_best_isa();
  return best;
}

int parse_isa(const std::string& name, const char* source) {
  for (int i = 0; i < kIsaCount; ++i)
    if (name == kIsaNames[i]) return i;
  throw std::invalid_argument(std::string("cpu_isa: ") + source + " must be scalar, avx2, avx512 or amx, got '" + name +
                              "'");
}

std::atomic<int> g_forced{-1};
std::once_flag g_env_once;
int g_default = -1;  // LOWBIT_CPU_ISA capped at what the CPU supports, else the best

int default_isa() {
  std::call_once(g_env_once, [] {
    const int best = best_isa();
    const char* env = std::getenv("LOWBIT_CPU_ISA");
    g_default = env && *env ? std::min(parse_isa(env, "the environment variable LOWBIT_CPU_ISA"), best) : best;
  });
  return g_default;
}

}  // namespace

int cpu_isa() {
  const int forced = g_forced.load();
  return forced >= 0 ? forced : default_isa();
}

const char* cpu_isa_name() { return kIsaNames[cpu_isa()]; }

const char* set_cpu_isa(const char* name) {
  if (!name || !*name) {
    g_forced.store(-1);
    return cpu_isa_name();
  }
  const int isa = parse_isa(name, "the CPU path");
  if (isa > best_isa())
    throw std::invalid_argument(std::string("cpu_isa: this CPU cannot run the ") + name + " path (best: " +
                                kIsaNames[best_isa()] + ")");
  g_forced.store(isa);
  return kIsaNames[isa];
}

}  // namespace lowbit
