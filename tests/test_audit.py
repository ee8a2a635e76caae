"""The privacy audit: its formulas, its replays of client training, the attack,
and the audited run (in process, no Flower runtime)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedsim.audit.hypernetwork import EMBEDDING
from fedsim.audit.inverting import invert
from fedsim.audit.maths import (
    best_matches,
    cosine_distance,
    infer_label_counts,
    psnr,
    total_variation,
)
from fedsim.audit.replay import Public, simulate
from fedsim.core import registry
from fedsim.core.errors import ConfigError
from fedsim.core.family import load
from fedsim.core.loading import load_experiment
from fedsim.core.messages import ARRAYS, CONFIG, METRICS, PARTITION_ID, SERVER_ROUND
from fedsim.core.seeding import derive_seed
from fedsim.engine.server.server_app import build
from fedsim.learn.training import make_loader
from tests.conftest import ScriptedGrid, reply, training_rows

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

# -- formulas ----------------------------------------------------------------------


def test_psnr_and_best_matches_against_explicit_loops() -> None:
    rng = np.random.default_rng(0)
    images = rng.random((5, 1, 4, 4))
    rec = images[[3, 0]] + rng.normal(0, 0.05, (2, 1, 4, 4))
    index, scores = best_matches(rec, images)
    for i, r in enumerate(rec):
        each = [10 * np.log10(1 / np.mean((r - im) ** 2)) for im in images]
        assert index[i] == int(np.argmax(each))
        assert scores[i] == pytest.approx(max(each))
        assert psnr(r, images[index[i]]) == pytest.approx(max(each))
    assert list(index) == [3, 0]
    assert psnr(images[0], images[0]) == float("inf")


def test_total_variation_and_cosine_distance() -> None:
    x = torch.tensor([[[[0.0, 1.0], [3.0, 3.0]]]])
    # horizontal |1-0|, |3-3| -> mean 0.5; vertical |3-0|, |3-1| -> mean 2.5
    assert float(total_variation(x)) == pytest.approx(3.0)
    assert float(total_variation(torch.ones(2, 5))) == 0.0
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}
    b = {"w": torch.tensor([2.0, 0.0]), "b": torch.tensor([-1.0])}
    va, vb = np.array([1.0, 2.0, 3.0]), np.array([2.0, 0.0, -1.0])
    want = 1 - va @ vb / np.linalg.norm(va) / np.linalg.norm(vb)
    assert float(cosine_distance(a, b)) == pytest.approx(want, rel=1e-6)


def test_label_counts_from_the_output_bias_update() -> None:
    """One cross-entropy SGD step on a linear head whose predictions are about
    uniform: the counts are read off the bias update, the label held once (whose
    bias fell) included (oracle: the counts drawn)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 5)
    with torch.no_grad():
        head.bias.zero_()
    x = torch.randn(8, 6) * 0.1
    y = torch.tensor([1, 1, 1, 1, 1, 3, 3, 4])
    before = head.bias.detach().clone()
    F.cross_entropy(head(x), y).backward()
    with torch.no_grad():
        head.bias -= 0.1 * head.bias.grad  # type: ignore[operator]
    counts = infer_label_counts((head.bias.detach() - before).numpy(), 8)
    assert counts.tolist() == [0, 5, 0, 2, 1]
    one = np.array([-0.1, 0.3, -0.2])  # one example: its label's bias rises
    assert infer_label_counts(one, 1).tolist() == [0, 1, 0]


# -- the replays reproduce the real clients' training --------------------------------


def _client_round(path: Path, overrides: list[str], pid: int = 0) -> tuple:
    """One real round of the family's client on partition ``pid``: the sent and
    replied contents, and what the client really held (its data, its state)."""
    exp = load_experiment(path, overrides)
    family = registry.family(exp.strategy.name)
    setup = build(exp)
    strategy = family.load_server()(setup)
    arrays = getattr(strategy, "shared", setup.initial)
    if family.name == "flora":  # FLoRA sends only the weights rounds change
        keep = {"body.1.weight", "body.4.weight", "head.weight", "head.bias"}
        arrays = ArrayRecord({k: v for k, v in arrays.items() if k in keep})
    client = family.load_client()(exp, setup.data.info, torch.device("cpu"))
    sent = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({SERVER_ROUND: 1})})
    state = RecordDict()
    data = setup.data.client(pid)
    answer = client.train(sent, data, server_round=1, state=state)
    return exp, setup, family, client, sent, answer, state, data


def _loader_order(exp: Any, data: Any, passes: int) -> tuple[torch.Tensor, ...]:
    """The examples in the order the client's seeded loader gave them in its
    ``passes``-th pass (the oracle of the replay's input order)."""
    seed = derive_seed(exp.seed, "train", 1, data.partition_id)
    loader = make_loader(data.train, exp.train.batch_size, seed=seed)
    for _ in range(passes):
        batches = list(loader)
    return tuple(torch.cat(parts) for parts in zip(*batches))


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("fedavg", []),
        ("flora", []),
        ("hyperfl", []),
        ("hyperfl", ["strategy.head-bias=false"]),
        ("hyperfl", ["strategy.share=trunk"]),
        ("hyperfl_lpm", []),
    ],
)
def test_the_replay_on_the_true_data_is_the_uploaded_update(
    name: str, extra: list[str]
) -> None:
    """Given the client's own examples (in its loader's order) and, for HyperFL,
    its private embedding and head (and, with private output heads, those),
    the attacker's replay of local training (three SGD-with-momentum steps of
    batch 3) equals the update the real client uploaded."""
    overrides = ["train.batch-size=3", *extra]
    exp, setup, family, client, sent, answer, state, data = _client_round(
        EXPERIMENTS / f"audit_{name}.toml", overrides
    )
    scene = load(family.audit)(sent, answer, Public(exp, setup.data.info, 1))
    unknowns: dict[str, torch.Tensor] = {}
    passes = 1
    if name.startswith("hyperfl"):
        from fedsim.clients.hyperfl import PRIVATE

        private = state[PRIVATE].to_torch_state_dict()
        first = client.initial_private(data.partition_id)
        unknowns = {EMBEDDING: first[EMBEDDING]}
        unknowns.update({k: private[k] for k in ("head.weight", "head.bias")})
        prefix = "hypernetwork."
        unknowns.update({k[len(prefix) :]: v for k, v in first.items() if prefix in k})
        passes = 2  # the head phase took the loader's first pass
    x, y = _loader_order(exp, data, passes)
    assert scene.examples == len(x) == 8
    update = simulate(scene, x, y, unknowns)
    for key, want in scene.observed.items():
        np.testing.assert_allclose(
            update[key].detach().numpy(), want.numpy(), rtol=1e-4, atol=1e-6
        )


# -- the attack ----------------------------------------------------------------------


def _one_image_round(overrides: list[str]) -> tuple:
    """One image, one local step: a client of audit_fedavg.toml trained on its
    first training example only."""
    exp = load_experiment(
        EXPERIMENTS / "audit_fedavg.toml",
        ["train.batch-size=1", "train.momentum=0.0", "train.lr=0.1", *overrides],
    )
    family = registry.family(exp.strategy.name)
    setup = build(exp)
    client = family.load_client()(exp, setup.data.info, torch.device("cpu"))
    data = setup.data.client(0)
    one = type(data)(0, data.train.subset(np.array([0])), data.test)
    sent = RecordDict({ARRAYS: setup.initial, CONFIG: ConfigRecord({SERVER_ROUND: 1})})
    answer = client.train(sent, one, server_round=1, state=RecordDict())
    return exp, setup, family, sent, answer, one


def _attack(  # type: ignore[no-untyped-def]
    exp: Any, setup: Any, family: Any, sent: RecordDict, answer: RecordDict, y: Any
):
    # Only what the server holds: the sent content, the reply's arrays and
    # metrics as they came over the wire, and the public experiment.
    wire = RecordDict({ARRAYS: answer[ARRAYS], METRICS: answer[METRICS]})
    return invert(
        sent,
        wire,
        Public(exp, setup.data.info, 1),
        surface=load(family.audit),
        settings=exp.audit,
        generator=torch.Generator().manual_seed(0),
        labels=None if exp.audit.labels == "inferred" else y,
    )


#: Measured (300 iterations): 37.3 dB with labels inferred or known; 4.3 dB under
#: DP-SGD with noise multiplier 1.
ONE_IMAGE_BAR = 25.0


def test_one_image_one_step_is_reconstructed() -> None:
    """Tiny mlp, one digits image, one SGD step, labels inferred from the bias
    update: the reconstruction is the image (oracle: the known image)."""
    exp, setup, family, sent, answer, one = _one_image_round(
        ["audit.iterations=300", "audit.labels=inferred"]
    )
    rec = _attack(exp, setup, family, sent, answer, one.train.y)
    assert rec.labels.tolist() == one.train.y.tolist()
    assert rec.images.shape == (1, 1, 8, 8)
    assert psnr(rec.images[0], one.train.x[0]) >= ONE_IMAGE_BAR


def test_dp_sgd_noise_ruins_the_reconstruction() -> None:
    """The same setting under DP-SGD (noise multiplier 1, clipping 1): the PSNR
    falls far below the bar."""
    exp, setup, family, sent, answer, one = _one_image_round(
        [
            "audit.iterations=300",
            "privacy.mechanism=dp-sgd",
            "privacy.noise-multiplier=1.0",
            "privacy.max-grad-norm=1.0",
        ]
    )
    rec = _attack(exp, setup, family, sent, answer, one.train.y)
    assert psnr(rec.images[0], one.train.x[0]) < ONE_IMAGE_BAR - 10


def test_an_unauditable_family_or_a_late_round_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="audit.attack: strategy.name = 'local'"):
        load_experiment(
            None, ["strategy.name=local", "audit.attack=inverting-gradients"]
        )
    with pytest.raises(ConfigError, match="audit.rounds: round 30 is after"):
        load_experiment(None, ["audit.attack=inverting-gradients", "audit.rounds=[30]"])
    with pytest.raises(ConfigError, match="audit.labels"):
        load_experiment(None, ["audit.labels=guessed"])


# -- the audited run -----------------------------------------------------------------


class ClientGrid(ScriptedGrid):
    """Answers every message with the family's real client algorithm, in process
    (the ClientApp's work without Flower)."""

    def __init__(self, exp: Any, partitions: dict[int, int]):
        super().__init__(partitions)
        setup_data = build(exp).data
        self.data = setup_data
        self.client = registry.family(exp.strategy.name).load_client()(
            exp, setup_data.info, torch.device("cpu")
        )
        self.states: dict[int, RecordDict] = {n: RecordDict() for n in partitions}

    def answer(self, msg: Message, message_id: str) -> Message:
        kind = msg.metadata.message_type
        if kind == MessageType.QUERY:
            return super().answer(msg, message_id)
        node = msg.metadata.dst_node_id
        pid = self.partitions[node]
        server_round = int(msg.content[CONFIG][SERVER_ROUND])  # type: ignore[arg-type]
        method = getattr(self.client, kind.split(".")[0])
        out = method(
            msg.content,
            self.data.client(pid),
            server_round=server_round,
            state=self.states[node],
        )
        arrays = (
            {k: a.numpy() for k, a in out[ARRAYS].items()} if ARRAYS in out else None
        )
        metrics = {**dict(out[METRICS]), PARTITION_ID: pid}
        return reply(arrays, metrics, src=node, reply_to=message_id)  # type: ignore[arg-type]


def _run(exp: Any, run_dir: Path) -> pd.DataFrame:
    from fedsim.engine.server.server_app import recorder_for, run

    recorder = recorder_for(exp, run_dir)
    with recorder.recording():
        run(ClientGrid(exp, {21: 0, 22: 1, 23: 2}), exp, recorder)
    return pd.read_parquet(run_dir / "metrics.parquet")


def test_the_audited_run_trains_exactly_as_the_run_without(
    task_identity: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Same seed, with and without ``[audit]`` (three attacks): every training
    and evaluation metric is bit-identical; the audited run adds, for the
    attacked clients, ``attack-psnr/<attack>`` and ``recovered/<attack>`` of
    each attack that applies, their best as ``attack-psnr`` and ``recovered``
    (and plain means over the clients), the audit phase's seconds and the PNG
    grids; the one-step analytic attack, facing several local steps, records
    nothing and logs why."""
    base = [
        "rounds=2",
        "federation.clients=3",
        "federation.fraction-train=1.0",
        "federation.fraction-evaluate=1.0",
        "model.name=mlp",
        "model.hidden=16",
        "train.batch-size=4",
        "data.client-test-fraction=0.95",
    ]
    attacks = ["inverting-gradients", "analytic", "analytic-multistep"]
    audit = [
        f"audit.attack={attacks}",
        "audit.rounds=[2]",
        "audit.clients=2",
        "audit.iterations=3",
    ]
    plain = _run(load_experiment(None, base), tmp_path / "plain")
    with caplog.at_level(logging.WARNING, logger="flwr"):
        audited = _run(load_experiment(None, [*base, *audit]), tmp_path / "audited")

    pd.testing.assert_frame_equal(training_rows(plain), training_rows(audited))
    psnr_rows = audited[audited["metric"] == "attack-psnr"]
    assert set(psnr_rows["round"]) == {2}
    assert (psnr_rows["phase"] == "train").all()
    per_client = psnr_rows[psnr_rows["client"].notna()]
    assert sorted(per_client["client"]) == [0, 1]
    mean = psnr_rows[psnr_rows["client"].isna()]["value"].item()
    assert mean == pytest.approx(per_client["value"].mean())
    clients = audited[audited["client"].notna()].set_index(["client", "metric"])
    for metric in ("attack-psnr", "recovered"):
        for pid in (0, 1):
            each = [
                clients.loc[(pid, f"{metric}/{a}"), "value"]
                for a in ("inverting-gradients", "analytic-multistep")
            ]
            assert clients.loc[(pid, metric), "value"] == max(each)
    assert not audited["metric"].isin(["attack-psnr/analytic"]).any()
    skipped = [
        r.message for r in caplog.records if "analytic not applicable" in r.message
    ]
    assert len(skipped) == 2 and "local steps" in skipped[0]
    assert ((audited["phase"] == "audit") & (audited["metric"] == "seconds")).sum() == 1
    grids = sorted(p.name for p in (tmp_path / "audited" / "attacks").iterdir())
    assert grids == [
        f"round-2-client-{pid}-{a}.png"
        for pid in (0, 1)
        for a in ("analytic-multistep", "inverting-gradients")
    ]
    assert not (tmp_path / "plain" / "attacks").exists()
    # fedsim report and the progress line show it
    from rich.console import Console

    from fedsim import analysis
    from fedsim.engine.host.progress import audit_note

    frame = analysis.load_runs([tmp_path / "plain", tmp_path / "audited"])
    table = analysis.comparison(frame)
    shown = table.set_index("run")["attack_psnr"]
    assert shown["audited"] == pytest.approx(per_client["value"].mean())
    assert np.isnan(shown["plain"])
    console = Console(width=250, record=True)
    console.print(analysis.comparison_table(table))
    assert "attack PSNR" in console.export_text()
    assert f"attack-psnr {mean:.2f} dB" in audit_note(audited, 2)
    assert audit_note(audited, 1) == "" and audit_note(plain, 2) == ""


def test_hyperfl_labels_not_in_the_upload_are_optimised_as_soft_labels() -> None:
    """HyperFL's upload has no output bias: with labels inferred, the attack
    optimises soft labels with the images and the private guesses; the same
    generator seed gives the same reconstruction."""
    exp, setup, family, client, sent, answer, state, data = _client_round(
        EXPERIMENTS / "audit_hyperfl.toml",
        ["audit.iterations=2", "audit.labels=inferred"],
    )
    public = Public(exp, setup.data.info, 1)
    scene = load(family.audit)(sent, answer, public)
    assert scene.bias is None and set(scene.unknowns) == {
        EMBEDDING,
        "head.weight",
        "head.bias",
    }
    wire = RecordDict({ARRAYS: answer[ARRAYS], METRICS: answer[METRICS]})
    rec, again = (
        invert(
            sent,
            wire,
            public,
            surface=load(family.audit),
            settings=exp.audit,
            generator=torch.Generator().manual_seed(1),
        )
        for _ in range(2)
    )
    assert rec.images.shape == (8, 1, 8, 8) and rec.labels.shape == (8,)
    assert 0.0 <= rec.images.min() and rec.images.max() <= 1.0
    np.testing.assert_array_equal(rec.images, again.images)
