"""Reading and comparing run directories.

- :mod:`fedsim.analysis.runs`: read run directories into one labelled DataFrame.
- :mod:`fedsim.analysis.views`: per-round views of that DataFrame.
- :mod:`fedsim.analysis.tables`: the comparison of runs and its rich rendering.
- :mod:`fedsim.analysis.plots`: matplotlib figures of the views (import it as
  ``from fedsim.analysis import plots``).
- :mod:`fedsim.analysis.trackers`: TensorBoard and MLflow round sinks.

The names below are the public API of the first three, re-exported here so that
``from fedsim import analysis; analysis.load_runs(...)`` is all a reader needs.
"""

from fedsim.analysis.runs import (
    LABEL_KEYS,
    RUN_COLUMNS,
    Run,
    RunDirError,
    empty_metrics,
    load_run,
    load_runs,
    run_labels,
    run_paths,
    runs_frame,
)
from fedsim.analysis.tables import (
    DEFAULT_TARGET,
    comparison,
    comparison_table,
    human_bytes,
)
from fedsim.analysis.views import (
    HEADLINE,
    client_metric,
    client_spread,
    communication,
    epsilon_per_round,
    headline_phases,
    phase_name,
    round_metric,
    run_order,
)

__all__ = [
    "DEFAULT_TARGET",
    "HEADLINE",
    "LABEL_KEYS",
    "RUN_COLUMNS",
    "Run",
    "RunDirError",
    "client_metric",
    "client_spread",
    "communication",
    "comparison",
    "comparison_table",
    "empty_metrics",
    "epsilon_per_round",
    "headline_phases",
    "human_bytes",
    "load_run",
    "load_runs",
    "phase_name",
    "round_metric",
    "run_labels",
    "run_order",
    "run_paths",
    "runs_frame",
]
