"""Where a simulation's Ray runs: a private Ray on loopback, or an existing cluster.

Flower's simulation runtime starts Ray with ``ray.init(**init_args)`` (its Ray
backend's ``init_args``). fedsim's launcher
(:mod:`fedsim.engine.server.simulation_process`) adds its own init args there
(:func:`fedsim.engine.server.simulation_process.init_args`), from the simulation
process's environment, which the runner sets on the private SuperLink
(:func:`environment`):

- **local run** (``resources.ray-address`` empty): ``address="local"``, so a
  ``RAY_ADDRESS`` in the environment, or the address file of a cluster that
  ``ray start`` left in ``/tmp/ray``, never attaches the run to some cluster
  (plain ``ray.init()`` would attach to either); and Ray's local-only mode
  (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, Ray's default on macOS and
  Windows): the node's address is 127.0.0.1, so the GCS, the raylet (node
  manager and object manager), every worker's and actor's gRPC server and the
  runtime-env agent listen on loopback only. ``ray.init(_node_ip_address=
  "127.0.0.1")`` is not enough: Ray 2.55 turns 127.0.0.1 into the host's
  address (``resolve_ip_for_localhost``) and then listens on every interface.
  The dashboard stays off (Flower's default). Flower's SuperLink listens on
  127.0.0.1 already (:func:`fedsim.engine.host.superlink.superlink_command`).
- **attached run** (``resources.ray-address = "HOST:PORT"``):
  ``address=HOST:PORT``. fedsim never starts or stops anything on the cluster:
  its runner stops only the processes it started (the simulation process is
  the cluster's driver, not one of its nodes). The cluster's own security is
  its operator's (Ray's token authentication: ``RAY_AUTH_MODE=token``, with
  ``RAY_AUTH_TOKEN`` in fedsim's environment too).

fedsim's code reaches the cluster's workers by being installed on every node
(the same version, in an environment at the same path: Flower's backend
passes the driver's ``sys.path`` to the workers as ``PYTHONPATH``); a
runtime-env ``working_dir``/``py_modules`` cannot carry it, since families and
models are found through the installed package's entry points. The pre-run
check (:func:`check_cluster`, on what :func:`survey` finds) verifies it on
every node, with the per-client resources against the cluster's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from fedsim.core.errors import ConfigError
from fedsim.engine.server.simulation_process import ADDRESS_VARIABLE, LOCAL_ONLY

#: Ray's own variable naming a cluster for ``ray.init()`` to attach to.
RAY_ADDRESS = "RAY_ADDRESS"
KEY = "resources.ray-address"


def environment(base: Mapping[str, str], address: str) -> dict[str, str]:
    """The private SuperLink's environment for a run on a local Ray
    (``address`` empty) or on the cluster at ``address``."""
    env = {k: v for k, v in base.items() if k not in (RAY_ADDRESS, ADDRESS_VARIABLE)}
    if address:
        env[ADDRESS_VARIABLE] = address
        env.pop(LOCAL_ONLY, None)
    else:
        env[LOCAL_ONLY] = "0"
    return env


def ignored_ray_address(address: str, env: Mapping[str, str] = os.environ) -> str:
    """One line saying that ``RAY_ADDRESS`` is ignored ('' when it is unset)."""
    value = env.get(RAY_ADDRESS, "")
    if not value:
        return ""
    where = f"the cluster at {address}" if address else "its own local Ray"
    return (
        f"fedsim: RAY_ADDRESS={value} is ignored: this run uses {where} "
        f"(set {KEY} or --ray-address to attach to a cluster)"
    )


def note_ignored(address: str) -> None:
    """Print :func:`ignored_ray_address` on stderr (nothing if it is '')."""
    if note := ignored_ray_address(address):
        print(note, file=sys.stderr)


def on_cluster(exp: Any, address: str, flag: str) -> Any:
    """``exp`` with ``resources.ray-address = address`` (given as ``flag``),
    validated as the key is."""
    from fedsim.core.loading import from_run_config, to_run_config

    try:
        return from_run_config({**to_run_config(exp), KEY: address})
    except ConfigError as err:
        raise ConfigError(f"{flag}: {err}") from None


# -- the pre-run check of an attached run ------------------------------------------


@dataclass(frozen=True)
class Node:
    """A live node of the cluster: its resources and what fedsim it runs."""

    node_id: str
    address: str
    resources: Mapping[str, float]
    code: str


def code_fingerprint() -> str:
    """fedsim's version and a hash of its installed source (the ``fedsim``
    package with its ``strategies`` and ``clients``), as this process sees it."""
    import fedsim

    digest = hashlib.sha256()
    roots = [Path(p) for p in fedsim.__path__]
    for sub in ("strategies", "clients"):
        module = __import__(f"fedsim.{sub}", fromlist=["_"])
        roots += [Path(p) for p in module.__path__]
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return f"{metadata.version('fedsim')}+{digest.hexdigest()[:12]}"


def _node_code() -> str:
    try:
        return code_fingerprint()
    except Exception as err:  # reported by the check, on this node's behalf
        return f"error: {type(err).__name__}: {err}"


#: Seconds a survey of a cluster is reused (a sweep checks many experiments).
SURVEY_TTL = 300.0
_surveys: dict[str, tuple[float, tuple[Node, ...]]] = {}


def survey(address: str) -> tuple[Node, ...]:
    """The live nodes of the cluster at ``address`` and the fedsim each runs,
    found by a short-lived driver in a process of its own (``python -m
    fedsim.engine.host.cluster ADDRESS``: this process's Ray, if any, is left
    alone); reused for :data:`SURVEY_TTL` seconds."""
    now = time.monotonic()
    if address in _surveys and now - _surveys[address][0] < SURVEY_TTL:
        return _surveys[address][1]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fedsim.engine.host.cluster", address],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{KEY}: no answer from {address} within 300 s") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise ConfigError(f"{KEY}: cannot attach to {address}: {lines[-1]}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    nodes = tuple(Node(n[0], n[1], n[2], n[3]) for n in found)
    _surveys[address] = (now, nodes)
    return nodes


def _survey_here(address: str) -> list[tuple[str, str, dict[str, float], str]]:
    """Attach to ``address`` as a driver: each live node with its resources
    and :func:`code_fingerprint` as a task pinned to it sees it (the workers
    get the ``PYTHONPATH`` Flower's backend gives them)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(
        address=address,
        logging_level=logging.ERROR,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}},
    )
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        probe = ray.remote(num_cpus=0)(_node_code)
        pinned = [
            probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(
                    n["NodeID"], soft=False
                )
            ).remote()
            for n in alive
        ]
        codes = ray.get(pinned, timeout=240)
        return [
            (n["NodeID"], n["NodeManagerAddress"], dict(n["Resources"]), code)
            for n, code in zip(alive, codes, strict=True)
        ]
    finally:
        ray.shutdown()


def check_cluster(
    address: str, num_cpus: int, num_gpus: float, device: str, nodes: tuple[Node, ...]
) -> None:
    """Refuse a run the cluster at ``address`` (its live ``nodes``) cannot
    serve: a node with another fedsim than this host's, or per-client
    resources no single node has (a client runs on one node)."""
    here = code_fingerprint()
    for node in nodes:
        if node.code != here:
            raise ConfigError(
                f"{KEY}: node {node.node_id[:8]} ({node.address}) of {address} "
                f"runs fedsim {node.code}, this host {here}; install the same "
                "fedsim on every node"
            )
    total: dict[str, float] = {}
    for node in nodes:
        for name, value in node.resources.items():
            total[name] = total.get(name, 0.0) + value
    asked = (("CPU", "num-cpus", num_cpus), ("GPU", "num-gpus", num_gpus))
    for name, key, need in asked:
        most = max((n.resources.get(name, 0.0) for n in nodes), default=0.0)
        if need > most:
            raise ConfigError(
                f"resources.{key}: {need:g} per client, but no node of the Ray "
                f"cluster at {address} has that many {name}s (largest "
                f"{most:g}, cluster total {total.get(name, 0.0):g})"
            )
    if device == "cuda" and not total.get("GPU"):
        raise ConfigError(
            f"resources.device: 'cuda' requested but the Ray cluster at {address} "
            "has no GPU"
        )


if __name__ == "__main__":
    print(json.dumps(_survey_here(sys.argv[1])))
