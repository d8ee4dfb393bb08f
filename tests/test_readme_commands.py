"""tools/readme_commands.py, the CI step that runs every README command: how it reads code blocks and commands,
and that the README has the blocks it runs (the commands themselves run in CI, not here)."""
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("readme_commands", ROOT / "tools" / "readme_commands.py")
readme_commands = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_commands)


def test_blocks_and_commands_are_parsed():
    text = "intro\n```bash\nmake demo   # a comment\n# only a comment\n\nlowbit quantize \\\n  --bits 4\n```\n" \
           "```python\nprint(1)\n```\n```\nnot run\n```\n"
    blocks = readme_commands.blocks(text)
    assert [lang for lang, _ in blocks] == ["bash", "python", ""]
    assert readme_commands.shell_commands(blocks[0][1]) == ["make demo", "lowbit quantize --bits 4"]


def test_the_readme_has_the_commands_ci_runs():
    blocks = readme_commands.blocks((ROOT / "README.md").read_text())
    commands = [c for lang, body in blocks if lang == "bash" for c in readme_commands.shell_commands(body)]
    assert {"make demo", "make test", "make wheel"} <= set(commands)
    assert any(c.startswith("lowbit generate") for c in commands) and any(c.startswith("lowbit convert")
                                                                         for c in commands)
    assert sum(lang == "python" for lang, _ in blocks) >= 1
    assert set(readme_commands.NOT_RUN) <= set(commands)  # what it skips is in the README, and said why
