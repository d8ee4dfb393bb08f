"""lowbit's kernels as typed Python functions (and torch custom ops, so torch.compile sees one op each).

This package is the only Python code that calls the native module lowbit._C.
"""
from lowbit.ops.hadamard import (HADAMARD_FACTORS, HADAMARD_MAX_N, hadamard_matrix, hadamard_supported,
                                 hadamard_transform, random_signs, randomized_hadamard_transform)
from lowbit.ops.pack import (dequantize_lut, dequantize_mixed, dequantize_uniform, mixed_words_per_row, nf_table,
                             pack_mixed, pack_uniform, unpack, unpack_mixed, words_per_row)
from lowbit.ops.cpu_isa import cpu_isa
from lowbit.ops.lut_gemm import (LUT_GEMM_BITS, LUT_GEMM_GROUP_SIZES, LUT_INTERLEAVE_ROWS, interleave_lut_codes,
                                 lut_gemm)
from lowbit.ops.vq_gemm import (VQ_CODEBOOKS, VQ_MAX_ENTRIES, VQ_MIN_ENTRIES, VQ_STRATEGIES, VQ_VECTOR_LENGTH,
                                vq_dequantize, vq_gemm, vq_gemm_cpu_strategy)
from lowbit.ops.async_dequant import (ASYNC_DEQUANT_BITS, ASYNC_DEQUANT_GROUP_SIZES, aligned_from_codes,
                                     aligned_words_per_row, async_dequant_gemm, prepare_async_dequant,
                                     prepare_lut_table, quantize_activations)
from lowbit.ops.mixed_gemm import MixedGemmWeight, mixed_aligned_words, mixed_gemm, prepare_mixed_gemm
from lowbit.ops.kv import (KV_BITS, KV_GROUP_SIZES, KV_HEAD_DIMS, kv_dequantize_keys, kv_dequantize_values,
                           kv_quantize_keys, kv_quantize_values, quantized_attention_decode)

__all__ = ["hadamard_transform", "randomized_hadamard_transform", "random_signs", "hadamard_matrix",
           "hadamard_supported", "HADAMARD_FACTORS", "HADAMARD_MAX_N",
           "pack_uniform", "unpack", "dequantize_uniform", "dequantize_lut", "pack_mixed", "unpack_mixed",
           "dequantize_mixed", "words_per_row", "mixed_words_per_row", "nf_table",
           "cpu_isa", "lut_gemm", "interleave_lut_codes", "LUT_GEMM_BITS", "LUT_GEMM_GROUP_SIZES",
           "LUT_INTERLEAVE_ROWS",
           "vq_gemm", "vq_dequantize", "vq_gemm_cpu_strategy", "VQ_VECTOR_LENGTH", "VQ_CODEBOOKS", "VQ_MIN_ENTRIES",
           "VQ_MAX_ENTRIES", "VQ_STRATEGIES",
           "kv_quantize_keys", "kv_quantize_values", "kv_dequantize_keys", "kv_dequantize_values",
           "quantized_attention_decode", "KV_BITS", "KV_GROUP_SIZES", "KV_HEAD_DIMS",
           "async_dequant_gemm", "prepare_async_dequant", "prepare_lut_table", "aligned_from_codes",
           "aligned_words_per_row",
           "quantize_activations", "ASYNC_DEQUANT_BITS", "ASYNC_DEQUANT_GROUP_SIZES",
           "mixed_gemm", "prepare_mixed_gemm", "MixedGemmWeight", "mixed_aligned_words"]
