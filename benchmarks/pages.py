"""Results tables live in the documentation pages they belong to, written by
the benchmark script that measured them — the pages never carry a hand-copied
number.

A page marks each generated table with a pair of comments::

    <!-- results:baselines-compare:start -->
    ... (rewritten by the script) ...
    <!-- results:baselines-compare:end -->

:func:`write_block` replaces what lies between them (the markers stay, and the
first line inside names the script and the command that wrote it). A script
prints its table as before and, with ``--write-docs``, also writes it into the
page. ``tests/test_docs.py`` checks that every block in ``docs/`` names a
script in ``benchmarks/`` that writes that block.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def markers(name: str) -> tuple[str, str]:
    """The start and end comments of block ``name``."""
    if not _NAME.match(name):
        raise ValueError(
            f"results block name {name!r}: lower-case letters, digits, '-'"
        )
    return f"<!-- results:{name}:start -->", f"<!-- results:{name}:end -->"


def provenance(script: str | None = None, argv: list[str] | None = None) -> str:
    """The line that says which command wrote a block."""
    argv = sys.argv[1:] if argv is None else argv
    script = script or Path(sys.argv[0]).name
    args = " ".join(shlex.quote(a) for a in argv if a != "--write-docs")
    command = f"python benchmarks/{Path(script).name} {args}".rstrip()
    return f"<!-- written by `{command}`; rerun it to refresh this table -->"


def write_block(
    page: str | Path, name: str, text: str, *, script: str | None = None
) -> Path:
    """Replace block ``name`` of ``docs/<page>`` with ``text``; the page must
    already carry both markers (the place of a table is an author's choice)."""
    path = page if isinstance(page, Path) else DOCS / page
    start, end = markers(name)
    source = path.read_text(encoding="utf-8")
    if (
        source.count(start) != 1
        or source.count(end) != 1
        or source.index(start) > source.index(end)
    ):
        raise ValueError(f"{path}: needs exactly one {start} ... {end} pair")
    head, rest = source.split(start, 1)
    _, tail = rest.split(end, 1)
    body = f"{start}\n{provenance(script)}\n\n{text.strip()}\n\n{end}"
    path.write_text(head + body + tail, encoding="utf-8")
    return path


def check_block(page: str | Path, name: str) -> None:
    """Stop at once (before a long benchmark runs) when ``docs/<page>`` lacks
    the markers of block ``name``; :func:`write_block` would refuse at the end."""
    path = page if isinstance(page, Path) else DOCS / page
    start, end = markers(name)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if text.count(start) != 1 or text.count(end) != 1:
        sys.exit(
            f"--write-docs: {path} needs one {start} ... {end} pair where the "
            "table goes (a table never regenerated stays plain text)"
        )


def blocks(text: str) -> list[str]:
    """Names of the results blocks in a page's text."""
    return re.findall(r"<!-- results:([a-z0-9-]+):start -->", text)
