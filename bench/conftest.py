"""Benchmarks run the installed lowbit; files are named bench_*.py. After the run, a summary prints each
benchmark's extra numbers (GB/s, fraction of the measured memory bandwidth) and, in groups that hold baselines
(benchmarks whose extra_info has "baseline": name), the speedup of every other benchmark over each baseline."""


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    benchmarks = [b for b in (getattr(session, "benchmarks", None) or []) if b.stats]
    if not benchmarks:
        return
    terminalreporter.section("lowbit: bandwidth and speedups (same run)")
    groups: dict = {}
    for b in benchmarks:
        groups.setdefault(b.group or "", []).append(b)
    for group, rows in sorted(groups.items()):
        baselines = {b.extra_info["baseline"]: b.stats.median for b in rows if "baseline" in b.extra_info}
        terminalreporter.write_line(f"-- {group}")
        for b in sorted(rows, key=lambda b: b.stats.median):
            extra = "  ".join(f"{k}={_fmt(v)}" for k, v in b.extra_info.items() if k != "baseline")
            ratios = "" if "baseline" in b.extra_info else "  ".join(
                f"{base / b.stats.median:.2f}x vs {name}" for name, base in baselines.items())
            terminalreporter.write_line(f"   {b.name:<44} {b.stats.median * 1e3:9.3f} ms  {extra}  {ratios}")
