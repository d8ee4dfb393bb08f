// fp16 / bf16 <-> fp32 conversions on raw 16-bit storage, usable on host and device.
// fp16 follows IEEE-754 binary16 with round-to-nearest-even (on the device: the hardware's conversions, the same
// values); bf16 is the top half of an fp32.
#pragma once
#include <cstdint>
#include <cstring>
#include "lowbit/common.h"

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

namespace lowbit {

LOWBIT_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

LOWBIT_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

LOWBIT_HD float half_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));  // one exact conversion instruction
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  // zero or subnormal: man * 2^-24, exact in fp32
  const float mag = float(man) * 5.9604644775390625e-8f;
  return sign ? -mag : mag;
#endif
}

LOWBIT_HD uint16_t float_to_half(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t x = float_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: overflow to inf
  if (ax < 0x38800000u) {                                   // result is subnormal or zero
    // Scale into the subnormal range exactly: adding 0.5 (2^-1) aligns the ulp to 2^-24 and rounds to nearest even.
    const float mag = bits_to_float(ax) + 0.5f;
    return uint16_t(sign | (float_to_bits(mag) - 0x3f000000u));
  }
  const uint32_t round = 0xfffu + ((ax >> 13) & 1u);  // round to nearest even on the 13 dropped bits
  return uint16_t(sign | ((ax - 0x38000000u + round) >> 13));
#endif
}

LOWBIT_HD float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

LOWBIT_HD uint16_t float_to_bf16(float f) {
  const uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);  // quiet nan
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

}  // namespace lowbit
