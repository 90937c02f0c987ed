"""Every relative link of the README, docs/ and the results pages points at a file that exists,
and every #anchor at a heading of that page (GitHub's heading ids)."""

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"),
                *(REPO / "experiments" / "results").rglob("README.md"),
                *(REPO / "benchmarks" / "results").rglob("README.md")])
_LINK = re.compile(r"\]\(([^)\s]*)\)")
_HEADING = re.compile(r"^#{1,6} (.*)$", re.M)


def heading_id(title: str) -> str:
    """GitHub's id of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def test_heading_ids_follow_github():
    assert heading_id("## 4. Benchmark: ours beside TF-Addons"[3:]) == \
        "4-benchmark-ours-beside-tf-addons"
    assert heading_id("α × strategy at the full schedule, 3 seeds") == \
        "α--strategy-at-the-full-schedule-3-seeds"
    assert heading_id("1. Align the raw `photos`") == "1-align-the-raw-photos"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in _LINK.findall(page.read_text()):
        if not target or re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in {
                heading_id(h) for h in _HEADING.findall(linked.read_text())}:
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: broken links {broken}"
