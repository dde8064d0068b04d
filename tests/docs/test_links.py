"""Every relative link in the repository's Markdown points at a file that exists and, where it names an
anchor, at a heading that exists there (GitHub's anchor rules: lower case, punctuation dropped,
spaces to hyphens). Moving text between the README and docs/ must not leave a reader at a dead link."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$", re.MULTILINE)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
SKIPPED_DIRS = {".venv", "node_modules", ".git", "meshbridge.egg-info"}


def _markdown_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.md") if not SKIPPED_DIRS.intersection(p.relative_to(ROOT).parts))


def github_anchor(heading: str) -> str:
    text = re.sub(r"[`*]|\[|\]\([^)]*\)", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def anchors_of(path: Path) -> set[str]:
    body = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {github_anchor(h) for h in HEADING.findall(body)}


def _links(path: Path) -> list[str]:
    body = CODE_SPAN.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    return [t for t in LINK.findall(body) if not re.match(r"^[a-z]+:", t)]


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in _links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors_of(dest):
            broken.append(f"{target}: no heading #{anchor}")
    return broken


def test_anchor_rule_matches_github() -> None:
    assert github_anchor("Changes from the starting contract") == "changes-from-the-starting-contract"
    assert github_anchor("`meshbridge-ca` command line") == "meshbridge-ca-command-line"
    assert github_anchor("The CRL set (`ca-crl.pem`)") == "the-crl-set-ca-crlpem"


def test_a_dead_link_is_found(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](#title) [gone](other.md) [anchor](#nowhere)\n", encoding="utf-8")
    assert broken_links(page) == ["other.md: no such file", "#nowhere: no heading #nowhere"]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    assert broken_links(path) == []
