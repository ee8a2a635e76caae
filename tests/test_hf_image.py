"""``model.task = "image-classification"`` on a Hugging Face ViT folder with its
image processor: the head's ``num_labels`` from the data, the pixels exactly
the processor's own call on the user's images, the loss HF's own, and a
federated round that trains it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.core.loading import load_experiment

CLASSES = 5


@pytest.fixture(scope="module")
def vit_assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random-init ViT (RGB 8x8, 3 labels) saved with a non-trivial
    image processor (bicubic resize to 8x8, its own mean and std), and an
    image dataset of 12x10 RGB PNGs with 5 classes (parquet)."""
    import datasets
    import transformers as tf
    from PIL import Image

    root = tmp_path_factory.mktemp("vit")
    config = tf.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
    )
    torch.manual_seed(0)
    tf.AutoModelForImageClassification.from_config(config).save_pretrained(root / "vit")
    tf.ViTImageProcessor(
        size={"height": 8, "width": 8},
        resample=3,
        image_mean=[0.4, 0.5, 0.6],
        image_std=[0.2, 0.25, 0.3],
    ).save_pretrained(root / "vit")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(60, 12, 10, 3), dtype=np.uint8)
    ds = datasets.Dataset.from_dict(
        {
            "img": [Image.fromarray(p) for p in pixels],
            "label": [i % CLASSES for i in range(60)],
        }
    ).cast_column("img", datasets.Image())
    ds.to_parquet(str(root / "images.parquet"))
    return root / "vit", root / "images.parquet"


def experiment(vit_assets: tuple[Path, Path], *more: str) -> object:
    folder, images = vit_assets
    return load_experiment(
        None,
        [
            "model.name=hf",
            f"model.path={folder}",
            "model.task=image-classification",
            "data.dataset=hf:parquet",
            f"data.path={images}",
            "data.split=train",
            "data.partitioner=iid",
            "federation.clients=2",
            "train.batch-size=8",
            "train.optimizer=adam",
            "train.lr=0.01",
            *more,
        ],
    )


def test_pixels_and_loss_are_the_processors_and_hf_models_own(
    vit_assets: tuple[Path, Path],
) -> None:
    """The head has num_labels from the data (5, the checkpoint had 3); a batch's
    pixel values equal ``processor(images=<the user's PIL images>)`` (default
    call: rescale from 8-bit, bicubic resize 12x10 -> 8x8, normalise); the task's
    loss is the HF model's own ``labels=`` loss on those pixels, and one training
    step through fedsim's loop changes only trainable weights and lowers it."""
    from PIL import Image
    from transformers import AutoImageProcessor

    from fedsim.learn.base import build_model
    from fedsim.learn.tasks import task_data, task_for
    from fedsim.learn.training import train_epochs

    exp = experiment(vit_assets)
    data = task_data(exp)  # type: ignore[arg-type]
    assert data.info.input_shape == (3, 12, 10) and data.info.num_classes == CLASSES
    model = build_model(exp.model, data.info, exp.seed)  # type: ignore[attr-defined]
    assert model.hf.config.num_labels == CLASSES
    assert model.hf.classifier.out_features == CLASSES

    x = torch.from_numpy(data.pool.x[:8])
    y = torch.from_numpy(data.pool.y[:8]).long()
    processor = AutoImageProcessor.from_pretrained(vit_assets[0])
    images = [
        Image.fromarray(np.round(row * 255).astype(np.uint8).transpose(1, 2, 0))
        for row in data.pool.x[:8]
    ]
    own = processor(images=images, return_tensors="pt")["pixel_values"]
    assert own.shape == (8, 3, 8, 8)
    torch.testing.assert_close(model.pixels(x), own, rtol=0, atol=1e-6)

    task = task_for(exp)  # type: ignore[arg-type]
    model.eval()
    with torch.no_grad():
        loss = task.loss(model, x, y)
        hf_loss = model.hf(pixel_values=own, labels=y).loss
    torch.testing.assert_close(loss, hf_loss, rtol=1e-6, atol=1e-6)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = train_epochs(
        model, [(x, y)], optimizer, epochs=1, device=torch.device("cpu"), loss=task.loss
    )
    torch.testing.assert_close(torch.tensor(stats.loss), hf_loss, rtol=1e-5, atol=1e-5)
    changed = [
        k for k, v in model.state_dict().items() if not torch.equal(v, before[k])
    ]
    assert any("classifier" in k for k in changed)
    model.eval()
    with torch.no_grad():
        assert float(task.loss(model, x, y)) < float(hf_loss)


def test_a_federated_lora_round_trains_the_vit(
    vit_assets: tuple[Path, Path], tmp_path: Path, task_identity: None
) -> None:
    """FedIT with LoRA on the ViT's q_proj/v_proj and the head saved: one
    in-process round; every client trains on processed pixels and reports
    accuracy, and the global head moves."""
    from tests.conftest import run_rounds

    exp = experiment(
        vit_assets,
        "strategy.name=fedit",
        "peft.method=lora",
        'peft.targets=["q_proj","v_proj"]',
        'peft.modules-to-save=["classifier"]',
        "peft.rank=4",
        "rounds=1",
    )
    from fedsim.core.messages import ARRAYS, METRICS

    _, grid, _ = run_rounds(exp, 1, tmp_path)
    trains = [(m, r) for m, r in grid.log if m.metadata.message_type == "train"]
    assert len(trains) == 2
    for msg, reply in trains:
        metrics = reply.content[METRICS]
        assert np.isfinite(metrics["loss"]) and metrics["num-examples"] > 0
        sent, back = msg.content[ARRAYS], reply.content[ARRAYS]
        head = [k for k in back if "classifier" in k]
        assert head and all(
            not np.array_equal(sent[k].numpy(), back[k].numpy())
            for k in head
            if k in sent
        )
