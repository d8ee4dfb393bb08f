"""Vector quantization (VPTQ / AQLM style) into the ``vq`` format: rows scaled to unit RMS, their runs of 8
weights clustered by importance-weighted k-means into one codebook or two residual codebooks, and, with a layer
Hessian, the codes chosen 8 columns at a time with GPTQ-style error feedback through the inverse Hessian's
Cholesky factor.

Defaults: E = 256 entries and R = 2 residual codebooks, i.e. 2 bits per weight of indices. Codebook overhead is
R * E * 8 fp16 values per layer: 0.2 bits per weight on a 576 x 576 layer, 0.004 on 4096 x 4096. E = 65536 with
R = 1 is also 2 bits of indices but needs a large layer (its codebook alone is 0.5 bits per weight on
4096 x 4096, and k-means against 65536 entries is slow on a CPU).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from lowbit.formats import QuantizedWeight
from lowbit.ops import VQ_CODEBOOKS, VQ_MAX_ENTRIES, VQ_MIN_ENTRIES, VQ_VECTOR_LENGTH
from lowbit.quant.gptq import inverse_hessian_factor

_V = VQ_VECTOR_LENGTH
_DISTANCE_BUDGET = 2**20  # elements of one chunk of the [vectors, entries] distance matrix (64 rows at least)
_POINTS_PER_ENTRY = 256  # k-means trains on at most this many vectors per codebook entry (a random subset)
_BLOCK = 128  # columns per lazy error-feedback update (as in GPTQ)


def entries_for_bits(bits: float, codebooks: int = 2) -> int:
    """The codebook size E giving `bits` index bits per weight with `codebooks` residual codebooks
    (E = 2^(8 * bits / codebooks)); raises ValueError when that is not a power of two in [256, 65536]."""
    if codebooks not in VQ_CODEBOOKS:
        raise ValueError(f"codebooks must be one of {VQ_CODEBOOKS}, got {codebooks!r}")
    log2e = _V * bits / codebooks
    if log2e != int(log2e) or not (VQ_MIN_ENTRIES <= 2 ** int(log2e) <= VQ_MAX_ENTRIES):
        raise ValueError(f"bits must make 8 * bits / codebooks an integer in [8, 16] (E = 2^that entries), got "
                         f"bits={bits} with codebooks={codebooks}")
    return 2 ** int(log2e)


def _check_args(weight: torch.Tensor, hessian: Optional[torch.Tensor], entries: int, codebooks: int,
                iters: int) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [out_features, in_features], got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a float tensor, got {weight.dtype}")
    n, k = weight.shape
    if n == 0:
        raise ValueError("weight must have at least one row (out_features >= 1), got 0")
    if k == 0 or k % _V:
        raise ValueError(f"weight must have in_features a positive multiple of {_V}, got {k}")
    if (isinstance(entries, bool) or not isinstance(entries, int) or entries & (entries - 1)
            or not VQ_MIN_ENTRIES <= entries <= VQ_MAX_ENTRIES):
        raise ValueError(f"entries must be a power of two in [{VQ_MIN_ENTRIES}, {VQ_MAX_ENTRIES}], got {entries!r}")
    if codebooks not in VQ_CODEBOOKS:
        raise ValueError(f"codebooks must be one of {VQ_CODEBOOKS}, got {codebooks!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    if hessian is not None and tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian must have shape [{k}, {k}], got {list(hessian.shape)}")


def row_scales(weight: torch.Tensor) -> torch.Tensor:
    """Per-row RMS of weight [N, K] as fp16 [N] (1 where it rounds to 0 in fp16, e.g. an all-zero row)."""
    rms = weight.to(torch.float32).pow(2).mean(dim=1).sqrt()
    rms = rms.clamp(max=torch.finfo(torch.float16).max).to(torch.float16)
    return torch.where(rms > 0, rms, torch.ones_like(rms))


def nearest(x: torch.Tensor, centroids: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Index [n] of the nearest centroid [E, 8] to each vector x [n, 8] under the squared distance
    sum_d weight[i, d] (x[i, d] - c[d])^2 (weight None: plain Euclidean), in chunks of the distance matrix.

    The distance less its row constant is -2 (w x) . c + w . c^2: one matmul of [w x, w] with [-2 c, c^2].
    """
    chunk = max(64, _DISTANCE_BUDGET // centroids.shape[0])
    index = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    if weight is None:
        norms = (centroids * centroids).sum(dim=1)
        for i0 in range(0, x.shape[0], chunk):
            index[i0:i0 + chunk] = torch.addmm(norms, x[i0:i0 + chunk], centroids.T, alpha=-2).argmin(dim=1)
        return index
    rhs = torch.cat([-2 * centroids, centroids * centroids], dim=1).T.contiguous()
    for i0 in range(0, x.shape[0], chunk):
        ws = weight[i0:i0 + chunk]
        index[i0:i0 + chunk] = (torch.cat([ws * x[i0:i0 + chunk], ws], dim=1) @ rhs).argmin(dim=1)
    return index


def _update(x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """One Lloyd step: weighted per-dimension means of each cluster; empty clusters move to the worst-fit
    vectors."""
    num = torch.zeros_like(centroids).index_add_(0, index, weight * x)
    den = torch.zeros_like(centroids).index_add_(0, index, weight)
    new = torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), centroids)
    empty = (torch.bincount(index, minlength=centroids.shape[0]) == 0).nonzero().squeeze(1)
    if len(empty):
        dist = (weight * (x - centroids[index]).pow(2)).sum(dim=1)
        worst = dist.topk(min(len(empty), x.shape[0])).indices
        new[empty[:len(worst)]] = x[worst]
    return new


def kmeans(x: torch.Tensor, weight: torch.Tensor, entries: int, iters: int, generator: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted k-means of vectors x [n, 8] (weights [n, 8], > 0): (centroids [E, 8] rounded to fp16 and kept in
    x's dtype, index [n] of each vector's nearest centroid). Initialized with E of the vectors drawn without
    replacement by `generator` (all of them, repeated, when n < E); `iters` Lloyd steps."""
    order = torch.randperm(x.shape[0], generator=generator, device=x.device)
    centroids = x[order.repeat(math.ceil(entries / x.shape[0]))[:entries]].clone()
    for _ in range(iters):
        centroids = _update(x, weight, nearest(x, centroids, weight), centroids)
    centroids = centroids.to(torch.float16).to(x.dtype)
    return centroids, nearest(x, centroids, weight)


def fit_codebooks(x: torch.Tensor, weight: torch.Tensor, entries: int, codebooks: int, iters: int,
                  seed: int) -> torch.Tensor:
    """Residual codebooks [R, E, 8] for vectors x [n, 8] (weights [n, 8]): codebook r is the weighted k-means of
    what codebooks 0..r-1 left, trained on at most 256 * E of the vectors (a random subset)."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    if x.shape[0] > _POINTS_PER_ENTRY * entries:
        keep = torch.randperm(x.shape[0], generator=generator, device=x.device)[:_POINTS_PER_ENTRY * entries]
        x, weight = x[keep], weight[keep]
    books, residual = [], x
    for _ in range(codebooks):
        book, index = kmeans(residual, weight, entries, iters, generator)
        books.append(book)
        residual = residual - book[index]
    return torch.stack(books)


def encode(x: torch.Tensor, books: torch.Tensor, weight: Optional[torch.Tensor] = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy residual encoding of vectors x [n, 8] with codebooks [R, E, 8]: (codes [n, R], what is left
    [n, 8]); codebook r takes the nearest codeword to what codebooks 0..r-1 left."""
    codes, residual = [], x
    for book in books:
        index = nearest(residual, book, weight)
        codes.append(index)
        residual = residual - book[index]
    return torch.stack(codes, dim=1), residual


def _feedback_codes(weight: torch.Tensor, scales: torch.Tensor, books: torch.Tensor, hessian: torch.Tensor,
                    damp: float) -> torch.Tensor:
    """Codes [N, K/8, R] chosen 8 columns at a time with GPTQ error feedback (float64).

    With U the upper Cholesky factor of H^-1 (of the columns not yet quantized), quantizing the 8 columns B to
    q costs ||(w_B - q) U_BB^-1||^2 once the later columns absorb the optimal correction
    w_rest -= (w_B - q) U_BB^-1 U_B,rest. So each row's vector (divided by its scale) and the codewords are
    mapped by U_BB^-1, encoded there, and the scaled residual is the error fed forward; updates are applied
    lazily, _BLOCK columns at a time.
    """
    n, k = weight.shape
    w = weight.to(torch.float64).clone()
    u = inverse_hessian_factor(hessian.to(w.device), damp)
    s = scales.to(torch.float64)[:, None]
    books = books.to(torch.float64)
    eye = torch.eye(_V, dtype=torch.float64, device=w.device)
    codes = torch.empty(n, k // _V, books.shape[0], dtype=torch.int64, device=w.device)
    for b0 in range(0, k, _BLOCK):
        b1 = min(k, b0 + _BLOCK)
        blocks = (b1 - b0) // _V
        diagonal = u[b0:b1, b0:b1].reshape(blocks, _V, blocks, _V).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        bases = torch.linalg.solve_triangular(diagonal, eye.expand(blocks, _V, _V), upper=True)  # the U_BB^-1
        mapped_books = books[None] @ bases[:, None]  # [blocks, R, E, 8]
        w1, err = w[:, b0:b1].clone(), torch.empty(n, b1 - b0, dtype=torch.float64, device=w.device)
        for i in range(blocks):
            c0, c = i * _V, b0 + i * _V
            codes[:, c // _V], left = encode(w1[:, c0:c0 + _V] / s @ bases[i], mapped_books[i])
            e = s * left  # (w_B - q) U_BB^-1
            w1[:, c0 + _V:] -= e @ u[c:c + _V, c + _V:b1]
            err[:, c0:c0 + _V] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return codes


def _reconstruction(codes: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """The unscaled weight [N, K] of codes [N, K/8, R] and codebooks [R, E, 8]: sum_r books[r, codes[..., r]]."""
    n, blocks, r = codes.shape
    return sum(books[i][codes[:, :, i]] for i in range(r)).reshape(n, blocks * _V)


def _refit(weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, books: torch.Tensor,
           scales: torch.Tensor, damp: float, cg_iters: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """With the codes fixed, the codebooks and then the row scales that minimize tr((W - W_hat) H (W - W_hat)^T)
    (H dampened as in GPTQ): the loss is quadratic in the codebooks (solved by conjugate gradients, each step one
    gradient of the loss; float32, which reaches float64's loss to 1e-6 relative in ~10 steps on test layers)
    and, per row, in its scale (closed form). AQLM's codebook update, exact instead of a few Adam steps."""
    w = weight.to(torch.float32)
    h = hessian.to(device=w.device, dtype=torch.float32)
    h = h + damp * torch.diagonal(h).mean().clamp(min=1e-12) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    s = scales.to(torch.float32)[:, None]

    flat = [codes[:, :, i].reshape(-1) for i in range(codes.shape[2])]

    def gradient(c: torch.Tensor) -> torch.Tensor:  # = A c - b for the quadratic's matrix A
        # d loss / d W_hat = -2 (W - W_hat) H; each codeword collects s_n times it over the runs that use it
        g = (-2.0 * s) * ((w - s * _reconstruction(codes, c)) @ h)
        g = g.reshape(-1, _V)
        return torch.stack([torch.zeros_like(c[i]).index_add_(0, flat[i], g) for i in range(c.shape[0])])

    x = books.to(torch.float32)
    b = -gradient(torch.zeros_like(x))
    r = b - (gradient(x) + b)
    p, rr, bb = r.clone(), float((r * r).sum()), float((b * b).sum())
    for _ in range(cg_iters):
        if rr <= 1e-12 * bb or rr == 0.0:
            break
        ap = gradient(p) + b
        alpha = rr / float((p * ap).sum())
        x, r = x + alpha * p, r - alpha * ap
        rr, rr_old = float((r * r).sum()), rr
        p = r + (rr / rr_old) * p
    recon = _reconstruction(codes, x)
    num, den = ((w @ h) * recon).sum(dim=1), ((recon @ h) * recon).sum(dim=1)
    fp16_max = torch.finfo(torch.float16).max
    new_scales = torch.where(den > 0, num / den.clamp(min=1e-30), s[:, 0]).clamp(-fp16_max, fp16_max)
    return x.to(books.dtype), new_scales.to(scales.dtype)


def _importance(hessian: Optional[torch.Tensor], k: int, damp: float, device: torch.device) -> torch.Tensor:
    """Per-input weight of the squared error [K]: the dampened Hessian diagonal (> 0), or ones without one."""
    if hessian is None:
        return torch.ones(k, device=device)
    diag = torch.diagonal(hessian).to(device=device, dtype=torch.float32).clamp(min=0)
    return diag + damp * diag.mean() + torch.finfo(torch.float32).tiny


def vq_quantize(weight: torch.Tensor, hessian: Optional[torch.Tensor] = None, entries: int = 256,
                codebooks: int = 2, iters: int = 10, seed: int = 0, damp: float = 0.01,
                error_feedback: bool = True, refit: bool = True) -> QuantizedWeight:
    """Vector-quantizes weight [N, K] into the ``vq`` format (w[n, 8j:8j+8] ~ scale[n] * sum_r codebook_r[code]).

    Each row is divided by its RMS (the fp16 scale). The runs of 8 weights of the scaled matrix are clustered by
    k-means weighted by scale[n]^2 * (diag(H) + damp * mean(diag H)) (uniform without a Hessian), codebook 2 on
    the residual of codebook 1. With a Hessian and `error_feedback`, the codes are then chosen 8 columns at a
    time, left to right, each block encoded in the metric of the inverse Hessian's Cholesky factor and its error
    propagated to the later columns as GPTQ does; otherwise each vector takes its nearest codewords greedily
    under the k-means weighting. With a Hessian and `refit`, the codebooks and then the row scales are finally
    refit by least squares to the codes under the full proxy loss tr((W - W_hat) H (W - W_hat)^T).

    Args:
        weight: float tensor [out_features, in_features], in_features a multiple of 8.
        hessian: optional input Hessian [in_features, in_features] (e.g. HessianAccumulator().hessian).
        entries: codebook size E, a power of two in [256, 65536]. codebooks: R, 1 or 2. Index bits per weight
            are R * log2(E) / 8; the defaults (256, 2) give 2 bits (see the module docstring for the overhead).
        iters: Lloyd iterations per codebook.
        seed: seeds the k-means initialization (the result is deterministic for a seed).
        damp: Hessian dampening, a fraction of its mean diagonal (as in GPTQ).
        error_feedback: with a Hessian, propagate each block's error to the later columns.
        refit: with a Hessian, refit codebooks and scales to the chosen codes (never increases the proxy loss).

    Returns:
        A ``vq`` QuantizedWeight on weight's device.

    Raises:
        ValueError naming the argument: weight not 2-D or in_features not a multiple of 8, entries not a power of
        two in range, codebooks not 1 or 2, iters < 1, a Hessian of the wrong shape. TypeError: a non-float weight.
    """
    _check_args(weight, hessian, entries, codebooks, iters)
    n, k = weight.shape
    w = weight.detach().to(torch.float32)
    scales = row_scales(w)
    s = scales.to(torch.float32)[:, None]
    vectors = (w / s).reshape(-1, _V)
    vector_weight = (s * s * _importance(hessian, k, damp, w.device)[None, :]).reshape(-1, _V)
    books = fit_codebooks(vectors, vector_weight, entries, codebooks, iters, seed)
    if hessian is not None and error_feedback:
        codes = _feedback_codes(w, scales, books, hessian, damp)
    else:
        codes = encode(vectors, books, vector_weight)[0].reshape(n, k // _V, codebooks)
    if hessian is not None and refit:
        books, scales = _refit(w, hessian, codes, books, scales, damp)
    return QuantizedWeight.vq(codes, books, scales)


__all__ = ["vq_quantize", "entries_for_bits", "fit_codebooks", "kmeans", "encode", "nearest", "row_scales"]
