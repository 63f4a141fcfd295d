"""The documentation: a README a newcomer reads in one sitting, and no relative link in it or in the pages
it links to (docs/, benchmarks/, tests/) pointing at a file or heading that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    REPO / "benchmarks" / "README.md",
    REPO / "benchmarks" / "LOG.md",
    REPO / "tests" / "README.md",
]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def relative_links(text: str) -> list[str]:
    """The targets of the markdown links of `text` outside code blocks that point inside the repository
    (a path, a path#heading or #heading of the same page)."""
    return [t for t in LINK.findall(FENCE.sub("", text)) if not re.match(r"[a-z]+:", t)]


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", text), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_readme_is_read_in_one_sitting():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines: move detail into docs/*.md (at most 250)"


def broken_links(page: Path) -> list[str]:
    """The relative links of `page` whose file, or whose heading in a markdown file, does not exist."""
    broken = []
    for target in relative_links(page.read_text(encoding="utf-8")):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
            broken.append(f"{target} (no such heading)")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path):
    assert page.is_file(), f"{page.relative_to(REPO)} is missing"
    assert not broken_links(page), f"{page.relative_to(REPO)}: broken links {broken_links(page)}"


def test_the_readme_lists_every_command():
    from nanogpt.cli import COMMANDS

    table = [
        line
        for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines()
        if line.startswith("| `nanogpt ")
    ]
    listed = {line.split("`")[1].split()[1] for line in table}
    assert listed == set(COMMANDS), (
        f"README's command table: missing {set(COMMANDS) - listed}, extra {listed - set(COMMANDS)}"
    )


HISTORY = re.compile(
    r"\bissue #?\d+|\(was:|\bwas: |after the structure change|previous session", re.IGNORECASE
)


@pytest.mark.parametrize(
    "page", [p for p in PAGES if p.name != "LOG.md"], ids=lambda p: str(p.relative_to(REPO))
)
def test_pages_state_behaviour_not_history(page: Path):
    """The story of how things came to be goes in git log and benchmarks/LOG.md, not in the pages."""
    found = [m.group() for m in HISTORY.finditer(page.read_text(encoding="utf-8"))]
    assert not found, f"{page.relative_to(REPO)}: {found}"
    assert (
        HISTORY.search("a fix for Issue 14") and HISTORY.search("(was: 2)") and not HISTORY.search("tissue 3")
    )


def test_the_link_checker_finds_a_missing_file_and_a_missing_heading(tmp_path: Path):
    (tmp_path / "other.md").write_text("# Other page\n## Throughput: `nanogpt bench`\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n[a](#title) [b](https://example.com) [c](other.md#throughput-nanogpt-bench) "
        "[d](other.md#other-page)\n[gone](nowhere.md) [e](#missing) [f](other.md#nope) ![g](pic.png)\n"
        "```\n[in code](code.md)\n```\n"
    )
    assert broken_links(page) == [
        "nowhere.md",
        "#missing (no such heading)",
        "other.md#nope (no such heading)",
        "pic.png",
    ]
