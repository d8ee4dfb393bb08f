// Typed loads and stores of one element as fp32, for kernels templated on the storage dtype, and the host-side
// dispatch from a tensor's dtype to them.
#pragma once
#include <cstdint>
#include <string>

#include "lowbit/common.h"
#include "lowbit/half.h"
#include "lowbit/tensor_view.h"

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

// Host: calls f(F32()), f(F16()) or f(BF16()) for a float dtype; any other is a type_error naming op and arg.
template <typename F>
void by_dtype(DType t, const char* op, const char* arg, F&& f) {
  switch (t) {
    case DType::f32: f(F32()); break;
    case DType::f16: f(F16()); break;
    case DType::bf16: f(BF16()); break;
    default: throw type_error(std::string(op) + ": " + arg + " must be float32, float16 or bfloat16");
  }
}

}  // namespace lowbit
