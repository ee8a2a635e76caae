"""Link check of the documentation site and the README: every relative link names
a file that exists, every anchor names a heading (or an ``{#id}``) of the page it
points to, and every page under ``docs/`` is in ``mkdocs.yml``'s nav.

``mkdocs build --strict`` checks the site's own links as well (mkdocs.yml's
``validation:`` turns missing pages, anchors and nav entries into errors); this
test also covers the README, which is not part of the site, and runs without
building it. Anchors are the slugs Python-Markdown's ``toc`` extension gives the
site's headings.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)
_ATTR_ID = re.compile(r"\{[^}]*#([\w-]+)[^}]*\}")


def prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code (no links there)."""
    return _CODE.sub("", _FENCE.sub("", text))


def anchors(text: str) -> set[str]:
    """The ids a page's headings (and ``{#id}`` attributes) get on the site."""
    found: set[str] = set(_ATTR_ID.findall(text))
    seen: dict[str, int] = {}
    for heading in _HEADING.findall(_FENCE.sub("", text)):
        heading = _ATTR_ID.sub("", heading).strip()
        plain = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
        slug = slugify(plain, "-")
        if slug in seen:  # toc's unique(): a repeated heading gets _1, _2, ...
            seen[slug] += 1
            slug = f"{slug}_{seen[slug]}"
        else:
            seen[slug] = 0
        found.add(slug)
    return found


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` whose file or anchor does not exist."""
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in _LINK.findall(prose(text)):
        if re.match(r"[a-zA-Z][a-zA-Z+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
        elif anchor and file.suffix == ".md":
            if anchor not in anchors(file.read_text(encoding="utf-8")):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such anchor)")
    return broken


def test_every_relative_link_and_anchor_resolves() -> None:
    pages = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
    broken = [b for page in pages for b in broken_links(page)]
    assert not broken, "\n".join(broken)


def nav_pages(nav: object) -> list[str]:
    """Every page named in a mkdocs nav (nested lists and one-key mappings)."""
    if isinstance(nav, str):
        return [] if re.match(r"[a-z]+://", nav) else [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in nav_pages(item)]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in nav_pages(value)]
    return []


def load_mkdocs() -> dict:
    """mkdocs.yml, its ``!!python/name:`` tags read as plain strings."""
    loader = type("Loader", (yaml.SafeLoader,), {})
    loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda *_: None)
    return yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=loader)


def test_every_docs_page_is_in_the_nav() -> None:
    config = load_mkdocs()
    listed = nav_pages(config["nav"])
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages - set(listed) == set(), "pages missing from mkdocs.yml nav"
    assert set(listed) - pages == set(), "nav entries without a page"
    assert len(listed) == len(set(listed)), "a page is listed twice in the nav"
    strict = config["validation"]
    assert config["strict"] is True
    assert strict["links"]["anchors"] == strict["links"]["not_found"] == "warn"
    assert strict["nav"]["omitted_files"] == strict["nav"]["not_found"] == "warn"


def test_the_link_check_finds_what_is_broken(tmp_path: Path) -> None:
    """The checker itself: a missing file, a missing anchor, a good anchor, a
    repeated heading's second slug, and a link inside code (not a link)."""
    (tmp_path / "b.md").write_text(
        "# Title\n## Step `one` {#first}\n## Again\n## Again\n"
    )
    page = tmp_path / "a.md"
    page.write_text(
        "[ok](b.md#title) [ok](b.md#first) [ok](b.md#again_1) [ok](#here)\n"
        "# Here\n[bad](c.md) [bad](b.md#nowhere) `[code](c.md)`\n"
        "```\n[code](d.md)\n```\n"
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = broken_links(page)
    finally:
        ROOT = saved
    assert found == ["a.md: c.md (no such file)", "a.md: b.md#nowhere (no such anchor)"]


def test_readme_is_a_front_door() -> None:
    """At most ~200 lines; the install-and-run and the test command; a link to
    every tutorial and how-to guide of the site; how to cite the papers."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    setup = (
        'python3 -m venv .venv && . .venv/bin/activate && pip install "torch==2.13.0"'
    )
    assert f"{setup} -e . && fedsim run\n" in text
    assert f'{setup} -e ".[dev]" && pytest\n' in text
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", text))
    guides = {
        f"docs/{p.relative_to(DOCS)}"
        for folder in ("tutorials", "how-to")
        for p in (DOCS / folder).glob("*.md")
    }
    assert guides - linked == set(), "README does not link these guides"
    assert re.search(r"^## How to cite$", text, re.M)


def test_check_block_stops_a_benchmark_before_it_runs(tmp_path: Path) -> None:
    """``--write-docs`` on a page without the block's markers stops at once."""
    import sys

    import pytest

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from pages import check_block

    page = tmp_path / "p.md"
    page.write_text("<!-- results:t:start -->\n<!-- results:t:end -->\n")
    check_block(page, "t")  # markers there: nothing happens
    with pytest.raises(SystemExit, match="results:u:start"):
        check_block(page, "u")
