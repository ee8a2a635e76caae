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


def test_results_blocks_are_written_by_a_script() -> None:
    """Every results table in the docs is a block that a benchmark script writes
    (its name appears in that script's source, which calls ``write_block``)."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from pages import blocks, markers

    scripts = {
        p.name: p.read_text(encoding="utf-8")
        for p in (ROOT / "benchmarks").glob("*.py")
        if "write_block" in p.read_text(encoding="utf-8")
    }
    orphans = []
    for page in sorted((ROOT / "docs").rglob("*.md")):
        text = page.read_text(encoding="utf-8")
        for name in blocks(text):
            start, end = markers(name)
            inside = text.split(start, 1)[1].split(end, 1)[0]
            writers = [s for s, src in scripts.items() if f'"{name}"' in src]
            if not writers or "written by `python benchmarks/" not in inside:
                orphans.append(f"{page.relative_to(ROOT)}:{name}")
    assert not orphans, f"results blocks no benchmark script writes: {orphans}"


def test_write_block_replaces_only_its_block(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from pages import write_block

    page = tmp_path / "p.md"
    page.write_text("a\n<!-- results:t:start -->\nold\n<!-- results:t:end -->\nb\n")
    write_block(page, "t", "| x |\n|---|\n| 1 |", script="demo.py")
    text = page.read_text()
    assert text.startswith(
        "a\n<!-- results:t:start -->\n<!-- written by `python benchmarks/demo.py"
    )
    assert (
        "| 1 |" in text
        and "old" not in text
        and text.endswith("<!-- results:t:end -->\nb\n")
    )
    page.write_text("no markers\n")
    try:
        write_block(page, "t", "x", script="demo.py")
    except ValueError as err:
        assert "results:t:start" in str(err)
    else:  # pragma: no cover - the check above must refuse
        raise AssertionError("a page without markers was written")
