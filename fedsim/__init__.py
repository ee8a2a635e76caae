"""fedsim: federated-learning simulation on Flower and Ray.

``fedsim.run(...)`` launches a run from Python
(:func:`fedsim.engine.host.front_door.run`), ``fedsim.sweep(...)`` a sweep
(:func:`fedsim.engine.host.sweep.sweep`); both are imported on first use, so
that ``import fedsim.core`` stays light.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "run", "sweep"]


def __getattr__(name: str) -> Any:
    if name == "run":
        from fedsim.engine.host.front_door import run

        return run
    if name == "sweep":
        from fedsim.engine.host.sweep import sweep

        return sweep
    raise AttributeError(f"module 'fedsim' has no attribute {name!r}")
