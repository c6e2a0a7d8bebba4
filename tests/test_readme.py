"""The README stays a short user's guide, and no relative link in it or in docs/ is broken."""

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_BYTES = 15_000
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target), with an optional "title".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def relative_links(text: str) -> list[str]:
    """The targets of the markdown links outside code that point into the repository."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    targets = [match.group(1) for match in LINK.finditer(prose)]
    return [t for t in targets if not EXTERNAL.match(t) and not t.startswith("#")]


def test_readme_is_a_short_guide():
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, (
        f"README.md is {size:,} bytes (limit {MAX_README_BYTES:,}): "
        "move measurements to docs/benchmarks.md and details to docs/"
    )


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files(doc: Path):
    broken = []
    for target in relative_links(doc.read_text(encoding="utf-8")):
        path = unquote(target.split("#", 1)[0].split("?", 1)[0])
        resolved = (doc.parent / path).resolve()
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files: {broken}"


def test_links_are_found():
    """The link finder sees links and images, and skips code and external addresses."""
    text = (
        "See [design](docs/design.md#layout) and ![chart](race.png).\n"
        "`[not](a-link.md)` and [web](https://example.org) and [here](#top).\n"
        "```\n[inside](fenced.md)\n```\n"
    )
    assert relative_links(text) == ["docs/design.md#layout", "race.png"]
