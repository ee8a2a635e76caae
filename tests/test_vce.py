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
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.metrics import VceMetrics
from simulation_state import RUN, identity, simulation_state  # noqa: F401

from fedsim.core.loading import load_experiment
from fedsim.core.messages import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES
from fedsim.core.rundir import read_metrics
from fedsim.engine.host import superlink
from fedsim.engine.server import simulation_process
from fedsim.engine.server.exchange_recording import RecordingGrid
from fedsim.engine.server.run_recorder import RunRecorder
from fedsim.flwr_private import linkstate, ray_backend, vce

#: Flower's own loop and worker, whatever the tests install.
FLOWERS_PICK_UP = vce_api.add_messages_to_queue
FLOWERS_WORKER = vce_api.worker

#: A ClientApp for the actors of the worker tests (they import this module):
#: counts its calls per node in ``context.state``, fails on partition 3.
COUNTING = ClientApp()


@COUNTING.train()
def _count(message: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    if partition == 3:
        raise ValueError("partition 3 always fails")
    calls = int(context.state.get("calls", MetricRecord({"n": 0}))["n"]) + 1
    context.state["calls"] = MetricRecord({"n": calls})
    x = float(message.content["config"]["x"])
    return Message(
        RecordDict({"metrics": MetricRecord({"y": 2 * x + partition, "n": calls})}),
        reply_to=message,
    )


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
        flower_grid, recorder, num_clients=6, assign=True
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
        found = shutil.which(simulation_process.COMMAND, path=env["PATH"])
        assert found == str(home / "bin" / simulation_process.COMMAND)
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
        "from fedsim.engine.server import simulation_process as sp\n"
        "from fedsim.flwr_private import vce\n"
        "assert sp.install()\n"
        "from flwr.server.superlink.fleet.vce import vce_api\n"
        "from flwr.server.superlink.linkstate.in_memory_linkstate import "
        "InMemoryLinkState as S\n"
        "from fedsim.flwr_private import linkstate\n"
        "assert vce_api.add_messages_to_queue is vce.add_messages_to_queue\n"
        "assert vce_api.worker is vce.worker\n"
        "assert S.get_message_ins is linkstate.get_message_ins\n"
        "assert S.store_message_res is linkstate.store_message_res\n"
        "from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend\n"
        "assert RayBackend.build.pipelined\n"
        "build = RayBackend.build\n"
        "assert sp.install() and RayBackend.build is build\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr


def test_ray_defaults_keep_a_value_the_user_set(monkeypatch):
    monkeypatch.delenv(simulation_process.INLINE_VARIABLE, raising=False)
    simulation_process.ray_defaults()
    assert os.environ[simulation_process.INLINE_VARIABLE] == str(simulation_process.INLINE_BYTES)
    monkeypatch.setenv(simulation_process.INLINE_VARIABLE, "12345")
    simulation_process.ray_defaults()
    assert os.environ[simulation_process.INLINE_VARIABLE] == "12345"


def test_ray_passes_replies_up_to_a_mebibyte_inside_task_calls():
    """An actor's reply of 0.5 MB comes back inside the call (it is on no node's
    object store), one of 2 MB through the object store; without the setting
    Ray puts the 0.5 MB one in the store too."""
    code = (
        "import sys\n"
        "from fedsim.engine.server import simulation_process\n"
        "if sys.argv[1] == 'tuned':\n"
        "    simulation_process.ray_defaults()\n"
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
    env = {k: v for k, v in os.environ.items() if k != simulation_process.INLINE_VARIABLE}
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
    ray_backend.pipeline(pool)
    assert pool.num_actors == 4 and sorted(pool.pool) == ["a", "a", "b", "b"]
    futures = [
        pool.submit(lambda actor, *job: (actor, job[2]), (None, None, str(i), None))
        for i in range(4)
    ]
    busy = [pool._future_to_actor[f] for f in futures]
    assert sorted(busy) == ["a", "a", "b", "b"] and not pool.is_actor_available()
    pool.add_actor_back_to_pool(futures[0])
    assert pool.pool == [busy[0]]
    ray_backend.pipeline(pool, tasks=3)  # from the actors listed now
    assert pool.pool == [busy[0]] * 3 and pool.num_actors == 3


def _drain(worker, backend, stores, messages):
    """Run ``worker`` (one thread) until it replied to ``messages``."""
    inbox, outbox = Queue(), Queue()
    for message in messages:
        inbox.put(message)
    stop = threading.Event()
    thread = threading.Thread(
        target=worker, args=(inbox, outbox, stores, backend, stop, VceMetrics())
    )
    thread.start()
    replies = [outbox.get(timeout=120) for _ in messages]
    stop.set()
    thread.join()
    return {r.metadata.reply_to_message_id: r for r in replies}


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0.001, [8, 6, 3, 2, 1]),
        (0.02, [2] * 9 + [1, 1]),
        (0.2, [1] * 20),
        (None, [1] * 20),
    ],
)
def test_worker_takes_even_shares_of_short_messages(monkeypatch, seconds, expected):
    """Guided self-scheduling: 20 queued messages, 2 workers, at most 8 a
    call: 8, then half of the rest each time, then single messages; fewer
    when the messages' type took long enough to fill a call (0.05 s), one a
    call while their time is not known."""
    batches = []

    def process(backend, stores, messages):
        batches.append(len(messages))
        return [Message(RecordDict(), reply_to=m) for m in messages]

    monkeypatch.setattr(vce, "process_messages", process)
    backend = type("Backend", (), {"num_workers": 2})()
    if seconds is not None:
        vce.message_seconds(backend)["train"] = seconds
    messages = [
        Message(RecordDict(), dst_node_id=n + 1, message_type="train")
        for n in range(20)
    ]
    for message in messages:
        message.metadata.__dict__["_message_id"] = str(uuid4())
    replies = _drain(vce.worker, backend, {}, messages)
    assert batches == expected
    assert set(replies) == {m.metadata.message_id for m in messages}
    assert len({r.metadata.message_id for r in replies.values()}) == 20  # fresh ids
    sizes = [vce.batch_size(q, 4, 0.001) for q in (1, 4, 5, 30, 100)]
    assert sizes == [1, 1, 2, 8, 8]


def test_batched_worker_replies_as_flowers_worker():
    """Flower's worker and fedsim's on twin node stores and one Ray actor:
    the same replies (the ClientApp's, or the error reply for a raising one),
    the same contexts afterwards, in one Ray call instead of one a message."""
    import ray
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
    from flwr.supercore.run import Run

    backend = RayBackend(
        {
            "client_resources": {"num_cpus": 1},
            "init_args": {"num_cpus": 1, "logging_level": "ERROR"},
        }
    )
    try:
        backend.build(lambda: COUNTING)
        submits = []
        submit = backend.pool.submit
        backend.pool.submit = lambda *a: submits.append(1) or submit(*a)
        run = Run.create_empty(run_id=RUN)
        mapping = {100 + p: p for p in range(5)}
        got = {}
        for name, worker in (("flower", FLOWERS_WORKER), ("fedsim", vce.worker)):
            stores = vce_api._register_node_info_stores(mapping, run)
            replies, submits[:] = [], []
            for step in range(2):  # the second round sees the first's context
                messages = [
                    Message(
                        RecordDict({"config": ConfigRecord({"x": 1.5 * n + step})}),
                        dst_node_id=node,
                        message_type="train",
                    )
                    for n, node in enumerate(mapping)
                ]
                for message in messages:
                    message.metadata.__dict__["_message_id"] = str(uuid4())
                by_id = _drain(worker, backend, stores, messages)
                replies += [by_id[m.metadata.message_id] for m in messages]
            got[name] = (
                [
                    (r.error.code, r.error.reason)
                    if r.has_error()
                    else dict(r.content["metrics"])
                    for r in replies
                ],
                {
                    n: {k: dict(v) for k, v in s.retrieve_context(RUN).state.items()}
                    for n, s in stores.items()
                },
                len(submits),
            )
        flower, fedsim = got["flower"], got["fedsim"]
        assert fedsim[1] == flower[1]  # contexts
        for ours, theirs in zip(fedsim[0], flower[0], strict=True):
            if isinstance(theirs, dict):
                assert ours == theirs
                continue
            # Ray's error names the remote traceback; fedsim quotes it whole
            assert ours[0] == theirs[0] == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            assert ours[1].startswith("<class 'flwr.clientapp.client_app.ClientAppE")
            for reason in (ours[1], theirs[1]):
                assert "ValueError: partition 3 always fails" in reason
                assert 'test_vce.py", line' in reason
        assert flower[0][5] == {"y": 2.0, "n": 2}
        # a call per message; the first alone (its time unknown), then batches
        assert (flower[2], fedsim[2]) == (10, 3)
    finally:
        backend.terminate()
        ray.shutdown()


def test_a_batch_that_cannot_run_gets_error_replies():
    """A node without a context and a pool that cannot take the call: each
    message gets the error reply Flower's worker sends for what was raised."""
    from flwr.supercore.run import Run

    class Pool:
        def submit(self, *_):
            raise RuntimeError("no actor left")

    backend = type("Backend", (), {"pool": Pool(), "app_fn": None})()
    stores = vce_api._register_node_info_stores({1: 0}, Run.create_empty(run_id=RUN))
    messages = [
        Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2)
    ]
    replies = vce.process_messages(backend, stores, messages)
    assert [r.metadata.reply_to_message_id for r in replies] == [
        m.metadata.message_id for m in messages
    ]
    assert [(r.error.code, r.error.reason) for r in replies] == [
        (ErrorCode.UNKNOWN, "<class 'RuntimeError'>:<'no actor left'>"),
        (ErrorCode.UNKNOWN, "<class 'KeyError'>:<'2'>"),
    ]


def test_a_worker_survives_a_batch_that_raises(monkeypatch):
    """Whatever goes wrong with a call, its messages get error replies and the
    worker goes on with the next ones."""
    calls = []

    def process(backend, stores, messages):
        calls.append(len(messages))
        if len(calls) == 1:
            raise RuntimeError("lost")
        return [Message(RecordDict(), reply_to=m) for m in messages]

    monkeypatch.setattr(vce, "process_messages", process)
    backend = type("Backend", (), {"num_workers": 1})()
    messages = [
        Message(RecordDict(), dst_node_id=n + 1, message_type="train") for n in range(2)
    ]
    for message in messages:
        message.metadata.__dict__["_message_id"] = str(uuid4())
    replies = _drain(vce.worker, backend, {}, messages)
    first, second = (replies[m.metadata.message_id] for m in messages)
    assert first.error.reason == "<class 'RuntimeError'>:<'lost'>"
    assert not second.has_error() and calls == [1, 1]
