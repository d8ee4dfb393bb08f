"""Build lowbit's bundled evaluation and calibration text from the Python 3.11 documentation sources shipped in
Debian's python3.11-doc package (PSF license): real English technical prose, with reST markup and code blocks
stripped. Disjoint splits, fixed by file lists:
  eval:        the tutorial (tutorial/*.rst.txt)
  calibration: the HOWTOs and the FAQ (howto/*.rst.txt, faq/*.rst.txt)

Run: apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb /tmp/pydoc
     python tools/make_text_corpus.py /tmp/pydoc/usr/share/doc/python3.11/html/_sources python/lowbit/corpus
"""
from __future__ import annotations

import pathlib
import re
import sys

ROLE = re.compile(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
LITERAL = re.compile(r"``([^`]*)``")
LINK = re.compile(r"`([^`<]*?)\s*<[^>]*>`_+")


def prose(text: str) -> str:
    """The paragraphs of a reST file without directives, literal blocks, tables or markup."""
    out, skip_indented, previous_literal = [], False, False
    for line in text.splitlines():
        stripped = line.strip()
        indented = line.startswith((" ", "\t"))
        if skip_indented:
            if not stripped or indented:
                continue
            skip_indented = False
        if stripped.startswith(".. ") or (previous_literal and not stripped):
            skip_indented = True
            previous_literal = False
            continue
        if indented and stripped.startswith((">>>", "...", "$")):
            continue
        if set(stripped) <= set("=-~^*#+|` ") and stripped:  # section underlines, table borders
            continue
        previous_literal = stripped.endswith("::")
        if previous_literal:
            stripped = stripped[:-1] if stripped != "::" else ""
        stripped = LINK.sub(r"\1", ROLE.sub(r"\1", LITERAL.sub(r"\1", stripped)))
        out.append(stripped)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def build(sources: pathlib.Path, dest: pathlib.Path) -> None:
    splits = {"eval": ["tutorial"], "calib": ["howto", "faq"]}
    dest.mkdir(parents=True, exist_ok=True)
    for split, folders in splits.items():
        files = sorted(p for f in folders for p in (sources / f).glob("*.rst.txt"))
        text = "\n\n".join(prose(p.read_text(encoding="utf-8")) for p in files)
        (dest / f"python_docs_{split}.txt").write_text(text, encoding="utf-8")
        print(f"{split}: {len(files)} files, {len(text)} characters")


if __name__ == "__main__":
    build(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))
