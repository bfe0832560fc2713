"""The README stays a front door and the docs stay connected: size, order, links, no commit stamps.

Plain text checks on the markdown files; no project imports, so it runs in a second.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# The tour's "train on your own file" part: a reader must meet it on the first screenful or two.
TRAIN_OWN = "Train on your own labelled file"
# Pages written by a script from local results (not committed); a link to one is fine while its generator exists.
GENERATED = {DOCS / "results.md": ROOT / "bench" / "report.py"}

# [text](target) and [text](target "title"); images too. Code spans are removed first.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)
STAMP = re.compile(r"\b(?:commit|clone of)\s+[0-9a-f]{7,40}\b", re.I)


@pytest.fixture(scope="module")
def cpu_graph_mode():
    """Overrides conftest's autouse fixture of this name, which imports MindSpore through the builder:
    these checks read text only, and must pass while the builder is being reshaped."""


def pages() -> list:
    return [README] + sorted(DOCS.glob("*.md"))


def relative_links(path: Path) -> list:
    text = CODE.sub("", path.read_text(encoding="utf-8"))
    links = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http:, mailto:, ... and anchors within the page
        links.append(target.split("#", 1)[0])
    return links


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move depth into docs/"


def test_train_on_your_own_file_comes_early():
    lines = README.read_text(encoding="utf-8").splitlines()
    where = [i for i, line in enumerate(lines, 1) if TRAIN_OWN in line]
    assert where, f"README.md no longer says {TRAIN_OWN!r}"
    assert where[0] <= 100, f"{TRAIN_OWN!r} starts at line {where[0]} of README.md, after line 100"


def test_relative_links_point_at_files():
    assert (DOCS / "README.md").is_file()
    broken = []
    for page in pages():
        for target in relative_links(page):
            path = (page.parent / target).resolve()
            if path.exists() or GENERATED.get(path, Path("/nonexistent")).exists():
                continue
            broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def test_link_pattern_finds_links():
    # Guards the test above against a pattern that silently matches nothing.
    assert relative_links(README), "no relative link found in README.md"


def test_readme_has_no_commit_stamps():
    stamps = STAMP.findall(README.read_text(encoding="utf-8"))
    assert not stamps, f"README.md names commits {stamps}: figures with provenance go to docs/measured.md"
