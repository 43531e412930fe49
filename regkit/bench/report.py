"""Writing benchmark results: marker-delimited sections of markdown files (so a script rewrites
only its own table), markdown tables, CSV files and the command line that reproduces a table.
Every file is written atomically (temporary file, then rename)."""
from __future__ import annotations

import csv
import re
import shlex
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from regkit.data.io import atomic_write

PathLike = Union[str, Path]


# -- generated sections of markdown files ---------------------------------------------------------
def markers(name: str) -> Tuple[str, str]:
    """``<!-- NAME:start -->`` and ``<!-- NAME:end -->``: the lines around a generated section."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def _section_pattern(name: str) -> "re.Pattern[str]":
    start, end = markers(name)
    return re.compile(re.escape(start) + r"\n(.*?)" + re.escape(end), flags=re.S)


def read_section(path: PathLike, name: str) -> Optional[str]:
    """The text between the markers of ``name`` in ``path``, or ``None`` when the file or the
    markers are absent."""
    path = Path(path)
    if not path.exists():
        return None
    match = _section_pattern(name).search(path.read_text())
    return match.group(1) if match else None


def replace_section(path: PathLike, name: str, body: str) -> Path:
    """Write ``body`` between the markers of ``name`` in ``path``, atomically, leaving the rest of
    the file as it was; without the markers, append the marked section at the end of the file
    (created if missing). A file with the start marker but no end marker is refused."""
    path = Path(path)
    start, end = markers(name)
    body = body.rstrip("\n") + "\n"
    text = path.read_text() if path.exists() else ""
    block = f"{start}\n{body}{end}"
    pattern = _section_pattern(name)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    elif start in text or end in text:
        raise ValueError(f"{path}: section '{name}' has only one of its markers {start} / {end}")
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    return write_text(path, text)


# -- files --------------------------------------------------------------------------------------
def write_text(path: PathLike, text: str) -> Path:
    """``path.write_text(text)``, atomically (creating the folder)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_csv(path: PathLike, rows: Iterable[Dict[str, Any]], fields: Optional[Sequence[str]] = None) -> Path:
    """Rows (dicts) as CSV, atomically; the columns are ``fields`` (keys not in it are left out)
    or the first row's keys."""
    rows = list(rows)
    fields = list(fields) if fields is not None else list(rows[0]) if rows else []

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    return atomic_write(path, write)


# -- markdown -----------------------------------------------------------------------------------
def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: Optional[str] = None) -> str:
    """A markdown table; ``align`` is one character per column (``l`` or ``r``), default left."""
    header = [str(h) for h in header]
    rule = ["---:" if a == "r" else "---" for a in (align or "l" * len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt_seconds(t: Optional[float]) -> str:
    """``20.8 ms`` below a second, ``4.77 s`` above; ``–`` for no value."""
    if t is None:
        return "–"
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def command_line(script: str, argv: Sequence[str], drop: Sequence[str] = ("--out",)) -> str:
    """The command that reproduces a table: ``script`` and its arguments (quoted for a POSIX
    shell), without the options in ``drop`` (and their values), which only say where the table
    goes."""
    kept: List[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in drop:
            skip = True
            continue
        if any(arg.startswith(d + "=") for d in drop):
            continue
        kept.append(shlex.quote(arg))
    return " ".join([script, *kept])
