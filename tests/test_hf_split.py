"""Split learning on Hugging Face transformers (:mod:`fedsim.learn.hf_split`):
the parts of a cut model run in order are the whole model, the gradient at the
cut is autograd's on the whole model, split LoRA training is centralized LoRA
training on the same batches, a U-shaped LoRA run exports a merged model that
reloads with its last server loss, and bad cuts / unsupported pairings exit 2.

Models are tiny random-init folders made offline (:mod:`tests.hf_assets`,
:mod:`fedsim.learn.tiny` for the ViT), or built from a config here (Mistral,
Qwen2 with sliding-window layers)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.core.loading import load_experiment
from fedsim.engine.host.cli import main
from fedsim.learn.hf import HFModel
from fedsim.learn.split import (
    context_arrays,
    cut_index,
    cut_tensor,
    received,
    split_model,
    stage_names,
)
from fedsim.learn.tasks import CausalLM, Classification
from tests.hf_assets import HfAssets
from tests.test_hf import alpaca, classification


def load(folder: Path, task: str = "causal-lm") -> HFModel:
    import transformers as tf

    auto = {
        "causal-lm": tf.AutoModelForCausalLM,
        "sequence-classification": tf.AutoModelForSequenceClassification,
        "image-classification": tf.AutoModelForImageClassification,
    }[task]
    return HFModel(auto.from_pretrained(folder, local_files_only=True), task).eval()


def configured(arch: str) -> HFModel:
    """A tiny Mistral (sliding window) or Qwen2 (a sliding-window layer after a
    full one) built from its config."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    if arch == "mistral":
        hf = tf.MistralForCausalLM(tf.MistralConfig(sliding_window=3, **common))
    else:
        config = tf.Qwen2Config(
            use_sliding_window=True, sliding_window=3, max_window_layers=1, **common
        )
        assert "sliding_attention" in config.layer_types
        hf = tf.Qwen2ForCausalLM(config)
    return HFModel(hf, "causal-lm").eval()


def batch(vocab: int, seed: int = 0) -> torch.Tensor:
    """Three tokenised rows, two of them right-padded; targets after token 2
    (``vocab`` 0: three 8x8 images)."""
    g = torch.Generator().manual_seed(seed)
    if not vocab:
        return torch.rand(3, 1, 8, 8, generator=g)
    x = torch.zeros(3, 2, 10, dtype=torch.long)
    x[:, 0] = torch.randint(3, vocab, (3, 10), generator=g)
    x[:, 1] = 2
    x[:, 1, :3] = 1
    x[1, :, 7:] = 0
    x[2, :, 5:] = 0
    return x


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedsim.learn.tiny import make_folder

    return make_folder(tmp_path_factory.mktemp("vit"), "vit")


def model_of(arch: str, assets: HfAssets, vit: Path) -> tuple[HFModel, int]:
    if arch in ("mistral", "qwen2"):
        return configured(arch), 64
    if arch == "vit":
        return load(vit, "image-classification"), 0
    task = "sequence-classification" if arch == "bert" else "causal-lm"
    model = load(getattr(assets, arch), task)
    return model, int(model.hf.config.vocab_size)


ARCHS = ["llama", "gpt2", "bert", "mistral", "qwen2", "vit"]


@pytest.mark.parametrize("arch", ARCHS)
def test_client_part_then_server_part_is_the_whole_model(
    arch: str, hf_assets: HfAssets, vit_folder: Path
) -> None:
    """At every block cut, client part -> (tensor + padding mask on the wire)
    -> server part gives the unsplit model's logits and loss."""
    model, vocab = model_of(arch, hf_assets, vit_folder)
    x = batch(vocab)
    names = stage_names(model)
    with torch.no_grad():
        whole = model(x)
        for cut in names[1:-2]:
            head, tail = split_model(model, [cut_index(model, cut)])
            out = head(x)
            wire = {**context_arrays(out)}
            logits = tail(received(wire, cut_tensor(out).clone()))
            torch.testing.assert_close(logits, whole, rtol=0, atol=1e-6)
    if vocab and arch != "bert":
        task = CausalLM()
        whole_loss = model.hf(
            input_ids=x[:, 0],
            attention_mask=(x[:, 1] > 0).long(),
            labels=torch.where(x[:, 1] == 2, x[:, 0], -100),
        ).loss
        split_loss = task.logits_loss(logits, task.targets(x, torch.zeros(3)))
        torch.testing.assert_close(split_loss, whole_loss, rtol=1e-6, atol=1e-6)


def block_of(model: HFModel, name: str) -> torch.nn.Module:
    return model.hf.get_submodule(name)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "vit"])
def test_gradient_at_the_cut_is_autograd_of_the_whole_model(
    arch: str, hf_assets: HfAssets, vit_folder: Path
) -> None:
    """The server's gradient of the cut activations (ServerSegment.step, the
    task's loss) equals ``torch.autograd.grad`` of the unsplit model's loss
    with respect to the cut block's output, caught by a forward hook."""
    from fedsim.core.experiment import TrainConfig
    from fedsim.strategies.split.server import ServerSegment

    model, vocab = model_of(arch, hf_assets, vit_folder)
    for module in model.modules():  # the server segment trains: no dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    task = Classification() if arch in ("bert", "vit") else CausalLM()
    x = batch(vocab, seed=1)
    y = torch.tensor([0, 1, 1])
    cut = stage_names(model)[1]  # the client: the embeddings and block 0
    caught: list[torch.Tensor] = []
    hook = block_of(model, cut).register_forward_hook(lambda m, i, o: caught.append(o))
    loss = task.loss(model, x, y)
    hook.remove()
    (oracle,) = torch.autograd.grad(loss, caught[0])
    head, tail = split_model(model, [cut_index(model, cut)])
    out = head(x)
    server = ServerSegment(tail, TrainConfig(lr=0.0), torch.device("cpu"), task)
    gradient, value = server.step(
        cut_tensor(out).detach().numpy(),
        task.targets(x, y).numpy(),
        context_arrays(out),
    )
    assert value == pytest.approx(loss.item(), rel=1e-6)
    np.testing.assert_allclose(gradient, oracle.numpy(), rtol=1e-5, atol=1e-7)
    assert np.abs(oracle.numpy()).max() > 0


LORA = (
    "peft.method=lora",
    'peft.targets=["q_proj", "v_proj"]',
    "peft.modules-to-save=[]",
    "peft.rank=4",
    "peft.dropout=0",
)


def test_split_lora_training_is_centralized_lora_training(
    hf_assets: HfAssets, tmp_path: Path, task_identity: None
) -> None:
    """One SplitFed V2 round, one client, LoRA on a LLaMA cut after block 0,
    run in-process through the real client and server: only adapters travel,
    and the round's adapters equal Adam on the unsplit LoRA model over the same
    batches (client and server optimise disjoint parameters)."""
    from fedsim.core.seeding import derive_seed
    from fedsim.learn.base import build_model
    from fedsim.learn.hf_split import prepare
    from fedsim.learn.split import batch_plan
    from fedsim.learn.tasks import task_data
    from fedsim.learn.training import make_optimizer
    from tests.conftest import run_rounds

    exp = load_experiment(
        None,
        alpaca(
            hf_assets,
            None,
            "strategy.name=sfl-v2",
            "split.cut=model.layers.0",
            "federation.clients=1",
            "data.max-length=160",
            "train.epochs=1",
            "train.batch-size=16",
            *LORA,
        ),
    )
    final, grid, _ = run_rounds(exp, 1, tmp_path)
    sent = grid.log[0][0].content["arrays"]
    assert sent.keys() and all("lora_" in k for k in sent.keys())
    assert all(".layers.0." in k for k in sent.keys())
    whole = task_data(exp)
    data = whole.client(0)
    model = prepare(build_model(exp.model, whole.info, exp.seed), exp)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, exp.train)
    seed = derive_seed(exp.seed, "train", 1, 0)
    task = CausalLM()
    for rows in batch_plan(
        len(data.train), exp.train.batch_size, exp.train.epochs, seed=seed
    ):
        optimizer.zero_grad()
        x = torch.from_numpy(data.train.x[rows])
        task.loss(model, x, torch.zeros(len(rows))).backward()
        optimizer.step()
    state = model.state_dict()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".layers.1." in n for n in trained)
    bad = [
        n
        for n in trained
        if not np.allclose(final[n].numpy(), state[n].numpy(), rtol=1e-4, atol=1e-6)
    ]
    assert not bad, (bad, trained)


def test_ushape_lora_run_exports_a_merged_model_with_its_last_loss(
    hf_assets: HfAssets, tmp_path: Path, task_identity: None
) -> None:
    """U-shaped split LoRA fine-tuning of a LLaMA-shaped model, 2 clients, 2
    rounds, through the ServerApp's ``run`` on an in-process grid: the server
    loss falls, and RUN_DIR/model (LoRA merged) reloads with
    ``AutoModelForCausalLM`` giving the last server-side loss."""
    from transformers import AutoModelForCausalLM

    from fedsim.engine.server.run_recorder import RunRecorder
    from fedsim.engine.server.server_app import MODEL_DIR, run
    from fedsim.learn.tasks import task_data
    from tests.conftest import InProcessGrid

    exp = load_experiment(
        None,
        alpaca(
            hf_assets,
            None,
            "strategy.name=split-ushape",
            "split.cut=model.layers.0",
            "split.tail=model.norm",
            "rounds=2",
            "data.max-length=160",
            "train.epochs=1",
            "train.batch-size=16",
            *LORA,
        ),
    )
    data = task_data(exp)
    recorder = RunRecorder(tmp_path, exp)
    run(InProcessGrid({100: 0, 101: 1}, exp, data), exp, recorder, assign=True)
    rows = {(r, c, p, m): v for r, c, p, m, v in recorder.rows}
    last = rows[(2, None, "server", "loss")]
    assert last < rows[(0, None, "server", "loss")]
    assert rows[(2, None, "server", "perplexity")] == pytest.approx(math.exp(last))
    hf = AutoModelForCausalLM.from_pretrained(
        tmp_path / MODEL_DIR, local_files_only=True
    )
    again = CausalLM().evaluate(
        HFModel(hf, "causal-lm"), data.test, device=torch.device("cpu")
    )
    assert again.values["loss"] == pytest.approx(last, rel=1e-5)


def test_bad_cuts_and_unsupported_pairings_exit_2(
    hf_assets: HfAssets,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each: exit 2, one line naming the key, nothing written."""
    monkeypatch.chdir(tmp_path)
    lora = ("strategy.name=sfl-v1", *LORA)
    cases = [
        (
            classification(
                hf_assets, f"model.path={hf_assets.llama}", "strategy.name=sfl-v1"
            ),
            "split.cut: split learning cuts Hugging Face models of the classes "
            "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel"
            ", BertForSequenceClassification, ViTForImageClassification; "
            "'sequence-classification' loaded a LlamaForSequenceClassification",
        ),
        (
            alpaca(hf_assets, None, *lora, "split.cut=model.layers.7"),
            "split.cut: 'model.layers.7' is not a stage of this model; use one of "
            "model.embed_tokens, model.layers.0, model.layers.1",
        ),
        (
            alpaca(hf_assets, None, *lora, "audit.attack=inverting-activations"),
            "audit.attack: the split audit reconstructs image inputs",
        ),
        (
            alpaca(
                hf_assets, None, "strategy.name=sfprompt", "split.cut=model.layers.0"
            ),
            "model.name: sfprompt prompts the packaged 'vit'",
        ),
        (
            alpaca(hf_assets, hf_assets.gpt2, "strategy.name=sfl-v1"),
            "peft.method: GPT2LMHeadModel ties its output layer",
        ),
        (
            alpaca(hf_assets, None, *lora, "peft.ranks=[2, 4]"),
            "peft.ranks: split learning trains one LoRA rank",
        ),
        (
            alpaca(hf_assets, None, *lora, "model.dtype=bfloat16"),
            "model.dtype: split learning sends float32",
        ),
        (
            classification(hf_assets, "strategy.name=split-ushape", "split.tail=x"),
            "split.tail: 'x' is not a stage of this model",
        ),
    ]
    for overrides, message in cases:
        args = ["run", *[a for o in overrides for a in ("--set", o)]]
        code = main([*args, "--out", str(tmp_path / "runs")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (overrides, err)
        assert len(err) == 1 and message in err[0], (message, err)
        assert not (tmp_path / "runs").exists()
