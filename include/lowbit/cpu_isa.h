// The CPU instruction-set level the kernels with hand-written SIMD paths run (lut_gemm, async_dequant_gemm,
// mixed_gemm, vq_gemm): chosen at run time, one level for all of them, so one wheel runs everywhere.
//   scalar  portable C++
//   avx2    AVX2 + FMA + F16C
//   avx512  the above + AVX-512 F/BW/VL + VNNI (Ice Lake and later, AMD Zen 4 and later)
//   amx     the above + AMX-TILE/INT8 with the kernel's permission to use them (Sapphire Rapids and later): the
//           async-dequant and mixed GEMMs multiply many rows of x with tiles, every other kernel runs as avx512
// The default is the best level the CPU supports, unless the environment variable LOWBIT_CPU_ISA (read once, at
// the first call) asks for a lower one.
#pragma once

namespace lowbit {

enum CpuIsa { kIsaScalar = 0, kIsaAvx2 = 1, kIsaAvx512 = 2, kIsaAmx = 3 };

// The level active now (a kernel reads it once per call).
int cpu_isa();
// Its name: "scalar", "avx2", "avx512" or "amx".
const char* cpu_isa_name();
// Forces a level ("" restores the default); throws std::invalid_argument for an unknown name or one the CPU
// cannot run. Returns the name of the level now active.
const char* set_cpu_isa(const char* name);

}  // namespace lowbit
