"""The quickstart gives the metrics it gave before the engine refactor, on any CPU.

``tests/data/quickstart_rounds3.csv`` holds every non-timing row of ``fedsim run
--set rounds=3`` recorded before families, the round driver and the one training
loop replaced the old engine (round 0's server loss re-recorded once since, when
the digits arrays got canonical strides). The run here is the same ServerApp
and ClientApp code in-process (:mod:`tests.inprocess`; tests/test_resume.py
shows it equals a run through Flower and Ray).

Tolerance: the model trains in float32 (unit roundoff ``u = 2**-24 ~ 6e-8``).
Another CPU (or another BLAS kernel: AVX-512 vs AVX2, another thread split) sums
the same float32 products in another order, and a sum of ``n`` terms in another
order may differ by up to ``~n*u`` relative (a few ``u`` in practice); three
rounds of SGD then carry such differences forward. Measured between an Intel
and an AMD EPYC machine: 41 of 317 values differed, by at most 1.5e-7 relative
(round 0's server loss 2.3054183960 vs 2.3054185655). ``RTOL = 1e-5`` is ~170
float32 ulps (~70x the measured spread), and ``ATOL`` covers values near zero.
Accuracies are counts over a test set: a prediction flipped by rounding would
move one by ``1/n`` (>= 3e-3) and fail the test, as it should (then the
difference is no longer rounding noise).

The tolerance still catches a real change:
:func:`test_a_wrong_aggregation_weight_fails_the_reference` runs the first round
with one client's FedAvg weight off by one example (of the ~150 it holds: the
smallest error an example count can have) and shows that the comparison fails:
its worst value is ~2.5 tolerances away (measured), while the two CPUs above
differ by ~1/70 of one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import fedavg

from fedsim.core.loading import load_experiment
from fedsim.core.messages import PARTITION_ID
from fedsim.core.rundir import SUMMARY_FILE
from fedsim.engine.server.run_recorder import create_run_dir
from tests.inprocess import comparable, simulate

pytestmark = pytest.mark.usefixtures("task_identity")

REFERENCE = Path(__file__).parent / "data" / "quickstart_rounds3.csv"
KEYS = ["round", "client", "phase", "metric"]
#: Relative tolerance: ~170 float32 ulps (see the module docstring).
RTOL = 1e-5
#: Absolute tolerance for values near zero (a loss or accuracy of ~0).
ATOL = 1e-7


def reference(rounds: int) -> pd.DataFrame:
    want = pd.read_csv(REFERENCE)
    want = want[want["round"] <= rounds]
    return want.astype({"client": "float64"}).sort_values(KEYS).reset_index(drop=True)


def run_quickstart(tmp_path: Path, rounds: int) -> pd.DataFrame:
    exp = load_experiment(None, [f"rounds={rounds}"])
    run_dir = create_run_dir(tmp_path, exp)
    simulate(exp, run_dir)
    assert '"completed"' in (run_dir / SUMMARY_FILE).read_text()
    got = comparable(run_dir)
    return got.astype({"client": "float64"}).sort_values(KEYS).reset_index(drop=True)


def compare(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """The reference comparison: the same rows, values within the tolerance."""
    pd.testing.assert_frame_equal(
        got[KEYS].astype(str), want[KEYS].astype(str), check_dtype=False
    )
    np.testing.assert_allclose(got["value"], want["value"], rtol=RTOL, atol=ATOL)


def worst_deviation(got: pd.DataFrame, want: pd.DataFrame) -> float:
    """The largest ``|got - want| / (ATOL + RTOL |want|)``: above 1 fails."""
    diff = np.abs(got["value"].to_numpy() - want["value"].to_numpy())
    return float(np.max(diff / (ATOL + RTOL * np.abs(want["value"].to_numpy()))))


def test_quickstart_matches_the_pre_refactor_reference(tmp_path: Path) -> None:
    compare(run_quickstart(tmp_path, 3), reference(3))


def test_a_wrong_aggregation_weight_fails_the_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FedAvg with client 0 weighted as if it held one example more than it
    does (an off-by-one in one client's count) gives round-1 rows the reference
    comparison rejects: the smallest count error is outside the tolerance."""
    original = fedavg.aggregate_arrayrecords

    def off_by_one(records: list[RecordDict], key: str) -> object:
        skewed = []
        for record in records:
            metrics = dict(next(iter(record.metric_records.values())))
            if metrics[PARTITION_ID] == 0:
                metrics[key] = float(metrics[key]) + 1  # type: ignore[arg-type]
            skewed.append(
                RecordDict({**record.array_records, "metrics": MetricRecord(metrics)})  # type: ignore[dict-item]
            )
        return original(skewed, key)

    monkeypatch.setattr(fedavg, "aggregate_arrayrecords", off_by_one)
    got, want = run_quickstart(tmp_path, 1), reference(1)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        compare(got, want)
    assert worst_deviation(got, want) > 2  # measured ~2.5: not a near miss
