// The run-time choice of the CPU instruction-set level (cpu_isa.h): what the CPU supports, the LOWBIT_CPU_ISA
// environment variable, and a level forced from Python (lowbit.ops.cpu_isa).
#include "lowbit/cpu_isa.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>

namespace lowbit {
namespace {

constexpr const char* kIsaNames[] = {"scalar", "avx2", "avx512"};

int best_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    return kIsaAvx512;
  if (avx2) return kIsaAvx2;
#endif
  return kIsaScalar;
}

int parse_isa(const std::string& name, const char* source) {
  for (int i = 0; i < 3; ++i)
    if (name == kIsaNames[i]) return i;
  throw std::invalid_argument(std::string("cpu_isa: ") + source + " must be scalar, avx2 or avx512, got '" + name + "'");
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
