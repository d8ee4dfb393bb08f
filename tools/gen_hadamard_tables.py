"""Generate include/lowbit/hadamard_tables.h: the Hadamard matrices H_m that lowbit's transform of size
n = 2^k * m uses besides the Sylvester part.

Constructions (all verified here to satisfy H @ H.T == m * I before being written):
  Paley I   (q = m - 1 a prime power, q = 3 mod 4):      12, 20, 28, 44, 60, 108, 140
  Paley II  (q = m / 2 - 1 a prime power, q = 1 mod 4):  36, 52
  Williamson (circulant symmetric A, B, C, D found by tools/find_williamson.py): 156, 172, when present
    in tools/williamson.json.
m = 40 needs no table of its own: n = 2^k * 40 = 2^(k+1) * 20.
Rows are stored as bit masks, bit j of row i set when H[i, j] == -1.

Run: python tools/gen_hadamard_tables.py > include/lowbit/hadamard_tables.h
"""
from __future__ import annotations

import itertools
import json
import pathlib

import numpy as np


def _prime_power(q: int) -> tuple[int, int] | None:
    for p in range(2, q + 1):
        if q % p == 0:
            k, r = 0, q
            while r % p == 0:
                r //= p
                k += 1
            return (p, k) if r == 1 else None
    return None


class GF:
    """The finite field GF(p^k); elements are ints whose base-p digits are polynomial coefficients."""

    def __init__(self, p: int, k: int):
        self.p, self.k, self.q = p, k, p**k
        self.modulus = self._irreducible() if k > 1 else None

    def _digits(self, a: int) -> list[int]:
        return [(a // self.p**i) % self.p for i in range(self.k)]

    def _number(self, digits: list[int]) -> int:
        return sum(d * self.p**i for i, d in enumerate(digits))

    def _irreducible(self) -> list[int]:
        # monic degree-k polynomial with no factor: for k <= 3, having no root suffices
        assert self.k <= 3, "only degrees up to 3 are needed"
        for tail in itertools.product(range(self.p), repeat=self.k):
            coeffs = list(tail) + [1]
            if all(sum(c * x**i for i, c in enumerate(coeffs)) % self.p for x in range(self.p)):
                return coeffs
        raise ValueError("no irreducible polynomial")

    def sub(self, a: int, b: int) -> int:
        return self._number([(x - y) % self.p for x, y in zip(self._digits(a), self._digits(b))])

    def mul(self, a: int, b: int) -> int:
        if self.k == 1:
            return a * b % self.p
        prod = [0] * (2 * self.k - 1)
        for i, x in enumerate(self._digits(a)):
            for j, y in enumerate(self._digits(b)):
                prod[i + j] = (prod[i + j] + x * y) % self.p
        for deg in range(len(prod) - 1, self.k - 1, -1):  # reduce by the monic modulus
            c = prod[deg]
            if c:
                for i, m in enumerate(self.modulus):
                    prod[deg - self.k + i] = (prod[deg - self.k + i] - c * m) % self.p
        return self._number(prod[: self.k])

    def jacobsthal(self) -> np.ndarray:
        squares = {self.mul(a, a) for a in range(1, self.q)}
        chi = lambda a: 0 if a == 0 else (1 if a in squares else -1)  # noqa: E731
        return np.array([[chi(self.sub(i, j)) for j in range(self.q)] for i in range(self.q)], dtype=np.int64)


def paley1(q: int) -> np.ndarray:
    Q = GF(*_prime_power(q)).jacobsthal()
    S = np.zeros((q + 1, q + 1), dtype=np.int64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return S + np.eye(q + 1, dtype=np.int64)


def paley2(q: int) -> np.ndarray:
    Q = GF(*_prime_power(q)).jacobsthal()
    C = np.zeros((q + 1, q + 1), dtype=np.int64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    return np.kron(C, np.array([[1, 1], [1, -1]])) + np.kron(np.eye(q + 1, dtype=np.int64), np.array([[1, -1], [-1, -1]]))


def williamson(a: list[int], b: list[int], c: list[int], d: list[int]) -> np.ndarray:
    """The Williamson array from first rows of symmetric circulant +-1 matrices A, B, C, D."""
    A, B, C, D = (np.array([np.roll(r, i) for i in range(len(r))], dtype=np.int64) for r in (a, b, c, d))
    return np.block([[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]])


def build() -> dict[int, np.ndarray]:
    H = {12: paley1(11), 20: paley1(19), 28: paley1(27), 44: paley1(43), 60: paley1(59), 108: paley1(107),
         140: paley1(139), 36: paley2(17), 52: paley2(25)}
    found = pathlib.Path(__file__).with_name("williamson.json")
    if found.exists():
        for m, rows in json.loads(found.read_text()).items():
            H[int(m)] = williamson(*rows)
    for m, h in H.items():
        assert h.shape == (m, m) and set(np.unique(h)) <= {-1, 1}, m
        assert (h @ h.T == m * np.eye(m, dtype=np.int64)).all(), f"H_{m} is not a Hadamard matrix"
    return dict(sorted(H.items()))


def emit(H: dict[int, np.ndarray]) -> str:
    words, tables, offset = [], [], 0
    for m, h in H.items():
        per_row = (m + 63) // 64
        for row in h:
            for w in range(per_row):
                bits = sum(1 << (j - w * 64) for j in range(w * 64, min(m, w * 64 + 64)) if row[j] < 0)
                words.append(f"0x{bits:016x}ull")
        tables.append(f"    {{{m}, {per_row}, {offset}}},")
        offset += m * per_row
    body = " \\\n".join("    " + ", ".join(words[i:i + 4]) + "," for i in range(0, len(words), 4))
    return "\n".join([
        "// Generated by tools/gen_hadamard_tables.py -- do not edit. Hadamard matrices H_m as row bit masks",
        "// (bit j of row i set when H_m[i][j] == -1), each verified to satisfy H_m H_m^T = m I. All tables are",
        "// concatenated in LOWBIT_HADAMARD_ROW_BITS so CUDA code can place a device copy of the same data.",
        "#pragma once", "#include <cstdint>", "", "namespace lowbit {", "",
        "#define LOWBIT_HADAMARD_ROW_BITS \\", body, "",
        "constexpr uint64_t kHadamardRowBits[] = {LOWBIT_HADAMARD_ROW_BITS};", "",
        "struct HadamardTable {", "  int m;", "  int words_per_row;", "  int offset;  // into kHadamardRowBits", "};", "",
        f"constexpr HadamardTable kHadamardTables[{len(tables)}] = {{", *tables, "};", "",
        "}  // namespace lowbit", ""])


if __name__ == "__main__":
    print(emit(build()), end="")
