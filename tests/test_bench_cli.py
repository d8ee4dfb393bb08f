"""`lowbit bench` (lowbit.bench_report): the GEMV speedup table and the PNG from the committed results in
bench/results/, `--plot-only`, its errors, and one real run of a single fast benchmark (a few seconds)."""
import json
import pathlib
import shutil
import statistics

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("pytest_benchmark")

from lowbit import bench_report  # noqa: E402
from lowbit.cli import main  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "bench" / "results"
CPU_JSON = RESULTS / "cpu-2core-avx2.json"
PPL_JSON = RESULTS / "smollm2_ppl.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def expected_speedups(results: dict, kernel_prefix: str, baseline_prefix: str) -> dict[str, float]:
    """Per GEMV shape, the baseline's median over the kernel's, found by test name in the raw JSON."""
    out = {}
    for group in {b["group"] for b in results["benchmarks"] if b["group"].endswith(" M=1")}:
        rows = {b["name"]: b["stats"]["median"] for b in results["benchmarks"] if b["group"] == group}
        kernel = [t for name, t in rows.items() if name.startswith(kernel_prefix)]
        base = [t for name, t in rows.items() if name.startswith(baseline_prefix)]
        k, n = group.split()[1:3]
        out[f"{k[2:]}x{n[2:]}"] = base[0] / kernel[0]
    return out


@pytest.mark.parametrize("kernel,bits,prefix", [
    ("lut_gemm", 2, "test_lowbit_lut_gemm[2-"), ("lut_gemm", 3, "test_lowbit_lut_gemm[3-"),
    ("lut_gemm", 4, "test_lowbit_lut_gemm[4-"), ("async_dequant_gemm", 2, "test_lowbit_async_dequant_gemm_2bit["),
    ("vq_gemm", 2, "test_lowbit_vq_gemm_2bit["), ("torch int4", 4, "test_torch_int4["),
])
def test_gemv_speedups_match_the_json_medians(kernel, bits, prefix):
    results = json.loads(CPU_JSON.read_text())
    speedups = bench_report.gemv_speedups(results)
    table = bench_report.format_table(speedups)
    for baseline, baseline_prefix in [("torch float32", "test_torch_dense[fp32-"),
                                      ("torch bfloat16", "test_torch_dense[bf16-")]:
        expected = expected_speedups(results, prefix, baseline_prefix)
        assert len(expected) == 3
        (row,) = [s for s in speedups if (s.kernel.name, s.kernel.bits, s.baseline.name) == (kernel, bits, baseline)]
        assert row.ratios == pytest.approx(expected, rel=1e-12)
        med, low, high = statistics.median(expected.values()), min(expected.values()), max(expected.values())
        assert row.median == pytest.approx(med) and row.low == pytest.approx(low) and row.high == pytest.approx(high)
        (line,) = [li for li in table.splitlines() if li.startswith(f"| {kernel} | {bits} |")]
        assert f"{med:.2f}x ({low:.2f}-{high:.2f})" in line


def test_table_lists_every_kernel_and_baseline():
    table = bench_report.format_table(bench_report.gemv_speedups(json.loads(CPU_JSON.read_text())))
    header = [li for li in table.splitlines() if li.startswith("| kernel |")][0]
    assert header == "| kernel | bits | vs torch float32 | vs torch bfloat16 | vs torch int4 |"
    rows = [tuple(c.strip() for c in li.split("|")[1:3]) for li in table.splitlines()[4:]]
    assert rows == [("async_dequant_gemm", "2"), ("lut_gemm", "2"), ("lut_gemm", "3"), ("lut_gemm", "4"),
                    ("vq_gemm", "2"), ("torch float32", "32"), ("torch bfloat16", "16"), ("torch int4", "4")]
    assert bench_report.format_table([]) == "no GEMV (M=1) benchmarks in these results"


def test_kernel_of_reads_bits_from_params_or_name():
    new = {"name": "test_lowbit_async_dequant_gemm[4-4096x4096-1]", "params": {"bits": 4, "k": 4096}, "extra_info": {}}
    old = {"name": "test_lowbit_vq_gemm_2bit[4096x4096-1]", "params": {"k": 4096}, "extra_info": {}}
    base = {"name": "test_torch_dense[bf16-4096x4096-1]", "params": {}, "extra_info": {"baseline": "torch bfloat16"}}
    assert bench_report.kernel_of(new) == bench_report.Kernel("async_dequant_gemm", 4, False)
    assert bench_report.kernel_of(old) == bench_report.Kernel("vq_gemm", 2, False)
    assert bench_report.kernel_of(base) == bench_report.Kernel("torch bfloat16", 16, True)


def _is_png(path: pathlib.Path) -> bool:
    return path.is_file() and path.stat().st_size > 10_000 and path.read_bytes()[:8] == PNG_MAGIC


def test_plot_writes_a_png(tmp_path):
    results = json.loads(CPU_JSON.read_text())
    assert _is_png(bench_report.plot(results, bench_report.load_ppl(PPL_JSON), tmp_path / "both.png"))
    assert _is_png(bench_report.plot({"benchmarks": []}, None, tmp_path / "empty.png"))


def test_plot_only_cli(tmp_path, capsys):
    shutil.copy(CPU_JSON, tmp_path / "run.json")
    shutil.copy(PPL_JSON, tmp_path / PPL_JSON.name)  # found next to the results by default
    main(["bench", "--plot-only", str(tmp_path / "run.json")])
    out = capsys.readouterr().out
    assert _is_png(tmp_path / "run.png")
    assert "| lut_gemm | 2 |" in out and f"perplexity from {tmp_path / PPL_JSON.name}" in out
    main(["bench", "--plot-only", str(CPU_JSON), "--out", str(tmp_path / "other"), "--bench-dir", str(tmp_path)])
    assert _is_png(tmp_path / "other.png")


def test_plot_only_errors(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="no such results file"):
        main(["bench", "--plot-only", str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit, match="not a perplexity table"):
        main(["bench", "--plot-only", str(CPU_JSON), "--out", str(tmp_path / "x"),
              "--ppl", str(RESULTS / "smollm2_kv_ppl.json")])
    with pytest.raises(SystemExit, match="takes no -k"):
        main(["bench", "--plot-only", str(CPU_JSON), "-k", "lut"])
    with pytest.raises(SystemExit, match="unknown families nope"):
        main(["bench", "--families", "gemm,nope", "--out", str(tmp_path / "x")])
    find_spec = bench_report.importlib.util.find_spec
    monkeypatch.setattr(bench_report.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    with pytest.raises(SystemExit, match=r'needs matplotlib: pip install "lowbit\[bench\]"'):
        main(["bench", "--plot-only", str(CPU_JSON), "--out", str(tmp_path / "x")])


@pytest.mark.slow
def test_bench_runs_one_benchmark(tmp_path, capsys):
    """The installed benchmarks, restricted to one Hadamard shape of lowbit's kernel (~10 s, mostly imports).
    A full `lowbit bench` takes many minutes here (every GEMM benchmark cycles 768 MB of operands)."""
    out = tmp_path / "new dir" / "run"
    main(["bench", "--families", "hadamard", "-k", "test_lowbit and 1x11008", "--out", str(out),
          "--", "--benchmark-max-time=0.05", "--benchmark-min-rounds=3", "-q"])
    results = json.loads(out.with_suffix(".json").read_text())
    assert [b["name"] for b in results["benchmarks"]] == ["test_lowbit[1x11008]"]
    assert results["benchmarks"][0]["stats"]["rounds"] >= 3
    assert results["machine_info"]["lowbit"]["version"]
    assert _is_png(out.with_suffix(".png"))
    assert "no GEMV (M=1) benchmarks" in capsys.readouterr().out
