"""Runs every command of README.md as a new user would type it (CI's README-commands test, `make readme-check`):
each line of the ```bash blocks in the repository root with .venv/bin first on PATH, each ```python block as a
script. Two commands are not run, with the reason printed: `make test` (CI runs it just before this) and
`make bench` (the full benchmark run; `lowbit bench`, which it calls, is run on a subset by tests/test_bench_cli.py).
Whatever the commands create in the repository root is removed afterwards. Exits non-zero on the first failure."""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOT_RUN = {"make test": "CI runs it just before this script",
           "make bench": "the full benchmark run; `lowbit bench` itself is tested on a subset"}


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced code block."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def shell_commands(body: str) -> list[str]:
    """The commands of a bash block: one per line, `\\` continuations joined, comments and blank lines dropped."""
    commands, current = [], ""
    for line in body.splitlines():
        line = line.rstrip() if not current else line.strip()
        if line.endswith("\\"):
            current += line[:-1].rstrip() + " "
            continue
        current += line
        command = current.split(" #")[0].strip() if not current.lstrip().startswith("#") else ""
        if command:
            commands.append(command)
        current = ""
    return commands


def run(command: list[str] | str, env: dict, shell: bool) -> None:
    shown = command if shell else " ".join(command)
    print(f"\n$ {shown}", flush=True)
    start = time.time()
    result = subprocess.run(command, cwd=ROOT, env=env, shell=shell)
    print(f"-- exit {result.returncode} in {time.time() - start:.0f} s", flush=True)
    if result.returncode:
        raise SystemExit(f"README command failed: {shown}")


def main() -> None:
    env = dict(os.environ, PATH=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    before = set(os.listdir(ROOT))
    try:
        for language, body in blocks((ROOT / "README.md").read_text()):
            if language == "bash":
                for command in shell_commands(body):
                    if command in NOT_RUN:
                        print(f"\n$ {command}\n-- not run: {NOT_RUN[command]}", flush=True)
                    else:
                        run(command, env, shell=True)
            elif language == "python":
                with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
                    f.write(body)
                try:
                    run([str(ROOT / ".venv" / "bin" / "python"), f.name], env, shell=False)
                finally:
                    os.unlink(f.name)
    finally:
        for name in sorted(set(os.listdir(ROOT)) - before):
            path = ROOT / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    print("\nevery README command ran", flush=True)


if __name__ == "__main__":
    sys.exit(main())
