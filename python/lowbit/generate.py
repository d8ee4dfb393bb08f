"""Token-by-token text generation for users: :func:`generate` runs ``model.generate`` on one prompt (weights as the
model holds them, QuantLinear layers included; optionally lowbit's 2/4-bit KV cache with the fused decode
attention), streams the decoded text as tokens come and times prefill and decode apart (:class:`GenerationResult`).
Backs the ``lowbit generate`` command."""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

#: KV cache widths :func:`generate` accepts (None: the model's usual full-precision cache).
KV_BITS_CHOICES = (None, 2, 4)


@dataclasses.dataclass
class GenerationResult:
    """What :func:`generate` produced and how fast.

    Attributes:
        text: the generated text (new tokens only, special tokens skipped).
        prompt_text: the prompt as fed to the model (after the chat template when ``chat=True``).
        token_ids: the new token ids (an EOS token that ended generation included).
        prompt_tokens: tokens in the prompt.
        new_tokens: tokens generated, at most ``max_new_tokens`` (fewer when an EOS token ended generation).
        prefill_seconds: time to first token: from the call of ``model.generate`` to the first new token (the
            prompt's forward pass and the first token's selection).
        seconds: decode time, from the first new token to the last (``new_tokens - 1`` forward passes).
        tokens_per_second: decode speed, ``(new_tokens - 1) / seconds``; None when only one token was generated.
        prefill_tokens_per_second: ``prompt_tokens / prefill_seconds``.
        stopped_at_eos: the last new token is an EOS token of the model's generation config.
        kv_bits: 2 or 4 when the quantized KV cache was used, else None.
        kv_cache_nbytes: bytes the quantized KV cache held at the end (codes, scales/zeros, window); None when
            ``kv_bits`` is None.
        kv_cache_fp16_nbytes: bytes an fp16 cache of the same tokens holds; None when ``kv_bits`` is None.
    """

    text: str
    prompt_text: str
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    seconds: float
    tokens_per_second: Optional[float]
    prefill_tokens_per_second: float
    stopped_at_eos: bool
    kv_bits: Optional[int] = None
    kv_cache_nbytes: Optional[int] = None
    kv_cache_fp16_nbytes: Optional[int] = None

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One line for people: tokens, decode speed, prefill, and the quantized KV cache's size."""
        if self.tokens_per_second is None:
            speed = "no decode step"
        else:
            speed = f"{self.tokens_per_second:.1f} tokens/s ({self.new_tokens - 1} after the first in " \
                    f"{self.seconds:.2f} s)"
        line = (f"-- {self.new_tokens} tokens: {speed}; prefill {self.prompt_tokens} tokens in "
                f"{self.prefill_seconds:.2f} s (time to first token)")
        if self.stopped_at_eos:
            line += "; stopped at EOS"
        if self.kv_bits is not None:
            line += (f"; KV cache {self.kv_bits}-bit: {self.kv_cache_nbytes / 1024:.1f} KiB "
                     f"(fp16: {self.kv_cache_fp16_nbytes / 1024:.1f} KiB)")
        return line


def _streamer_class():
    """The streamer type, built on first use so that importing this module does not import transformers."""
    from transformers.generation.streamers import BaseStreamer

    class _Streamer(BaseStreamer):
        """Decodes the new tokens incrementally, hands each new piece of text to `callback`, and records when
        the first new token arrived. The first ``put`` (the prompt) is skipped.

        Each piece is what the decoding of all new tokens so far adds to the text already handed out; text
        ending in U+FFFD (an incomplete UTF-8 sequence of byte-level tokens) is held back until it completes
        or generation ends. So the pieces concatenate to the decoding of all new tokens (for tokenizers whose
        decoding of a prefix of tokens is a prefix of the whole decoding, which byte-level BPE and SentencePiece
        tokenizers satisfy).
        """

        def __init__(self, tokenizer: Any, callback: Optional[Callable[[str], None]]):
            self.tokenizer, self.callback = tokenizer, callback
            self.ids: list[int] = []
            self.emitted = ""
            self.prompt_seen = False
            self.first_token_time: Optional[float] = None

        def _emit(self, text: str) -> None:
            if len(text) > len(self.emitted) and text.startswith(self.emitted):
                piece, self.emitted = text[len(self.emitted):], text
                if self.callback is not None:
                    self.callback(piece)

        def _decode(self) -> str:
            return self.tokenizer.decode(self.ids, skip_special_tokens=True)

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            if self.first_token_time is None:
                self.first_token_time = time.perf_counter()
            if value.dim() > 1:
                if value.shape[0] != 1:
                    raise ValueError(f"the streamer takes one sequence, got a batch of {value.shape[0]}")
                value = value[0]
            self.ids.extend(int(t) for t in value.reshape(-1).tolist())
            if self.callback is not None:
                self._emit(self._decode().rstrip("\ufffd"))

        def end(self) -> None:
            if self.callback is not None:
                self._emit(self._decode())

    return _Streamer


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _head_dim(model: nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    if config is None:
        return None
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None and getattr(config, "num_attention_heads", None) and getattr(config, "hidden_size", None):
        head_dim = config.hidden_size // config.num_attention_heads
    return head_dim


def _check_arguments(prompt: Any, max_new_tokens: Any, kv_bits: Any, kv_residual: Any, kv_group: Any,
                     kv_rotate: Any, do_sample: Any, temperature: Any, top_p: Any, top_k: Any, seed: Any,
                     stream: Any, chat: Any) -> None:
    from lowbit.ops import KV_GROUP_SIZES
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if kv_bits is not None and (not _is_int(kv_bits) or kv_bits not in KV_BITS_CHOICES):
        raise ValueError(f"kv_bits must be one of {KV_BITS_CHOICES}, got {kv_bits!r}")
    if not _is_int(kv_residual) or kv_residual < 0:
        raise ValueError(f"kv_residual must be an int >= 0, got {kv_residual!r}")
    if not _is_int(kv_group) or kv_group not in KV_GROUP_SIZES:
        raise ValueError(f"kv_group must be one of {KV_GROUP_SIZES}, got {kv_group!r}")
    for name, value in (("kv_rotate", kv_rotate), ("do_sample", do_sample), ("chat", chat)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool, got {value!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if not _is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: no top-k filtering), got {top_k!r}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if stream is not None and not callable(stream):
        raise ValueError(f"stream must be a callable taking a str, or None, got {stream!r}")


def generate(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 64, kv_bits: Optional[int] = None,
             kv_residual: int = 128, kv_group: int = 32, kv_rotate: bool = True, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             stream: Optional[Callable[[str], None]] = None, chat: bool = False) -> GenerationResult:
    """Generates up to `max_new_tokens` tokens after `prompt` with ``model.generate``, streaming the text.

    The model runs as it is: a model quantized with :func:`lowbit.quantize_model` or loaded with
    :func:`lowbit.load_quantized` runs its QuantLinear layers' fused kernels. With `kv_bits`, the keys and values
    go to a :class:`lowbit.nn.QuantizedKVCache` (the newest `kv_residual` tokens in full precision, older ones in
    `kv_bits`-bit codes) and the decode steps run under the ``"lowbit_kv"`` attention implementation (the fused
    quantized attention kernel); the model's attention implementation is restored afterwards.

    Args:
        model: a transformers causal LM (one sequence; its first parameter's device is used).
        tokenizer: its tokenizer (a transformers tokenizer: ``__call__``, ``decode``).
        prompt: the text to continue (or the user message, with `chat`).
        max_new_tokens: at most this many new tokens, >= 1; fewer when the model emits an EOS token of its
            generation config.
        kv_bits: None (the model's usual cache), 2 or 4.
        kv_residual: tokens kept in full precision by the quantized cache, >= 0.
        kv_group: tokens per key scale/zero group of the quantized cache: 32, 64 or 128.
        kv_rotate: Hadamard-rotate keys and values before quantizing them.
        do_sample: sample (with `temperature`, `top_p`, `top_k`, `seed`) instead of greedy decoding.
        temperature: softmax temperature when sampling, > 0.
        top_p: nucleus sampling mass when sampling, in (0, 1] (1: off).
        top_k: keep the k most likely tokens when sampling, >= 0 (0: off).
        seed: seed of torch's random generator when sampling (the global generator's state is restored after).
        stream: called with each new piece of text as tokens come (the pieces concatenate to the result's text).
        chat: wrap `prompt` as a user message in the tokenizer's chat template, with the generation prompt.

    Returns:
        A :class:`GenerationResult`.

    Raises:
        ValueError: naming the bad argument and the value received; `chat` with a tokenizer that has no chat
            template; a prompt of no tokens; `kv_bits` on a model whose head_dim the quantized cache lacks.
    """
    _check_arguments(prompt, max_new_tokens, kv_bits, kv_residual, kv_group, kv_rotate, do_sample, temperature,
                     top_p, top_k, seed, stream, chat)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat=True needs a tokenizer with a chat template; this tokenizer has none")
        prompt_text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                    add_generation_prompt=True)
        encoded = tokenizer(prompt_text, return_tensors="pt", add_special_tokens=False)
    else:
        prompt_text = prompt
        encoded = tokenizer(prompt_text, return_tensors="pt")
    device = next(model.parameters()).device
    input_ids = encoded["input_ids"].to(device)
    attention_mask = encoded.get("attention_mask")
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    prompt_tokens = int(input_ids.shape[1])
    if prompt_tokens == 0:
        raise ValueError(f"prompt must encode to at least one token, got {prompt!r} (no tokens)")

    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample)
    if do_sample:
        kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=top_k)
    if getattr(model.generation_config, "pad_token_id", None) is None:
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        if pad is None:
            eos = getattr(model.generation_config, "eos_token_id", None)
            pad = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
        if pad is not None:
            kwargs["pad_token_id"] = pad  # one sequence: never used, but spares the warning

    cache = None
    previous_attn = None
    if kv_bits is not None:
        from lowbit.nn.kv_cache import ATTN_IMPLEMENTATION, QuantizedKVCache
        from lowbit.ops import KV_HEAD_DIMS
        head_dim = _head_dim(model)
        if head_dim is not None and head_dim not in KV_HEAD_DIMS:
            raise ValueError(f"kv_bits={kv_bits} needs a model whose head_dim is one of {KV_HEAD_DIMS}, this "
                             f"model's is {head_dim}")
        cache = QuantizedKVCache(bits=kv_bits, residual=kv_residual, group=kv_group, rotate=kv_rotate)
        kwargs["cache"] = cache
        previous_attn = getattr(model.config, "_attn_implementation", None)
        model.set_attn_implementation(ATTN_IMPLEMENTATION)

    streamer = _streamer_class()(tokenizer, stream)
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices, enabled=do_sample):
            if do_sample:
                torch.manual_seed(seed)
            start = time.perf_counter()
            out = model.generate(input_ids, attention_mask=attention_mask, streamer=streamer, **kwargs)
            end = time.perf_counter()
    finally:
        if previous_attn is not None:
            model.set_attn_implementation(previous_attn)

    new_ids = [int(t) for t in out[0, prompt_tokens:].tolist()]
    new_tokens = len(new_ids)
    first = streamer.first_token_time if streamer.first_token_time is not None else end
    prefill_seconds, seconds = first - start, end - first
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    return GenerationResult(
        text=tokenizer.decode(new_ids, skip_special_tokens=True),
        prompt_text=prompt_text,
        token_ids=new_ids,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        prefill_seconds=prefill_seconds,
        seconds=seconds,
        tokens_per_second=(new_tokens - 1) / max(seconds, 1e-9) if new_tokens > 1 else None,
        prefill_tokens_per_second=prompt_tokens / max(prefill_seconds, 1e-9),
        stopped_at_eos=bool(new_ids) and new_ids[-1] in eos_ids,
        kv_bits=kv_bits,
        kv_cache_nbytes=cache.nbytes() if cache is not None else None,
        kv_cache_fp16_nbytes=cache.fp16_nbytes() if cache is not None else None,
    )


__all__ = ["generate", "GenerationResult", "KV_BITS_CHOICES"]
