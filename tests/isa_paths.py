"""The CPU instruction-set paths this machine runs (from /proc/cpuinfo and, for AMX, the kernel's permission;
independently of lowbit) and a context manager forcing one, so each SIMD kernel is tested on every path."""
import contextlib

from lowbit.ops import cpu_isa


def _cpu_flags() -> set:
    with open("/proc/cpuinfo") as f:
        return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())


def _amx_permitted() -> bool:
    """Whether Linux lets this process use the AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA)."""
    import ctypes
    import platform
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18
    return ctypes.CDLL(None, use_errno=True).syscall(sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0


def _supported_isas() -> list:
    flags = _cpu_flags()
    isas = ["scalar"]
    if {"avx2", "fma", "f16c"} <= flags:
        isas.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
            isas.append("avx512")
            if {"amx_tile", "amx_int8"} <= flags and _amx_permitted():
                isas.append("amx")
    return isas


SUPPORTED_ISAS = _supported_isas()


@contextlib.contextmanager
def forced_isa(name: str):
    assert cpu_isa(name) == name
    try:
        yield
    finally:
        cpu_isa("")
