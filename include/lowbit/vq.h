// Vector-quantized weights (VPTQ / AQLM style): the format, the element logic shared by the CPU and CUDA
// kernels, and the entry points of the VQ GEMM and dequantization.
//
// Format. W_hat is [N, K] with K a multiple of the vector length v = kVqVecLen = 8; row n is cut into
// J = K / 8 vectors, and vector j is a sum of R residual codewords times a per-row scale:
//   W_hat[n, 8j + d] = scale[n] * sum_{r < R} codebooks[r, codes[n, j, r], d]        (d < 8)
//   codes      int16 [N, J, R]  (uint16 accepted too): each element is read as an UNSIGNED 16-bit index;
//              or uint8 [N, J, R] (for E = 256: one byte per index, half the memory and traffic)
//   codebooks  fp16  [R, E, 8]  E = 2^c entries, 8 <= c <= 16 (E a power of two in [256, 65536])
//   scales     fp16  [N]
//   R in {1, 2}
// The codewords are summed in fp32, then multiplied by the scale (fp32). Index information is c * R / 8 bits
// per weight (c = 16, R = 1 and c = 8, R = 2 are both 2 bits), plus the codebooks (R * E * 16 bytes) and the
// scales (2 bytes per row); the int16 container itself holds 16 / 8 = 2 bits per weight per codebook.
//
// Indices >= E are invalid. The CPU kernels never read out of bounds: they mask each index with E - 1 while
// computing and afterwards raise std::invalid_argument naming the first invalid (n, j, r). The CUDA kernels
// only mask (an invalid index silently reads entry index & (E - 1)); validate codes on the host if needed.
#pragma once
#include <cstdint>

#include "lowbit/common.h"
#include "lowbit/half.h"
#include "lowbit/tensor_view.h"


namespace lowbit {

constexpr int kVqVecLen = 8;
constexpr int64_t kVqMinEntries = 256;
constexpr int64_t kVqMaxEntries = 65536;
constexpr int kVqMaxCodebooks = 2;

// True for a valid number of codebook entries: a power of two in [256, 65536].
LOWBIT_HD bool vq_entries_ok(int64_t e) { return e >= kVqMinEntries && e <= kVqMaxEntries && (e & (e - 1)) == 0; }

// The index the kernels use for a stored code: always < E (an invalid code is masked, see above).
// C: uint16_t or uint8_t, the stored code's container.
template <typename C>
LOWBIT_HD uint32_t vq_index(C code, uint32_t entries) { return uint32_t(code) & (entries - 1u); }

// Position of codes[n, j, r] in the contiguous [N, J, R] tensor.
LOWBIT_HD int64_t vq_code_offset(int64_t n, int64_t j, int r, int64_t vectors, int codebooks) {
  return (n * vectors + j) * codebooks + r;
}

// fp16 bits -> fp32 (half.h: the hardware conversion on the GPU, the exact software one on the CPU).
LOWBIT_HD float vq_half(uint16_t h) { return half_to_float(h); }

// w[d] += codeword[d] for the 8 fp16 values of one codeword.
LOWBIT_HD void vq_add_codeword(const uint16_t* codeword, float* w) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int d = 0; d < kVqVecLen; ++d) w[d] += vq_half(codeword[d]);
}

// The 8 weights W_hat[n, 8j .. 8j + 8) of vector (n, j) into w: the R codewords summed, times scale[n].
template <typename C>
LOWBIT_HD void vq_decode_vector(const C* codes, const uint16_t* codebooks, const uint16_t* scales, int64_t n,
                                int64_t j, int64_t vectors, int codebooks_r, uint32_t entries, float* w) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int d = 0; d < kVqVecLen; ++d) w[d] = 0.0f;
  for (int r = 0; r < codebooks_r; ++r) {
    const uint32_t idx = vq_index(codes[vq_code_offset(n, j, r, vectors, codebooks_r)], entries);
    vq_add_codeword(codebooks + (int64_t(r) * entries + idx) * kVqVecLen, w);
  }
  const float s = vq_half(scales[n]);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int d = 0; d < kVqVecLen; ++d) w[d] *= s;
}

// How the CPU GEMM runs (see csrc/cpu/gemm_vq.cpp for the cost rule that picks one under kAuto).
enum class VqStrategy { kAuto, kDecode, kLut };

// Entry points. x: contiguous [M, K] fp32/fp16/bf16; codes: int16/uint16/uint8 [N, K/8, R]; codebooks: fp16 [R, E, 8];
// scales: fp16 [N]; out: contiguous [M, N] of x's dtype. Accumulation is fp32.
void vq_gemm_cpu(const TensorView& x, const TensorView& codes, const TensorView& codebooks, const TensorView& scales,
                 const TensorView& out, VqStrategy strategy);
void vq_gemm_cuda(const TensorView& x, const TensorView& codes, const TensorView& codebooks,
                  const TensorView& scales, const TensorView& out, int64_t stream);
// The strategy the CPU kernel would use for these sizes under kAuto (the CPU's features included).
VqStrategy vq_gemm_cpu_choice(int64_t m, int64_t n, int64_t k, int codebooks_r, int64_t entries);

// out: contiguous [N, K] fp32/fp16/bf16 receives W_hat.
void vq_dequantize_cpu(const TensorView& codes, const TensorView& codebooks, const TensorView& scales,
                       const TensorView& out);
void vq_dequantize_cuda(const TensorView& codes, const TensorView& codebooks, const TensorView& scales,
                        const TensorView& out, int64_t stream);

}  // namespace lowbit
