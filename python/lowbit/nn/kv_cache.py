"""QuantizedKVCache: a ``transformers`` Cache keeping keys and values in lowbit's packed 2/4-bit KIVI layout.

Each layer holds, per sequence and KV head, the packed store of :mod:`lowbit.ops.kv` (keys per channel over groups
of ``group`` tokens, values per token over groups of 32 channels, fp16 scale/zero), a full-precision window of
the newest tokens and, with ``sink > 0``, the first ``sink`` tokens in full precision for good (the "attention
sink" of StreamingLLM / IntactKV: they draw large attention weights). The first ``sink`` tokens fill the sink;
later ones enter the window; whenever it holds more than ``residual`` tokens, its oldest whole groups of ``group``
tokens are quantized into the store. Groups are aligned to token ``sink``, so streaming gives the very codes a
one-shot quantization of the same tokens gives. In token order the cache is sink, store, window.

Keys are cached as the attention passes them to ``update``: for Llama-family models that is after RoPE, so a
cached key never needs its position again. With ``rotate=True`` keys and values are multiplied by the orthogonal
R = H_D diag(s) / sqrt(D) (Walsh-Hadamard over head_dim, fixed random signs s) before quantization, spreading
outlier channels over the group; the sink and the window stay unrotated. q.k = (Rq).(Rk), and softmax(.) (R V) =
R (softmax(.) V), so the two attention paths undo the rotation as follows:

* ``update`` returns full tensors for the model's own attention (any ``attn_implementation``), in token order:
  the sink, the tokens quantized by earlier calls, dequantized and rotated back by R^T, then the window and the
  new tokens in full precision (as KIVI, prefill attends over its own tokens unquantized, even those it moves
  into the store).
* The ``"lowbit_kv"`` attention function registered here (``attn_implementation="lowbit_kv"``, or
  ``model.set_attn_implementation("lowbit_kv")``) runs single-token decode with
  :func:`lowbit.ops.quantized_attention_decode`, reading the packed store directly: the query and the sink plus
  window (one tensor, the kernel's full-precision tokens: with post-RoPE keys and no mask, attention over a set
  of tokens does not depend on their order) are rotated by R, the output rotated back by R^T. On a layer it has
  seen once, ``update`` of a single token then skips dequantization and returns the new token, tagged, in place
  of the full tensors; the tag lets the function find the layer. Any other call (prefill, several tokens, a
  padding mask, which the kernel cannot apply) runs sdpa over the full tensors. The kernel reads the store as it
  is after the update: on a step that moved a group, that group is seen quantized, where the full-tensor path
  still sees it unquantized for this one step.
  Don't switch attn_implementation away from ``lowbit_kv`` while reusing a cache it has decoded from.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Optional

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lowbit.ops import (KV_BITS, KV_GROUP_SIZES, KV_HEAD_DIMS, kv_dequantize_keys, kv_dequantize_values,
                        kv_quantize_keys, kv_quantize_values, quantized_attention_decode, random_signs,
                        randomized_hadamard_transform)

#: The name under which the fused decode attention is registered with transformers.
ATTN_IMPLEMENTATION = "lowbit_kv"
_TAG = "_lowbit_kv_layer"  # attribute of the key tensor update() returns: (layer, is_placeholder)
_STORE = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")


def _check_config(bits: int, residual: int, group: int, rotate: bool, sink: int) -> None:
    if isinstance(bits, bool) or bits not in KV_BITS:
        raise ValueError(f"bits must be one of {KV_BITS}, got {bits!r}")
    if isinstance(group, bool) or group not in KV_GROUP_SIZES:
        raise ValueError(f"group must be one of {KV_GROUP_SIZES}, got {group!r}")
    if isinstance(residual, bool) or not isinstance(residual, int) or residual < 0:
        raise ValueError(f"residual must be an int >= 0, got {residual!r}")
    if not isinstance(rotate, bool):
        raise ValueError(f"rotate must be a bool, got {rotate!r}")
    if isinstance(sink, bool) or not isinstance(sink, int):
        raise TypeError(f"sink must be an int >= 0, got {sink!r}")
    if sink < 0:
        raise ValueError(f"sink must be an int >= 0, got {sink!r}")


class QuantizedKVLayer(CacheLayerMixin):
    """One attention layer's quantized cache: the sink, the packed store (a multiple of ``group`` tokens), the window.

    Tensors, [B, H_kv, ...] as in :mod:`lowbit.ops.kv`: ``k_codes, k_scale, k_zero, v_codes, v_scale, v_zero``
    (the store, keys rotated when ``rotate``) and ``k_res, v_res`` (unrotated, in the model's dtype: the
    ``sink_length`` sink tokens, then the ``window_length`` window tokens). After an update the window holds at
    most max(``residual``, ``group`` - 1) tokens (only whole groups move); the sink holds min(``sink``, tokens seen).
    Arguments as :class:`QuantizedKVCache`.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, bits: int = 2, residual: int = 128, group: int = 32, rotate: bool = True, sink: int = 4):
        _check_config(bits, residual, group, rotate, sink)
        super().__init__()
        self.bits, self.residual, self.group, self.rotate, self.sink = bits, residual, group, rotate, sink
        self.decode_in_kernel = False  # set by the lowbit_kv attention the first time it sees this layer

    # -- state ---------------------------------------------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Empty store and window for the batch, heads, head_dim, dtype and device of `key_states`."""
        b, h, _, d = key_states.shape
        if d not in KV_HEAD_DIMS:
            raise ValueError(f"head_dim (last dim of key_states) must be one of {KV_HEAD_DIMS}, got {d}")
        self.device, self.dtype, self.head_dim = key_states.device, key_states.dtype, d
        self.signs = random_signs(d, seed=0, device=self.device) if self.rotate else None
        empty = key_states.new_empty((b, h, 0, d))
        self.k_codes, self.k_scale, self.k_zero = kv_quantize_keys(empty, self.bits, self.group)
        self.v_codes, self.v_scale, self.v_zero = kv_quantize_values(empty, self.bits)
        self.k_res, self.v_res = empty, empty.clone()
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends [B, H_kv, T, D] keys (post-RoPE) and values; returns what the attention should attend over.

        Normally: every cached token in order (sink, the store dequantized, window), then the new tokens,
        [B, H_kv, L, D].
        After the lowbit_kv attention has claimed this layer, a single-token update returns the new token itself
        as a placeholder that only that attention function understands.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        placeholder = self.decode_in_kernel and key_states.shape[-2] == 1
        old_k, old_v = (None, None) if placeholder else self._dequantized_store()
        self.k_res = torch.cat([self.k_res, key_states], dim=-2)
        self.v_res = torch.cat([self.v_res, value_states], dim=-2)
        if placeholder:
            keys, values = key_states, value_states
        else:
            keys, values = self._in_order(old_k, old_v)
        self._flush()
        setattr(keys, _TAG, (self, placeholder))
        return keys, values

    def _flush(self) -> None:
        """Moves the oldest whole groups out of the window until it holds at most `residual` tokens."""
        s, n = self.sink_length, self.window_length
        groups = min(-(-(n - self.residual) // self.group), n // self.group)
        if groups <= 0:
            return
        m = groups * self.group
        k, v = (self._rotated(x[:, :, s:s + m].float()) for x in (self.k_res, self.v_res))
        parts = (*kv_quantize_keys(k, self.bits, self.group), *kv_quantize_values(v, self.bits))
        for name, part in zip(_STORE, parts):
            setattr(self, name, torch.cat([getattr(self, name), part], dim=2))
        self.k_res, self.v_res = (torch.cat([x[:, :, :s], x[:, :, s + m:]], dim=2) for x in (self.k_res, self.v_res))

    def _in_order(self, store_k: torch.Tensor, store_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sink, then the given (dequantized) store, then the window: the tokens in sequence order."""
        s = self.sink_length
        return tuple(torch.cat([x[:, :, :s], store, x[:, :, s:]], dim=-2)
                     for x, store in ((self.k_res, store_k), (self.v_res, store_v)))

    def _rotated(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        if not self.rotate:
            return x
        return randomized_hadamard_transform(x, self.signs, inverse=inverse)

    def _dequantized_store(self) -> tuple[torch.Tensor, torch.Tensor]:
        k = kv_dequantize_keys(self.k_codes, self.k_scale, self.k_zero, self.bits, self.group)
        v = kv_dequantize_values(self.v_codes, self.v_scale, self.v_zero, self.bits, head_dim=self.head_dim)
        return (self._rotated(k, inverse=True).to(self.dtype), self._rotated(v, inverse=True).to(self.dtype))

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values as full [B, H_kv, L, D] tensors in token order (store dequantized and rotated
        back between the sink and the window)."""
        return self._in_order(*self._dequantized_store())

    # -- fused decode --------------------------------------------------------------------------------------------

    def attend(self, query: torch.Tensor, scaling: Optional[float] = None) -> torch.Tensor:
        """softmax(scaling * q K^T) V over the whole cache for one query per sequence, from the packed store.

        The kernel reads the store as its quantized tokens and sink plus window (``k_res``) as its full-precision
        ones; the order of the tokens does not matter to it.

        Args:
            query: [B, H_q, D] (post-RoPE), H_q a multiple of H_kv, in the cache's dtype.
            scaling: the softmax scale, default 1/sqrt(D).

        Returns:
            [B, H_q, D] in query's dtype.
        """
        b = query.shape[0]
        lengths_q = torch.full((b,), self.quantized_length, dtype=torch.int32, device=query.device)
        lengths_res = torch.full((b,), self.k_res.shape[2], dtype=torch.int32, device=query.device)
        out = quantized_attention_decode(
            self._rotated(query), self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero,
            self._rotated(self.k_res), self._rotated(self.v_res), lengths_q, lengths_res, self.bits, self.group,
            scaling)
        return self._rotated(out, inverse=True)

    # -- Cache layer API -----------------------------------------------------------------------------------------

    @property
    def quantized_length(self) -> int:
        """Tokens in the packed store."""
        return self.v_codes.shape[2] if self.is_initialized else 0

    @property
    def sink_length(self) -> int:
        """Tokens in the full-precision sink: min(``sink``, tokens seen) (the window fills once the sink is full)."""
        return min(self.sink, self.k_res.shape[2]) if self.is_initialized else 0

    @property
    def window_length(self) -> int:
        """Tokens in the full-precision window (the newest, after the sink and the store)."""
        return self.k_res.shape[2] - self.sink_length if self.is_initialized else 0

    def get_seq_length(self) -> int:
        """Tokens cached: sink, store and window."""
        return self.sink_length + self.quantized_length + self.window_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) for a mask over the cache and `query_length` new tokens."""
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        """-1: the cache grows without bound."""
        return -1

    def reset(self) -> None:
        """Drops every cached token (the next update starts afresh)."""
        for name in (*_STORE, "k_res", "v_res"):
            setattr(self, name, None)
        self.is_initialized = False

    def _map_batch(self, fn) -> None:
        if self.is_initialized:
            for name in (*_STORE, "k_res", "v_res"):
                setattr(self, name, fn(getattr(self, name)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorders the batch for beam search (codes are per sequence, so this is exact)."""
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeats each sequence `repeats` times along the batch."""
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps the sequences at `indices`."""
        self._map_batch(lambda t: t[indices])

    # -- memory --------------------------------------------------------------------------------------------------

    def nbytes(self) -> int:
        """Bytes held: packed codes, fp16 scales and zeros, the sink and the window."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (getattr(self, n) for n in (*_STORE, "k_res", "v_res")))

    def fp16_nbytes(self) -> int:
        """Bytes an fp16 cache of the same tokens holds (keys and values)."""
        if not self.is_initialized:
            return 0
        b, h, _, d = self.k_res.shape
        return 2 * b * h * self.get_seq_length() * d * 2


class QuantizedKVCache(Cache):
    """A ``transformers`` Cache whose attention layers are :class:`QuantizedKVLayer` (KIVI-style 2/4-bit).

    ``model.generate(input_ids, past_key_values=QuantizedKVCache(bits=4), max_new_tokens=...)`` (or ``cache=``, the
    newer name) works with any ``attn_implementation``; ``attn_implementation="lowbit_kv"`` runs the
    decode steps through the fused kernel (module docstring). Layers are created on their first update.

    Args:
        bits: code width, 2 or 4.
        residual: tokens kept in full precision (the newest ones), >= 0.
        group: tokens per key scale/zero group, 32, 64 or 128.
        rotate: Hadamard-rotate keys and values over head_dim before quantization.
        sink: the first ``sink`` tokens of each sequence stay in full precision for good, >= 0. Default 4: on
            SmolLM2-135M (``tools/kv_cache_ppl.py``, 2-bit, window 128, rotated) it takes the perplexity from +6.3%
            to +1.8% over the fp cache (sink 1 gives the same, 16 no more). Memory: on average exactly ``sink``
            more full-precision tokens per layer and head (the groups start after the sink, so at a given length
            up to ``group`` - 1 more or fewer than that), nothing measurable at long contexts. The sink is the
            first ``sink`` positions of the batch: a left-padded row keeps its pads there, not its first tokens.

    Raises:
        TypeError: a non-int ``sink``.
        ValueError: naming the bad argument; at the first update, a head_dim not in ``KV_HEAD_DIMS``.
    """

    def __init__(self, bits: int = 2, residual: int = 128, group: int = 32, rotate: bool = True, sink: int = 4):
        _check_config(bits, residual, group, rotate, sink)
        super().__init__(layer_class_to_replicate=partial(QuantizedKVLayer, bits, residual, group, rotate, sink))
        self.bits, self.residual, self.group, self.rotate, self.sink = bits, residual, group, rotate, sink

    def nbytes(self) -> int:
        """Bytes held by all layers: packed codes, scales/zeros, sinks and windows."""
        return sum(layer.nbytes() for layer in self.layers)

    def fp16_nbytes(self) -> int:
        """Bytes an fp16 cache of the same tokens would hold."""
        return sum(layer.fp16_nbytes() for layer in self.layers)


def lowbit_kv_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                        scaling: Optional[float] = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function ``"lowbit_kv"``: fused quantized decode when possible, sdpa otherwise.

    Takes what the model's attention passes (query [B, H_q, T, D]; key, value as returned by the cache's update)
    and returns ``(output [B, T, H_q, D], None)``. A single-token query on a QuantizedKVLayer placeholder, with no
    mask and no dropout, runs :meth:`QuantizedKVLayer.attend`; a masked one is served from the dequantized cache.
    """
    layer, placeholder = getattr(key, _TAG, (None, False))
    if layer is not None:
        layer.decode_in_kernel = True
    if placeholder:
        if attention_mask is None and dropout == 0.0:
            return layer.attend(query[:, :, 0], scaling).unsqueeze(1), None
        key, value = layer.dequantized()
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, lowbit_kv_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)

__all__ = ["QuantizedKVCache", "QuantizedKVLayer", "lowbit_kv_attention", "ATTN_IMPLEMENTATION"]
