# `lowbit bench`: run the kernel micro-benchmarks (bench_*.py, shipped as lowbit/bench/) through pytest-benchmark
# in a subprocess, and turn a results JSON into a GEMV speedup table and a PNG: speed vs bits, perplexity vs bits.
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

#: The perplexity-vs-bits table looked for next to the results and in the benchmark dir's results/.
PPL_NAME = "smollm2_ppl.json"
#: Bits per weight of the torch baselines, by the last word of their extra_info["baseline"] name.
_BASELINE_BITS = {"float32": 32, "bfloat16": 16, "float16": 16, "int4": 4}
_BITS_SUFFIX = re.compile(r"_(\d+)bit$")
_INSTALL_HINT = 'pip install "lowbit[bench]"'


@dataclass(frozen=True)
class Kernel:
    """One benchmarked implementation: a lowbit kernel at some width, or a torch baseline."""
    name: str                # "lut_gemm", "vq_gemm", or the baseline's name ("torch float32")
    bits: Optional[float]    # bits per weight (None when the benchmark does not say)
    baseline: bool


@dataclass
class Speedup:
    """The speedup of `kernel` over `baseline` on each GEMV shape: baseline median time / kernel median time."""
    kernel: Kernel
    baseline: Kernel
    ratios: dict[str, float]  # "KxN" -> ratio

    @property
    def median(self) -> float:
        return statistics.median(self.ratios.values())

    @property
    def low(self) -> float:
        return min(self.ratios.values())

    @property
    def high(self) -> float:
        return max(self.ratios.values())


def default_bench_dir() -> pathlib.Path:
    """The benchmarks installed with lowbit (lowbit/bench/)."""
    import lowbit
    return pathlib.Path(lowbit.__file__).parent / "bench"


def kernel_of(benchmark: dict[str, Any]) -> Kernel:
    """The kernel a pytest-benchmark entry measured, from its test name, `params` and `extra_info`."""
    baseline = benchmark.get("extra_info", {}).get("baseline")
    if baseline:
        return Kernel(baseline, _BASELINE_BITS.get(baseline.split()[-1]), True)
    name = benchmark["name"].split("[")[0].removeprefix("test_").removeprefix("lowbit_")
    bits = (benchmark.get("params") or {}).get("bits")
    suffix = _BITS_SUFFIX.search(name)
    if suffix:
        name = name[: suffix.start()]
        bits = bits if bits is not None else int(suffix.group(1))
    return Kernel(name, bits, False)


def _sort_key(kernel: Kernel) -> tuple:
    # lowbit kernels by name and width, then the baselines widest first.
    return (kernel.baseline, -(kernel.bits or 0) if kernel.baseline else 0, kernel.name, kernel.bits or 0)


def gemv_speedups(results: dict[str, Any]) -> list[Speedup]:
    """Speedups over every baseline of the same group, for the GEMV benchmarks (groups "gemm ...", params m=1)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for b in results.get("benchmarks", []):
        if (b.get("group") or "").startswith("gemm") and (b.get("params") or {}).get("m") == 1:
            groups.setdefault(b["group"], []).append(b)
    found: dict[tuple[Kernel, Kernel], dict[str, float]] = {}
    for rows in groups.values():
        baselines = {kernel_of(b): b["stats"]["median"] for b in rows if kernel_of(b).baseline}
        for b in rows:
            kernel, shape = kernel_of(b), f"{b['params']['k']}x{b['params']['n']}"
            for base, median in baselines.items():
                if base != kernel:
                    found.setdefault((kernel, base), {})[shape] = median / b["stats"]["median"]
    return [Speedup(kernel, base, ratios) for (kernel, base), ratios in
            sorted(found.items(), key=lambda item: (_sort_key(item[0][0]), _sort_key(item[0][1])))]


def format_table(speedups: Sequence[Speedup]) -> str:
    """A Markdown table: one row per kernel and width, one column per baseline, median (min-max) over shapes."""
    if not speedups:
        return "no GEMV (M=1) benchmarks in these results"
    baselines = list(dict.fromkeys(s.baseline.name for s in speedups))
    shapes = sorted({shape for s in speedups for shape in s.ratios}, key=lambda s: tuple(map(int, s.split("x"))))
    cells: dict[Kernel, dict[str, str]] = {}
    for s in speedups:
        text = f"{s.median:.2f}x" if len(s.ratios) == 1 else f"{s.median:.2f}x ({s.low:.2f}-{s.high:.2f})"
        cells.setdefault(s.kernel, {})[s.baseline.name] = text
    lines = [f"GEMV (M=1) speedup: baseline median time / kernel median time; median (min-max) over "
             f"{len(shapes)} shape(s) K x N: {', '.join(shapes)}", "",
             "| kernel | bits | " + " | ".join(f"vs {b}" for b in baselines) + " |",
             "|---|---|" + "---|" * len(baselines)]
    for kernel, row in cells.items():
        bits = "-" if kernel.bits is None else f"{kernel.bits:g}"
        lines.append(f"| {kernel.name} | {bits} | " + " | ".join(row.get(b, "-") for b in baselines) + " |")
    return "\n".join(lines)


def load_ppl(path: pathlib.Path) -> dict[str, Any]:
    """A perplexity-vs-bits table (bench/results/smollm2_ppl.json): "runs" of {method, bits, perplexity, ...}."""
    data = json.loads(pathlib.Path(path).read_text())
    runs = data.get("runs") if isinstance(data, dict) else None
    if not runs or not all({"method", "bits", "perplexity"} <= set(r) for r in runs):
        raise ValueError(f"{path}: not a perplexity table (a \"runs\" list of {{method, bits, perplexity}})")
    return data


def _machine(results: dict[str, Any]) -> str:
    info = results.get("machine_info", {})
    cpu = info.get("cpu", {})
    return f"{cpu.get('brand_raw') or info.get('machine', '')}, {cpu.get('count', '?')} cores".strip(", ")


def _bits_axis(ax, ticks: Sequence[float]) -> None:
    from matplotlib.ticker import NullLocator
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(ticks)), labels=[f"{t:g}" for t in sorted(set(ticks))])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("bits per weight")
    ax.grid(True, alpha=0.3)


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _speed_panel(ax, speedups: Sequence[Speedup], machine: str) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    fp32 = [s.baseline for s in speedups if s.baseline.bits == 32]
    reference = fp32[0] if fp32 else speedups[0].baseline if speedups else None
    series: dict[Kernel, list[Speedup]] = {}
    for s in speedups:
        if s.baseline == reference and s.kernel.bits is not None:
            series.setdefault(Kernel(s.kernel.name, None, s.kernel.baseline), []).append(s)
    if not series:
        _note(ax, "no GEMV (M=1) benchmarks in these results")
        return
    lowbit = [k for k in series if not k.baseline]
    for i, kernel in enumerate(lowbit):
        points = sorted(series[kernel], key=lambda s: s.kernel.bits)
        shift = 2 ** (0.04 * (i - (len(lowbit) - 1) / 2))  # series side by side at a shared width (log axis)
        ax.errorbar([s.kernel.bits * shift for s in points], [s.median for s in points],
                    yerr=[[s.median - s.low for s in points], [s.high - s.median for s in points]],
                    marker="osD^vP*X"[i % 8], capsize=3, label=kernel.name)
    for kernel in (k for k in series if k.baseline):
        (s,) = series[kernel]
        ax.errorbar([s.kernel.bits], [s.median], yerr=[[s.median - s.low], [s.high - s.median]], marker="x",
                    color="0.4", capsize=3, linestyle="none")
        ax.annotate(kernel.name, (s.kernel.bits, s.median), textcoords="offset points", xytext=(6, 4), fontsize=8,
                    color="0.3")
    ax.plot([reference.bits or 32], [1.0], marker="x", color="0.4")
    ax.annotate(f"{reference.name} = 1", (reference.bits or 32, 1.0), textcoords="offset points", xytext=(-6, -6),
                ha="right", va="top", fontsize=8, color="0.3")
    ax.axhline(1.0, color="0.4", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.margins(y=0.08)
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    shapes = len({shape for s in speedups for shape in s.ratios})
    ax.set_ylabel(f"speedup over {reference.name} (median, min-max over {shapes} shape{'s' * (shapes > 1)})")
    ax.set_title(f"GEMV (M=1) speed vs bits\n{machine}", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    _bits_axis(ax, [s.kernel.bits for points in series.values() for s in points] + [reference.bits or 32])


def _ppl_panel(ax, ppl: Optional[dict[str, Any]]) -> None:
    if ppl is None:
        _note(ax, "no perplexity results (lowbit bench --ppl FILE)")
        return
    sizes: dict[str, set] = {}
    for r in ppl["runs"]:
        sizes.setdefault(r["method"], set()).add(r.get("group_size"))
    series: dict[str, list[dict[str, Any]]] = {}
    for r in ppl["runs"]:
        if r["method"] == "fp32":
            ax.axhline(r["perplexity"], color="0.4", linestyle="--", linewidth=1, label=f"fp32 ({r['perplexity']:.4g})")
        else:
            label = r["method"] + (f" g{r.get('group_size')}" if len(sizes[r["method"]]) > 1 else "")
            label += "".join(f" +{o}" for o in r.get("options", []))
            series.setdefault(label, []).append(r)
    for i, (label, points) in enumerate(series.items()):
        points.sort(key=lambda r: r["bits"])
        ax.plot([r["bits"] for r in points], [r["perplexity"] for r in points], marker="osD^vP*X"[i % 8],
                label=label)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"perplexity vs bits\n{ppl.get('model', '')}", fontsize=10)
    ax.legend(fontsize=8)
    _bits_axis(ax, [r["bits"] for points in series.values() for r in points])


def plot(results: dict[str, Any], ppl: Optional[dict[str, Any]], path: pathlib.Path) -> pathlib.Path:
    """Write the PNG: GEMV speedup vs bits from pytest-benchmark `results`, perplexity vs bits from `ppl` (or a
    note where it is None)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5), layout="constrained")
    FigureCanvasAgg(fig)
    speed, quality = fig.subplots(1, 2)
    _speed_panel(speed, gemv_speedups(results), _machine(results))
    _ppl_panel(quality, ppl)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"lowbit bench needs {', '.join(missing)}: {_INSTALL_HINT}")


def find_ppl(results_json: pathlib.Path, bench_dir: pathlib.Path) -> Optional[pathlib.Path]:
    """The default perplexity table: PPL_NAME next to the results JSON, else in `bench_dir`/results/."""
    candidates = [pathlib.Path(results_json).parent / PPL_NAME, pathlib.Path(bench_dir) / "results" / PPL_NAME]
    return next((c for c in candidates if c.is_file()), None)


def report(results_json: pathlib.Path, png: pathlib.Path, ppl: Optional[pathlib.Path]) -> str:
    """Plot `results_json` (and the perplexity table `ppl`, if any) into `png`; returns the GEMV table."""
    results_json = pathlib.Path(results_json)
    if not results_json.is_file():
        raise SystemExit(f"lowbit bench: {results_json}: no such results file")
    _require("matplotlib")
    try:
        results = json.loads(results_json.read_text())
        ppl_data = load_ppl(ppl) if ppl is not None else None
    except (OSError, ValueError) as e:
        raise SystemExit(f"lowbit bench: {e}") from None
    plot(results, ppl_data, png)
    note = f"perplexity from {ppl}" if ppl is not None else "no perplexity table found (--ppl FILE)"
    return f"{format_table(gemv_speedups(results))}\n\nwrote {png} ({note})"


def run_benchmarks(bench_dir: pathlib.Path, results_json: pathlib.Path, families: Optional[Sequence[str]] = None,
                   keyword: Optional[str] = None, pytest_args: Sequence[str] = ()) -> int:
    """Run the bench_*.py files of `bench_dir` (only bench_<family>.py for `families`) with pytest-benchmark in a
    subprocess, writing its JSON to `results_json`; returns pytest's exit status."""
    bench_dir = pathlib.Path(bench_dir).resolve()
    available = sorted(p.stem.removeprefix("bench_") for p in bench_dir.glob("bench_*.py"))
    if not available:
        raise SystemExit(f"lowbit bench: no bench_*.py in {bench_dir}")
    unknown = sorted(set(families or ()) - set(available))
    if unknown:
        raise SystemExit(f"lowbit bench: unknown families {', '.join(unknown)} (have: {', '.join(available)})")
    selected = list(families) if families else available
    _require("pytest", "pytest_benchmark", "matplotlib", *(["hadamard_transform"] if "hadamard" in selected else []))
    # -c devnull: no ini file of the caller's directory applies; the bench dir is the rootdir and on sys.path.
    cmd = [sys.executable, "-m", "pytest", *(f"bench_{f}.py" for f in selected), "--benchmark-only",
           f"--benchmark-json={pathlib.Path(results_json).resolve()}", "-o", "python_files=bench_*.py",
           "-p", "no:cacheprovider", "-c", os.devnull, "--rootdir", str(bench_dir),
           *(["-k", keyword] if keyword else []), *pytest_args]
    return subprocess.call(cmd, cwd=bench_dir)


def bench(out: pathlib.Path, bench_dir: Optional[pathlib.Path] = None, families: Optional[Sequence[str]] = None,
          keyword: Optional[str] = None, pytest_args: Sequence[str] = (),
          ppl: Optional[pathlib.Path] = None) -> str:
    """Run the benchmarks into `out`.json (with lowbit.build_info() as machine_info["lowbit"]), plot `out`.png;
    returns the GEMV table. `ppl` defaults to find_ppl()."""
    import lowbit
    if ppl is not None and not pathlib.Path(ppl).is_file():
        raise SystemExit(f"lowbit bench: --ppl {ppl}: no such file")
    bench_dir = pathlib.Path(bench_dir) if bench_dir is not None else default_bench_dir()
    results_json, png = pathlib.Path(f"{out}.json"), pathlib.Path(f"{out}.png")
    results_json.parent.mkdir(parents=True, exist_ok=True)
    results_json.unlink(missing_ok=True)
    status = run_benchmarks(bench_dir, results_json, families, keyword, pytest_args)
    if status == 5:
        raise SystemExit("lowbit bench: no benchmark matched the selection")
    if not results_json.is_file():
        raise SystemExit(f"lowbit bench: pytest exited with status {status} and wrote no results")
    results = json.loads(results_json.read_text())
    results.setdefault("machine_info", {})["lowbit"] = lowbit.build_info()
    results_json.write_text(json.dumps(results, indent=1))
    table = report(results_json, png, ppl if ppl is not None else find_ppl(results_json, bench_dir))
    if status != 0:
        print(table)
        raise SystemExit(f"lowbit bench: some benchmarks failed (pytest exit status {status}); "
                         f"the others are in {results_json}")
    return f"{table}\nwrote {results_json}"
