"""The README stays a front door (short, every command listed) and the docs stay true to the tree:
every relative link and anchor resolves, every repository path they name exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qmoe_cli.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250  # the front pages of GPTQModel, llm-compressor and llama.cpp are 150-400
LINK = re.compile(r"\]\(([^)\s]+)\)")
# a path inside the repository, as the docs name them: `scripts/demo.py`, tests/test_pack.py, ...
REPO_PATH = re.compile(r"(?<![\w/.-])((?:scripts|tests|qmoe_cli|configs|kernels|docs)/[\w./-]*\w"
                       r"\.(?:py|sh|toml|cpp|cu|h|md))")


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)  # no headings inside code
    return {slug(m) for m in re.findall(r"^#+ (.*)$", text, re.MULTILINE)}


def test_readme_is_a_front_door() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (f"README.md has {len(lines)} lines, more than {README_MAX_LINES}: "
                                            "move detail to docs/")


def test_readme_lists_every_command() -> None:
    """The command summary names each command `qmoe --help` lists, so a new one gets its line."""
    readme = README.read_text()
    summary = readme.split("\n## Commands", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in main.commands if f"`qmoe {name}" not in summary]
    assert not missing, f"README.md's command summary lacks: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_and_anchors_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor} in {file.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_repository_paths_exist(page: Path) -> None:
    """A doc that names `scripts/x.py` or `qmoe_cli/formats/y.py` names a file that is there (a
    directory for a path without a suffix is not checked)."""
    missing = sorted({p for p in REPO_PATH.findall(page.read_text()) if not (ROOT / p).exists()})
    assert not missing, f"{page.name} names files that do not exist: {missing}"
