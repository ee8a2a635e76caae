"""Documentation that matches the code."""

from __future__ import annotations

import re
from pathlib import Path

from fedsim.core import registry
from fedsim.core.loading import load_experiment
from fedsim.core.sweeps import load_sweep
from fedsim.docs import FAMILY_DIR, generated, key_files

ROOT = Path(__file__).resolve().parents[1]


def test_generated_files_are_current() -> None:
    """The key reference, the family pages and pyproject's Flower config (`flwr
    run .` from a checkout runs the packaged quickstart) match the code."""
    stale = [
        str(path.relative_to(ROOT))
        for path, text in generated(ROOT).items()
        if not path.exists() or path.read_text(encoding="utf-8") != text
    ]
    assert not stale, f"run `python -m fedsim.docs` to refresh {stale}"
    assert key_files(ROOT), "no page carries the experiment-key reference"


def test_every_family_has_its_page() -> None:
    pages = {p.stem for p in (ROOT / FAMILY_DIR).glob("*.md")} - {"index"}
    assert pages == set(registry.families())


def test_readme_links_resolve() -> None:
    """Relative links of the README name files that exist; anchors name headings."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    slugs = {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.*)$", text, re.M)
    }
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        if path and not (ROOT / path).exists():
            broken.append(target)
        elif not path and anchor not in slugs:
            broken.append(target)
    assert not broken, broken


def test_every_experiment_file_is_valid() -> None:
    files = sorted((ROOT / "experiments").glob("*.toml"))
    assert files
    for path in files:
        text = path.read_text(encoding="utf-8")
        if "[grid]" in text or "[[variants]]" in text:
            assert load_sweep(path)  # a sweep file: every experiment valid
        else:
            load_experiment(path)
