"""nn.Module replacements: quantized linear layers; and a quantized KV cache for transformers models.

``QuantizedKVCache`` needs transformers, so it is imported on first access.
"""
from lowbit.nn.linear import QuantLinear, replace_linear, set_float_activations

_KV_CACHE_NAMES = ("QuantizedKVCache", "QuantizedKVLayer", "lowbit_kv_attention")


def __getattr__(name: str):
    if name in _KV_CACHE_NAMES:
        from lowbit.nn import kv_cache
        return getattr(kv_cache, name)
    raise AttributeError(f"module 'lowbit.nn' has no attribute {name!r}")


__all__ = ["QuantLinear", "replace_linear", "set_float_activations", *_KV_CACHE_NAMES]
