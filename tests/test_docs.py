"""The README and the pages under docs/ say what the code does: every ```python block in them
runs, every link between them resolves, and the benchmark page's published tables are what
``python -m benchmarks --publish`` wrote.

A block runs as a script of its own, in a fresh interpreter, in an empty directory, and must
exit 0. The line before its fence may say how:

- nothing: ``python block.py``;
- ``<!-- run under: aiotimer run -->``: ``python -m aiotimer run -- python block.py``, so that a
  worker's ``aiotimer.expires``/``timer`` really talk to a watchdog;
- ``<!-- run under: pytest -->``: the block is a test module, run by pytest with the set-up that
  docs/testing.md describes (``aiotimer.pytest_plugin`` in a ``conftest.py``);
- ``<!-- not run: REASON -->``: only compiled (it needs torch, GPUs, several hosts...); a few
  such blocks at most.

Other fenced blocks (console sessions, output pasted from real runs, YAML) are not run, but every
fence must name its language, so that no Python block can slip past as untagged.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
#: Seconds a block may take (they take about one; a loaded 2-core machine is slow to start
#: interpreters, and a failure to finish is reported with the block's output).
TIMEOUT = 120

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
COMMENT = re.compile(r"^\s*<!--(?P<body>.*?)-->\s*$")
DIRECTIVE = re.compile(r"^\s*(?P<kind>not run|run under)\s*:\s*(?P<value>.*?)\s*$")
RUNNERS = ("aiotimer run", "pytest")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    directive: str | None  # the comment on the line before the fence, if any

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def kind(self) -> str | None:
        match = DIRECTIVE.match(self.directive or "")
        return match["kind"] if match else None

    @property
    def value(self) -> str:
        match = DIRECTIVE.match(self.directive or "")
        return match["value"] if match else ""


def fenced_blocks(page: Path) -> list[Block]:
    lines = page.read_text().split("\n")
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not (
            lines[j].strip().startswith(fence) and set(lines[j].strip()) == {fence[0]}
        ):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        assert j < len(lines), f"{page.name}:{i + 1}: a fence that is never closed"
        before = COMMENT.match(lines[i - 1]) if i > 0 else None
        blocks.append(
            Block(
                page=page,
                line=i + 1,
                lang=opening["info"].strip().split(" ")[0],
                code="\n".join(body) + "\n",
                directive=before["body"].strip() if before else None,
            )
        )
        i = j + 1
    return blocks


def outside_fences(page: Path) -> list[str]:
    """The page's lines outside its fenced blocks."""
    kept: list[str] = []
    in_fence: str | None = None
    for line in page.read_text().split("\n"):
        opening = FENCE.match(line)
        if in_fence is None and opening is not None:
            in_fence = opening["fence"]
        elif in_fence is not None and line.strip().startswith(in_fence):
            in_fence = None
        elif in_fence is None:
            kept.append(line)
    return kept


def prose(page: Path) -> str:
    """The page without its fenced blocks and inline code (where links are not links)."""
    return "\n".join(re.sub(r"`[^`]*`", "", line) for line in outside_fences(page))


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings."""
    seen: Counter[str] = Counter()
    out: set[str] = set()
    for line in outside_fences(page):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading is None:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading[1])
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        out.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    return out


BLOCKS = [block for page in PAGES for block in fenced_blocks(page)]
PYTHON = [block for block in BLOCKS if block.lang == "python"]
RUN = [block for block in PYTHON if block.kind != "not run"]


def test_the_readme_opens_with_the_two_commands() -> None:
    """A newcomer's first two commands, as CI runs the second one."""
    commands = [line[4:] for line in README.read_text().split("\n")[:14] if line.startswith("    ")]
    assert commands == [
        "pip install -e '.[metrics]' && aiotimer run -n 4 --max-restarts 1 -- python "
        "examples/flaky_worker.py",
        "pip install -e '.[test,torch,bench,metrics]' && python -m pytest",
    ]
    ci = (ROOT / ".ci" / "run").read_text().split("\n")
    assert ci[ci.index("# The README's test command, exactly:") + 1] == commands[1]


def test_every_fence_names_its_language() -> None:
    untagged = [block.id for block in BLOCKS if not block.lang]
    assert untagged == [], "tag them (```text for output, ```console for a session)"


def test_the_markers_are_well_formed_and_few() -> None:
    assert len(PYTHON) >= 6, "the Markdown parser found too few Python blocks"
    for block in BLOCKS:
        if block.directive is not None and block.kind is None:
            assert "run" not in block.directive.lower(), f"{block.id}: {block.directive!r}"
        if block.kind is not None:
            assert block.lang == "python", f"{block.id}: a marker on a {block.lang} block"
        if block.kind == "run under":
            assert block.value in RUNNERS, f"{block.id}: run under {block.value!r}?"
        if block.kind == "not run":
            assert len(block.value.split()) >= 4, f"{block.id}: say why it is not run"
        if re.search(r"^(async )?def test_", block.code, re.M) and block.kind != "not run":
            assert block.value == "pytest", f"{block.id}: a test module runs under pytest"
    # A marker anywhere else (a typo'd fence, a blank line in between) would silently do nothing.
    for page in PAGES:
        lines = page.read_text().split("\n")
        for number, line in enumerate(lines, 1):
            comment = COMMENT.match(line)
            if comment and DIRECTIVE.match(comment["body"].strip()):
                following = lines[number] if number < len(lines) else ""
                assert FENCE.match(following), f"{page.name}:{number}: not before a fence"
    skipped = [block.id for block in PYTHON if block.kind == "not run"]
    assert len(skipped) * 5 <= len(PYTHON), f"too many blocks are not run: {skipped}"


@pytest.mark.parametrize("block", PYTHON, ids=[block.id for block in PYTHON])
def test_every_python_block_compiles(block: Block) -> None:
    """Blocks that are not run are compiled all the same (fragments may ``await``)."""
    compile(block.code, block.id, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN, ids=[block.id for block in RUN])
def test_every_python_block_runs(block: Block, tmp_path: Path) -> None:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("AIOTIMER_", "PYTEST_", "TORCHELASTIC_"))
    }
    script = tmp_path / "block.py"
    script.write_text(block.code)
    command = [sys.executable, str(script)]
    if block.value == "aiotimer run":
        command = [sys.executable, "-m", "aiotimer", "run", "--", *command]
    elif block.value == "pytest":
        script = script.rename(tmp_path / "test_block.py")
        (tmp_path / "conftest.py").write_text('pytest_plugins = ["aiotimer.pytest_plugin"]\n')
        (tmp_path / "pytest.ini").write_text(
            "[pytest]\nasyncio_default_fixture_loop_scope = function\nfilterwarnings = error\n"
        )
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", script.name]
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, (
        f"{block.id} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    if block.value == "pytest":
        assert re.search(r"\b[1-9]\d* passed", result.stdout), result.stdout


def test_every_link_between_the_pages_resolves() -> None:
    broken: list[str] = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(page)):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


def test_the_readme_links_every_page() -> None:
    linked = set(re.findall(r"\]\(docs/([^)#\s]+)", prose(README)))
    assert linked == {page.name for page in PAGES[1:]}


def _publish(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """benchmarks/__main__.py, where ``--publish`` is implemented (imported, not run)."""
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("benchmarks.__main__")


def test_the_published_tables_are_the_last_published_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--publish`` writes benchmarks/results/latest.md and, from it, the page's tables
    between its two marker lines: the page shows exactly that run."""
    publish = _publish(monkeypatch)
    assert publish.PUBLISHED_PAGE == ROOT / "docs" / "benchmarks.md"
    page = publish.PUBLISHED_PAGE.read_text()
    commit = re.search(r"\(\d+ s\), at commit (\w+)\.\n", page)
    assert commit, "the published tables name the commit they measured"
    latest = (ROOT / "benchmarks" / "results" / "latest.md").read_text()
    tables = publish.published_tables(latest, commit[1])
    assert publish.publish_into(page, tables) == page
    assert "#### Kill latency" in tables and "**" not in tables.split("\n")[2]


def test_publishing_rewrites_only_between_the_markers(monkeypatch: pytest.MonkeyPatch) -> None:
    publish = _publish(monkeypatch)
    begin, end = publish.PUBLISHED_BEGIN, publish.PUBLISHED_END
    page = f"# B\n\nabove\n\n{begin}\n\nold\n\n{end}\n\nbelow\n"
    new = publish.publish_into(page, "new\n")
    assert new == f"# B\n\nabove\n\n{begin}\n\nnew\n\n{end}\n\nbelow\n"
    assert publish.publish_into(new, "new") == new
    for broken in (page.replace(end, ""), page.replace(begin, ""), f"{end}\n{begin}\n"):
        with pytest.raises(ValueError):
            publish.publish_into(broken, "new")
