"""What the CUDA compiler says about each kernel: CI's check that no kernel spills registers or uses local memory.

Compiles every csrc/cuda/*.cu for sm_90 to a cubin with the build's flags (nvcc -O3 --expt-relaxed-constexpr,
`-Xptxas -v`), two files at a time, and reads per kernel (one row per template instantiation):
- from ptxas' report: registers, spill stores/loads, stack frame (local memory) and static shared memory;
- from `cuobjdump -res-usage`: constant memory (CONSTANT[n] banks: kernel parameters and __constant__ data);
- from `cuobjdump -elf`: the __launch_bounds__ block size (EIATTR_MAX_THREADS); kernels without one take theirs
  from BLOCK_SIZES below, the block size their launch in the .cu uses;
- from `cuobjdump -sass`: the global load opcodes (LDG.E.128* and LDGSTS.E.BYPASS.128, cp.async, are the 128-bit
  ones) and any local memory instruction (LDL/STL).
With those it computes the theoretical occupancy on an H100 (sm_90) for that block size and the kernel's static
shared memory only: dynamic shared memory is chosen per launch and is not counted. The arithmetic is
cuda_occupancy.h's.

Exits 1 naming each kernel that spills (spill stores or loads > 0) or uses local memory (stack frame > 0, or
LDL/STL in its SASS) unless ALLOWED lists it with a reason; exits 2 when a file does not compile or a tool is
missing. `--markdown` prints the table of the README's "CUDA kernels: compiler resource report", `--json PATH`
writes the same data.

Needs nvcc (PATH or /usr/local/cuda/bin), cuobjdump and nvdisasm (beside nvcc, on PATH, or the nvidia/cu13/bin
of the pip packages nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm) and cu++filt or c++filt.

    python tools/cuda_resources.py [--markdown] [--json PATH]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import fnmatch
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = "csrc/cuda/*.cu"
INCLUDE_DIRS = ("include", "third_party/dlpack", "csrc")
NVCC_FLAGS = ("-arch=sm_90", "-cubin", "-O3", "--expt-relaxed-constexpr", "-Xptxas", "-v")
JOBS = 2
DEFAULT_NVCC = "/usr/local/cuda/bin/nvcc"

# Block sizes of the kernels without __launch_bounds__, as their launches in csrc/cuda/*.cu set them.
BLOCK_SIZES: dict[str, int] = {
    "quantize_activations_kernel": 256,  # gemm_async_dequant.cu: threads = 256
    "vq_dequantize_kernel": 256,  # gemm_vq.cu: threads = 256
    "find_bad_code_kernel": 256,  # pack.cu: kThreads
    "quantize_keys_kernel": 256,  # kv.cu: kThreads
    "quantize_values_kernel": 256,
    "dequantize_keys_kernel": 256,
    "dequantize_values_kernel": 256,
    "decode_reduce_kernel": 128,  # kv.cu: launch_kernel(..., B * Hq blocks, 128 threads, ...)
}

# Kernels allowed to spill or use local memory: fnmatch pattern of the short name -> why it needs to.
ALLOWED: dict[str, str] = {}


@dataclasses.dataclass(frozen=True)
class Sm90:
    """The H100's (sm_90) per-SM limits, as cuda_occupancy.h takes them."""

    regs_per_sm: int = 65536
    regs_per_block: int = 65536
    reg_granularity: int = 256  # registers are allocated per warp in units of 256
    sub_partitions: int = 4  # each holds a quarter of the register file
    max_regs_per_thread: int = 255
    max_threads_per_sm: int = 2048  # 64 warps
    max_blocks_per_sm: int = 32
    smem_per_sm: int = 228 * 1024
    max_smem_per_block: int = 227 * 1024
    reserved_smem_per_block: int = 1024
    smem_granularity: int = 128


H100 = Sm90()


@dataclasses.dataclass
class Kernel:
    """One kernel instantiation: what ptxas, cuobjdump and the occupancy arithmetic say about it."""

    mangled: str
    source: str
    name: str = ""
    registers: int = 0
    stack_frame: int = 0
    cumulative_stack: int = 0  # with the frames of the device functions it calls
    spill_stores: int = 0
    spill_loads: int = 0
    static_smem: int = 0
    constant: int = 0
    block_size: int = 0
    global_loads: dict[str, int] = dataclasses.field(default_factory=dict)
    local_instructions: dict[str, int] = dataclasses.field(default_factory=dict)
    blocks_per_sm: int = 0
    occupancy_limit: str = ""

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0

    @property
    def local_memory(self) -> int:
        """Bytes of stack (local memory) per thread."""
        return max(self.stack_frame, self.cumulative_stack)

    @property
    def uses_local_memory(self) -> bool:
        return self.local_memory > 0 or bool(self.local_instructions)

    @property
    def loads_128bit(self) -> str:
        """'yes' (LDG.*.128), 'cp.async only' (LDGSTS.*.128 and no 128-bit LDG) or 'no'."""
        wide = [op for op in self.global_loads if is_128bit(op)]
        if any(op.startswith("LDG.") for op in wide):
            return "yes"
        return "cp.async only" if wide else "no"

    @property
    def occupancy(self) -> float:
        """Resident warps per SM over the H100's 64, in percent."""
        return 100.0 * self.blocks_per_sm * warps(self.block_size) / warps(H100.max_threads_per_sm)


# ---- ptxas -v --------------------------------------------------------------------------------------------------

ENTRY = re.compile(r"Compiling entry function '([^']+)'")
PROPERTIES = re.compile(r"Function properties for (\S+)")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")
SMEM = re.compile(r"(\d+) bytes smem")
CUMULATIVE = re.compile(r"(\d+) bytes cumulative stack size")


def parse_ptxas(log: str, source: str) -> dict[str, Kernel]:
    """Kernels (entry functions) of one file's ptxas -v report, by mangled name. The stack frame lines of
    non-inlined device functions are skipped: a kernel's cumulative stack size includes them."""
    kernels: dict[str, Kernel] = {}
    entry: Kernel | None = None
    in_entry_properties = False
    for line in log.splitlines():
        if m := ENTRY.search(line):
            entry = kernels.setdefault(m.group(1), Kernel(m.group(1), source))
        elif m := PROPERTIES.search(line):
            in_entry_properties = entry is not None and m.group(1) == entry.mangled
        elif (m := FRAME.search(line)) and in_entry_properties and entry:
            entry.stack_frame, entry.spill_stores, entry.spill_loads = map(int, m.groups())
        elif (m := USED.search(line)) and entry:
            entry.registers = int(m.group(1))
            entry.static_smem = int(s.group(1)) if (s := SMEM.search(line)) else 0
            entry.cumulative_stack = int(c.group(1)) if (c := CUMULATIVE.search(line)) else 0
    return kernels


# ---- cuobjdump ---------------------------------------------------------------------------------------------------

RES_FUNCTION = re.compile(r"^\s*Function (\S+):\s*$")
CONSTANT_BANK = re.compile(r"CONSTANT\[\d+\]:(\d+)")


def parse_res_usage(text: str) -> dict[str, int]:
    """Constant memory bytes (all CONSTANT[n] banks) per mangled name, from `cuobjdump -res-usage`."""
    constant: dict[str, int] = {}
    function = None
    for line in text.splitlines():
        if m := RES_FUNCTION.match(line):
            function = m.group(1)
        elif function and (banks := CONSTANT_BANK.findall(line)):
            constant[function] = sum(map(int, banks))
    return constant


NV_INFO = re.compile(r"^\.nv\.info\.(\S+)\s*$")
MAX_THREADS_VALUE = re.compile(r"Value:\s*((?:0x[0-9a-f]+\s*)+)$")


def parse_launch_bounds(elf: str) -> dict[str, int]:
    """__launch_bounds__ block size per mangled name: EIATTR_MAX_THREADS (x, y, z) of its .nv.info section in
    `cuobjdump -elf`. Kernels without __launch_bounds__ have no such attribute."""
    bounds: dict[str, int] = {}
    function, after_attribute = None, False
    for line in elf.splitlines():
        if m := NV_INFO.match(line):
            function = m.group(1)
        elif "Attribute:" in line:
            after_attribute = line.split()[-1] == "EIATTR_MAX_THREADS"
        elif after_attribute and function and (m := MAX_THREADS_VALUE.search(line)):
            x, y, z = (int(v, 16) for v in m.group(1).split())
            bounds[function] = x * y * z
            after_attribute = False
    return bounds


SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)\s*$")
SASS_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")


def parse_sass(sass: str) -> dict[str, dict[str, int]]:
    """Opcode counts per mangled name, from `cuobjdump -sass`."""
    opcodes: dict[str, dict[str, int]] = {}
    counts: dict[str, int] = {}
    for line in sass.splitlines():
        if m := SASS_FUNCTION.match(line):
            counts = opcodes.setdefault(m.group(1), {})
        elif m := SASS_OPCODE.search(line):
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return opcodes


def is_global_load(opcode: str) -> bool:
    """LDG (global load) and LDGSTS (cp.async, global to shared); not LDGDEPBAR, the cp.async commit."""
    return opcode.split(".")[0] in ("LDG", "LDGSTS")


def is_local_access(opcode: str) -> bool:
    return opcode.split(".")[0] in ("LDL", "STL")


def is_128bit(opcode: str) -> bool:
    """A 128-bit (or wider) load: LDG.E.128[.CONSTANT], LDGSTS.E.BYPASS.128, LDG.E.ENL2.256 (sm_100)."""
    return any(part in ("128", "256") for part in opcode.split(".")[1:])


# ---- names and block sizes ---------------------------------------------------------------------------------------


def demangle(names: list[str], tool: str) -> dict[str, str]:
    """Mangled -> demangled, through one run of cu++filt / c++filt."""
    out = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def short_name(demangled: str) -> str:
    """'void lowbit::(anonymous namespace)::lut_gemm_kernel<lowbit::BF16, 3, 8>(...)' -> 'lut_gemm_kernel<BF16, 3,
    8>': the kernel name and template arguments without namespaces, return type or parameters."""
    text = demangled.replace("(anonymous namespace)::", "")
    text = re.sub(r"\b\w+::", "", text)
    text = re.sub(r"^void ", "", text)
    depth = 0
    for i, c in enumerate(text):
        depth += {"<": 1, ">": -1}.get(c, 0)
        if c == "(" and depth == 0:
            return text[:i]
    return text


def base_name(name: str) -> str:
    return name.split("<")[0]


# ---- occupancy (cuda_occupancy.h) --------------------------------------------------------------------------------


def round_up(x: int, granularity: int) -> int:
    return -(-x // granularity) * granularity


def warps(block_size: int) -> int:
    return -(-block_size // 32)


def blocks_by_registers(registers: int, block_size: int, sm: Sm90 = H100) -> int:
    """Blocks per SM the register file allows: per-warp allocation rounded to 256 registers, each of the 4
    sub-partitions holding a quarter of the file."""
    if registers == 0:
        return sm.max_blocks_per_sm
    per_warp = round_up(registers * 32, sm.reg_granularity)
    per_block = per_warp * round_up(warps(block_size), sm.sub_partitions)  # as the hardware checks it
    if registers > sm.max_regs_per_thread or per_block > sm.regs_per_block:
        return 0
    warps_per_sm = (sm.regs_per_sm // sm.sub_partitions // per_warp) * sm.sub_partitions
    return warps_per_sm // warps(block_size)


def blocks_by_smem(smem: int, sm: Sm90 = H100) -> int:
    """Blocks per SM the shared memory allows: each block takes its shared memory plus the 1 KB the driver reserves,
    rounded to 128 bytes."""
    per_block = round_up(smem + sm.reserved_smem_per_block, sm.smem_granularity)
    if per_block > sm.max_smem_per_block + sm.reserved_smem_per_block:
        return 0
    return sm.smem_per_sm // per_block


def occupancy(registers: int, smem: int, block_size: int, sm: Sm90 = H100) -> tuple[int, str]:
    """(resident blocks per SM, what limits them: 'warps', 'registers', 'shared memory' or 'blocks')."""
    limits = {
        "blocks": sm.max_blocks_per_sm,
        "warps": warps(sm.max_threads_per_sm) // warps(block_size),
        "registers": blocks_by_registers(registers, block_size, sm),
        "shared memory": blocks_by_smem(smem, sm),
    }
    limit = min(limits, key=lambda k: limits[k])
    return limits[limit], limit


# ---- tools and compiling -----------------------------------------------------------------------------------------


def find_tool(name: str, nvcc: str) -> str | None:
    """`name` on PATH, beside nvcc, or in the nvidia/cu13/bin of a pip-installed NVIDIA package."""
    if found := shutil.which(name):
        return found
    candidates = [pathlib.Path(nvcc).parent / name]
    candidates += [pathlib.Path(p) / "nvidia" / "cu13" / "bin" / name for p in sys.path if p]
    return next((str(c) for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


@dataclasses.dataclass(frozen=True)
class Tools:
    """Paths of the programs the check runs."""

    nvcc: str
    cuobjdump: str
    nvdisasm: str
    demangler: str


def find_tools() -> Tools:
    """The tools, or SystemExit(2) naming what is missing and how to get it."""
    nvcc = shutil.which("nvcc") or DEFAULT_NVCC
    found = {"nvcc": nvcc if os.path.exists(nvcc) else None}
    found |= {name: find_tool(name, nvcc) for name in ("cuobjdump", "nvdisasm")}
    found["demangler"] = find_tool("cu++filt", nvcc) or shutil.which("c++filt")
    missing = [name for name, path in found.items() if path is None]
    if missing:
        print(f"cuda_resources: not found: {', '.join(missing)} (nvcc: PATH or {DEFAULT_NVCC}; pip install "
              "nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm; c++filt comes with binutils)", file=sys.stderr)
        raise SystemExit(2)
    return Tools(nvcc, found["cuobjdump"], found["nvdisasm"], found["demangler"])


def run(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)


def analyse(source: pathlib.Path, tools: Tools, tmp: pathlib.Path) -> list[Kernel] | str:
    """The kernels of one .cu file, or what went wrong: the compiler's output when it does not compile."""
    cubin = tmp / (source.stem + ".cubin")
    includes = [f"-I{d}" for d in INCLUDE_DIRS]
    compiled = run([tools.nvcc, *NVCC_FLAGS, *includes, "-o", str(cubin), str(source.relative_to(ROOT))])
    if compiled.returncode:
        return "does not compile:\n" + compiled.stdout + compiled.stderr
    env = dict(os.environ, PATH=f"{pathlib.Path(tools.nvdisasm).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    dumps = {}
    for option in ("-res-usage", "-elf", "-sass"):
        dumped = run([tools.cuobjdump, option, str(cubin)], env)
        if dumped.returncode:
            return f"cuobjdump {option} failed: {dumped.stderr}"
        dumps[option] = dumped.stdout
    kernels = parse_ptxas(compiled.stdout + compiled.stderr, source.name)
    constant = parse_res_usage(dumps["-res-usage"])
    bounds = parse_launch_bounds(dumps["-elf"])
    opcodes = parse_sass(dumps["-sass"])
    for k in kernels.values():
        k.constant = constant.get(k.mangled, 0)
        k.block_size = bounds.get(k.mangled, 0)
        ops = opcodes.get(k.mangled, {})
        k.global_loads = {op: n for op, n in sorted(ops.items()) if is_global_load(op)}
        k.local_instructions = {op: n for op, n in sorted(ops.items()) if is_local_access(op)}
    return list(kernels.values())


def finish(kernels: list[Kernel], demangler: str) -> list[str]:
    """Names, block sizes and occupancy of all kernels; the errors: kernels with no known block size."""
    names = demangle([k.mangled for k in kernels], demangler)
    errors = []
    for k in kernels:
        k.name = short_name(names[k.mangled])
        k.block_size = k.block_size or BLOCK_SIZES.get(base_name(k.name), 0)
        if not k.block_size:
            errors.append(f"{k.name} ({k.source}): no __launch_bounds__ and not in BLOCK_SIZES")
            continue
        k.blocks_per_sm, k.occupancy_limit = occupancy(k.registers, k.static_smem, k.block_size)
    return errors


def violations(kernels: list[Kernel]) -> list[str]:
    """One line per kernel that spills or uses local memory and that ALLOWED does not excuse."""
    lines = []
    for k in kernels:
        if not (k.spills or k.uses_local_memory) or any(fnmatch.fnmatchcase(k.name, p) for p in ALLOWED):
            continue
        local = ", ".join(f"{n} {op}" for op, n in k.local_instructions.items()) or "no LDL/STL"
        lines.append(f"{k.name} ({k.source}): {k.spill_stores} B spill stores, {k.spill_loads} B spill loads, "
                     f"{k.local_memory} B stack, {local}")
    return lines


# ---- output ------------------------------------------------------------------------------------------------------


def markdown(kernels: list[Kernel]) -> str:
    rows = ["| kernel | file | block | registers | static smem (B) | spill st/ld (B) | local mem (B) | "
            "H100 occupancy, static smem | 128-bit global loads |",
            "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for k in kernels:
        local = str(k.local_memory) + (" (LDL/STL)" if k.local_instructions else "")
        rows.append(f"| `{k.name}` | {k.source} | {k.block_size} | {k.registers} | {k.static_smem} | "
                    f"{k.spill_stores}/{k.spill_loads} | {local} | {k.blocks_per_sm} blocks, {k.occupancy:g}% "
                    f"({k.occupancy_limit}) | {k.loads_128bit} |")
    return "\n".join(rows)


def span(values: list) -> str:
    """'a' or 'a–b' for the smallest and largest of values."""
    lo, hi = min(values), max(values)
    return f"{lo:g}" if lo == hi else f"{lo:g}–{hi:g}"


def summary(kernels: list[Kernel]) -> str:
    """One row per kernel (all its template instantiations): the README's table."""
    rows = ["| kernel | file | instantiations | block | registers | static smem (B) | spills / local mem | "
            "H100 occupancy, static smem | 128-bit global loads |",
            "|---|---|---:|---:|---:|---:|---|---|---|"]
    families: dict[str, list[Kernel]] = {}
    for k in kernels:
        families.setdefault(base_name(k.name), []).append(k)
    for name, ks in families.items():
        bad = sum(k.spills or k.uses_local_memory for k in ks)
        limits = ", ".join(sorted({k.occupancy_limit for k in ks}))
        loads = ", ".join(sorted({k.loads_128bit for k in ks}))
        rows.append(f"| `{name}` | {ks[0].source} | {len(ks)} | {span([k.block_size for k in ks])} | "
                    f"{span([k.registers for k in ks])} | {span([k.static_smem for k in ks])} | "
                    f"{'none' if not bad else f'{bad} instantiations'} | "
                    f"{span([k.blocks_per_sm for k in ks])} blocks, {span([k.occupancy for k in ks])}% ({limits}) | "
                    f"{loads} |")
    return "\n".join(rows)


def as_json(kernels: list[Kernel]) -> list[dict]:
    return [dict(dataclasses.asdict(k), occupancy_percent=k.occupancy, spills=k.spills, local_memory=k.local_memory,
                 uses_local_memory=k.uses_local_memory, loads_128bit=k.loads_128bit) for k in kernels]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print the table of every instantiation")
    parser.add_argument("--summary", action="store_true", help="print the README's table (one row per kernel)")
    parser.add_argument("--json", type=pathlib.Path, metavar="PATH", help="write the data as JSON")
    args = parser.parse_args(argv)
    tools = find_tools()
    sources = sorted(ROOT.glob(SOURCES))
    if not sources:
        print(f"cuda_resources: no {SOURCES} under {ROOT}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(JOBS) as pool:
        results = list(pool.map(lambda s: analyse(s, tools, pathlib.Path(tmp)), sources))
    failed = [f"cuda_resources: {s.name} {r}" for s, r in zip(sources, results) if isinstance(r, str)]
    if failed:
        print("\n".join(failed), file=sys.stderr)
        return 2
    kernels = [k for r in results for k in r]
    errors = finish(kernels, tools.demangler)
    kernels.sort(key=lambda k: (k.source, k.name))
    if args.json:
        args.json.write_text(json.dumps(as_json(kernels), indent=1) + "\n")
    if args.markdown:
        print(markdown(kernels))
    if args.summary:
        print(summary(kernels))
    bad = violations(kernels)
    for line in errors + bad:
        print(f"cuda_resources: {line}", file=sys.stderr)
    print(f"cuda_resources: {len(kernels)} kernels in {len(sources)} files; {len(bad)} spill or use local memory "
          f"(allowed: {len(ALLOWED)} patterns)", file=sys.stderr)
    return 2 if errors else 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
