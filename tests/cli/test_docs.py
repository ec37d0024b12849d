"""The documentation site's pages: the API reference lists the public API, and the code blocks marked to run do run.

A Python block in docs/ preceded by `<!-- runs (tests/cli/test_docs.py) -->` is executed here, the marked blocks of a
page in order and in one namespace (a later block may use an earlier one's names), in an empty working folder.
`with A => B; C => D` after the marker shortens a block for the test (fewer training steps), replacing text A by B.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
MARKER = re.compile(r"^( *)<!-- runs \(tests/cli/test_docs\.py\)(?: with (.*?))? -->\n\1```python\n(.*?)^\1```",
                    re.M | re.S)


def runnable_blocks(page: Path) -> list[str]:
    """The marked Python blocks of a page, dedented, with their replacements applied."""
    blocks = []
    for indent, replacements, code in MARKER.findall(page.read_text()):
        code = textwrap.dedent(code)
        for pair in filter(None, (replacements or "").split(";")):
            old, new = (part.strip() for part in pair.split("=>"))
            assert old in code, f"{page.name}: {old!r} is not in the block it should replace in"
            code = code.replace(old, new)
        blocks.append(code)
    return blocks


PAGES = sorted(p for p in DOCS.rglob("*.md") if runnable_blocks(p))


def test_pages_mark_blocks_to_run():
    assert {p.relative_to(DOCS).as_posix() for p in PAGES} >= {"guide/sampling.md", "guide/training.md"}


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(DOCS).as_posix() for p in PAGES])
def test_marked_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_block"}
    for i, code in enumerate(runnable_blocks(page)):
        exec(compile(code, f"{page.relative_to(DOCS)} block {i + 1}", "exec"), namespace)


def test_the_api_reference_lists_exactly_the_public_api():
    from diffusion_pl import _PUBLIC

    listed = re.findall(r"^::: diffusion_pl\.([\w.]+)\.(\w+)$", (DOCS / "reference" / "api.md").read_text(), re.M)
    assert sorted(f"{module}.{name}" for module, name in listed) == \
        sorted(f"{module}.{name}" for name, module in _PUBLIC.items())
