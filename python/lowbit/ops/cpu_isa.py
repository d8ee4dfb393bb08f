"""The CPU instruction-set level of lowbit's SIMD kernels (LUT, async-dequant, mixed and VQ GEMMs)."""
from __future__ import annotations

from typing import Optional

from lowbit.ops._native import _C


def cpu_isa(name: Optional[str] = None) -> str:
    """The CPU path the SIMD kernels run: "amx" (AVX-512 plus AMX-INT8 tiles, which the async-dequant and mixed
    GEMMs use from 16 rows of x on), "avx512" (AVX-512 F/BW/VL + VNNI), "avx2" (AVX2 + FMA + F16C) or "scalar".
    With ``name``, forces that path first ("" restores the default: the best this CPU supports, or the
    lower one the environment variable LOWBIT_CPU_ISA names). Raises ValueError for an unknown name or one this
    CPU cannot run."""
    return _C.cpu_isa() if name is None else _C.set_cpu_isa(str(name))


__all__ = ["cpu_isa"]
