"""The repository as a whole: self-contained (no path that leaves it), Markdown links and cited doc sections that
resolve, LICENSE and CITATION.cff present and well-formed, the README's two commands."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Names of files that live outside the repository. Split so that this file does not match its own patterns.
OUTSIDE = re.compile("|".join((
    r"\b(?:METHOD|DESIGN)" + r"(?:\.md|\s*§)",  # the specs the project started from
    r"\.\./" + r"shared\b",  # a sibling folder of the checkout
    r"/work/" + r"(?:shared|main|notes|wt-)",  # the development machine's folders
)))
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
CITED_DOC = re.compile(r"\bdocs/([\w-]+\.md)(?:#([\w-]+))?")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def tracked_files() -> list[str]:
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [name for name in listing.stdout.decode().split("\0") if name and (ROOT / name).is_file()]


def read_text(name: str) -> str | None:
    """The file's text, or None for a binary file (images)."""
    try:
        return (ROOT / name).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def outside_references(text: str) -> list[str]:
    return [match.group(0) for match in OUTSIDE.finditer(text)]


def prose_lines(markdown: str) -> list[str]:
    """The lines of a Markdown text outside fenced code blocks."""
    lines, fenced = [], False
    for line in markdown.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """The anchors of a Markdown text's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(markdown):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(path: Path, root: Path) -> list[str]:
    """Relative links of a Markdown file that leave `root`, name a missing file, or a missing heading."""
    text = path.read_text(encoding="utf-8")
    problems = []
    for line in prose_lines(text):
        for target in MARKDOWN_LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            if root.resolve() not in (resolved, *resolved.parents):
                problems.append(f"{target}: leaves the repository")
            elif not resolved.exists():
                problems.append(f"{target}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text(encoding="utf-8")):
                problems.append(f"{target}: no heading with this anchor")
    return problems


def test_no_tracked_file_names_a_path_outside_the_repository() -> None:
    offenders = []
    for name in tracked_files():
        text = read_text(name)
        if text is not None:
            offenders += [f"{name}: {found}" for found in outside_references(text)]
    assert not offenders, "paths outside the repository:\n" + "\n".join(offenders)


def test_markdown_links_resolve_inside_the_repository() -> None:
    problems = []
    for name in tracked_files():
        if name.endswith(".md"):
            problems += [f"{name}: {problem}" for problem in broken_links(ROOT / name, ROOT)]
    assert not problems, "\n".join(problems)


def test_cited_doc_sections_exist() -> None:
    """`docs/<page>.md#<anchor>` in code, configs and prose names an existing page and heading."""
    problems = []
    for name in tracked_files():
        text = read_text(name)
        if text is None:
            continue
        for page, anchor in CITED_DOC.findall(text):
            target = ROOT / "docs" / page
            if not target.is_file():
                problems.append(f"{name}: docs/{page} does not exist")
            elif anchor and anchor not in anchors(target.read_text(encoding="utf-8")):
                problems.append(f"{name}: docs/{page} has no section #{anchor}")
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    assert outside_references("see " + "METHOD" + ".md §4 and " + ".." + "/shared/paper") != []
    assert outside_references("see docs/method.md#metrics") == []
    assert slug("Eq. 10 and 11 — partial softmax") == "eq-10-and-11--partial-softmax"
    assert slug("The paper's numbers") == "the-papers-numbers"
    (tmp_path / "repo" / "pages").mkdir(parents=True)
    (tmp_path / "outside.md").write_text("# Outside\n")
    (tmp_path / "repo" / "pages" / "page.md").write_text("# Page\n\n## A section\n\n```\n# not a heading\n```\n")
    page = tmp_path / "repo" / "README.md"
    page.write_text("[ok](pages/page.md#a-section) [up](../outside.md) [gone](pages/gone.md)\n"
                    "[bad](pages/page.md#nope) [code](pages/page.md#not-a-heading) [web](https://example.org/x.md)\n"
                    "![self](#readme)\n")
    assert anchors((tmp_path / "repo" / "pages" / "page.md").read_text()) == {"page", "a-section"}
    assert broken_links(page, tmp_path / "repo") == [
        "../outside.md: leaves the repository", "pages/gone.md: no such file",
        "pages/page.md#nope: no heading with this anchor", "pages/page.md#not-a-heading: no heading with this anchor",
        "#readme: no heading with this anchor",
    ]


def test_license_is_the_apache_license() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.lstrip().startswith("Apache License\n") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "Copyright 2026 the udtimm authors" in text


def test_citation_file_describes_this_software_and_the_paper() -> None:
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    for key in ("cff-version", "message", "title", "authors", "version", "license", "references"):
        assert citation.get(key), f"CITATION.cff lacks {key}"
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    version = re.search(r'^version\s*=\s*"([^"]+)"', pyproject, re.MULTILINE).group(1)
    assert (citation["cff-version"], citation["title"], citation["license"]) == ("1.2.0", "udtimm", "Apache-2.0")
    assert str(citation["version"]) == version
    paper = next(ref for ref in citation["references"] if ref.get("type") == "conference-paper")
    assert paper["title"] == ("Handling Difficult Labels for Multi-label Image Classification via Uncertainty "
                              "Distillation")
    assert (paper["year"], paper["doi"]) == (2021, "10.1145/3474085.3475406")
    assert [author["family-names"] for author in paper["authors"]] == ["Song", "Wu", "Yang", "Zhang", "Li", "Yuan"]


@pytest.mark.parametrize("command", ["pip install -r requirements.txt && python train.py", "python -m pytest -q"])
def test_readme_gives_the_two_commands(command: str) -> None:
    assert command in (ROOT / "README.md").read_text(encoding="utf-8")


def test_ci_runs_the_readme_test_command() -> None:
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def test_the_readme_stays_short_and_links_the_details() -> None:
    # `wc -w`'s count: the README is a front page; results and details live in docs/ and benchmarks/results/.
    assert len((ROOT / "README.md").read_text(encoding="utf-8").split()) < 1500
