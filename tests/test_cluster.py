"""Where a simulation's Ray runs (:mod:`fedsim.engine.host.cluster`): a local run
listens on loopback only and ignores ``RAY_ADDRESS``; ``resources.ray-address``
attaches to an existing cluster after a pre-run check against the cluster's
nodes (the two-node cluster test is in tests/test_ray_cluster.py)."""

from __future__ import annotations

import ipaddress

import pytest

from fedsim.core.errors import ConfigError
from fedsim.core.loading import load_experiment
from fedsim.engine.host import cluster
from fedsim.engine.server import simulation_process
from fedsim.flwr_private import ray_backend
from tests.runs import STRAY_RAY, fedsim


def loopback(address: str) -> bool:
    """Whether a socket bound to ``address`` is reachable from this host only
    (``::ffff:127.0.0.1``: an IPv6 socket bound to IPv4's loopback)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def test_loopback_addresses():
    assert all(map(loopback, ["127.0.0.1", "::1", "::ffff:127.0.0.1", "127.0.1.1"]))
    assert not any(map(loopback, ["0.0.0.0", "::", "192.0.2.2", "::ffff:10.0.0.1"]))


def test_a_local_run_listens_on_loopback_only(four_client_runs):
    """Every socket that a process of the shared four-client sweep (its
    SuperLink, simulation process, Ray's GCS, raylet, agents, workers and
    actors) listened on while it ran was bound to loopback."""
    result = next(iter(four_client_runs.values())).sweep
    names = {name for _, _, name in result.listening}
    assert {"gcs_server", "raylet", "flower-superlin"} <= {n[:15] for n in names}
    exposed = sorted(s for s in result.listening if not loopback(s[0]))
    assert not exposed, exposed


def test_a_local_run_ignores_ray_address_and_says_so(four_client_runs):
    """The shared sweep ran with ``RAY_ADDRESS`` naming no cluster: it
    completed on its own Ray, and said once that the variable was ignored."""
    result = next(iter(four_client_runs.values())).sweep
    notes = [ln for ln in result.stderr.splitlines() if "RAY_ADDRESS" in ln]
    assert notes == [
        f"fedsim: RAY_ADDRESS={STRAY_RAY} is ignored: this run uses its own local "
        "Ray (set resources.ray-address or --ray-address to attach to a cluster)"
    ]


def test_the_simulation_environment_says_where_ray_runs():
    base = {"RAY_ADDRESS": "10.0.0.1:6379", "PATH": "/bin", cluster.LOCAL_ONLY: "1"}
    local = cluster.environment(base, "")
    assert local == {"PATH": "/bin", cluster.LOCAL_ONLY: "0"}
    assert simulation_process.init_args(local) == {"address": "local", "include_dashboard": False}
    attached = cluster.environment(base, "10.0.0.5:6379")
    assert attached == {"PATH": "/bin", cluster.ADDRESS_VARIABLE: "10.0.0.5:6379"}
    assert simulation_process.init_args(attached) == {"address": "10.0.0.5:6379"}
    assert cluster.ignored_ray_address("", {}) == ""


def test_flowers_backend_gets_fedsims_init_args(monkeypatch):
    """Flower's Ray backend passes its ``init_args`` to ``ray.init``;
    fedsim's are added to them (and win)."""
    RayBackend = ray_backend.ray_backend()
    calls = []
    monkeypatch.setattr(RayBackend, "init_ray", lambda self, cfg: calls.append(cfg))
    assert ray_backend.add_init_args(simulation_process.init_args)
    assert ray_backend.add_init_args(simulation_process.init_args)  # once only
    monkeypatch.setenv(cluster.ADDRESS_VARIABLE, "10.0.0.5:6379")
    RayBackend.init_ray(None, {"init_args": {"num_cpus": 2, "address": "auto"}})
    assert calls == [{"init_args": {"num_cpus": 2, "address": "10.0.0.5:6379"}}]


@pytest.mark.parametrize("value", ["nonsense", "host:", ":6379", "h:0", "ray://h:1"])
def test_a_ray_address_is_host_and_port(value):
    with pytest.raises(ConfigError, match=r"^resources.ray-address: .* HOST:PORT"):
        load_experiment(None, [f"resources.ray-address={value}"])
    ok = load_experiment(None, ["resources.ray-address=10.0.0.5:6379"])
    assert ok.resources.ray_address == "10.0.0.5:6379"


def test_a_bad_ray_address_flag_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "runs"
    result = fedsim("run", "--ray-address", "nowhere", out=out)
    assert result.returncode == 2
    assert result.stderr.startswith("fedsim: error: --ray-address: resources.ray-")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def _node(name: str, cpus: float, gpus: float = 0.0, code: str = "") -> cluster.Node:
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    return cluster.Node(name * 8, "10.0.0.1", resources, code)


def test_the_cluster_check_compares_with_the_clusters_nodes():
    """Per-client resources against each node's (a client runs on one node),
    not this host's; and the same fedsim on every node."""
    here = cluster.code_fingerprint()
    nodes = (_node("a", 8, code=here), _node("b", 16, gpus=2, code=here))
    cluster.check_cluster("h:1", 16, 1, "cuda", nodes)  # more than this host has
    with pytest.raises(ConfigError, match=r"num-cpus: 17 per client.*largest 16, "):
        cluster.check_cluster("h:1", 17, 0, "cpu", nodes)
    with pytest.raises(ConfigError, match=r"num-gpus: 3 per client.*total 2\)"):
        cluster.check_cluster("h:1", 1, 3, "cpu", nodes)
    cpus_only = (_node("a", 8, code=here),)
    with pytest.raises(ConfigError, match=r"^resources.device: 'cuda'.* no GPU"):
        cluster.check_cluster("h:1", 1, 0, "cuda", cpus_only)
    other = (*nodes, _node("c", 8, code="0.0.1+abc"))
    with pytest.raises(ConfigError, match=r"node cccccccc .* runs fedsim 0.0.1\+abc"):
        cluster.check_cluster("h:1", 1, 0, "cpu", other)


def test_the_code_fingerprint_follows_the_source(tmp_path, monkeypatch):
    """Another byte in any module of fedsim, its strategies or clients gives
    another fingerprint."""
    import fedsim.clients

    before = cluster.code_fingerprint()
    extra = tmp_path / "clients"
    extra.mkdir()
    (extra / "extra.py").write_text("X = 1\n")
    monkeypatch.setattr(
        fedsim.clients, "__path__", [*fedsim.clients.__path__, str(extra)]
    )
    assert cluster.code_fingerprint() != before


def test_client_state_and_placement_travel_with_the_message(
    tmp_path, monkeypatch, task_identity
):
    """The simulation process restores a resumed client's saved state into
    the context it sends, saves the state that comes back with the reply, and
    tags the reply with the Ray node that ran it; the client (here: whatever
    ran in the "actor") never touches the run directory."""
    import ray
    from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

    from fedsim.core.loading import RESUME_KEY, RUN_DIR_KEY
    from fedsim.core.messages import CONFIG, PARTITION_ID, SERVER_ROUND
    from fedsim.engine.client import client_state
    from fedsim.engine.server import placement
    from fedsim.flwr_private import vce

    run_dir = tmp_path / "run"
    store = client_state.ClientStateStore(run_dir)
    store.save(1, 2, RecordDict({"acc": MetricRecord({"n": 5})}))
    seen = []

    def client(message, context):  # what the actor runs; it sees no run dir
        seen.append(dict(context.state.items()))
        n = int(context.state["acc"]["n"]) + 1
        context.state["acc"] = MetricRecord({"n": n})
        return Message(RecordDict({"m": MetricRecord({"n": n})}), reply_to=message)

    class Pool:
        def submit(self, fn, job):
            results = [(client(m, c), c) for m, _, c in job[1]]
            return 0.01, ("node-b", "10.0.0.2"), results

        def add_actor_back_to_pool(self, future):
            pass

    class Store:
        def __init__(self):
            run_config = {RUN_DIR_KEY: str(run_dir), RESUME_KEY: True}
            self.context = Context(7, 3, {"partition-id": 1}, RecordDict(), run_config)

        def retrieve_context(self, run_id):
            return self.context

        def update_context(self, run_id, context):
            self.context = context

    monkeypatch.setattr(ray, "get", lambda future: future)
    backend = type("Backend", (), {"pool": Pool(), "app_fn": None})()
    stores = {3: Store()}
    config = ConfigRecord({PARTITION_ID: 1, SERVER_ROUND: 3})
    message = Message(RecordDict({CONFIG: config}), dst_node_id=3, message_type="train")
    (reply,) = vce.process_messages(
        backend, stores, [message], simulation_process.RELAY
    )
    assert dict(seen[0]["acc"]) == {"n": 5}  # restored before the call
    assert client_state.RELAYED in seen[0]
    saved_round, saved = store.load(1)
    assert saved_round == 3 and dict(saved["acc"]) == {"n": 6}
    assert client_state.RELAYED not in saved  # the engine's mark is not saved
    assert placement.take(reply) == ("node-b", "10.0.0.2")
    assert placement.RECORD not in reply.content  # taken off
    assert placement.take(reply) is None


def test_placement_counts_clients_per_node_and_round():
    from fedsim.engine.server.placement import Placement

    p = Placement()
    for rnd, phase, node in [(1, "train", "a"), (1, "train", "b"), (1, "train", "a")]:
        p.served(rnd, phase, (node, "10.0.0.1"))
    p.served(2, "evaluate", ("b", "10.0.0.2"))
    assert p.as_json() == {
        "nodes": {"a": "10.0.0.1", "b": "10.0.0.1"},
        "rounds": {"1": {"train": {"a": 2, "b": 1}}, "2": {"evaluate": {"b": 1}}},
    }
    kept = Placement(p.as_json()).up_to(1).as_json()
    assert kept["rounds"] == {"1": {"train": {"a": 2, "b": 1}}}


def test_compose_publishes_the_superlink_on_loopback_by_default():
    """The plain-text SuperLink of docker/compose.yaml (any SuperNode, any
    run) is published on 127.0.0.1 unless FEDSIM_SUPERLINK_HOST says
    otherwise, as the several-hosts guide says; no other service publishes a
    port."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    published = {}
    for name in ("compose.yaml", "compose.secure.yaml", "compose.gpu.yaml"):
        services = yaml.safe_load((root / "docker" / name).read_text())["services"]
        for service, spec in services.items():
            if spec and "ports" in spec:
                published[(name, service)] = spec["ports"]
    bound = "${FEDSIM_SUPERLINK_HOST-127.0.0.1}:${FEDSIM_SUPERLINK_PORT-9093}:9093"
    assert published == {("compose.yaml", "superlink"): [bound]}
    guide = (root / "docs" / "how-to" / "several-hosts.md").read_text()
    assert "FEDSIM_SUPERLINK_HOST" in guide
