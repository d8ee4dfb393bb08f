"""What lowbit's kernels do, on realistic sizes, and how fast, against torch references in the same run."""
import math
import time

import torch

import lowbit
from lowbit.ops import (aligned_from_codes, async_dequant_gemm, dequantize_uniform, hadamard_matrix, hadamard_transform,
                        lut_gemm, pack_uniform, random_signs, randomized_hadamard_transform, unpack)


def best_time(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def hadamard_section() -> None:
    print("== Hadamard transform (normalized, last dim, fp32) vs dense x @ H.T in torch ==")
    print(f"{'shape':>16} {'lowbit ms':>10} {'dense ms':>10} {'speedup':>8} {'max |err|':>10}")
    for rows, n in [(4096, 4096), (1, 11008), (1, 14336), (2048, 576), (512, 1536)]:
        x = torch.randn(rows, n)
        h = hadamard_matrix(n, torch.float32) / math.sqrt(n)
        ours = best_time(lambda: hadamard_transform(x))
        dense = best_time(lambda: x @ h.T)
        err = (hadamard_transform(x) - x @ h.T).abs().max().item()
        print(f"{str((rows, n)):>16} {ours * 1e3:10.2f} {dense * 1e3:10.2f} {dense / ours:7.1f}x {err:10.2e}")
    x = torch.randn(8, 576)
    s = random_signs(576, seed=0)
    back = randomized_hadamard_transform(randomized_hadamard_transform(x, s), s, inverse=True)
    print(f"randomized rotation (QuIP/QuaRot) then its inverse on [8, 576]: max |x - x'| = {(back - x).abs().max():.2e}")


def packing_section() -> None:
    print("\n== Packing and dequantization of a 4096 x 11008 weight, group 128, to fp16 ==")
    print(f"{'bits':>5} {'packed MB':>10} {'dequant ms':>11} {'out GB/s':>9} {'round trip':>11}")
    n, k, g = 4096, 11008, 128
    for bits in (2, 3, 4):
        codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
        packed = pack_uniform(codes, bits)
        scales, zeros = (torch.rand(n, -(-k // g)) * 0.01).half(), torch.full((n, -(-k // g)), 2.0).half()
        t = best_time(lambda: dequantize_uniform(packed, scales, zeros, bits, g, k, torch.float16))
        exact = bool(torch.equal(unpack(packed, bits, k), codes))
        print(f"{bits:>5} {packed.numel() * 4 / 2**20:10.1f} {t * 1e3:11.2f} {n * k * 2 / t / 1e9:9.1f} "
              f"{'exact' if exact else 'MISMATCH':>11}")


def gemm_section() -> None:
    print("\n== Decoding-step GEMV (M = 1) on a 4096 x 4096 weight vs torch dense fp32 (one weight, cache-warm) ==")
    n = k = 4096
    x = torch.randn(1, k)
    w = torch.randn(n, k)
    dense = best_time(lambda: x @ w.T, repeat=20)
    print(f"{'kernel':>28} {'ms':>8} {'vs fp32':>8} {'rel. err vs dequantized':>24}")
    print(f"{'torch fp32 x @ W.T':>28} {dense * 1e3:8.3f} {1.0:7.1f}x")
    for bits in (2, 3, 4):
        codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
        packed = pack_uniform(codes, bits)
        scales, zeros = (torch.rand(n, k // 128) * 0.01).half(), torch.full((n, k // 128), 2.0 ** (bits - 1)).half()
        table = torch.arange(2**bits, dtype=torch.float32)
        ref = x.double() @ dequantize_uniform(packed, scales, zeros, bits, 128, k, torch.float32).double().T
        runs = [("lut_gemm", lambda: lut_gemm(x, packed, scales, table, bits, 128, zeros=zeros))]
        if bits == 2:
            aligned = aligned_from_codes(codes)
            runs.append(("async_dequant_gemm (int8 x)", lambda: async_dequant_gemm(x, aligned, scales, zeros, 128)))
        for name, fn in runs:
            t = best_time(fn, repeat=20)
            err = ((fn().double() - ref).norm() / ref.norm()).item()
            print(f"{f'{name} {bits}-bit':>28} {t * 1e3:8.3f} {dense / t:7.1f}x {err:24.2e}")


def main() -> None:
    info = lowbit.build_info()
    print(f"lowbit {info['version']}  cpu: {info['cpu_features']}  threads: {info['openmp_threads']}  "
          f"cuda build: {info['cuda']} (archs {info['cuda_archs'] or '-'})  cuda devices: {info['cuda_devices']}")
    hadamard_section()
    packing_section()
    gemm_section()


if __name__ == "__main__":
    main()
