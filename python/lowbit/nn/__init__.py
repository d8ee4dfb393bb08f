"""nn.Module replacements: quantized linear layers."""
from lowbit.nn.linear import QuantLinear, replace_linear

__all__ = ["QuantLinear", "replace_linear"]
