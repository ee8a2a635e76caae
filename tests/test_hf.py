"""Hugging Face models and text data: tokenisation, the causal-LM loss, loading
errors, LoRA on real architectures (FLoRA == PEFT's ``cat``), in-process rounds.

The models are tiny random-init folders made offline (:mod:`tests.hf_assets`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedsim.core.errors import ConfigError
from fedsim.core.loading import load_experiment
from fedsim.core.messages import ARRAYS, LORA_SCALING, METRICS, NUM_EXAMPLES
from fedsim.engine.host.cli import main
from fedsim.learn.text import CONTEXT, PAD, TARGET, tokenize_rows, trim
from tests.hf_assets import HfAssets


def hf_experiment(model: Path, *overrides: str, task: str = "causal-lm") -> list[str]:
    return [
        "model.name=hf",
        f"model.path={model}",
        f"model.task={task}",
        "federation.clients=2",
        "data.partitioner=iid",
        "data.max-length=320",
        "train.batch-size=8",
        "train.optimizer=adam",
        "train.lr=0.01",
        "rounds=1",
        *overrides,
    ]


def alpaca(assets: HfAssets, model: Path | None = None, *more: str) -> list[str]:
    return hf_experiment(
        model or assets.llama,
        "data.dataset=file",
        f"data.path={assets.alpaca}",
        "data.format=alpaca",
        *more,
    )


def classification(assets: HfAssets, *more: str) -> list[str]:
    return hf_experiment(
        assets.bert,
        "data.dataset=file",
        f"data.path={assets.labelled_parquet}",
        "data.text-column=text",
        *more,
        task="sequence-classification",
    )


def test_text_classification_tokens_are_the_tokenizers_own_call(
    hf_assets: HfAssets,
) -> None:
    """Every batch, cut to its longest row, holds exactly the ids and attention
    mask of ``tokenizer(texts, padding="longest", truncation=True,
    max_length=...)`` on the same texts (dynamic padding), truncation included."""
    from fedsim.learn.data import federated_data
    from fedsim.learn.hf import load_tokenizer
    from fedsim.learn.tasks import task_data

    exp = load_experiment(None, classification(hf_assets, "data.max-length=8"))
    data = task_data(exp)
    raw = federated_data(exp.data, 2, exp.seed)
    tokenizer = load_tokenizer(exp.model)
    assert data.info.input_shape == (2, 8) and data.info.num_classes == 2
    assert np.array_equal(data.pool.y, raw.pool.y)
    lengths = set()
    for start in range(0, len(raw.pool), 3):
        texts = [str(t) for t in raw.pool.x[start : start + 3, 0]]
        batch = trim(torch.from_numpy(data.pool.x[start : start + 3]))
        own = tokenizer(
            texts, padding="longest", truncation=True, max_length=8, return_tensors="pt"
        )
        assert torch.equal(batch[:, 0], own["input_ids"])
        assert torch.equal((batch[:, 1] != PAD).long(), own["attention_mask"])
        lengths.add(batch.shape[-1])
    assert len(lengths) > 1 and max(lengths) == 8  # dynamic, and truncated


def test_causal_lm_loss_counts_response_tokens_only(hf_assets: HfAssets) -> None:
    """A hand-built batch of two rows (prompt, response, padding): the task's
    loss is the mean next-token cross-entropy over the response tokens, computed
    here row by row on the unpadded sequences, and equals transformers' own loss
    with the prompt and padding labelled -100."""
    from fedsim.learn.hf import HFModel, load_pretrained
    from fedsim.learn.tasks import CausalLM

    exp = load_experiment(None, alpaca(hf_assets))
    model = HFModel(load_pretrained(exp.model, 1), "causal-lm").eval()
    rows = [([1, 17, 23, 40], [55, 61, 2]), ([1, 9], [12, 2])]
    x = torch.zeros(2, 2, 10, dtype=torch.long)
    x[:, 0] = 0  # pad id
    for i, (prompt, response) in enumerate(rows):
        ids = prompt + response
        x[i, 0, : len(ids)] = torch.tensor(ids)
        x[i, 1, : len(prompt)] = CONTEXT
        x[i, 1, len(prompt) : len(ids)] = TARGET
    with torch.no_grad():
        loss = CausalLM().loss(model, x, torch.zeros(2, dtype=torch.long))
        terms = []
        for prompt, response in rows:
            ids = torch.tensor([prompt + response])
            logp = model.hf(input_ids=ids).logits[0].log_softmax(-1)
            for t in range(len(prompt), len(prompt) + len(response)):
                terms.append(-logp[t - 1, ids[0, t]])
        oracle = torch.stack(terms).mean()
        cut = trim(x)
        labels = torch.where(cut[:, 1] == TARGET, cut[:, 0], -100)
        hf_loss = model.hf(
            input_ids=cut[:, 0], attention_mask=(cut[:, 1] != PAD).long(), labels=labels
        ).loss
    assert len(terms) == 5
    torch.testing.assert_close(loss, oracle, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, hf_loss, rtol=1e-5, atol=1e-6)


def test_instruction_rows_mark_the_response_and_eos(hf_assets: HfAssets) -> None:
    """Alpaca (JSON) and Dolly (JSONL) files of the same rows load to the same
    prompts; the target tokens of a row decode to its response and EOS, the
    context to the template filled with its instruction and input."""
    from fedsim.learn.data import load_arrays
    from fedsim.learn.hf import load_tokenizer
    from fedsim.learn.text import ALPACA_NO_INPUT, ALPACA_TEMPLATE
    from tests.hf_assets import instructions

    a = load_experiment(None, alpaca(hf_assets))
    d = load_experiment(
        None,
        alpaca(hf_assets, None, "data.format=dolly", f"data.path={hf_assets.dolly}"),
    )
    rows_a, info = load_arrays(a.data, 0)
    rows_d, _ = load_arrays(d.data, 0)
    assert np.array_equal(rows_a.x, rows_d.x) and info.num_classes == 1
    source = instructions(96)
    assert rows_a.x[0, 0] == ALPACA_TEMPLATE.format(**source[0])
    assert rows_a.x[2, 0] == ALPACA_NO_INPUT.format(
        instruction=source[2]["instruction"]
    )
    tokenizer = load_tokenizer(a.model)
    tokens = tokenize_rows(rows_a.x[:3], tokenizer, 200)
    for row, raw in zip(tokens, source):
        target = row[0][row[1] == TARGET].tolist()
        assert target[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(target[:-1]) == raw["output"]
        context = row[0][row[1] == CONTEXT].tolist()
        assert context[0] == tokenizer.bos_token_id
        assert tokenizer.decode(context[1:]) == rows_a.x[source.index(raw), 0]
    custom = load_experiment(
        None, alpaca(hf_assets, None, "data.template=Q: {instruction} {input}\nA:")
    )
    rows_c, _ = load_arrays(custom.data, 0)
    assert rows_c.x[0, 0] == f"Q: {source[0]['instruction']} {source[0]['input']}\nA:"


def cli_bad(assets: HfAssets, tmp: Path) -> list[tuple[list[str], str]]:
    bad_target = 'peft.targets=["q_proj", "nope"]'
    return [
        (alpaca(assets, tmp / "missing"), "model.path: "),
        (alpaca(assets, assets.alpaca), "model.path: "),
        (classification(assets, "data.text-column=body"), "data.text-column: 'body'"),
        (
            alpaca(assets, None, "data.format=dolly"),
            "data.format: 'dolly' rows need a column 'response'",
        ),
        (alpaca(assets, None, "data.format=ragged"), "data.format: "),
        (alpaca(assets, None, "model.task=causal"), "model.task: "),
        (["model.name=no_such_pkg.mod:build"], "model.name: cannot import"),
        (classification(assets, "data.format=alpaca"), "data.text-column: "),
        (
            alpaca(assets, None, "strategy.name=flora", "peft.method=lora", bad_target),
            "peft.targets: 'nope' matches no module of the model; linear layers it "
            "has: q_proj, k_proj",
        ),
    ]


def test_bad_model_path_task_format_column_target_exit_2(
    hf_assets: HfAssets,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each: exit 2, one line naming the key, nothing written."""
    monkeypatch.chdir(tmp_path)
    for overrides, message in cli_bad(hf_assets, tmp_path):
        args = ["run", *[a for o in overrides for a in ("--set", o)]]
        code = main([*args, "--out", str(tmp_path / "runs")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (overrides, err)
        assert len(err) == 1 and message in err[0], (message, err)
        assert not (tmp_path / "runs").exists()


def random_adapters(
    base: torch.nn.Module, layout: object, rank: int, seed: int
) -> dict[str, torch.Tensor]:
    """Random A (r x d_in) and B (d_out x r) for every adapted module."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in layout.adapted:  # type: ignore[attr-defined]
        weight = base.get_submodule(name).weight
        d_out, d_in = weight.shape[::-1] if name in layout.transposed else weight.shape  # type: ignore[attr-defined]
        out[f"{name}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen)
        out[f"{name}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) / 10
    return out


@pytest.mark.parametrize(
    ("arch", "targets"),
    [("llama", '["q_proj", "v_proj"]'), ("gpt2", '["c_attn"]')],
)
def test_flora_merge_equals_peft_cat_on_real_architectures(
    hf_assets: HfAssets, arch: str, targets: str
) -> None:
    """FLoRA's merged global model, from clients of ranks 2 and 4 weighted by
    their examples, equals PEFT's own ``add_weighted_adapter(...,
    combination_type="cat")`` of the same adapters merged into the base, on
    LLaMA's ``Linear`` projections and GPT-2's fused ``Conv1D`` ``c_attn``
    (``fan_in_fan_out``)."""
    from peft import LoraConfig, get_peft_model

    from fedsim.learn.base import build_model
    from fedsim.learn.lora import lora_layout
    from fedsim.learn.tasks import task_data
    from fedsim.strategies.flora.server import FLoRA

    folder = getattr(hf_assets, arch)
    exp = load_experiment(
        None,
        alpaca(
            hf_assets,
            folder,
            "strategy.name=flora",
            "peft.method=lora",
            f"peft.targets={targets}",
            "peft.ranks=[2, 4]",
            "peft.alpha=8",
            "peft.modules-to-save=[]",
        ),
    )
    base = build_model(exp.model, task_data(exp).info, exp.seed)
    layout = lora_layout(base, exp.peft)
    assert bool(layout.transposed) == (arch == "gpt2")
    ranks, examples = (2, 4), (30.0, 10.0)
    clients = [random_adapters(base, layout, r, k) for k, r in enumerate(ranks)]
    contents = [
        RecordDict(
            {
                ARRAYS: ArrayRecord(adapters),
                METRICS: MetricRecord({NUM_EXAMPLES: n, LORA_SCALING: 8.0 / r}),
            }
        )
        for adapters, r, n in zip(clients, ranks, examples)
    ]
    initial = ArrayRecord({k: v.detach().clone() for k, v in base.state_dict().items()})
    merged, _ = FLoRA.from_layout(layout).merge(initial, contents)

    hf = base.hf
    inner = [m.removeprefix("hf.") for m in layout.adapted]
    peft_model = None
    for k, r in enumerate(ranks):
        config = LoraConfig(
            r=r, lora_alpha=8, target_modules=inner, fan_in_fan_out=arch == "gpt2"
        )
        if peft_model is None:
            peft_model = get_peft_model(hf, config, adapter_name=f"c{k}")
        else:
            peft_model.add_adapter(f"c{k}", config)
        with torch.no_grad():
            for name in inner:
                layer = peft_model.base_model.model.get_submodule(name)
                layer.lora_A[f"c{k}"].weight.copy_(
                    clients[k][f"hf.{name}.lora_A.weight"]
                )
                layer.lora_B[f"c{k}"].weight.copy_(
                    clients[k][f"hf.{name}.lora_B.weight"]
                )
    assert peft_model is not None
    p = [n / sum(examples) for n in examples]
    peft_model.add_weighted_adapter(["c0", "c1"], p, "cat", combination_type="cat")
    peft_model.set_adapter("cat")
    oracle = peft_model.merge_and_unload().state_dict()
    for name in inner:
        key = f"{name}.weight"
        got = merged[f"hf.{key}"].numpy()
        assert not np.allclose(got, initial[f"hf.{key}"].numpy())
        np.testing.assert_allclose(got, oracle[key].numpy(), rtol=1e-5, atol=1e-6)


def test_exported_model_reloads_with_the_last_server_loss(
    hf_assets: HfAssets, tmp_path: Path, task_identity: None
) -> None:
    """FLoRA rounds of a LLaMA-shaped causal LM on Alpaca rows, heterogeneous
    ranks, driven by the ServerApp's own ``run`` on an in-process grid: the
    clients' replies carry loss (train) and loss + perplexity (evaluate), and
    RUN_DIR/model, reloaded with ``AutoModelForCausalLM`` and ``AutoTokenizer``,
    gives the last server-side eval loss on the held-out split."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedsim.engine.server.run_recorder import RunRecorder
    from fedsim.engine.server.server_app import MODEL_DIR, run
    from fedsim.learn.hf import HFModel
    from fedsim.learn.tasks import CausalLM, task_data
    from tests.conftest import InProcessGrid

    exp = load_experiment(
        None,
        alpaca(
            hf_assets,
            None,
            "strategy.name=flora",
            "peft.method=lora",
            'peft.targets=["q_proj", "v_proj"]',
            "peft.modules-to-save=[]",
            "peft.ranks=[2, 4]",
            "rounds=2",
            "data.max-length=320",
        ),
    )
    data = task_data(exp)
    recorder = RunRecorder(tmp_path, exp)
    grid = InProcessGrid({100: 0, 101: 1}, exp, data)
    run(grid, exp, recorder, assign=True)
    rows = {(r, c, phase, m): v for r, c, phase, m, v in recorder.rows}
    last = rows[(2, None, "server", "loss")]
    assert rows[(2, None, "server", "perplexity")] == pytest.approx(math.exp(last))
    assert {m for (_, c, p, m) in rows if p == "evaluate" and c is not None} >= {
        "loss",
        "perplexity",
    }
    assert last < rows[(0, None, "server", "loss")]
    folder = tmp_path / MODEL_DIR
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert len(tokenizer) == model.config.vocab_size
    again = CausalLM().evaluate(
        HFModel(model, "causal-lm"), data.test, device=torch.device("cpu")
    )
    assert again.values["loss"] == pytest.approx(last, rel=1e-5)


def test_user_model_from_an_entry_point_runs_and_is_exported(
    two_client_runs: dict,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The plug-in's ``ping-linear`` (``fedsim.models`` entry point) is listed by
    ``fedsim list``, reachable as ``package.module:factory`` too, gets the model
    options and the data's shape and classes, and ran a FedAvg round through
    Flower (``two_client_runs["user-model"]``, 1 round, 2 clients): its final
    weights, under the user's own names, are RUN_DIR/model/model.safetensors and
    give the run's last server-side loss."""
    from safetensors.torch import load_file

    from fedsim.core import registry
    from fedsim.learn.base import build_model
    from fedsim.learn.tasks import task_data
    from fedsim.learn.training import evaluate
    from tests.runs import PLUGIN

    monkeypatch.syspath_prepend(str(PLUGIN))
    registry.models.cache_clear()
    try:
        assert main(["list"]) == 0
        assert "ping-linear" in capsys.readouterr().out
        run = two_client_runs["user-model"]
        exp = load_experiment(run.run_dir / "config.toml")
        named = load_experiment(None, ["model.name=fedsim_ping.model:build"])
        model = build_model(exp.model, task_data(exp).info, exp.seed)
        other = build_model(named.model, task_data(named).info, named.seed)
    finally:
        registry.models.cache_clear()
    assert type(model).__name__ == type(other).__name__ == "UserLinear"
    assert model.scale == exp.model.hidden / 64
    weights = load_file(str(run.run_dir / "model" / "model.safetensors"))
    assert weights["user_linear.weight"].shape == (10, 64)
    model.load_state_dict(weights)
    import pandas as pd

    frame = pd.read_parquet(run.run_dir / "metrics.parquet")
    server = frame[(frame.phase == "server") & (frame.metric == "loss")]
    last = float(server.sort_values("round")["value"].iloc[-1])
    stats = evaluate(model, task_data(exp).test, device=torch.device("cpu"))
    assert stats.loss == pytest.approx(last, rel=1e-5)


def test_dp_sgd_trains_lora_on_an_hf_model_and_rejects_full_training(
    hf_assets: HfAssets, tmp_path: Path, task_identity: None
) -> None:
    """DP-SGD (Opacus) with LoRA adapters on GPT-2's Conv1D ``c_attn``: a round
    trains (the guard checks every adapter got per-example gradients) and
    reports the accountant's epsilon. Full training of the HF causal LM is
    refused before the run (Opacus finds no per-example gradients for some of
    its layers)."""
    from fedsim.engine.host.checks import preflight
    from fedsim.learn.tasks import task_data
    from fedsim.privacy.accounting import epsilon as accountant_epsilon
    from fedsim.privacy.accounting import planned_steps
    from tests.conftest import run_rounds

    dp = ["privacy.mechanism=dp-sgd", "privacy.noise-multiplier=0.5"]
    lora = ["strategy.name=flora", "peft.method=lora", 'peft.targets=["c_attn"]']
    exp = load_experiment(
        None, alpaca(hf_assets, hf_assets.gpt2, *dp, *lora, "peft.modules-to-save=[]")
    )
    preflight(exp)
    _, _, recorder = run_rounds(exp, 1, tmp_path)
    epsilon = [v for _, c, p, m, v in recorder.rows if m == "epsilon" and c == 0]
    n = len(task_data(exp).client(0).train)
    q, steps, _ = planned_steps(n, exp.train.batch_size, exp.train.epochs, 1)
    history = [(0.5, q, steps)]
    oracle = accountant_epsilon(
        history, exp.privacy.target_delta, exp.privacy.accountant
    )
    assert epsilon == [pytest.approx(oracle, abs=1e-6)]
    full = load_experiment(None, alpaca(hf_assets, hf_assets.llama, *dp))
    with pytest.raises(ConfigError, match="cannot be trained in full with DP-SGD"):
        preflight(full)


def test_the_summary_table_of_a_causal_lm_run_shows_its_perplexity(
    tmp_path: Path,
) -> None:
    """A causal LM has no accuracy: the CLI's summary names its perplexity."""
    from rich.console import Console

    from fedsim.engine.host.console import summary_table

    summary = {
        "status": "completed",
        "rounds_completed": 2,
        "rounds": 2,
        "final": {"loss": 2.0, "perplexity": 7.389, "evaluate_perplexity": 8.0},
    }
    console = Console(record=True, width=100)
    console.print(summary_table(summary, tmp_path))
    text = console.export_text()
    assert "server perplexity" in text and "7.3890" in text
    assert "federated perplexity" in text and "8.0000" in text
    assert "accuracy" not in text
