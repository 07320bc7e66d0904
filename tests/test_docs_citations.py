"""Comments, docstrings and docs cite only files in the repository (issue 21).

A contributor who clones the repository has no design documents beside it: no house-style or
performance notes, no DreamLLM specification, no raw GPU result folders outside the repository. So
no tracked source or Markdown file may send the reader there. State the rule or the fact in a few
words instead, or cite the repository file that holds it (the tolerance rule:
tests/kernels/kernel_helpers.py; the performance targets: dreamllm_fast/bench/targets.py; GPU
figures: their copy under benchmarks/results/). benchmarks/results/ is exempt: its folders are
historical records, kept as they were written.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = (".py", ".md")
EXEMPT = ("benchmarks/results/",)
# Each pattern names a document that is not in the repository. Written as regexes with escaped
# dots and split words so that this file does not match its own patterns.
OUTSIDE_DOCS = {
    "the house-style notes": r"\bstyle\.md\b",
    "the performance notes": r"\bperformance\.md\b",
    "the DreamLLM specification": r"\bdreamllm\.md\b",
    "the design folder": r"\bshared/" r"design\b",
    "the raw GPU results folder": r"\bshared/" r"gpu-results\b",
}
PATTERN = re.compile("|".join(f"(?:{p})" for p in OUTSIDE_DOCS.values()))
SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "__pycache__", "node_modules", "shared"}


def _source_files() -> list[str]:
    """Tracked files plus untracked ones git does not ignore; a walk of the tree without git."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        paths = out.splitlines()
    except (OSError, subprocess.CalledProcessError):  # no git, or not a git checkout (an sdist)
        paths = []
        for d, dirs, files in os.walk(ROOT):
            dirs[:] = [x for x in dirs if x not in SKIP_DIRS and not x.endswith(".egg-info")]
            paths += [os.path.relpath(os.path.join(d, f), ROOT).replace(os.sep, "/") for f in files]
    return sorted(p for p in set(paths) if p.endswith(SUFFIXES) and not p.startswith(EXEMPT)
                  and (ROOT / p).is_file())


def find_outside_citations(paths) -> list[str]:
    """'path:line: text' for every line of `paths` (relative to the root) that cites such a document."""
    hits = []
    for rel in paths:
        text = (ROOT / rel).read_text(encoding="utf-8", errors="replace")
        for no, line in enumerate(text.splitlines(), 1):
            if PATTERN.search(line):
                hits.append(f"{rel}:{no}: {line.strip()}")
    return hits


def test_the_scan_sees_the_source_tree():
    files = _source_files()
    # a scan of nothing would pass vacuously: make sure the package, the kernels and the tests are in it
    for must in ("dreamllm_fast/pipeline.py", "kernels/decode_attention.py", "README.md",
                 "tests/test_docs_citations.py"):
        assert must in files, f"{must} missing from the scanned files ({len(files)} found)"
    assert not any(f.startswith("benchmarks/results/") for f in files)


def test_each_pattern_catches_its_citation():
    # split literals: joined at compile time, so the source line itself is no citation
    samples = ["(style" ".md §6)", "see performance" ".md", "shared/" "design/notes",
               "dreamllm" ".md §1.5", "shared/" "gpu-results/2026-11-23/arbiter.txt"]
    for s in samples:
        assert PATTERN.search(s), s
    for fine in ("docs/architecture.md", "benchmarks/results/NVIDIA_H100_80GB_HBM3/x/arbiter.txt",
                 "tests/kernels/kernel_helpers.py", "dreamllm_fast/bench/targets.py", "lifestyle.mdx"):
        assert not PATTERN.search(fine), fine


def test_sources_cite_only_repository_files():
    hits = find_outside_citations(_source_files())
    assert not hits, (
        f"{len(hits)} line(s) cite documents that are not in the repository ("
        + ", ".join(OUTSIDE_DOCS) + "). State the rule or fact in a few words, or cite the "
        "repository file that holds it (tests/kernels/kernel_helpers.py, dreamllm_fast/bench/targets.py, "
        "benchmarks/results/...):\n" + "\n".join(hits))
