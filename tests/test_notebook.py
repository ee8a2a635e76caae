"""experiments/analysis.ipynb: committed without outputs, runs top to bottom."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "experiments" / "analysis.ipynb"


def test_notebook_is_committed_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1


@pytest.mark.slow
def test_notebook_executes_end_to_end(small_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Existing run + one tiny run the notebook starts through the CLI."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (at,) = [
        i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])
    ]
    params = (
        f"RUNS = [{str(small_run.run_dir)!r}]\n"
        'COMPARISON = {"tiny-iid": ["data.partitioner=iid"]}\n'
        'COMMON = ["rounds=2", "federation.clients=2", "model.name=mlp"]\n'
        f"OUT = {str(tmp_path / 'runs')!r}\n"
        "TARGET = 0.5\n"
    )
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(params))
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError on any failing cell

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # accuracy/loss, vs bytes, client spread (no epsilon)
    tables = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    comparison = next(t for t in tables if "rounds_to_target" in t)
    assert "quickstart" in comparison and "tiny-iid" in comparison
    (tiny,) = (tmp_path / "runs").iterdir()
    assert (tiny / "metrics.parquet").exists()
