// Typed loads and stores of one element as fp32, for kernels templated on the storage dtype.
#pragma once
#include <cstdint>

#include "lowbit/common.h"
#include "lowbit/half.h"

namespace lowbit {

struct F32 {
  using storage = float;
  static LOWBIT_HD float load(const storage* p, int64_t i) { return p[i]; }
  static LOWBIT_HD void store(storage* p, int64_t i, float v) { p[i] = v; }
};
struct F16 {
  using storage = uint16_t;
  static LOWBIT_HD float load(const storage* p, int64_t i) { return half_to_float(p[i]); }
  static LOWBIT_HD void store(storage* p, int64_t i, float v) { p[i] = float_to_half(v); }
};
struct BF16 {
  using storage = uint16_t;
  static LOWBIT_HD float load(const storage* p, int64_t i) { return bf16_to_float(p[i]); }
  static LOWBIT_HD void store(storage* p, int64_t i, float v) { p[i] = float_to_bf16(v); }
};

}  // namespace lowbit
