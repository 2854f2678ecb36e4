"""docs/benchmarks.md, one section per benchmark: each benchmark replaces its own
section and leaves the others as they are, byte for byte."""

from __future__ import annotations

import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nFigures measured on this project's machines, each with the command that reproduces it.\n"


def replace_section(title: str, section: str, doc: Path = DOC) -> None:
    """Replaces the ``## <title>…`` section of ``doc`` with ``section`` (which starts
    with its own ``## `` heading), or appends it when there is none yet."""
    text = doc.read_text() if doc.exists() else HEADER
    head, *sections = text.split("\n## ")
    new = section.strip("\n").removeprefix("## ") + "\n"
    at = _find(sections, title)
    if at is None:
        sections.append(new)
    else:
        sections[at] = new
    doc.write_text("\n## ".join(part if part.endswith("\n") else part + "\n" for part in [head, *sections]))
    print(f"wrote the '{title}' section of {doc}", file=sys.stderr)


def section_text(title: str, doc: Path = DOC) -> str:
    """The ``## <title>`` section of ``doc`` without its heading, or ""."""
    if not doc.exists():
        return ""
    _, *sections = doc.read_text().split("\n## ")
    at = _find(sections, title)
    return "" if at is None else sections[at]


def _find(sections: list[str], title: str) -> int | None:
    """The section headed ``title`` exactly, else the first whose heading starts so
    ("Relay overhead" heads "Relay overhead: tokens/s and …"); an exact match first,
    since "Prefix caching" is not "Prefix caching: what the figures say"."""
    headings = [s.split("\n", 1)[0] for s in sections]
    exact = next((i for i, h in enumerate(headings) if h == title), None)
    return exact if exact is not None else next((i for i, h in enumerate(headings) if h.startswith(title)), None)
