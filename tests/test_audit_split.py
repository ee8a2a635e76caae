"""The privacy audit of split learning: activation inversion of the first batch's
cut-layer activations against the head the server holds (in process, no Flower
runtime)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsim.audit.activations import PROMPTS, invert_activations
from fedsim.audit.inverting import invert
from fedsim.audit.maths import best_matches, psnr, relative_distance
from fedsim.audit.replay import Public
from fedsim.core import registry
from fedsim.core.errors import ConfigError
from fedsim.core.family import load
from fedsim.core.loading import load_experiment
from fedsim.core.messages import ACTIVATIONS, ARRAYS, CONFIG, CUT, SERVER_ROUND
from fedsim.core.seeding import derive_seed
from fedsim.engine.server.server_app import build
from fedsim.learn.codecs import FixedBits, decode
from fedsim.learn.split import batch_plan, from_record
from tests.conftest import TINY_SFPROMPT, InProcessGrid, training_rows

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
AUDIT_SFL = EXPERIMENTS / "audit_sfl.toml"


def _first_upload(exp: Any, pid: int = 0, one: bool = False) -> tuple:
    """The round's ``train`` exchange of the family's real client on partition
    ``pid`` (``one``: its first training example only): what the server sent
    (its client segment, from the real strategy), the client's reply, the
    client's state after it, and the client's data."""
    family = registry.family(exp.strategy.name)
    setup = build(exp)
    strategy = family.load_server()(setup)
    sent = RecordDict(
        {
            ARRAYS: ArrayRecord(strategy.client_state()),
            CONFIG: ConfigRecord({SERVER_ROUND: 1}),
        }
    )
    client = family.load_client()(exp, setup.data.info, torch.device("cpu"))
    data = setup.data.client(pid)
    if one:
        data = type(data)(pid, data.train.subset(np.array([0])), data.test)
    state = RecordDict()
    answer = client.train(sent, data, server_round=1, state=state)
    return setup, family, sent, answer, state, data


def _wire(answer: RecordDict) -> RecordDict:
    """What reaches the server of the reply: its ``cut`` record, nothing else."""
    return RecordDict({CUT: answer[CUT]})


def _attack(exp: Any, pid: int = 0, one: bool = False) -> tuple:
    setup, family, sent, answer, _, data = _first_upload(exp, pid, one)
    rec = invert(
        sent,
        _wire(answer),
        Public(exp, setup.data.info, 1),
        surface=load(family.audit),
        settings=exp.audit,
        generator=torch.Generator().manual_seed(0),
    )
    return rec, data, setup


def _batch0(exp: Any, data: Any) -> np.ndarray:
    """Oracle of the uploaded batch: the first of the client's seeded plan."""
    seed = derive_seed(exp.seed, "train", 1, data.partition_id)
    return batch_plan(len(data.train), exp.train.batch_size, 1, seed=seed)[0]


#: Measured (300 iterations, one image, partitions 0 / 1): the first linear layer
#: (64 -> 64) gives the image back (68.9 / 85.7 dB); after its ReLU (body.2,
#: about half the units silent) 10.4 / 13.1 dB.
ONE_IMAGE_BAR = 50.0


@pytest.mark.parametrize("cut", ["body.1", "body.2"])
def test_one_image_from_the_first_layer_and_not_after_its_relu(cut: str) -> None:
    """One digits image up as the mlp's first-layer output: the reconstruction is
    the image (oracle: the known image) and carries its label (SplitFed sends
    it); cut after the ReLU of a 64-wide layer, the same attack falls far short."""
    exp = load_experiment(
        AUDIT_SFL,
        ["train.batch-size=1", f"split.cut={cut}", "audit.iterations=300"],
    )
    rec, data, _ = _attack(exp, one=True)
    assert rec.images.shape == (1, 1, 8, 8)
    assert rec.labels.tolist() == data.train.y.tolist()
    value = psnr(rec.images[0], data.train.x[0])
    if cut == "body.1":
        assert value >= ONE_IMAGE_BAR
    else:
        assert value < ONE_IMAGE_BAR - 25


def test_int4_activations_blur_the_reconstruction() -> None:
    """Eight images, first-layer cut: the float activations give every image back
    (measured 76.0 dB mean); int4 codes (16 levels per channel over the batch)
    leave a clearly worse one (34.6 dB). With one row per batch int4 is
    lossless (each channel's minimum is its value)."""
    scores = {}
    for codec in ("none", "int4"):
        exp = load_experiment(
            AUDIT_SFL,
            ["split.cut=body.1", f"split.quantization={codec}", "audit.iterations=300"],
        )
        rec, data, setup = _attack(exp)
        assert rec.images.shape == (8, 1, 8, 8)
        images = setup.data.pool.x[setup.data.partitions[0]]
        scores[codec] = float(
            np.minimum(best_matches(rec.images, images)[1], 100).mean()
        )
    assert scores["none"] >= ONE_IMAGE_BAR
    assert scores["int4"] < scores["none"] - 20
    row = np.random.default_rng(0).normal(size=(1, 64)).astype(np.float32)
    int4 = FixedBits(4)
    np.testing.assert_array_equal(int4.decode(int4.encode(row)), row)


@pytest.mark.parametrize("name", ["sfl-v1", "sfl-v2", "split-ushape"])
def test_the_scene_is_the_sent_head_on_the_decoded_first_batch(name: str) -> None:
    """From the sent content and the reply's ``cut`` record alone: the observed
    activations are ``relu(x W^T + b)`` of the client's first batch with ``W, b``
    the weights the server sent (oracle: plain torch on the sent arrays and the
    true batch), and the scene's head maps that batch onto them; SplitFed's
    labels come along, U-shaped sends none."""
    exp = load_experiment(AUDIT_SFL, [f"strategy.name={name}"])
    setup, family, sent, answer, _, data = _first_upload(exp)
    scene = load(family.audit)(sent, _wire(answer), Public(exp, setup.data.info, 1))
    batch = _batch0(exp, data)
    x = torch.from_numpy(data.train.x[batch])
    weights = sent[ARRAYS].to_torch_state_dict()
    want = torch.relu(
        x.flatten(1) @ weights["body.1.weight"].T + weights["body.1.bias"]
    )
    torch.testing.assert_close(scene.observed, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(scene.forward({}, x), want, atol=1e-6, rtol=0)
    if name == "split-ushape":
        assert scene.labels is None
    else:
        assert scene.labels.tolist() == data.train.y[batch].tolist()


def test_a_reply_without_activations_gives_no_reconstruction() -> None:
    """A client with no training examples answers ``train`` with its segment
    only: nothing to invert, no row (the auditor records none)."""
    exp = load_experiment(AUDIT_SFL, [])
    setup, family, sent, answer, _, _ = _first_upload(exp)
    segment = RecordDict({ARRAYS: sent[ARRAYS]})
    rec = invert(
        sent,
        segment,
        Public(exp, setup.data.info, 1),
        surface=load(family.audit),
        settings=exp.audit,
        generator=torch.Generator().manual_seed(0),
    )
    assert rec.images.shape == (0, 1, 8, 8) and rec.labels.shape == (0,)


def test_a_coded_upload_is_seen_decoded() -> None:
    """int8: the attacker matches the values the server decodes (oracle: the
    codec's decode of the reply), off the client's float activations by at most
    half a quantization step."""
    exp = load_experiment(AUDIT_SFL, ["split.quantization=int8"])
    setup, family, sent, answer, _, data = _first_upload(exp)
    scene = load(family.audit)(sent, _wire(answer), Public(exp, setup.data.info, 1))
    cut = from_record(answer[CUT])
    decoded = decode(FixedBits(8), ACTIVATIONS, cut)
    np.testing.assert_array_equal(scene.observed.numpy(), decoded)
    x = torch.from_numpy(data.train.x[_batch0(exp, data)])
    exact = scene.forward({}, x).numpy()
    step = cut[f"{ACTIVATIONS}.scale"]
    assert 0 < np.abs(decoded - exact).max() <= step.max() / 2 + 1e-6


#: A tiny SFPrompt (no pre-training) on digits: a 16-wide ViT of 4x4 patches, its
#: head the embedding and block 0. Measured (200 iterations): 36.2 dB mean over the
#: 5 kept images (24.0 to 49.0), the prompts optimised.
SFPROMPT = (
    *TINY_SFPROMPT,
    "federation.clients=20",
    "data.client-test-fraction=0.89",
    "train.batch-size=8",
    "audit.attack=inverting-activations",
    "audit.iterations=200",
)


def test_sfprompt_prompts_are_optimised_from_the_sent_ones() -> None:
    """SFPrompt updates its prompts locally before batch 0: the scene starts the
    prompts at the sent ones; with the client's live prompts (from its
    ``context.state``, unknown to the server) the head maps the true batch onto
    the observed activations exactly, with the sent ones it does not; the attack
    gives the kept images back."""
    from fedsim.clients.split import CURSOR, WEIGHTS

    exp = load_experiment(None, list(SFPROMPT))
    setup, family, sent, answer, state, data = _first_upload(exp)
    public = Public(exp, setup.data.info, 1)
    scene = load(family.audit)(sent, _wire(answer), public)
    torch.testing.assert_close(
        scene.unknowns[PROMPTS],
        sent[ARRAYS].to_torch_state_dict()[PROMPTS],
        atol=0,
        rtol=0,
    )
    live = state[WEIGHTS].to_torch_state_dict()[PROMPTS]
    kept = np.asarray(state[CURSOR]["kept"])
    seed = derive_seed(exp.seed, "train", 1, data.partition_id)
    batch = kept[batch_plan(len(kept), exp.train.batch_size, 1, seed=seed)[0]]
    x = torch.from_numpy(data.train.x[batch])
    with torch.no_grad():
        exact = relative_distance(scene.forward({PROMPTS: live}, x), scene.observed)
        stale = relative_distance(scene.forward(scene.unknowns, x), scene.observed)
    assert float(exact) < 1e-10 < float(stale)
    rec = invert_activations(
        scene, public, settings=exp.audit, generator=torch.Generator().manual_seed(0)
    )
    assert (rec.labels == -1).all()
    images = setup.data.pool.x[setup.data.partitions[0]]
    assert best_matches(rec.images, images)[1].mean() >= 25


def test_the_attack_must_fit_the_upload() -> None:
    with pytest.raises(ConfigError, match="use audit.attack = 'inverting-activations'"):
        load_experiment(AUDIT_SFL, ["audit.attack=inverting-gradients"])
    with pytest.raises(ConfigError, match="use audit.attack = 'inverting-gradients'"):
        load_experiment(
            EXPERIMENTS / "audit_fedavg.toml", ["audit.attack=inverting-activations"]
        )


def _run(exp: Any, run_dir: Path) -> pd.DataFrame:
    from fedsim.engine.server.server_app import recorder_for, run

    recorder = recorder_for(exp, run_dir)
    with recorder.recording():
        run(InProcessGrid({21: 0, 22: 1, 23: 2}, exp, build(exp).data), exp, recorder)
    return pd.read_parquet(run_dir / "metrics.parquet")


def test_the_audited_split_run_trains_exactly_as_the_run_without(
    task_identity: None, tmp_path: Path
) -> None:
    """SplitFed V1, same seed, with and without ``[audit]``: every training and
    evaluation metric is bit-identical; the audited run adds ``attack-psnr`` for
    the attacked clients of round 2 and their grids."""
    base = [
        "rounds=2",
        "federation.clients=3",
        "federation.fraction-train=1.0",
        "data.client-test-fraction=0.9",
        "train.batch-size=4",
    ]
    audit = ["audit.rounds=[2]", "audit.clients=2", "audit.iterations=3"]
    plain = _run(
        load_experiment(AUDIT_SFL, [*base, "audit.attack=none"]), tmp_path / "p"
    )
    audited = _run(load_experiment(AUDIT_SFL, [*base, *audit]), tmp_path / "a")

    pd.testing.assert_frame_equal(training_rows(plain), training_rows(audited))
    rows = audited[audited["metric"] == "attack-psnr"]
    assert set(rows["round"]) == {2}
    assert sorted(rows[rows["client"].notna()]["client"]) == [0, 1]
    grids = sorted(p.name for p in (tmp_path / "a" / "attacks").iterdir())
    assert grids == [
        f"round-2-client-{pid}-inverting-activations.png" for pid in (0, 1)
    ]


def test_the_auditor_keeps_the_batches_it_is_asked_for(task_identity: None) -> None:
    """``audit.batches = [1, 2]``: of a client's activation uploads (batch 0
    answers ``train``, batch t the t-th gradient) the auditor keeps batches 1
    and 2, each with the ``train`` content (the head the server sent); a reply
    under ``cut`` without activations (U-shaped's tail gradient) is no batch."""
    from flwr.app import Array, Message

    from fedsim.audit.auditor import Auditor
    from tests.conftest import reply_metadata

    exp = load_experiment(AUDIT_SFL, ["audit.batches=[1, 2]"])
    auditor = Auditor(exp, None, None, registry.family(exp.strategy.name).audit)

    def cut(name: str, value: float) -> RecordDict:
        values = Array(np.full((2, 3), value, np.float32))
        return RecordDict({CUT: ArrayRecord({f"{name}.values": values})})

    head = RecordDict({ARRAYS: ArrayRecord({"w": Array(np.zeros(2, np.float32))})})
    steps = [
        ("train", head, cut(ACTIVATIONS, 0.0)),
        ("train.split_step", cut("gradient", 9.0), cut(ACTIVATIONS, 1.0)),
        ("train.split_tail", cut(ACTIVATIONS, 9.0), cut("gradient", 9.0)),
        ("train.split_step", cut("gradient", 9.0), cut(ACTIVATIONS, 2.0)),
        ("train.split_step", cut("gradient", 9.0), cut(ACTIVATIONS, 3.0)),
    ]
    for kind, down, up in steps:
        sent = Message(content=down, dst_node_id=7, message_type=kind)
        back = Message(content=up, metadata=reply_metadata(7, "x", kind))
        auditor.observe(1, [sent], [back], {7: 4})
    kept = auditor._seen[4]
    assert [batch for batch, _, _ in kept] == [1, 2]
    assert all(sent is head for _, sent, _ in kept)
    values = [r[CUT][f"{ACTIVATIONS}.values"].numpy()[0, 0] for _, _, r in kept]
    assert values == [1.0, 2.0]
