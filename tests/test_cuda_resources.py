"""tools/cuda_resources.py, CI's check of what the CUDA compiler says about each kernel: its parsers on output captured
from nvcc 13.0 (ptxas -v) and cuobjdump 13.2 for sm_90, the H100 occupancy arithmetic, the allow-list and the
table; then the script itself on csrc/cuda (slow, needs nvcc)."""
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cuda_resources", ROOT / "tools" / "cuda_resources.py")
cr = importlib.util.module_from_spec(_spec)
sys.modules["cuda_resources"] = cr  # dataclasses look their module up there
_spec.loader.exec_module(cr)

LUT = ("_ZN6lowbit44_GLOBAL__N__810e1a8b_11_gemm_lut_cu_7ddb76cf15lut_gemm_kernelINS_4BF16ELi3ELi8EEEvPKNT_7storage"
       "EPKjPKtSA_PKfPS4_iiiii")
REDUCE = "_ZN6lowbit37_GLOBAL__N__ce7abbec_5_kv_cu_7b86e8b520decode_reduce_kernelINS_4BF16EEEvPKfPNT_7storageEii"
PARTIAL = ("_ZN6lowbit37_GLOBAL__N__ce7abbec_5_kv_cu_7b86e8b521decode_partial_kernelINS_4BF16ELi4EEEvNS0_12DecodeParams"
           "IT_EE")

# ptxas -v of gemm_lut.cu and kv.cu (two kernels each, cut)
PTXAS = f"""\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '{LUT}' for 'sm_90'
ptxas info    : Function properties for {LUT}
    16 bytes stack frame, 32 bytes spill stores, 44 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 16 bytes cumulative stack size, 64 bytes smem
ptxas info    : Compile time = 138.311 ms
ptxas info    : Compiling entry function '{PARTIAL}' for 'sm_90'
ptxas info    : Function properties for {PARTIAL}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 78 registers, used 1 barriers, 12384 bytes smem
ptxas info    : Compile time = 122.473 ms
ptxas info    : Compiling entry function '{REDUCE}' for 'sm_90'
ptxas info    : Function properties for {REDUCE}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers
ptxas info    : Compile time = 35.723 ms
"""

# ptxas -v of a kernel calling a __noinline__ device function: the callee's own properties block comes after
PTXAS_CALL = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z1kPKfPfi' for 'sm_90'
ptxas info    : Function properties for _Z1kPKfPfi
    64 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 64 bytes cumulative stack size
ptxas info    : Compile time = 5.059 ms
ptxas info    : Function properties for _Z6helperPKfi
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""

RES_USAGE = f"""
Resource usage:
 Common:
  GLOBAL:14976 CONSTANT[4]:8
 Function {PARTIAL}:
  REG:78 STACK:0 SHARED:13408 LOCAL:0 CONSTANT[0]:696 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function {REDUCE}:
  REG:32 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:552 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

ELF = f"""
.nv.info.{PARTIAL}
\t<0x4>
\tAttribute:\tEIATTR_MAXREG_COUNT
\tFormat:\tEIFMT_HVAL
\tValue:\t0xff
\t<0x11>
\tAttribute:\tEIATTR_MAX_THREADS
\tFormat:\tEIFMT_SVAL
\tValue:\t0x80 0x1 0x1 
\t<0x12>
\tAttribute:\tEIATTR_CRS_STACK_SIZE
\tFormat:\tEIFMT_SVAL
\tValue:\t0x0 


.nv.info.{REDUCE}
\t<0x4>
\tAttribute:\tEIATTR_MAXREG_COUNT
\tFormat:\tEIFMT_HVAL
\tValue:\t0xff
"""

SASS = f"""
\tcode for sm_90
\t\tFunction : {LUT}
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                     /* 0x00000a00ff017b82 */
                                                                                              /* 0x000fe20000000800 */
        /*0480*/              @!P1 LDGSTS.E.BYPASS.128 [R21], desc[UR8][R18.64] ;              /* 0x0000000012159fae */
        /*0500*/              @!P2 LDGSTS.E.BYPASS.128 [R17+0x800], desc[UR8][R6.64] ;         /* 0x008000000611afae */
        /*0530*/                   LDGDEPBAR ;                                                 /* 0x00000000000079af */
        /*03e0*/                   @UP1 UIADD3 UR5, UR5, 0x1, URZ ;                            /* 0x0000000105051890 */
        /*0450*/              @!PT LDS RZ, [RZ] ;                                              /* 0x00000000fffff984 */
        /*4960*/                   LDL.LU R46, [R1+0x8] ;                                     /* 0x00000800012e7983 */
        /*0390*/                   STL.128 [R1], R4 ;                        /* 0x0000000401007387 */
\t\t..........

\t\tFunction : {REDUCE}
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0510*/                   LDG.E.128.CONSTANT R12, desc[UR8][R12.64] ;               /* 0x000000080c0c7981 */
        /*0090*/                   LDG.E R3, desc[UR8][R2.64] ;                                /* 0x0000000802037981 */
"""


def test_ptxas_report_is_parsed_per_kernel():
    kernels = cr.parse_ptxas(PTXAS, "kv.cu")
    assert list(kernels) == [LUT, PARTIAL, REDUCE]
    lut, partial, reduce = kernels.values()
    assert (lut.registers, lut.stack_frame, lut.cumulative_stack, lut.spill_stores, lut.spill_loads,
            lut.static_smem) == (64, 16, 16, 32, 44, 64)
    assert lut.spills and lut.uses_local_memory and lut.local_memory == 16
    assert (partial.registers, partial.static_smem, partial.spills, partial.uses_local_memory) == (78, 12384, False,
                                                                                                   False)
    assert (reduce.registers, reduce.static_smem, reduce.source) == (32, 0, "kv.cu")


def test_a_callee_block_does_not_overwrite_the_kernel_and_the_cumulative_stack_counts():
    (kernel,) = cr.parse_ptxas(PTXAS_CALL, "call.cu").values()
    assert (kernel.mangled, kernel.stack_frame, kernel.cumulative_stack) == ("_Z1kPKfPfi", 64, 64)
    kernel.stack_frame = 0  # a kernel whose only stack is its callee's
    assert kernel.uses_local_memory and not kernel.spills


def test_constant_memory_and_launch_bounds_from_cuobjdump():
    assert cr.parse_res_usage(RES_USAGE) == {PARTIAL: 696, REDUCE: 552}
    assert cr.parse_launch_bounds(ELF) == {PARTIAL: 128}  # decode_reduce_kernel has no __launch_bounds__


def test_sass_opcodes_global_loads_and_local_memory():
    opcodes = cr.parse_sass(SASS)
    assert opcodes[LUT] == {"LDC": 1, "LDGSTS.E.BYPASS.128": 2, "LDGDEPBAR": 1, "UIADD3": 1, "LDS": 1, "LDL.LU": 1,
                            "STL.128": 1}
    assert opcodes[REDUCE] == {"LDG.E.128.CONSTANT": 1, "LDG.E": 1}
    assert [op for op in opcodes[LUT] if cr.is_global_load(op)] == ["LDGSTS.E.BYPASS.128"]
    assert [op for op in opcodes[LUT] if cr.is_local_access(op)] == ["LDL.LU", "STL.128"]
    assert [op for op in opcodes[REDUCE] if cr.is_128bit(op)] == ["LDG.E.128.CONSTANT"]
    assert not any(map(cr.is_128bit, ["LDG.E", "LDG.E.64.CONSTANT", "LDG.E.U16.CONSTANT", "LDG.E.U8.CONSTANT"]))
    assert cr.is_128bit("LDG.E.ENL2.256.CONSTANT")


def test_128bit_column():
    kernel = cr.Kernel("k", "k.cu", global_loads={"LDG.E.U16.CONSTANT": 3})
    assert kernel.loads_128bit == "no"
    kernel.global_loads["LDGSTS.E.BYPASS.128"] = 4
    assert kernel.loads_128bit == "cp.async only"
    kernel.global_loads["LDG.E.128.CONSTANT"] = 1
    assert kernel.loads_128bit == "yes"


@pytest.mark.parametrize("demangled, short", [
    ("void lowbit::(anonymous namespace)::lut_gemm_kernel<lowbit::BF16, 3, 8>(lowbit::BF16::storage const*, "
     "unsigned int const*, unsigned short const*, unsigned short const*, float const*, lowbit::BF16::storage*, int, "
     "int, int, int, int)", "lut_gemm_kernel<BF16, 3, 8>"),
    ("void lowbit::(anonymous namespace)::decode_uniform_kernel<2, lowbit::(anonymous namespace)::U8, "
     "lowbit::(anonymous namespace)::CodeParams>(unsigned int const*, lowbit::(anonymous namespace)::CodeParams, "
     "unsigned char*, long, int, int)", "decode_uniform_kernel<2, U8, CodeParams>"),
    ("void lowbit::(anonymous namespace)::decode_partial_kernel<lowbit::BF16, 4>(lowbit::(anonymous namespace)::"
     "DecodeParams<lowbit::BF16>)", "decode_partial_kernel<BF16, 4>"),
    ("lowbit::(anonymous namespace)::find_bad_code_kernel(unsigned char const*, long, long, int, unsigned char "
     "const*, int, unsigned long long*)", "find_bad_code_kernel"),
])
def test_short_names(demangled, short):
    assert cr.short_name(demangled) == short


@pytest.mark.parametrize("registers, smem, block, expected", [
    (32, 0, 256, (8, "warps")),  # 64 warps: full occupancy
    (33, 0, 256, (6, "registers")),  # 33 x 32 = 1056 registers per warp, allocated as 1280: 12 warps per quarter
    (64, 64, 256, (4, "registers")),  # lut_gemm_kernel<BF16, 3, 8>: 2048 per warp, 32 warps
    (80, 12384, 128, (6, "registers")),  # decode_partial_kernel<BF16, 2>: 2560 per warp, 6 warps per quarter
    (128, 0, 256, (2, "registers")),
    (32, 48 * 1024, 128, (4, "shared memory")),  # 49 KB with the reserved 1 KB: 4 of them in 228 KB
    (40, 33792, 256, (6, "registers")),  # decode_uniform_kernel: smem would allow 6 as well
    (16, 0, 32, (32, "blocks")),  # 32 blocks of one warp: 50%
    (255, 0, 1024, (0, "registers")),  # 256 x 8160 -> 8192 x 32 warps > 65536: does not launch
])
def test_h100_occupancy(registers, smem, block, expected):
    assert cr.occupancy(registers, smem, block) == expected


def test_occupancy_percent_and_shared_memory_rounding():
    kernel = cr.Kernel("k", "k.cu", block_size=128, blocks_per_sm=6)
    assert kernel.occupancy == pytest.approx(37.5)
    assert cr.blocks_by_smem(0) == 228  # the reserved 1 KB alone
    assert cr.blocks_by_smem(1) == 233472 // 1152  # 1025 B rounds to 1152
    assert cr.blocks_by_smem(227 * 1024) == 1
    assert cr.blocks_by_smem(227 * 1024 + 1) == 0


def test_violations_and_the_allow_list(monkeypatch):
    spilling = cr.Kernel(LUT, "gemm_lut.cu", name="lut_gemm_kernel<BF16, 3, 8>", stack_frame=16, spill_stores=32,
                         spill_loads=44, local_instructions={"LDL": 5, "STL": 8})
    local_only = cr.Kernel("k", "k.cu", name="k", local_instructions={"LDL": 1})
    clean = cr.Kernel(REDUCE, "kv.cu", name="decode_reduce_kernel<BF16>")
    found = cr.violations([spilling, local_only, clean])
    assert found == ["lut_gemm_kernel<BF16, 3, 8> (gemm_lut.cu): 32 B spill stores, 44 B spill loads, 16 B stack, "
                     "5 LDL, 8 STL", "k (k.cu): 0 B spill stores, 0 B spill loads, 0 B stack, 1 LDL"]
    monkeypatch.setattr(cr, "ALLOWED", {"lut_gemm_kernel<*>": "a reason"})
    assert cr.violations([spilling, local_only, clean]) == found[1:]


def test_markdown_row():
    kernel = cr.Kernel(LUT, "gemm_lut.cu", name="lut_gemm_kernel<BF16, 3, 8>", registers=64, stack_frame=16,
                       spill_stores=32, spill_loads=44, static_smem=64, block_size=256, blocks_per_sm=4,
                       occupancy_limit="registers", local_instructions={"LDL": 5})
    assert cr.markdown([kernel]).splitlines()[2] == ("| `lut_gemm_kernel<BF16, 3, 8>` | gemm_lut.cu | 256 | 64 | 64 | "
                                                    "32/44 | 16 (LDL/STL) | 4 blocks, 50% (registers) | no |")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="needs nvcc")
def test_no_kernel_spills_or_uses_local_memory(tmp_path):
    """The whole check on csrc/cuda: every kernel compiles for sm_90, none spills or uses local memory (unless
    allowed), every one has a block size."""
    out = tmp_path / "resources.json"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "cuda_resources.py"), "--json", str(out)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert out.exists()
