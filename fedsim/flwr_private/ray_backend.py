"""Flower 1.41's Ray backend (``RayBackend``), patched: fedsim's ``ray.init``
arguments, and actors that hold two calls at once.

- :func:`add_init_args`: Flower's backend starts Ray with
  ``ray.init(**init_args)``; fedsim adds its own (a loopback Ray, or an
  existing cluster's address:
  :func:`fedsim.engine.server.simulation_process.init_args`).
- :func:`pipeline_actors`: ``RayBackend.build`` and ``terminate`` list every
  actor of Flower's ``BasicActorPool`` twice, so each actor holds two calls,
  one running and one queued in Ray (:func:`pipeline`; see
  :mod:`fedsim.flwr_private.vce`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedsim.flwr_private import version

MODULE = "flwr.server.superlink.fleet.vce.backend.raybackend"
POOL = "flwr.simulation.ray_transport.ray_actor.BasicActorPool"
#: Messages each Ray actor holds at once (one running, the others queued).
TASKS_PER_ACTOR = 2
#: Flower's methods this module replaces or calls, and their parameters.
PATCHED = {
    f"{MODULE}.RayBackend.init_ray": ("self", "backend_config"),
    f"{MODULE}.RayBackend.build": ("self", "app_fn"),
    f"{MODULE}.RayBackend.terminate": ("self",),
    f"{POOL}.submit": ("self", "actor_fn", "job"),
    f"{POOL}.add_actor_back_to_pool": ("self", "future"),
}


def ray_backend() -> Any:
    """Flower's ``RayBackend`` class (importing it starts nothing)."""
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    return RayBackend


def add_init_args(init_args: Callable[[], dict[str, Any]]) -> bool:
    """Add ``init_args()`` to the ``init_args`` Flower's Ray backend passes to
    ``ray.init`` (they win; idempotent). False, and nothing replaced, on
    another Flower version (warning once)."""
    if not version.patchable("ray-init-args", "starts Ray with Flower's arguments"):
        return False
    backend = ray_backend()
    if getattr(backend.init_ray, "fedsim", False):
        return True
    init_ray = backend.init_ray

    def with_fedsim_args(self: Any, backend_config: Any) -> None:
        given = backend_config.setdefault("init_args", {})
        backend_config["init_args"] = {**given, **init_args()}
        init_ray(self, backend_config)

    with_fedsim_args.fedsim = True  # type: ignore[attr-defined]
    backend.init_ray = with_fedsim_args
    return True


def pipeline(pool: Any, tasks: int = TASKS_PER_ACTOR) -> None:
    """List every actor of Flower's ``BasicActorPool`` ``tasks`` times: the
    pool hands an actor to each message it submits and takes it back with the
    reply, and the runtime runs one worker thread per listed actor, so each
    actor gets up to ``tasks`` messages at once (Ray runs an actor's calls one
    after another, in order)."""
    actors = list(dict.fromkeys(pool.pool))
    pool.pool = actors * tasks
    pool.num_actors = len(pool.pool)


def pipeline_actors() -> None:
    """``RayBackend.build`` pipelines its pool; ``terminate`` ends each actor
    once (idempotent; the caller checks the version)."""
    backend = ray_backend()
    if getattr(backend.build, "pipelined", False):
        return
    build, terminate = backend.build, backend.terminate

    def pipelined_build(self: Any, app_fn: Any) -> None:
        build(self, app_fn)
        pipeline(self.pool)

    def terminate_once(self: Any) -> None:
        if self.pool:  # each actor once, however often it is listed
            pipeline(self.pool, tasks=1)
        terminate(self)

    pipelined_build.pipelined = True  # type: ignore[attr-defined]
    backend.build = pipelined_build
    backend.terminate = terminate_once
