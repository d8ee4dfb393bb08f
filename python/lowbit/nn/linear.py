"""QuantLinear: an nn.Linear replacement whose weight is a QuantizedWeight, run through lowbit's fused GEMMs
(LUT GEMM for the scalar formats, VQ GEMM for ``vq``), optionally wrapped in QuIP incoherence (randomized
Hadamard rotations of the input and output)."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from lowbit.formats import TENSOR_NAMES, QuantizedWeight
from lowbit.ops import (cpu_isa, interleave_lut_codes, prepare_async_dequant, prepare_lut_table, prepare_mixed_gemm,
                        randomized_hadamard_transform)
from lowbit.ops._native import is_cuda
from lowbit.ops.async_dequant import ASYNC_DEQUANT_BITS, async_dequant_gemm_unchecked
from lowbit.ops.hadamard import check_hadamard_size, hadamard_unchecked
from lowbit.ops.lut_gemm import lut_gemm_unchecked
from lowbit.ops.mixed_gemm import mixed_gemm_unchecked
from lowbit.ops.vq_gemm import vq_gemm_unchecked

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class QuantLinear(nn.Module):
    """y = x W^T + b with W given by a QuantizedWeight; never materializes the dense weight in forward.

    2- and 4-bit ``uniform`` and ``lut`` weights are re-laid once into the aligned layout and run through
    :func:`lowbit.ops.async_dequant_gemm` (activations rounded to int8 per group, a ``lut`` table to int8 once:
    about 0.5-1% relative error on the output, for a GEMV 2-3x faster than the fp32 LUT kernel);
    ``float_activations=True``, and 3-bit weights, run :func:`lowbit.ops.lut_gemm` on the unrounded activations
    (an affine weight is the identity table with per-group zeros). ``mixed`` weights run through
    :func:`lowbit.ops.mixed_gemm`, one int8-activation kernel over both widths (re-laid once); with
    ``float_activations`` they are split into their 4-bit and 2-bit groups instead, each a uniform matrix run by
    the LUT kernel on the matching columns of x. ``vq`` weights run through
    :func:`lowbit.ops.vq_gemm` straight from their codes and codebooks. With incoherence signs, x is rotated by
    H_K diag(s_in) first and the output by diag(s_out) H_N^T after (the QuIP transform the quantizer applied to W).
    The weight's operands (and signs) are checked and laid out once, at construction; forward checks only x and
    calls the kernels directly, which is what a decode step of a small model spends its time on otherwise.
    With an input permutation p the stored weight's column j is the layer's column p[j], so x is gathered to
    x[..., p] first (how act-order GPTQ checkpoints, whose groups are not contiguous along K, run here).

    Args:
        weight: the quantized weight [out_features, in_features].
        bias: optional bias [out_features].
        signs_in / signs_out: +-1 vectors [in_features] / [out_features] when the weight is incoherence-processed.
        input_perm: a permutation of range(in_features) (int64 [in_features]) when the stored columns are permuted.
        float_activations: run 2/4-bit uniform, lut and mixed weights through the LUT kernel on the unrounded
            activations instead of the int8-activation kernels (slower; a run-time choice, not stored in
            checkpoints).
    """

    def __init__(self, weight: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                 signs_in: Optional[torch.Tensor] = None, signs_out: Optional[torch.Tensor] = None,
                 input_perm: Optional[torch.Tensor] = None, float_activations: bool = False):
        super().__init__()
        if not isinstance(float_activations, bool):
            raise TypeError(f"float_activations must be a bool, got {float_activations!r}")
        self.float_activations = float_activations
        if not isinstance(weight, QuantizedWeight):
            raise TypeError(f"weight must be a QuantizedWeight, got {type(weight).__name__}")
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.format, self.config = weight.format, dict(weight.config)
        for name, t in weight.tensors.items():
            self.register_buffer(name, t)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must have shape [{self.out_features}], got {list(bias.shape)}")
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        for name, s, n in (("signs_in", signs_in, self.in_features), ("signs_out", signs_out, self.out_features)):
            if s is not None:
                _check_signs(name, s, n)
            self.register_buffer(name, None if s is None else s.to(device=weight.device, dtype=torch.float32))
        if (signs_in is None) != (signs_out is None):
            raise ValueError("signs_in and signs_out must be given together (QuIP incoherence) or not at all")
        if input_perm is not None:
            _check_permutation(input_perm, self.in_features)
            if signs_in is not None:
                raise ValueError("input_perm and incoherence signs cannot be combined")
            input_perm = input_perm.to(device=weight.device, dtype=torch.int64)
        self.register_buffer("input_perm", input_perm)
        self._parts = self._gemm_parts(weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight: QuantizedWeight, **signs: torch.Tensor) -> "QuantLinear":
        """A QuantLinear replacing `linear` (its bias is kept) with the already quantized `weight`."""
        if (weight.out_features, weight.in_features) != (linear.out_features, linear.in_features):
            raise ValueError(f"weight has shape [{weight.out_features}, {weight.in_features}] but linear is "
                             f"[{linear.out_features}, {linear.in_features}]")
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(weight.to(linear.weight.device), bias, **signs)

    @property
    def weight(self) -> QuantizedWeight:
        """The QuantizedWeight held (built from the module's buffers)."""
        return QuantizedWeight(self.format, {n: getattr(self, n) for n in TENSOR_NAMES[self.format]}, self.config)

    def _gemm_parts(self, w: QuantizedWeight) -> list[tuple[Optional[torch.Tensor], Callable, tuple[Any, ...]]]:
        """(column index or None, GEMM taking (x [M, K'], *arguments), its weight arguments) per fused GEMM the
        forward runs; the arguments are contiguous and checked (by QuantizedWeight) once, here."""
        t, gs = {name: v.contiguous() for name, v in w.tensors.items()}, w.group_size
        if w.format == "vq":
            return [(None, vq_gemm_unchecked, (t["codes"], t["codebooks"], t["scales"], "auto"))]
        if w.format in ("uniform", "lut"):
            return [(None, *_grouped_gemm(t["packed"], t["scales"], t.get("zeros"), t.get("table"),
                                          w.config["bits"], gs, w.in_features, self.float_activations))]
        if not self.float_activations:
            mixed = prepare_mixed_gemm(t["packed"], t["group_bits"], gs, w.in_features)
            return [(None, mixed_gemm_unchecked, (*mixed, t["scales"], t["zeros"], gs))]
        codes, gb, k = w.codes(), t["group_bits"].tolist(), w.in_features
        parts = []
        for bits in (4, 2):
            groups = [g for g, b in enumerate(gb) if b == bits]
            if not groups:
                continue
            cols = torch.cat([torch.arange(g * gs, min(k, (g + 1) * gs)) for g in groups]).to(w.device)
            sub = QuantizedWeight.uniform(codes[:, cols.cpu()].cpu(), t["scales"][:, groups].cpu(),
                                          t["zeros"][:, groups].cpu(), bits, gs).to(w.device)
            parts.append((cols, *_grouped_gemm(sub.tensors["packed"], sub.tensors["scales"], sub.tensors["zeros"],
                                               None, bits, gs, len(cols), self.float_activations)))
        return parts

    def set_float_activations(self, enabled: bool = True) -> "QuantLinear":
        """Switches 2/4-bit uniform, lut and mixed weights between the LUT kernel on unrounded activations (True)
        and the faster int8-activation kernels (False, the default); returns self."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {enabled!r}")
        self.float_activations = enabled
        self._parts = self._gemm_parts(self.weight)
        return self

    @property
    def int8_activations(self) -> bool:
        """True when forward rounds x to int8 per group (some part of the weight runs the async kernel)."""
        return any(gemm in (async_dequant_gemm_unchecked, mixed_gemm_unchecked) for _, gemm, _ in self._parts)

    def _apply(self, fn: Callable, recurse: bool = True):
        super()._apply(fn, recurse)
        self._parts = self._gemm_parts(self.weight)  # keep the GEMM operands on the module's device
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._parts = self._gemm_parts(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"x must have dtype float32, float16 or bfloat16, got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dimension {self.in_features}, got shape {list(x.shape)}")
        device = self._parts[0][2][0].device
        if x.device != device:
            raise ValueError(f"x is on {x.device}, but the layer's weight is on {device}")
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if self.input_perm is not None:
            x = x.index_select(1, self.input_perm)
        x = x.contiguous()
        if self.signs_in is not None:
            x = hadamard_unchecked(x, self.signs_in, self.in_features ** -0.5, False)
        y = None
        for cols, gemm, args in self._parts:
            part = gemm(x if cols is None else x.index_select(1, cols), *args)
            y = part if y is None else y + part
        if self.signs_out is not None:
            y = hadamard_unchecked(y, self.signs_out, self.out_features ** -0.5, True)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The dense float32 weight [out_features, in_features] this layer applies (incoherence undone)."""
        w = self.weight.dequantize(torch.float32)
        if self.signs_in is not None:
            # y = s_out * H_N^T (W~ (H_K (s_in * x)))  =>  W = diag(s_out) H_N^T W~ H_K diag(s_in)
            w = randomized_hadamard_transform(w.t().contiguous(), self.signs_out, inverse=True).t()
            w = randomized_hadamard_transform(w.contiguous(), self.signs_in, inverse=True)
        if self.input_perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.input_perm, w)
        return w

    def extra_repr(self) -> str:
        w = self.weight
        incoherent = ", incoherence=hadamard" if self.signs_in is not None else ""
        permuted = ", input_perm=True" if self.input_perm is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"{w.layout()}, bias={self.bias is not None}{incoherent}{permuted}")


def _check_permutation(perm: torch.Tensor, n: int) -> None:
    """Raises unless perm is an integer tensor [n] holding each of 0..n-1 once."""
    if not isinstance(perm, torch.Tensor) or perm.dtype.is_floating_point or perm.dtype == torch.bool:
        raise TypeError(f"input_perm must be an integer tensor, got {getattr(perm, 'dtype', type(perm).__name__)}")
    if tuple(perm.shape) != (n,):
        raise ValueError(f"input_perm must have shape [{n}], got {list(perm.shape)}")
    if not torch.equal(torch.sort(perm.to(torch.int64).cpu()).values, torch.arange(n)):
        raise ValueError(f"input_perm must be a permutation of 0..{n - 1}")


def _grouped_gemm(packed: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                  table: Optional[torch.Tensor], bits: int, group_size: int, k: int,
                  float_activations: bool) -> tuple[Callable, tuple[Any, ...]]:
    """The fused GEMM of a uniform (table None: the codes are the values) or lut weight and its arguments: the
    async-dequant kernel over the aligned layout at 2 and 4 bits (unless float_activations; a table is rounded to
    int8 there), the LUT kernel otherwise (uniform: with the identity table)."""
    scales = scales.contiguous()
    zeros = zeros.contiguous() if zeros is not None else None
    if bits in ASYNC_DEQUANT_BITS and not float_activations:
        tables = prepare_lut_table(table, bits) if table is not None else (None, None)
        return async_dequant_gemm_unchecked, (prepare_async_dequant(packed, k, bits), scales, zeros, *tables, bits,
                                              group_size)
    if table is None:
        table = torch.arange(2**bits, dtype=torch.float32, device=packed.device)
    codes = packed.contiguous()
    if bits == 2 and not is_cuda(codes) and cpu_isa() in ("avx512", "amx"):
        codes = interleave_lut_codes(codes)  # what the 2-bit AVX-512 GEMV reads without transposing
    return lut_gemm_unchecked, (codes, scales, zeros, table.contiguous(), bits, group_size)


def _check_signs(name: str, signs: torch.Tensor, n: int) -> None:
    """Raises unless signs is a tensor [n] of +-1 and n a size the Hadamard kernel supports."""
    if not isinstance(signs, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(signs).__name__}")
    if tuple(signs.shape) != (n,):
        raise ValueError(f"{name} must have shape [{n}], got {list(signs.shape)}")
    if not bool((signs.abs() == 1).all()):
        raise ValueError(f"{name} must contain only +1 and -1")
    check_hadamard_size(n)


def set_float_activations(model: nn.Module, enabled: bool = True) -> int:
    """Calls :meth:`QuantLinear.set_float_activations` on every QuantLinear of `model`; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.set_float_activations(enabled)
    return len(layers)


def replace_linear(model: nn.Module, quantize_fn: Callable[[str, nn.Linear], Optional[QuantLinear]],
                   skip: Iterable[str] = ("lm_head",)) -> nn.Module:
    """Swaps every nn.Linear of `model` whose qualified name matches none of `skip` for quantize_fn(name, linear)
    (None keeps the layer). Returns the model, changed in place."""
    skip = tuple(skip)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not any(s and s in full for s in skip):
                replacement = quantize_fn(full, child)
                if replacement is not None:
                    setattr(module, child_name, replacement)
    return model


__all__ = ["QuantLinear", "replace_linear", "set_float_activations"]
