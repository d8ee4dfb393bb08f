"""What lowbit's kernels do, on realistic sizes, and how fast, against torch references in the same run."""
import math
import time

import torch

import lowbit
from lowbit.ops import hadamard_matrix, hadamard_transform, random_signs, randomized_hadamard_transform


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


def main() -> None:
    info = lowbit.build_info()
    print(f"lowbit {info['version']}  cpu: {info['cpu_features']}  threads: {info['openmp_threads']}  "
          f"cuda build: {info['cuda']} (archs {info['cuda_archs'] or '-'})  cuda devices: {info['cuda_devices']}")
    hadamard_section()


if __name__ == "__main__":
    main()
