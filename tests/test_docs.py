"""The documentation: the site builds strictly (a broken link or anchor in docs/ fails the build), every
relative link of README.md and docs/*.md points to a file and heading that exist, and the README stays the
short front door whose Quickstart block holds exactly the two commands CI and the hooks read."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
QUICKSTART = [
    "pip install torch==2.13.0 && pip install -e . && alignkit quickstart",
    'pip install torch==2.13.0 && pip install -e ".[dev]" && python -m pytest -q',
]
MAX_README_LINES = 220

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where links are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _slugs(text: str) -> set[str]:
    """The anchors of a page's headings, as GitHub makes them and as MkDocs (Python-Markdown's toc) does; a
    link is good when either matches, since README links are read on GitHub and docs links on the site."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for match in HEADING.finditer(FENCE.sub("", text)):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(2))  # a link in a heading: its text
        title = title.replace("`", "").replace("*", "")
        github = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        if github in seen:  # GitHub numbers repeated headings: x, x-1, x-2
            seen[github] += 1
            found.add(f"{github}-{seen[github]}")
        else:
            seen[github] = 0
            found.add(github)
        ascii_title = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
        found.add(re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", ascii_title).strip().lower()))
    return found


def _broken_links(page: Path, inside: Path | None = None) -> list[str]:
    """Relative links of `page` whose file (or heading) does not exist; with `inside`, links that leave that
    folder too (MkDocs cannot follow a docs page out of docs/)."""
    broken = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("/"):
            continue  # http(s):, mailto:, absolute paths: not checked here
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if inside is not None and not dest.is_relative_to(inside.resolve()):
            broken.append(f"{target} (outside {inside.name}/: write it as code, not as a link)")
        elif not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _slugs(dest.read_text(encoding="utf-8")):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    return broken


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        message = 'mkdocs is not installed (pip install "mkdocs>=1.6", a dev dependency)'
        if os.environ.get("CI"):
            pytest.fail(message + ": CI must build the docs")
        pytest.skip(message)
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()


def test_every_readme_link_resolves() -> None:
    assert _broken_links(README) == []


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_every_docs_link_resolves_inside_docs(page: Path) -> None:
    assert _broken_links(page, inside=DOCS) == []


def test_the_link_checker_catches_a_broken_link(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# A page\n## Some `code`: here\n", encoding="utf-8")
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md) [ok](a.md#a-page) [ok](a.md#some-code-here) [ok](#b) `[code](x.md)`\n"
        "[missing](c.md) [bad anchor](a.md#nope) [web](https://example.com/x.md)\n# B\n",
        encoding="utf-8",
    )
    assert _broken_links(page) == ["c.md (no such file)", "a.md#nope (no heading #nope in a.md)"]


def test_the_readme_is_short_and_its_quickstart_holds_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_README_LINES, "the README is the front door: move reference to docs/"
    # read as .ci/run and the before-stop hook read it: the first code block after the Quickstart heading
    heading = re.search(r"^#+\s*quick\s*-?start.*?$", text, re.I | re.M)
    assert heading, "README.md has no Quickstart heading"
    block = re.search(r"```[^\n]*\n(.*?)```", text[heading.end() :], re.S)
    assert block, "no code block under the Quickstart heading"
    lines = [line.strip() for line in block.group(1).splitlines()]
    assert [line for line in lines if line and not line.startswith("#")] == QUICKSTART
