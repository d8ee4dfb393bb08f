"""lowbit's kernels as typed Python functions (and torch custom ops, so torch.compile sees one op each).

This package is the only Python code that calls the native module lowbit._C.
"""
from lowbit.ops.hadamard import (HADAMARD_FACTORS, HADAMARD_MAX_N, hadamard_matrix, hadamard_supported,
                                 hadamard_transform, random_signs, randomized_hadamard_transform)

__all__ = ["hadamard_transform", "randomized_hadamard_transform", "random_signs", "hadamard_matrix",
           "hadamard_supported", "HADAMARD_FACTORS", "HADAMARD_MAX_N"]
