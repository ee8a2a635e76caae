"""Regenerate the experiment-file reference in README.md from the config schema.

Usage: ``python -m fedsim.docs [README.md]``. ``tests/test_docs.py`` fails when the
README's table and the code disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedsim.config import reference_markdown

START, END = "<!-- keys:start -->", "<!-- keys:end -->"


def with_reference(text: str) -> str:
    """``text`` with the block between the markers replaced by the reference."""
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{reference_markdown()}{END}{tail}"


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "README.md")
    text = path.read_text(encoding="utf-8")
    if START not in text or END not in text:
        print(f"{path}: markers {START} / {END} not found", file=sys.stderr)
        return 2
    path.write_text(with_reference(text), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
