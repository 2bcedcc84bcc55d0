"""The repository stands alone: every reference to docs/ resolves inside it, and nothing points outside it."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = [ROOT / line for line in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):   # not a git checkout: every text file
        files = [p for p in ROOT.rglob("*") if ".git" not in p.parts]
    return [p for p in files if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".toml", ".sh", "")]


def _headings(doc: Path) -> set[str]:
    return set(re.findall(r"^#{2,4} §(\d+(?:\.\d+)?)[. ]", doc.read_text(), re.M))


def test_every_section_reference_resolves_to_a_heading():
    """``docs/<name>.md §n`` (and §n.m, ranges, lists) in code, configs and docs names a heading of that file."""
    cited = 0
    for path in _tracked():
        text = path.read_text(errors="replace")
        for doc, refs in re.findall(r"(docs/[\w/]+\.md)((?:[ ,–-]*(?:and )?§\d+(?:\.\d+)?)+)", text):
            target = ROOT / doc
            assert target.is_file(), f"{path.relative_to(ROOT)} cites {doc}, which does not exist"
            for ref in re.findall(r"§(\d+(?:\.\d+)?)", refs):
                cited += 1
                assert ref in _headings(target), f"{path.relative_to(ROOT)} cites {doc} §{ref}: no such heading"
    assert cited > 30   # the code does cite the mathematics


def test_docs_links_resolve():
    """Every relative link or path of the form docs/..., benchmarks/results/... in README and docs exists."""
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)\)", path.read_text()):
            assert (path.parent / target).exists(), f"{path.name} links to {target}, which does not exist"
        for target in re.findall(r"`((?:docs|benchmarks/results)/[\w./-]+\.(?:md|png|csv))`", path.read_text()):
            assert (ROOT / target).exists() or target.endswith((".png", ".csv")), f"{path.name} names {target}"


@pytest.mark.parametrize("pattern", [r"\.\./shared", r"/work/shared", r"MATH\.md"])
def test_nothing_refers_outside_the_repository(pattern):
    offenders = [str(p.relative_to(ROOT)) for p in _tracked()
                 if p.name != "test_docs.py" and re.search(pattern, p.read_text(errors="replace"))]
    assert offenders == []
