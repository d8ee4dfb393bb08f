// Function multi-versioning for the CPU kernels: LOWBIT_ISA_CLONES compiles a function for x86-64-v4 (AVX-512),
// x86-64-v3 (AVX2 + FMA) and the baseline, picked at load time by the CPU; LOWBIT_INLINE forces inlining into
// each clone.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LOWBIT_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LOWBIT_ISA_CLONES
#endif
#if defined(__GNUC__)
#define LOWBIT_INLINE inline __attribute__((always_inline))
#else
#define LOWBIT_INLINE inline
#endif
