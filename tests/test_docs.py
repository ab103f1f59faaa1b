"""The README is the front door and docs/ holds the rest: both stay true.

- README.md is at most 15 KB and links every page of docs/;
- every relative link in README.md and docs/*.md points at a file that exists;
- every shell block marked ``<!-- runnable -->`` (the line before its fence) runs, in order, in a
  fresh folder per document, on the embedded tiny model, and exits 0. Blocks that serve forever,
  need a GPU or a real checkpoint are simply not marked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MARK = "<!-- runnable -->"
LINK = re.compile(r"\[[^\]]*\]\(([^)#\s]+)(?:#[^)]*)?\)")


def runnable_blocks(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == MARK:
            j = i + 1
            if j >= len(lines) or not lines[j].startswith("```"):
                raise AssertionError(f"{path.name}:{i + 1}: {MARK} must stand right before a code fence")
            k = j + 1
            while k < len(lines) and not lines[k].startswith("```"):
                k += 1
            blocks.append("\n".join(lines[j + 1:k]))
            i = k
        i += 1
    return blocks


def test_readme_is_the_front_door():
    size = README.stat().st_size
    assert size <= 15 * 1024, f"README.md is {size} bytes; keep it <= 15 KB and move detail into docs/"
    text = README.read_text()
    unlinked = [d.name for d in DOCS if f"docs/{d.name}" not in text]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        if not (doc.parent / target).exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files: {broken}"


DOCS_WITH_BLOCKS = [d for d in [README, *DOCS] if runnable_blocks(d)]


def test_the_readme_quick_start_is_marked_runnable():
    assert README in DOCS_WITH_BLOCKS


@pytest.mark.parametrize("doc", DOCS_WITH_BLOCKS, ids=lambda p: p.name)
def test_runnable_shell_blocks_run(doc, tmp_path):
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("HF_HUB_OFFLINE", "1")
    for n, block in enumerate(runnable_blocks(doc)):
        script = "set -euo pipefail\n" + block + "\n"
        res = subprocess.run(["bash", "-c", script], check=False, cwd=tmp_path, env=env, capture_output=True,
                             text=True,
                             timeout=900)
        assert res.returncode == 0, (f"{doc.name}, runnable block {n + 1} failed ({res.returncode}):\n{block}\n"
                                     f"--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-3000:]}")
