"""Regenerate what is derived from the code: the experiment-key reference (in
every Markdown file of the repository that carries its markers), one page per
registered strategy family under ``docs/families/`` (the declaration's paper,
contract, deviations, capabilities and options; text after the generated block is
kept) and their entries in ``mkdocs.yml``'s nav, and the
``[tool.flwr.app.config]`` table of pyproject.toml (the packaged quickstart,
flattened, so that ``flwr run .`` runs the same apps).

Usage: ``python -m fedsim.docs`` from the repository root. ``tests/test_docs.py``
fails when a generated part and the code disagree.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path

import tomli_w

from fedsim.core import registry
from fedsim.core.family import Family
from fedsim.core.loading import (
    RUN_DIR_KEY,
    load_experiment,
    reference,
    reference_markdown,
    to_run_config,
)

START, END = "<!-- keys:start -->", "<!-- keys:end -->"
FAMILY_START, FAMILY_END = "<!-- family:start -->", "<!-- family:end -->"
TABLE_START, TABLE_END = "<!-- families:start -->", "<!-- families:end -->"
NAV_START, NAV_END = "# families-nav:start", "# families-nav:end"
FLWR_CONFIG = "[tool.flwr.app.config]"
#: where the family pages live, relative to the repository root
FAMILY_DIR = Path("docs") / "families"


def flower_config() -> dict[str, bool | int | float | str]:
    """Run-config defaults of the Flower App: the quickstart plus ``run-dir``."""
    return {**to_run_config(load_experiment(None)), RUN_DIR_KEY: ""}


def with_flower_config(pyproject: str) -> str:
    """``pyproject`` with its final ``[tool.flwr.app.config]`` table regenerated."""
    head, sep, _ = pyproject.partition(FLWR_CONFIG)
    if not sep:
        raise ValueError(f"pyproject.toml has no {FLWR_CONFIG} table")
    table = tomli_w.dumps({"tool": {"flwr": {"app": {"config": flower_config()}}}})
    return head + table


def replace_block(text: str, start: str, end: str, block: str) -> str:
    """``text`` with the part between the markers replaced by ``block``."""
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    return f"{head}{start}\n{block}{end}{tail}"


def with_reference(text: str) -> str:
    """``text`` with the block between the key markers replaced by the reference."""
    return replace_block(text, START, END, reference_markdown())


def markdown_of_rest(doc: str) -> str:
    """A reStructuredText docstring as Markdown: roles and double backquotes
    become code spans, numpy-style section underlines become bold labels."""
    doc = re.sub(r":(?:mod|class|func|data|meth|attr):`~?([^`]+)`", r"`\1`", doc)
    doc = doc.replace("``", "`")
    lines = doc.splitlines()
    out: list[str] = []
    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and set(nxt.strip()) == {"-"} and len(nxt.strip()) >= 3:
            out.append(f"**{line.strip()}**")
            continue
        if set(line.strip()) == {"-"} and len(line.strip()) >= 3 and out:
            continue
        out.append(line)
    return "\n".join(out).strip() + "\n"


def family_markdown(family: Family) -> str:
    """The generated part of a family's page."""
    module = family.server.partition(":")[0].rsplit(".", 1)[0]
    declaration = importlib.import_module(module)
    yes = {True: "yes", False: "no"}
    rows = [
        ("`strategy.name`", f"`{family.name}`"),
        ("server", f"`{family.server}`"),
        ("client", f"`{family.client}`"),
        ("`peft.method`", ", ".join(f"`{m}`" for m in family.peft)),
        ("global model", yes[family.global_model]),
        ("`privacy.mechanism`", ", ".join(f"`{m}`" for m in family.privacy)),
        ("custom actions", ", ".join(f"`{a}`" for a in family.actions) or "none"),
        ("privacy audit", yes[bool(family.audit)]),
    ]
    lines = [f"# `{family.name}`", "", family.summary, ""]
    lines += ["| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Declaration", ""]
    lines.append(markdown_of_rest(declaration.__doc__ or "(no docstring)"))
    options = reference(family.name)
    lines += ["## Options", ""]
    if options:
        lines += ["| key | default | meaning |", "| --- | --- | --- |"]
        lines += [f"| `{k}` | `{d}` | {h} |" for k, d, h in options]
    else:
        lines.append("None of its own: the experiment keys apply.")
    return "\n".join(lines) + "\n"


def family_page(family: Family, current: str | None) -> str:
    """The page of ``family``: the generated block, then the text kept after it."""
    block = family_markdown(family)
    if current is None or FAMILY_START not in current:
        return f"{FAMILY_START}\n{block}{FAMILY_END}\n"
    return replace_block(current, FAMILY_START, FAMILY_END, block)


def families_table(link_dir: str) -> str:
    """Every registered family, a row each, linked to its page in ``link_dir``."""
    lines = ["| family | what it is |", "| --- | --- |"]
    lines += [
        f"| [`{name}`]({link_dir}{name}.md) | {family.summary} |"
        for name, family in sorted(registry.families().items())
    ]
    return "\n".join(lines) + "\n"


def families_index() -> str:
    """``docs/families/index.md``: every registered family, a line each."""
    lines = [
        "# Strategy families",
        "",
        "Every registered family (`fedsim list`), generated from its declaration by",
        "`python -m fedsim.docs`. A plug-in family gets its page the same way.",
        "",
        "| family | what it is |",
        "| --- | --- |",
    ]
    return "\n".join(lines[:-2]) + "\n" + families_table("")


def with_families_nav(mkdocs_yml: str) -> str:
    """``mkdocs.yml`` with the family pages listed between its nav markers (the
    markers' indentation is kept), so every generated page is in the site's nav."""
    found = re.search(
        rf"^( *){re.escape(NAV_START)}\n(?:.*\n)*?( *){re.escape(NAV_END)}",
        mkdocs_yml,
        re.M,
    )
    if not found:
        raise ValueError(f"mkdocs.yml has no {NAV_START} ... {NAV_END} pair")
    indent = found.group(1)
    lines = [f"{indent}{NAV_START}", f"{indent}- families/index.md"]
    lines += [
        f"{indent}- {name}: families/{name}.md" for name in sorted(registry.families())
    ]
    lines.append(f"{indent}{NAV_END}")
    return mkdocs_yml[: found.start()] + "\n".join(lines) + mkdocs_yml[found.end() :]


def key_files(root: Path) -> list[Path]:
    """Markdown files that carry the key reference's markers."""
    found = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    return [p for p in found if p.exists() and START in p.read_text(encoding="utf-8")]


def generated(root: Path) -> dict[Path, str]:
    """Every generated file of the repository at ``root`` and its current text."""
    out: dict[Path, str] = {}
    for path in key_files(root):
        out[path] = with_reference(path.read_text(encoding="utf-8"))
    pages = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    for path in pages:
        text = out.get(path) or (
            path.read_text(encoding="utf-8") if path.exists() else ""
        )
        if TABLE_START in text:
            rel = os.path.relpath(root / FAMILY_DIR, path.parent).replace(os.sep, "/")
            table = families_table("" if rel == "." else f"{rel}/")
            out[path] = replace_block(text, TABLE_START, TABLE_END, table)
    for name, family in sorted(registry.families().items()):
        page = root / FAMILY_DIR / f"{name}.md"
        current = page.read_text(encoding="utf-8") if page.exists() else None
        out[page] = family_page(family, current)
    out[root / FAMILY_DIR / "index.md"] = families_index()
    mkdocs_yml = root / "mkdocs.yml"
    if mkdocs_yml.exists():
        out[mkdocs_yml] = with_families_nav(mkdocs_yml.read_text(encoding="utf-8"))
    pyproject = root / "pyproject.toml"
    out[pyproject] = with_flower_config(pyproject.read_text(encoding="utf-8"))
    return out


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else ".")
    if not key_files(root):
        print(
            f"{root}: no Markdown file has the markers {START} / {END}", file=sys.stderr
        )
        return 2
    for path, text in generated(root).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
