"""The simulation runtime fedsim's SuperLinks start: the pick-up loop against
Flower's own on twin LinkStates, hand-offs that wake their reader instead of
waiting for a poll (proved with polls made minutes long), and the launcher."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from queue import Empty, Queue
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.server.superlink.fleet.vce import vce_api
from simulation_state import identity, simulation_state  # noqa: F401

from fedsim.core.loading import load_experiment
from fedsim.core.messages import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES
from fedsim.core.rundir import read_metrics
from fedsim.engine import linkstate, superlink, vce
from fedsim.engine.recorder import RunRecorder
from fedsim.engine.recording import RecordingGrid

#: Flower's own loop, whatever the tests install.
FLOWERS_PICK_UP = vce_api.add_messages_to_queue


class Sweeps(threading.Event):
    """A stop event that lets a pick-up loop sweep ``n`` times."""

    def __init__(self, n: int):
        super().__init__()
        self.left = n

    def is_set(self) -> bool:
        self.left -= 1
        return self.left < 0


def queued(queue: Queue[Message]) -> list[Message]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


@pytest.mark.parametrize("seed", range(3))
def test_pick_up_queues_what_flowers_loop_queues(seed, monkeypatch):
    linkstate.install()
    monkeypatch.setattr(vce, "SWEEP", 0.001)
    rng = np.random.default_rng(seed)
    twins = simulation_state(9), simulation_state(9)
    pushed: tuple[list[str], list[str]] = ([], [])
    counts = rng.integers(0, 3, size=9)  # two messages for some nodes
    for which, (_, grid, nodes) in enumerate(twins):
        order = np.random.default_rng(seed).permutation(9)
        batch = [
            Message(RecordDict(), dst_node_id=nodes[i], message_type="train")
            for i in order
            for _ in range(counts[i])
        ]
        pushed[which].extend(grid.push_messages(batch))
    total = 0
    for _ in range(3):  # one message per node per sweep
        got = []
        for which, loop in enumerate((vce.add_messages_to_queue, FLOWERS_PICK_UP)):
            state, _, nodes = twins[which]
            queue: Queue[Message] = Queue()
            loop(state, queue, {n: i for i, n in enumerate(nodes)}, Sweeps(1))
            got.append(
                [pushed[which].index(m.metadata.message_id) for m in queued(queue)]
            )
        # the same messages; Flower's in node order, ours in push order
        assert sorted(got[0]) == sorted(got[1])
        assert got[0] == sorted(got[0])
        assert len(set(got[0])) == len(got[0]) == int((counts > total).sum())
        total += 1


def test_pick_up_wakes_when_a_message_is_stored(monkeypatch):
    """With a sweep pause of ten minutes, only the store's signal can hand the
    message over in time."""
    linkstate.install()
    monkeypatch.setattr(vce, "SWEEP", 600.0)
    state, grid, nodes = simulation_state(50)
    queue: Queue[Message] = Queue()
    stop = threading.Event()
    loop = threading.Thread(
        target=vce.add_messages_to_queue,
        args=(state, queue, {n: i for i, n in enumerate(nodes)}, stop),
        daemon=True,
    )
    loop.start()
    try:
        for node in (nodes[3], nodes[41]):
            time.sleep(0.2)  # the loop is waiting
            (message_id,) = grid.push_messages(
                [Message(RecordDict(), dst_node_id=node, message_type="train")]
            )
            assert queue.get(timeout=30).metadata.message_id == message_id
    finally:
        stop.set()
        grid.push_messages(  # wakes the loop, which sees the stop event
            [Message(RecordDict(), dst_node_id=nodes[0], message_type="train")]
        )
        loop.join(timeout=30)
    assert not loop.is_alive()


def answer(message: Message) -> Message:
    """A client's train reply: its model plus 1, as many examples as its node id
    modulo 7 plus 1."""
    arrays = message.content[ARRAYS].to_numpy_ndarrays()
    node = message.metadata.dst_node_id
    content = RecordDict(
        {
            ARRAYS: ArrayRecord([a + 1 for a in arrays]),
            METRICS: MetricRecord({NUM_EXAMPLES: node % 7 + 1, "loss": 0.5}),
        }
    )
    return Message(content, reply_to=message)


def test_server_grid_collects_replies_as_they_are_stored(tmp_path, monkeypatch):
    """The ServerApp's grid over Flower's in-memory grid: messages reach the
    pick-up loop, a worker answers, and each reply wakes the grid. Every poll
    and sweep pause is ten minutes here: an exchange of 6 nodes that ends in
    seconds was carried by the signals alone. Then a node that never answers
    holds its exchange to the round timeout and is recorded as failed."""
    linkstate.install()
    monkeypatch.setattr(vce, "SWEEP", 600.0)
    monkeypatch.setattr(RecordingGrid, "POLL_MAX", 600.0)
    state, flower_grid, nodes = simulation_state(6)
    silent: set[int] = set()
    queue: Queue[Message] = Queue()
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            try:
                message = queue.get(timeout=0.05)
            except Empty:
                continue
            if message.metadata.dst_node_id not in silent:
                reply = answer(message)
                reply.metadata.__dict__["_message_id"] = str(uuid4())
                state.store_message_res(reply)

    threads = [
        threading.Thread(
            target=vce.add_messages_to_queue,
            args=(state, queue, {n: i for i, n in enumerate(nodes)}, stop),
            daemon=True,
        ),
        threading.Thread(target=worker, daemon=True),
    ]
    for thread in threads:
        thread.start()
    exp = load_experiment(None, ["federation.clients=6"])
    recorder = RunRecorder(tmp_path, exp)
    grid = RecordingGrid(
        flower_grid, recorder, num_clients=6, min_replies=1, assign=True
    )
    partition_of = grid.partitions()

    def exchange(server_round: int, timeout: float) -> tuple[list[Message], float]:
        content = RecordDict(
            {
                ARRAYS: ArrayRecord([np.arange(4, dtype=np.float32)]),
                CONFIG: ConfigRecord({"server-round": server_round}),
            }
        )
        messages = [
            Message(content, dst_node_id=n, message_type="train")
            for n in grid.get_node_ids()
        ]
        start = time.monotonic()
        replies = grid.send_and_receive(messages, timeout=timeout)
        return replies, time.monotonic() - start

    try:
        replies, took = exchange(1, timeout=600)
        assert took < 60
        assert sorted(r.metadata.src_node_id for r in replies) == sorted(nodes)
        for reply in replies:
            (got,) = reply.content[ARRAYS].to_numpy_ndarrays()
            np.testing.assert_array_equal(got, np.arange(4, dtype=np.float32) + 1)
        recorder.end_round(1)
        silent.add(nodes[4])
        replies, took = exchange(2, timeout=1.0)
        assert 1.0 <= took < 60
        assert len(replies) == 5 and nodes[4] not in {
            r.metadata.src_node_id for r in replies
        }
        recorder.end_round(2)
    finally:
        stop.set()
        flower_grid.push_messages(
            [Message(RecordDict(), dst_node_id=nodes[0], message_type="train")]
        )
        for thread in threads:
            thread.join(timeout=30)
    signal = linkstate.signals(state)
    assert signal.awaited == set() and signal.replied == set()
    frame = read_metrics(tmp_path)
    train = frame[(frame["phase"] == "train") & frame["client"].notna()]
    examples = train[(train["metric"] == "examples") & (train["round"] == 1)]
    assert dict(zip(examples["client"], examples["value"], strict=True)) == {
        partition_of[n]: float(n % 7 + 1) for n in nodes
    }
    assert [(f["round"], f["client"]) for f in recorder.failures] == [
        (2, partition_of[nodes[4]])
    ]


def test_a_reply_wakes_its_waiter_and_no_other():
    linkstate.install()
    state, grid, nodes = simulation_state(3)
    ids = list(
        grid.push_messages(
            [Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes]
        )
    )
    linkstate.await_replies(state, set(ids[:2]))
    for node in nodes:
        for message in state.get_message_ins(node_id=node, limit=1):
            reply = Message(RecordDict(), reply_to=message)
            reply.metadata.__dict__["_message_id"] = f"r-{node}"
            assert state.store_message_res(reply) is not None
    assert linkstate.wait_for_replies(state, set(ids), 600.0) == set(ids[:2])
    start = time.monotonic()
    assert linkstate.wait_for_replies(state, set(ids), 0.05) == set()  # collected
    assert time.monotonic() - start >= 0.04
    linkstate.forget_replies(state, set(ids))
    assert linkstate.signals(state).awaited == set()


def test_superlinks_start_the_launcher(tmp_path):
    home, env = superlink.flower_home(superlink.loopback(9093))
    try:
        found = shutil.which(vce.COMMAND, path=env["PATH"])
        assert found == str(home / "bin" / vce.COMMAND)
        out = subprocess.run(
            [found, "--help"], env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        assert "usage: flwr-simulation" in out.stdout
    finally:
        shutil.rmtree(home)


def test_launcher_installs_before_flowers_runtime_starts():
    """What the launcher runs before Flower's entry point, in a fresh interpreter."""
    code = (
        "from fedsim.engine import vce\n"
        "assert vce.install()\n"
        "from flwr.server.superlink.fleet.vce import vce_api\n"
        "from flwr.server.superlink.linkstate.in_memory_linkstate import "
        "InMemoryLinkState as S\n"
        "from fedsim.engine import linkstate\n"
        "assert vce_api.add_messages_to_queue is vce.add_messages_to_queue\n"
        "assert S.get_message_ins is linkstate.get_message_ins\n"
        "assert S.store_message_res is linkstate.store_message_res\n"
        "from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend\n"
        "assert RayBackend.build.pipelined\n"
        "build = RayBackend.build\n"
        "assert vce.install() and RayBackend.build is build\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr


def test_ray_defaults_keep_a_value_the_user_set(monkeypatch):
    monkeypatch.delenv(vce.INLINE_VARIABLE, raising=False)
    vce.ray_defaults()
    assert os.environ[vce.INLINE_VARIABLE] == str(vce.INLINE_BYTES)
    monkeypatch.setenv(vce.INLINE_VARIABLE, "12345")
    vce.ray_defaults()
    assert os.environ[vce.INLINE_VARIABLE] == "12345"


def test_ray_passes_replies_up_to_a_mebibyte_inside_task_calls():
    """An actor's reply of 0.5 MB comes back inside the call (it is on no node's
    object store), one of 2 MB through the object store; without the setting
    Ray puts the 0.5 MB one in the store too."""
    code = (
        "import sys\n"
        "from fedsim.engine import vce\n"
        "if sys.argv[1] == 'tuned':\n"
        "    vce.ray_defaults()\n"
        "import ray\n"
        "ray.init(num_cpus=1, include_dashboard=False, logging_level='ERROR')\n"
        "@ray.remote(num_cpus=1)\n"
        "def reply(n):\n"
        "    return b'x' * n\n"
        "refs = [reply.remote(n) for n in (500_000, 2_000_000)]\n"
        "ray.get(refs)\n"
        "where = ray.experimental.get_object_locations(refs)\n"
        "print([bool(where[r]['node_ids']) for r in refs])\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != vce.INLINE_VARIABLE}
    stored = {}
    for mode in ("tuned", "ray"):
        out = subprocess.run(
            [sys.executable, "-c", code, mode],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert out.returncode == 0, out.stderr
        stored[mode] = out.stdout.strip().splitlines()[-1]
    assert stored == {"tuned": "[False, True]", "ray": "[True, True]"}


def test_pipeline_gives_each_actor_two_messages_at_once():
    """Flower's own pool methods on a pipelined pool: two messages go to each
    actor before any reply, a reply frees its actor for the next message."""
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    pool = BasicActorPool.__new__(BasicActorPool)
    pool.pool, pool.num_actors, pool._future_to_actor = ["a", "b"], 2, {}
    vce.pipeline(pool)
    assert pool.num_actors == 4 and sorted(pool.pool) == ["a", "a", "b", "b"]
    futures = [
        pool.submit(lambda actor, *job: (actor, job[2]), (None, None, str(i), None))
        for i in range(4)
    ]
    busy = [pool._future_to_actor[f] for f in futures]
    assert sorted(busy) == ["a", "a", "b", "b"] and not pool.is_actor_available()
    pool.add_actor_back_to_pool(futures[0])
    assert pool.pool == [busy[0]]
    vce.pipeline(pool, tasks=3)  # from the actors listed now
    assert pool.pool == [busy[0]] * 3 and pool.num_actors == 3
