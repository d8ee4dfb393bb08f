"""Block-wise fine-tuning of a quantized decoder block (as AQLM does after quantizing each block): with every code
fixed, the continuous parameters of the block's QuantLinear layers (scales, real-valued zeros, lut tables, vq
codebooks and row scales, biases) and the block's own full-precision parameters (norms) are trained with Adam so
that the block's output on the calibration inputs matches the full-precision block's output on the same inputs."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from lowbit.formats import QuantizedWeight
from lowbit.io import set_submodule
from lowbit.nn import QuantLinear
from lowbit.ops.hadamard import hadamard_unchecked


class TunableLinear(nn.Module):
    """A differentiable stand-in for a QuantLinear: its codes fixed, its continuous weight parameters trainable
    (float32), forward x -> x W(params)^T + b through a dense weight rebuilt each call (incoherence rotations and
    input permutations applied as in QuantLinear). :meth:`to_quant_linear` rounds the parameters back to the
    format's dtypes. Zeros that are all integers (GPTQ-compatible checkpoints) stay fixed."""

    def __init__(self, layer: QuantLinear):
        super().__init__()
        w = layer.weight
        self.format, self.config = w.format, dict(w.config)
        self.in_features, self.out_features = w.in_features, w.out_features
        self.float_activations = layer.float_activations
        t = {name: v.detach().float() if v.is_floating_point() else v for name, v in w.tensors.items()}
        codes = w.codes().to(torch.int64)
        self.register_buffer("codes", codes)
        self.scales = nn.Parameter(t["scales"].clone())
        if self.format == "vq":
            self.codebooks = nn.Parameter(t["codebooks"].clone())
        elif self.format == "lut":
            self.table = nn.Parameter(t["table"].clone())
        else:
            zeros = t["zeros"].clone()
            integer = bool(torch.equal(zeros, zeros.round()))
            self.zeros = nn.Parameter(zeros, requires_grad=not integer)
        if self.format == "mixed":
            self.register_buffer("group_bits", w.tensors["group_bits"])
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone())
        for name in ("signs_in", "signs_out", "input_perm"):
            self.register_buffer(name, getattr(layer, name))
        self.register_buffer("rotate_in", None if layer.signs_in is None else hadamard_unchecked(
            torch.eye(self.in_features, device=codes.device), layer.signs_in, self.in_features ** -0.5, False))
        self.register_buffer("rotate_out", None if layer.signs_out is None else hadamard_unchecked(
            torch.eye(self.out_features, device=codes.device), layer.signs_out, self.out_features ** -0.5, True))

    def dense_weight(self) -> torch.Tensor:
        """W(params) [out_features, in_features] in the stored (rotated, permuted) basis."""
        if self.format == "vq":
            books = self.codebooks  # [R, E, 8]
            runs = sum(books[r][self.codes[..., r]] for r in range(books.shape[0]))  # [N, K/8, 8]
            return self.scales[:, None] * runs.reshape(self.out_features, self.in_features)
        gs, k = self.config["group_size"], self.in_features
        scales = self.scales.repeat_interleave(gs, dim=1)[:, :k]
        if self.format == "lut":
            return scales * self.table[self.codes]
        return scales * (self.codes.to(scales.dtype) - self.zeros.repeat_interleave(gs, dim=1)[:, :k])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)
        if self.rotate_in is not None:
            x = x @ self.rotate_in
        y = x @ self.dense_weight().t()
        if self.rotate_out is not None:
            y = y @ self.rotate_out
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype)

    @torch.no_grad()
    def to_quant_linear(self) -> QuantLinear:
        """The QuantLinear with the current parameters (rounded to fp16 where the format stores fp16)."""
        codes = self.codes
        if self.format == "vq":
            weight = QuantizedWeight.vq(codes, self.codebooks, self.scales)
        elif self.format == "lut":
            weight = QuantizedWeight.lut(codes.to(torch.uint8), self.scales, self.table, self.config["bits"],
                                         self.config["group_size"])
        elif self.format == "mixed":
            weight = QuantizedWeight.mixed(codes.to(torch.uint8), self.scales, self.zeros, self.group_bits,
                                           self.config["group_size"])
        else:
            weight = QuantizedWeight.uniform(codes.to(torch.uint8), self.scales, self.zeros, self.config["bits"],
                                             self.config["group_size"])
        return QuantLinear(weight, self.bias, self.signs_in, self.signs_out, self.input_perm,
                           float_activations=self.float_activations)


def _swap(block: nn.Module, kind: type, make) -> dict[str, nn.Module]:
    """Replaces every submodule of `block` of type `kind` by make(module); returns {name: new module}."""
    swapped = {}
    for name, module in list(block.named_modules()):
        if isinstance(module, kind):
            swapped[name] = make(module)
            set_submodule(block, name, swapped[name])
    return swapped


def _relative_error(block: nn.Module, inputs: Sequence[tuple[torch.Tensor, dict]],
                    targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum ||block(h) - target||^2 / sum ||target||^2 over the batches (differentiable)."""
    error = sum(((_output(block(h, **kw)).float() - t.float()) ** 2).sum() for (h, kw), t in zip(inputs, targets))
    return error / sum(float((t.float() ** 2).sum()) for t in targets)


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def finetune_block(block: nn.Module, inputs: Sequence[tuple[torch.Tensor, dict]], targets: Sequence[torch.Tensor],
                   epochs: int = 8, lr: float = 1e-3, seed: int = 0) -> tuple[float, float]:
    """Trains the continuous parameters of a quantized block in place to match `targets`.

    Args:
        block: a decoder block whose linears are QuantLinear layers (replaced by new QuantLinear layers holding
            the tuned parameters; codes are not changed).
        inputs: the calibration batches entering the block, [(hidden_states, forward kwargs)].
        targets: the full-precision block's outputs on those inputs, one tensor per batch.
        epochs: passes over the batches (one Adam step per batch, batches in a seeded random order).
        lr: Adam learning rate relative to each parameter tensor's mean magnitude (so scales, codebooks and norm
            weights all move by about lr of their size per step).
        seed: the batch order's seed.

    Returns:
        (relative output error before, after): sum ||block(h) - target||^2 / sum ||target||^2. When training
        does not lower it, the block is left with its original parameters (and after == before).
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if len(inputs) != len(targets) or not inputs:
        raise ValueError(f"inputs and targets must be non-empty and of one length, got {len(inputs)} and "
                         f"{len(targets)}")
    with torch.no_grad():
        before = float(_relative_error(block, inputs, targets))
    if epochs == 0:
        return before, before
    originals = {name: module for name, module in block.named_modules() if isinstance(module, QuantLinear)}
    quantized = {id(p) for m in originals.values() for p in m.parameters()}
    own = [p for p in block.parameters() if p.is_floating_point() and id(p) not in quantized]
    saved = [(p, p.detach().clone(), p.requires_grad) for p in own]
    tunable = _swap(block, QuantLinear, TunableLinear)
    params = [p for p in own if p.dtype == torch.float32] + [p for m in tunable.values() for p in m.parameters()
                                                            if p.requires_grad]
    for p in params:
        p.requires_grad_(True)
    groups = [{"params": [p], "lr": lr * max(float(p.detach().abs().mean()), 1e-8)} for p in params]
    optimizer = torch.optim.Adam(groups)
    order = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            for i in torch.randperm(len(inputs), generator=order).tolist():
                optimizer.zero_grad(set_to_none=True)
                _relative_error(block, [inputs[i]], [targets[i]]).backward()
                optimizer.step()
    _swap(block, TunableLinear, TunableLinear.to_quant_linear)
    for p, _, flag in saved:
        p.requires_grad_(flag)
    with torch.no_grad():
        after = float(_relative_error(block, inputs, targets))
    if after < before:
        return before, after
    for name, module in originals.items():  # training did not help: put the block back as it was
        set_submodule(block, name, module)
    with torch.no_grad():
        for p, value, _ in saved:
            p.copy_(value)
    return before, before


__all__ = ["finetune_block", "TunableLinear"]
