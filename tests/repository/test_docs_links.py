"""Every relative link in README.md and docs/*.md resolves: its file exists and its #anchor is a heading there.

Anchors follow GitHub's rule for headings (github-slugger): the heading's rendered text, lower-cased, with
every character that is not a letter, digit, mark, `_`, `-` or space removed and spaces turned into `-`; a
repeated heading gets `-1`, `-2`, ... Links inside code (fenced blocks, `inline code`) are not links.
"""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def slug(heading: str) -> str:
    """GitHub's anchor of a heading's markdown text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = text.replace("`", "").lower()
    kept = "".join(ch for ch in text
                   if ch.isalnum() or ch in "_- " or unicodedata.category(ch).startswith("M"))
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for match in HEADING.finditer(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(page: Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    return [target for target in LINK.findall(text) if not EXTERNAL.match(target)]


def broken_links(page: Path) -> list[str]:
    """The page's relative link targets that name a missing file or a missing heading."""
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
            broken.append(f"{target} (no heading with this anchor in {resolved.name})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_the_readme_links_every_docs_page():
    linked = {(REPO / target.partition("#")[0]).resolve() for target in links(REPO / "README.md")}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []


@pytest.mark.parametrize("heading, anchor", [
    ("Fit sets: `--fit-on SPEC`", "fit-sets---fit-on-spec"),
    ("Measurements on clutter version 1 (before issue 22)", "measurements-on-clutter-version-1-before-issue-22"),
    ("The main job (`make main`)", "the-main-job-make-main"),
    ("Running `scripts/evaluate.py`", "running-scriptsevaluatepy"),
    ("Ablation: head, miner, training resolution", "ablation-head-miner-training-resolution"),
    ("Whitening: `--whiten pca|lw [--whiten-dims N]`", "whitening---whiten-pcalw---whiten-dims-n"),
    ("ITQ at 16–128 bits, `map_at_k`", "itq-at-16128-bits-map_at_k"),
])
def test_anchors_follow_githubs_rule(heading, anchor):
    assert slug(heading) == anchor


def test_a_missing_file_or_heading_is_reported(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Same\n\n## Same\n", encoding="utf-8")
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md) [ok](a.md#title) [ok](a.md#same-1) [ok](#here) [web](https://example.org/x.md)\n"
        "`[code](gone.md)`\n```\n[fenced](gone.md)\n```\n\n# Here\n\n"
        "[bad](gone.md) [bad anchor](a.md#same-2) [bad own](#nowhere)\n", encoding="utf-8")
    assert broken_links(page) == ["gone.md (no such file)",
                                  "a.md#same-2 (no heading with this anchor in a.md)",
                                  "#nowhere (no heading with this anchor in b.md)"]
