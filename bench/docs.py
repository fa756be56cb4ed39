"""Keep one section per benchmark in docs/benchmarks.md, replaced in place on each run."""

from __future__ import annotations

import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def update_section(title: str, body: str, *, key: str | None = None) -> None:
    """Replace (or append) the section between ``<!-- bench:KEY -->`` markers."""
    key = key or re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40]
    begin, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    section = f"{begin}\n## {title}\n\n{body.strip()}\n{end}\n"
    content = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n\nFigures measured side by side in one run on the machine named in each section.\n"
    if begin in content and end in content:
        content = re.sub(re.escape(begin) + ".*?" + re.escape(end) + "\n?", lambda _: section, content, flags=re.S)
    else:
        content = content.rstrip("\n") + "\n\n" + section
    DOCS.write_text(content)
    print(f"updated {DOCS}", file=sys.stderr)
