"""Search for Williamson matrices of odd order n (default n = 39 and n = 43) and write tools/williamson.json.

Williamson matrices are symmetric circulant +-1 matrices A, B, C, D of order n with
A^2 + B^2 + C^2 + D^2 = 4n I; plugged into the Williamson array they give a Hadamard matrix of order 4n
(tools/gen_hadamard_tables.py consumes the json, keyed by 4n, for H_156 and H_172).

Method (exhaustive meet-in-the-middle over the standard normalizations, deterministic):
  * A symmetric first row r (r[j] == r[n - j]) has (n + 1) / 2 free signs. All 2^((n+1)/2) of them are
    enumerated with numpy. Each row is negated so that its row sum s > 0 (negating one matrix keeps the
    equation), and kept only when its (real) DFT f(k) = sum_j r[j] cos(2 pi j k / n) satisfies
    f(k)^2 <= 4n for every k (the PSD test: f_a^2 + f_b^2 + f_c^2 + f_d^2 = 4n for all k).
  * The row sums satisfy sa^2 + sb^2 + sc^2 + sd^2 = 4n; every decomposition into four positive odd
    squares (sorted, since A, B, C, D may be permuted) is searched in turn.
  * Williamson's equation is equivalent to PAF_A(s) + PAF_B(s) + PAF_C(s) + PAF_D(s) = 0 for
    s = 1..(n-1)/2, PAF being the integer periodic autocorrelation. With a fixed random linear hash h of
    the PAF vector (mod 2^64, so h(PAF_A + PAF_B) = h(A) + h(B)) we store h(A) + h(B) for all pairs (A, B)
    that pass the pair PSD test f_a^2 + f_b^2 <= 4n, where A is restricted to one representative of its
    orbit under the multipliers j -> t j (t coprime to n; they act on all four matrices at once), and
    then look up -(h(C) + h(D)) for all pairs (C, D) through a bitmap and a sorted key array.
  * Every hit is verified exactly (integer PAFs, then A^2 + B^2 + C^2 + D^2 == 4n I with integer
    circulant matrices); only verified solutions are written.

Run:  python tools/find_williamson.py            (orders 39 and 43; about 2-3 minutes, ~1 GB)
      python tools/find_williamson.py 39 43 ...  (any odd orders; large orders need lots of time/memory)
The hash weights come from a fixed seed, so runs are reproducible. Needs only numpy.
"""
from __future__ import annotations

import json
import math
import pathlib
import sys
import time

import numpy as np

SEED = 20240611
TOL = 1e-6


def enumerate_rows(n: int):
    """All symmetric +-1 rows (free signs r[0..h]) with row sum s > 0, s^2 <= 4n and f(k)^2 <= 4n."""
    m, h = (n + 1) // 2, (n - 1) // 2
    k = np.arange(1, h + 1)
    cos = np.empty((m, h))
    cos[0] = 1.0
    for i in range(1, m):
        cos[i] = 2.0 * np.cos(2.0 * np.pi * i * k / n)
    shifts = np.arange(m, dtype=np.int64)
    free, psd = [], []
    chunk = 1 << 18
    for start in range(0, 1 << m, chunk):
        codes = np.arange(start, min(start + chunk, 1 << m), dtype=np.int64)
        R = (1 - 2 * ((codes[:, None] >> shifts) & 1)).astype(np.int8)
        s = R[:, 0].astype(np.int64) + 2 * R[:, 1:].sum(1, dtype=np.int64)
        F = R.astype(np.float64) @ cos
        P = F * F
        ok = (s > 0) & (s * s <= 4 * n) & (P <= 4 * n + TOL).all(1)
        free.append(R[ok])
        psd.append(P[ok])
    return np.concatenate(free), np.concatenate(psd)


def encode(R: np.ndarray) -> np.ndarray:
    return ((R < 0).astype(np.int64) << np.arange(R.shape[1], dtype=np.int64)).sum(1)


def full_rows(R: np.ndarray, n: int) -> np.ndarray:
    idx = np.array([min(j, n - j) for j in range(n)])
    return R[:, idx]


def row_sums(R: np.ndarray) -> np.ndarray:
    return R[:, 0].astype(np.int64) + 2 * R[:, 1:].sum(1, dtype=np.int64)


def paf(R: np.ndarray, n: int) -> np.ndarray:
    """Periodic autocorrelations PAF(s), s = 1..(n-1)/2, of the full rows (int64, shape (N, h))."""
    X = full_rows(R, n).astype(np.int16)
    return np.stack([(X * np.roll(X, -s, axis=1)).sum(1, dtype=np.int64) for s in range(1, (n + 1) // 2)], 1)


def canonical(R: np.ndarray, n: int) -> np.ndarray:
    """Mask of rows that are the minimum (by code) of their orbit under the multipliers t in Z_n^*."""
    m = R.shape[1]
    code = encode(R)
    best = code.copy()
    for t in range(2, m):
        if math.gcd(t, n) != 1:
            continue
        perm = [min(t * i % n, n - t * i % n) for i in range(m)]
        best = np.minimum(best, encode(R[:, perm]))
    return best == code


def decompositions(n: int) -> list[tuple[int, int, int, int]]:
    out = []
    odd = range(1, math.isqrt(4 * n) + 1, 2)
    for a in odd:
        for b in odd:
            for c in odd:
                for d in odd:
                    if a >= b >= c >= d and a * a + b * b + c * c + d * d == 4 * n:
                        out.append((a, b, c, d))
    return out


def verify(rows: list[np.ndarray], n: int) -> bool:
    mats = [np.array([np.roll(r, i) for i in range(n)], dtype=np.int64) for r in rows]
    if not all((M == M.T).all() for M in mats):
        return False
    return bool((sum(M @ M for M in mats) == 4 * n * np.eye(n, dtype=np.int64)).all())


class Search:
    def __init__(self, n: int):
        self.n = n
        t = time.time()
        self.R, self.P = enumerate_rows(n)
        self.s = row_sums(self.R)
        self.paf = paf(self.R, n)
        self.canon = canonical(self.R, n)
        rng = np.random.default_rng(SEED)
        w = rng.integers(0, 2**63, size=self.paf.shape[1], dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        pv = self.paf.view(np.uint64)
        self.hash = np.zeros(len(self.R), dtype=np.uint64)
        for j in range(len(w)):
            self.hash += pv[:, j] * w[j]
        counts = {int(v): int(c) for v, c in zip(*np.unique(self.s, return_counts=True))}
        log(f"n={n}: {len(self.R)} rows pass the PSD test, by row sum {counts}; "
            f"{int(self.canon.sum())} multiplier-canonical ({time.time() - t:.1f}s)")

    def cls(self, s: int, canon: bool = False) -> np.ndarray:
        mask = self.s == s
        if canon:
            mask &= self.canon
        return np.nonzero(mask)[0]

    def run(self):
        for dec in decompositions(self.n):
            t = time.time()
            sol = self.search(dec)
            log(f"n={self.n} sums {dec}: {'found' if sol else 'none'} ({time.time() - t:.1f}s)")
            if sol:
                return sol
        return None

    def search(self, dec):
        n = self.n
        sizes = {s: len(self.cls(s)) for s in set(dec)}
        # choose which pair is looked up (cost ~ N_c N_d) and which is stored (A canonical)
        best = None
        for x in ((0, 1), (0, 2), (0, 3)):
            y = tuple(i for i in range(4) if i not in x)
            q = sizes[dec[y[0]]] * sizes[dec[y[1]]] / (2 if dec[y[0]] == dec[y[1]] else 1)
            if best is None or q < best[0]:
                best = (q, x, y)
        _, x, y = best
        sa, sb, sc, sd = dec[x[0]], dec[x[1]], dec[y[0]], dec[y[1]]
        ia, ib = self.cls(sa, canon=True), self.cls(sb)
        ic, id_ = self.cls(sc), self.cls(sd)
        if min(len(ia), len(ib), len(ic), len(id_)) == 0:
            return None
        # stored side: pairs (A, B) passing the pair PSD test
        PB = self.P[ib].astype(np.float32)
        hB = self.hash[ib]
        lim = np.float32(4 * n + 1e-3)
        keys, pa, pb = [], [], []
        blk = max(1, (1 << 22) // len(ib))
        for st in range(0, len(ia), blk):
            a = ia[st:st + blk]
            PA = self.P[a].astype(np.float32)
            ok = np.ones((len(a), len(ib)), dtype=bool)
            for k in range(PB.shape[1]):
                ok &= (PA[:, k, None] + PB[None, :, k]) <= lim
            r, c = np.nonzero(ok)
            keys.append(self.hash[a][r] + hB[c])
            pa.append(a[r].astype(np.int32))
            pb.append(ib[c].astype(np.int32))
        keys = np.concatenate(keys)
        order = np.argsort(keys, kind="stable")
        keys, pa, pb = keys[order], np.concatenate(pa)[order], np.concatenate(pb)[order]
        bits = 30
        bitmap = np.zeros(1 << (bits - 3), dtype=np.uint8)
        top = keys >> np.uint64(64 - bits)
        np.bitwise_or.at(bitmap, (top >> np.uint64(3)).astype(np.int64), (np.uint8(1) << (top & np.uint64(7)).astype(np.uint8)))
        log(f"  stored {len(keys)} (A,B) pairs for sums ({sa},{sb}) [{len(ia)} x {len(ib)}], "
            f"looking up {len(ic)} x {len(id_)} (C,D) pairs for sums ({sc},{sd})")
        # lookup side
        same = sc == sd
        negC = np.uint64(0) - self.hash[ic]
        hD = self.hash[id_]
        shift, seven = np.uint64(64 - bits), np.uint64(7)
        blk = max(1, (1 << 23) // len(id_))
        for st in range(0, len(ic), blk):
            c_rows = np.arange(st, min(st + blk, len(ic)))
            d0 = st if same else 0
            q = negC[c_rows, None] - hD[None, d0:]
            top = q >> shift
            hit = (bitmap[(top >> np.uint64(3)).astype(np.int64)] >> (top & seven).astype(np.uint8)) & np.uint8(1)
            r, c = np.nonzero(hit)
            if same:
                keep = c + d0 >= c_rows[r]
                r, c = r[keep], c[keep]
            if len(r) == 0:
                continue
            qk = q[r, c]
            lo = np.searchsorted(keys, qk, "left")
            hi = np.searchsorted(keys, qk, "right")
            for j in np.nonzero(hi > lo)[0]:
                ci, di = ic[c_rows[r[j]]], id_[c[j] + d0]
                for p in range(lo[j], hi[j]):
                    quad = (pa[p], pb[p], ci, di)
                    if (sum(self.paf[i] for i in quad) == 0).all():
                        rows = [full_rows(self.R[i:i + 1], n)[0].astype(np.int64) for i in quad]
                        if verify(rows, n):
                            return rows
        return None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(orders: list[int]) -> None:
    path = pathlib.Path(__file__).with_name("williamson.json")
    result = json.loads(path.read_text()) if path.exists() else {}
    for n in orders:
        t = time.time()
        sol = Search(n).run()
        log(f"n={n}: {'solution found' if sol else 'NO solution found'} in {time.time() - t:.1f}s")
        if sol:
            result[str(4 * n)] = [[int(v) for v in r] for r in sol]
    path.write_text(json.dumps(dict(sorted(result.items(), key=lambda kv: int(kv[0])))) + "\n")
    log(f"wrote {path}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [39, 43])
