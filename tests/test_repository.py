"""The repository keeps what its documents cite: benchmark and docs files are not git-ignored (an ignore rule
once matched every `runs/` folder at any depth, and run stats cited by docs/results.md never reached the
repository), and every benchmark file, script and image that README.md and docs/*.md cite exists."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# a repository path in prose or code: benchmarks/..., scripts/..., docs/images/... (globs are skipped)
CITED = re.compile(r"(?<![\w/.$-])((?:benchmarks|scripts|docs/images)/[\w.+/*-]*[\w+/*-])")
LINKED = re.compile(r"\]\(((?:images|\.\./benchmarks|\.\./scripts)/[^)\s#]+)\)")
# a shell variable set to a benchmark folder in a code block (B=benchmarks/...), and its later uses ($B/...)
ASSIGNED_OR_USED = re.compile(r"\b([A-Z]\w*)=(benchmarks/[\w.+/-]*[\w+-])|\$([A-Z]\w*)/([\w.+/*-]*[\w+*-])")
# Run stats that docs/results.md's `wdmctl report` commands read but that were never committed, because
# .gitignore's `runs/` then matched benchmark folders too; docs/results.md says so. Nothing may join this list.
LOST = {f"benchmarks/h200-issue15-table1/runs/{run}" for run in (
    "WDM-S2-seed0", "WDM-S2-seed1", "UMamba-S2-seed0", "DiM-S2-seed0", "UViT-S2-seed0", "UViT-S2-seed1")} | {
    f"benchmarks/h200-issue15-table4k/runs/{run}" for run in (
        "UMamba-S2-seed0", "UMamba-S2-seed1", "DiM-S2-seed0", "DiM-S2-seed1", "UViT-S2-seed0-4.5min",
        "UViT-S2-seed1-4.5min")} | {
    f"benchmarks/h200-issue15-skipinit/runs/{run}" for run in ("WDM-S2-average-seed0", "WDM-S2-average-seed1")}


def cited_paths(document: Path) -> set[str]:
    text = document.read_text()
    paths = {m.group(1) for m in CITED.finditer(text)}
    paths |= {str((document.parent / m.group(1)).resolve().relative_to(ROOT)) for m in LINKED.finditer(text)}
    variables: dict[str, str] = {}
    for m in ASSIGNED_OR_USED.finditer(text):   # in order: a later B=... replaces an earlier one
        if m.group(1):
            variables[m.group(1)] = m.group(2)
        elif m.group(3) in variables:
            paths.add(f"{variables[m.group(3)]}/{m.group(4)}")
    return {p for p in paths if "*" not in p}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_file_exists(document):
    missing = sorted(p for p in cited_paths(document) - LOST if not (ROOT / p).exists())
    assert not missing, f"{document.name} cites files that are not in the repository: {missing}"


def test_the_citations_found_expand_variables_and_skip_globs(tmp_path):
    document = tmp_path / "doc.md"
    document.write_text("Files: `benchmarks/h200-x/` and benchmarks/h200-y.json, grids in docs/images/a.png;\n"
                        "not benchmarks/*.json, nor my-scripts/x.sh, nor $OUT/z.json\n"
                        "B=benchmarks/h200-a\nwdmctl report $B/runs/one --solo-speed $B/s.json $B/*.json\n"
                        "B=benchmarks/h200-b\nwdmctl report $B/runs/two\n")
    assert cited_paths(document) == {
        "benchmarks/h200-x/", "benchmarks/h200-y.json", "docs/images/a.png", "benchmarks/h200-a",
        "benchmarks/h200-a/runs/one", "benchmarks/h200-a/s.json", "benchmarks/h200-b", "benchmarks/h200-b/runs/two"}


def test_the_lost_runs_are_still_lost_and_still_cited():
    # the list only excuses what is really gone: a restored run, or a citation removed, shrinks it
    cited = set().union(*(cited_paths(document) for document in DOCUMENTS))
    assert LOST <= cited
    assert not [p for p in LOST if (ROOT / p).exists()]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_results_are_not_git_ignored():
    paths = ["benchmarks/h200-x/runs/WDM-S2-seed0/stats.jsonl", "benchmarks/h200-x/samples/grid.png",
             "docs/images/x/samples/grid.png", "benchmarks/h200-x/caches/manifest.json"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert ignored == []
    # the user's own folders at the top level stay ignored
    top = subprocess.run(["git", "check-ignore", "--no-index", "runs/x", "caches/x", "samples/x"], cwd=ROOT,
                         capture_output=True, text=True).stdout.split()
    assert top == ["runs/x", "caches/x", "samples/x"]
