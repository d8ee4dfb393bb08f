"""Layer Hessians for second-order quantizers: streaming H = 2/n * sum x^T x over calibration inputs, and the
proxy loss tr((W - W_hat) H (W - W_hat)^T) every quantizer is compared by."""
from __future__ import annotations

import torch


class HessianAccumulator:
    """Accumulates H = (2 / n) X^T X of a linear layer's inputs, batch by batch, in float64.

    Each batch product runs in float32 (fast) and is added to a float64 running mean, so long calibration
    streams lose no precision. Use :meth:`add` from a forward hook: inputs of shape [..., in_features].
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.in_features = int(in_features)
        self.hessian = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Adds inputs x [..., in_features] (every leading position is one sample)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dimension {self.in_features}, got shape {list(x.shape)}")
        x = x.detach().reshape(-1, self.in_features).to(torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        total = self.count + m
        self.hessian.mul_(self.count / total)
        self.hessian.add_((x.T @ x).to(torch.float64), alpha=2.0 / total)
        self.count = total


def proxy_loss(weight: torch.Tensor, weight_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - W_hat) H (W - W_hat)^T): the increase of the layer's squared output error on the calibration data."""
    d = (weight.to(torch.float64) - weight_hat.to(torch.float64))
    return float(((d @ hessian.to(torch.float64)) * d).sum())


__all__ = ["HessianAccumulator", "proxy_loss"]
