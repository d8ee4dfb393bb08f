"""Quantizers that turn a dense weight (and, for second-order methods, its layer Hessian) into a
QuantizedWeight; proxy_loss compares them."""
from lowbit.quant.finetune import finetune_block
from lowbit.quant.gptq import gptq_quantize
from lowbit.quant.hessian import HessianAccumulator, proxy_loss
from lowbit.quant.mixed import allocate_bits, mixed_quantize
from lowbit.quant.quip import IncoherentWeight, quip_quantize
from lowbit.quant.rtn import nf_quantize, rtn_quantize
from lowbit.quant.vq import vq_quantize

__all__ = ["rtn_quantize", "nf_quantize", "gptq_quantize", "quip_quantize", "IncoherentWeight",
           "HessianAccumulator", "proxy_loss",
           "mixed_quantize", "allocate_bits", "vq_quantize", "finetune_block"]
