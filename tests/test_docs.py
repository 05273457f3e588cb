"""The documentation holds together: every relative link in README.md and docs/*.md reaches a file (and
a heading, for #anchors), the README stays short, and every config override its code blocks show
composes. Fast: nothing is trained, no rank is started."""

import re
import shlex
from pathlib import Path

import pytest

from bigtrain.config import compose
from bigtrain.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250

FENCE = re.compile(r"^(```|~~~)(.*)$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`[^`]*`")
# Top-level keys of bigtrain's config (bigtrain/config/schema.py): an override names one of them.
CONFIG_ROOTS = ("model", "data", "eval", "zero", "offload", "precision", "parallel", "comm", "optimizer",
                "scheduler", "train", "checkpoint", "logging", "fault", "sweep", "seed", "run_dir", "deepspeed")
OVERRIDE = re.compile(r"^\+{0,2}(" + "|".join(CONFIG_ROOTS) + r")(\.[A-Za-z0-9_]+)*=\S.*$")


def split_blocks(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The lines outside fenced code blocks, and each fenced block as (info string, lines)."""
    prose, blocks, block = [], [], None
    for line in text.splitlines():
        fence = FENCE.match(line.strip())
        if fence and block is None:
            block = (fence.group(2).strip(), [])
        elif fence:
            blocks.append(block)
            block = None
        elif block is not None:
            block[1].append(line)
        else:
            prose.append(line)
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    prose, _ = split_blocks(page.read_text())
    found, seen = set(), {}
    for line in prose:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            found.add(base if count == 0 else f"{base}-{count}")
            seen[base] = count + 1
    return found


def relative_links(page: Path) -> list[str]:
    prose, _ = split_blocks(page.read_text())
    links = []
    for line in prose:
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                links.append(target)
    return links


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(f"{target}: no file {destination}")
        elif anchor and (destination.suffix != ".md" or anchor not in anchors(destination)):
            broken.append(f"{target}: no heading '#{anchor}' in {destination.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)} has broken links:\n" + "\n".join(broken)


def test_docs_pages_are_all_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README) if t.partition("#")[0]}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link to: {unlinked}"


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, \
        f"README.md has {lines} lines; keep it at most {README_MAX_LINES} (move detail to docs/)"


def command_lines(lines: list[str]) -> list[str]:
    """Logical lines of a shell block: continuations joined, a leading `$ ` prompt removed."""
    joined, pending = [], ""
    for line in lines:
        text = line.rstrip()
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        joined.append(pending + text)
        pending = ""
    if pending:
        joined.append(pending)
    return [line.removeprefix("$ ") for line in joined]


def overrides_in(line: str, python: bool) -> list[str]:
    """The bigtrain overrides on one line of a code block (shell words, or string literals in Python);
    anything else (environment variables, flags, shell variables, output) is left out."""
    if python:
        words = re.findall(r"\"([^\"]*)\"|'([^']*)'", line.split("#", 1)[0])
        words = [a or b for a, b in words]
    else:
        try:
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)  # `;`, `|`, `&&` end a word
            lexer.whitespace_split, lexer.commenters = True, "#"
            words = list(lexer)
        except ValueError:  # output with an unbalanced quote: plain words will do
            words = line.split()
    found = {}
    for word in words:
        parts = word.split()
        # A quoted list of overrides ("a=1 b=2", as a shell loop holds them) is several; a quoted value
        # with spaces ('data.sources=[{path: A, weight: 0.7}]') is one.
        for part in parts if all(OVERRIDE.match(p) for p in parts) else [word]:
            if "$" not in part and OVERRIDE.match(part):
                found[part.split("=", 1)[0].lstrip("+")] = part  # the last value of a key wins, as in a loop
    return list(found.values())


def readme_overrides() -> list[tuple[str, list[str]]]:
    _, blocks = split_blocks(README.read_text())
    found = []
    for info, lines in blocks:
        python = info.startswith("python")
        for line in (lines if python else command_lines(lines)):
            overrides = overrides_in(line, python)
            if overrides:
                found.append((line.strip(), overrides))
    return found


def test_readme_shows_overrides():
    assert len(README_OVERRIDES) >= 5, "the README's code blocks should show the overrides its tour runs"


README_OVERRIDES = readme_overrides()


@pytest.mark.parametrize("line, overrides", README_OVERRIDES,
                         ids=[f"command{number}" for number in range(len(README_OVERRIDES))])
def test_every_override_in_the_readme_composes(line, overrides):
    try:
        compose(overrides)
    except ConfigError as err:
        pytest.fail(f"README.md shows overrides that do not compose: {overrides}\n  in: {line[:200]}\n  {err}")
