"""Replace one generated section of a markdown file, between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->`` markers, so that re-running a script rewrites only its own section.

Used by the scripts that write docs (``model_table.py``, ``bench_models.py``).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

from regkit.data.io import atomic_write  # noqa: E402


def markers(name: str):
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def read_section(path: Path, name: str):
    """The text between the markers, or None when the file or the markers are absent."""
    start, end = markers(name)
    if not path.exists():
        return None
    match = re.search(re.escape(start) + r"\n(.*?)" + re.escape(end), path.read_text(), flags=re.S)
    return match.group(1) if match else None


def replace_section(path: Path, name: str, body: str) -> Path:
    """Write ``body`` between the markers of ``name`` in ``path`` (atomically); without markers,
    append the marked section at the end of the file (created if missing)."""
    start, end = markers(name)
    body = body.rstrip("\n") + "\n"
    text = path.read_text() if path.exists() else ""
    block = f"{start}\n{body}{end}"
    pattern = re.escape(start) + r"\n.*?" + re.escape(end)
    if re.search(pattern, text, flags=re.S):
        text = re.sub(pattern, lambda _: block, text, count=1, flags=re.S)
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
