"""Documentation that matches the code."""

from __future__ import annotations

from pathlib import Path

from fedsim.core.loading import load_experiment
from fedsim.core.sweeps import load_sweep
from fedsim.docs import with_flower_config, with_reference

ROOT = Path(__file__).resolve().parents[1]


def test_readme_key_reference_is_current() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert with_reference(text) == text, "run `python -m fedsim.docs` to refresh"


def test_pyproject_flower_config_is_current() -> None:
    """`flwr run .` from a checkout runs the packaged quickstart."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert with_flower_config(text) == text, "run `python -m fedsim.docs` to refresh"


def test_every_experiment_file_is_valid() -> None:
    files = sorted((ROOT / "experiments").glob("*.toml"))
    assert files
    for path in files:
        text = path.read_text(encoding="utf-8")
        if "[grid]" in text or "[[variants]]" in text:
            assert load_sweep(path)  # a sweep file: every experiment valid
        else:
            load_experiment(path)
