"""fedsim: federated-learning simulation on Flower and Ray.

``fedsim.run(...)`` launches a run from Python (see :func:`fedsim.engine.launch.run`);
it is imported on first use, so that ``import fedsim.core`` stays light.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "run"]


def __getattr__(name: str) -> Any:
    if name == "run":
        from fedsim.engine.launch import run

        return run
    raise AttributeError(f"module 'fedsim' has no attribute {name!r}")
