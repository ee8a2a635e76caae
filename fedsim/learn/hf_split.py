"""Cutting Hugging Face transformers into stages, for split learning.

An ``hf`` model (:class:`fedsim.learn.hf.HFModel`) is cut at a *block*: the
stages are the embeddings, every block of the model's block list, the final
norm (or pooler) and the output layer, named by the model's own module paths
(what ``model.hf.named_modules()`` calls them), so ``split.cut =
"model.layers.1"`` puts the embeddings and blocks 0 and 1 on the client. Each
architecture is described explicitly (:data:`ARCHITECTURES`, keyed by the
``transformers`` class), with its forward conventions reproduced exactly:

- LLaMA, Mistral, Qwen2 (``*ForCausalLM``): ``model.embed_tokens``,
  ``model.layers.<i>``, ``model.norm``, ``lm_head``. Positions are ``0..L-1``
  (right padding); every block gets the mask of its attention kind built by
  ``transformers.masking_utils`` (causal, or sliding-window where the config
  says so) from the padding mask, and the rotary ``(cos, sin)`` computed by the
  model's own ``rotary_emb``.
- GPT-2 (``GPT2LMHeadModel``): ``transformer.wte`` (token + position
  embeddings ``wpe``, then dropout), ``transformer.h.<i>`` (the causal mask),
  ``transformer.ln_f``, ``lm_head``.
- BERT (``BertForSequenceClassification``): ``bert.embeddings``,
  ``bert.encoder.layer.<i>`` (the bidirectional padding mask), ``bert.pooler``,
  ``classifier`` (dropout, then the linear layer).
- ViT (``ViTForImageClassification``): ``vit.embeddings`` (of the images as
  :meth:`fedsim.learn.hf.HFModel.pixels` prepares them), ``vit.layers.<i>``,
  ``vit.layernorm``, ``classifier`` (of the class token). Images have no
  padding: plain tensors cross the cut.

``head`` also names the output layer of every architecture (the default
``split.tail``). Between stages a batch travels as a :class:`Carry`: the
hidden states and the padding mask. Across the wire the hidden states are the
cut tensor (coded, differentiated) and the mask travels beside them as
context (:func:`cut_tensor`, :func:`cut_context`, :func:`join`); the masks and
rotary embeddings each side needs are rebuilt from it, as the unsplit model
builds them from ``attention_mask``.

LoRA (``peft.method = "lora"``, :func:`prepare`): PEFT's LoRA layers are
injected in place into the ``peft.targets`` (so the model stays an
``HFModel`` and the stage prefixes hold), A drawn as FedIT's and FLoRA's first
round (:func:`fedsim.learn.lora.initial_a`, from the run's seed), B = 0; only
the adapters and ``peft.modules-to-save`` train, and only they travel
(:func:`carried`). Adapters persist across rounds and are averaged as any
segment weight (FedAvg of A and of B, as SplitLoRA does; not the average of
the products ``B A``, which FLoRA addresses).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsim.core.errors import ConfigError
from fedsim.core.seeding import derive_seed
from fedsim.learn.hf import HFModel
from fedsim.learn.text import PAD, trim

#: ``(name, forward, parameter prefixes)`` of one stage (as
#: :data:`fedsim.learn.split.Stage`).
Stage = tuple[str, Callable[[Any], Any], tuple[str, ...]]

#: Name of the context array holding a cut's padding mask.
MASK = "mask"


@dataclass
class Carry:
    """A batch between two stages: hidden states ``(b, L, d)``, the padding
    mask ``(b, L)`` (1: attended), and what the blocks derive from them (masks
    per attention kind, rotary embeddings), built once per segment."""

    hidden: torch.Tensor
    mask: torch.Tensor
    derived: dict[str, Any] = field(default_factory=dict)

    def then(self, hidden: torch.Tensor) -> Carry:
        """The same batch with new hidden states."""
        return Carry(hidden, self.mask, self.derived)


def cut_tensor(value: Any) -> torch.Tensor:
    """The tensor that crosses a cut (coded, and differentiated through)."""
    return value.hidden if isinstance(value, Carry) else value


def cut_context(value: Any) -> dict[str, np.ndarray]:
    """Arrays that cross a cut beside its tensor: the padding mask of a batch
    of hidden states (uint8), nothing for a plain tensor."""
    if isinstance(value, Carry):
        return {MASK: value.mask.detach().cpu().numpy().astype(np.uint8)}
    return {}


def join(tensor: torch.Tensor, context: dict[str, np.ndarray]) -> Any:
    """A received cut tensor as the next stage takes it."""
    if MASK in context:
        mask = torch.from_numpy(np.asarray(context[MASK], dtype=np.int64))
        return Carry(tensor, mask.to(tensor.device))
    return tensor


def _positions(c: Carry) -> torch.Tensor:
    """Position ids ``0..L-1`` (right padding; what the models use without
    ``position_ids``)."""
    if "positions" not in c.derived:
        length = c.hidden.shape[1]
        c.derived["positions"] = torch.arange(length, device=c.hidden.device)[None]
    return c.derived["positions"]  # type: ignore[no-any-return]


def _embed_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and padding mask of a tokenised batch, as ``HFModel`` makes
    them (dynamic padding)."""
    x = trim(x)
    return x[:, 0], (x[:, 1] != PAD).long()


# -- LLaMA-style decoders ----------------------------------------------------------
def _llama_kind(config: Any, index: int) -> str:
    return "full_attention"


def _mistral_kind(config: Any, index: int) -> str:
    return "full_attention" if config.sliding_window is None else "sliding_attention"


def _qwen2_kind(config: Any, index: int) -> str:
    return str(config.layer_types[index])


def _decoder(kind: Callable[[Any, int], str]) -> Callable[[HFModel], list[Stage]]:
    def build(model: HFModel) -> list[Stage]:
        from transformers.masking_utils import (
            create_causal_mask,
            create_sliding_window_causal_mask,
        )

        hf = model.hf
        body, config = hf.model, hf.config
        makers = {
            "full_attention": create_causal_mask,
            "sliding_attention": create_sliding_window_causal_mask,
        }

        def embed(x: torch.Tensor) -> Carry:
            ids, mask = _embed_input(x)
            return Carry(body.embed_tokens(ids), mask)

        def attention(c: Carry, index: int) -> Any:
            which = kind(config, index)
            if which not in c.derived:
                c.derived[which] = makers[which](
                    config=config,
                    inputs_embeds=c.hidden,
                    attention_mask=c.mask,
                    cache=None,
                    position_ids=_positions(c),
                )
            return c.derived[which]

        def rotary(c: Carry) -> Any:
            if "rotary" not in c.derived:
                c.derived["rotary"] = body.rotary_emb(c.hidden, _positions(c))
            return c.derived["rotary"]

        def block(index: int) -> Callable[[Carry], Carry]:
            layer = body.layers[index]

            def run(c: Carry) -> Carry:
                return c.then(
                    layer(
                        c.hidden,
                        attention_mask=attention(c, index),
                        position_embeddings=rotary(c),
                        position_ids=_positions(c),
                        use_cache=False,
                    )
                )

            return run

        return [
            ("model.embed_tokens", embed, ("hf.model.embed_tokens.",)),
            *_blocks("model.layers", len(body.layers), block),
            ("model.norm", lambda c: c.then(body.norm(c.hidden)), ("hf.model.norm.",)),
            ("lm_head", lambda c: hf.lm_head(c.hidden), ("hf.lm_head.",)),
        ]

    return build


def _blocks(
    path: str, count: int, block: Callable[[int], Callable[[Carry], Carry]]
) -> list[Stage]:
    return [(f"{path}.{i}", block(i), (f"hf.{path}.{i}.",)) for i in range(count)]


# -- GPT-2 -------------------------------------------------------------------------
def _gpt2(model: HFModel) -> list[Stage]:
    from transformers.masking_utils import create_causal_mask

    hf = model.hf
    body, config = hf.transformer, hf.config

    def embed(x: torch.Tensor) -> Carry:
        ids, mask = _embed_input(x)
        tokens = body.wte(ids)
        c = Carry(tokens, mask)
        return c.then(body.drop(tokens + body.wpe(_positions(c))))

    def block(index: int) -> Callable[[Carry], Carry]:
        layer = body.h[index]

        def run(c: Carry) -> Carry:
            if "causal" not in c.derived:
                c.derived["causal"] = create_causal_mask(
                    config=config,
                    inputs_embeds=c.hidden,
                    attention_mask=c.mask,
                    cache=None,
                    position_ids=_positions(c),
                )
            out = layer(
                c.hidden,
                None,
                c.derived["causal"],
                None,
                use_cache=False,
                position_ids=_positions(c),
            )
            return c.then(out)

        return run

    return [
        ("transformer.wte", embed, ("hf.transformer.wte.", "hf.transformer.wpe.")),
        *_blocks("transformer.h", len(body.h), block),
        (
            "transformer.ln_f",
            lambda c: c.then(body.ln_f(c.hidden)),
            ("hf.transformer.ln_f.",),
        ),
        ("lm_head", lambda c: hf.lm_head(c.hidden), ("hf.lm_head.",)),
    ]


# -- BERT --------------------------------------------------------------------------
def _bert(model: HFModel) -> list[Stage]:
    from transformers.masking_utils import create_bidirectional_mask

    hf = model.hf
    body, config = hf.bert, hf.config

    def embed(x: torch.Tensor) -> Carry:
        ids, mask = _embed_input(x)
        return Carry(body.embeddings(input_ids=ids), mask)

    def block(index: int) -> Callable[[Carry], Carry]:
        layer = body.encoder.layer[index]

        def run(c: Carry) -> Carry:
            if "bidirectional" not in c.derived:
                c.derived["bidirectional"] = create_bidirectional_mask(
                    config=config, inputs_embeds=c.hidden, attention_mask=c.mask
                )
            return c.then(layer(c.hidden, c.derived["bidirectional"]))

        return run

    return [
        ("bert.embeddings", embed, ("hf.bert.embeddings.",)),
        *_blocks("bert.encoder.layer", len(body.encoder.layer), block),
        ("bert.pooler", lambda c: body.pooler(c.hidden), ("hf.bert.pooler.",)),
        ("classifier", lambda h: hf.classifier(hf.dropout(h)), ("hf.classifier.",)),
    ]


# -- ViT ---------------------------------------------------------------------------
def _vit(model: HFModel) -> list[Stage]:
    from transformers.masking_utils import create_bidirectional_mask

    hf = model.hf
    body, config = hf.vit, hf.config

    def block(index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        layer = body.layers[index]

        def run(h: torch.Tensor) -> torch.Tensor:
            mask = create_bidirectional_mask(
                config=config, inputs_embeds=h, attention_mask=None
            )
            return layer(h, mask)  # type: ignore[no-any-return]

        return run

    return [
        (
            "vit.embeddings",
            lambda x: body.embeddings(model.pixels(x)),
            ("hf.vit.embeddings.",),
        ),
        *[
            (f"vit.layers.{i}", block(i), (f"hf.vit.layers.{i}.",))
            for i in range(len(body.layers))
        ],
        ("vit.layernorm", body.layernorm, ("hf.vit.layernorm.",)),
        ("classifier", lambda h: hf.classifier(h[:, 0, :]), ("hf.classifier.",)),
    ]


#: ``transformers`` class name -> the stages of a model of that class.
ARCHITECTURES: dict[str, Callable[[HFModel], list[Stage]]] = {
    "LlamaForCausalLM": _decoder(_llama_kind),
    "MistralForCausalLM": _decoder(_mistral_kind),
    "Qwen2ForCausalLM": _decoder(_qwen2_kind),
    "GPT2LMHeadModel": _gpt2,
    "BertForSequenceClassification": _bert,
    "ViTForImageClassification": _vit,
}


def is_hf(model: nn.Module) -> bool:
    """Whether ``model`` is an ``hf`` model (cut here)."""
    return isinstance(model, HFModel)


def stages(model: HFModel) -> list[Stage]:
    """The stages of an ``hf`` model, in forward order.

    Raises
    ------
    ConfigError
        For an architecture without a description here.
    """
    name = type(model.hf).__name__
    if name not in ARCHITECTURES:
        raise ConfigError(
            f"split.cut: split learning cuts Hugging Face models of the classes "
            f"{', '.join(ARCHITECTURES)}; {model.task!r} loaded a {name}"
        )
    return ARCHITECTURES[name](model)


def default_cut(names: Sequence[str]) -> str:
    """Where an ``hf`` model is cut when ``split.cut`` is empty: after its
    first block."""
    return names[1]


# -- LoRA --------------------------------------------------------------------------
def prepare(model: nn.Module, experiment: Any) -> nn.Module:
    """The model as split learning trains it (``Family.model``; the client side
    applies the same): with ``peft.method = "lora"``, PEFT's LoRA layers
    injected in place, only they (and ``peft.modules-to-save``) trainable;
    otherwise ``model`` unchanged."""
    peft = experiment.peft
    if peft.method != "lora":
        return model
    from peft import LoraConfig, inject_adapter_in_model

    from fedsim.learn.lora import ADAPTER, alpha_for, initial_a, lora_layout

    layout = lora_layout(model, peft)
    config = LoraConfig(
        r=peft.rank,
        lora_alpha=alpha_for(peft, peft.rank),  # type: ignore[arg-type]
        lora_dropout=peft.dropout,
        target_modules=list(layout.adapted),
        bias="none",
        fan_in_fan_out=bool(layout.transposed),
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    seed = derive_seed(experiment.seed, "split-lora")
    model.requires_grad_(False)
    with torch.no_grad():
        for name in layout.adapted:
            layer: Any = model.get_submodule(name)
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            a.copy_(initial_a(peft, name, a.shape[1], peft.rank, seed))
            b.zero_()
            a.requires_grad_(True)
            b.requires_grad_(True)
    params = dict(model.named_parameters())
    for key in layout.trained:  # never a LoRA target, so its name is unchanged
        params[key].requires_grad_(True)
    return model


def has_adapters(model: nn.Module) -> bool:
    """Whether PEFT layers were injected into ``model`` (:func:`prepare`)."""
    import sys

    if "peft" not in sys.modules:  # no PEFT layer without PEFT imported
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def carried(model: nn.Module) -> frozenset[str] | None:
    """State-dict names a segment's weights carry: with LoRA injected, the
    trainable parameters only (the frozen base is built identically on every
    side and never travels); otherwise None (everything)."""
    if not has_adapters(model):
        return None
    return frozenset(n for n, p in model.named_parameters() if p.requires_grad)


def check(experiment: Any, model: nn.Module) -> None:
    """Pre-run checks of split learning that depend on the model and on LoRA
    (ConfigError naming the key, before anything is written)."""
    peft = experiment.peft
    if peft.method == "lora":
        from fedsim.learn.lora import lora_layout

        if peft.ranks:
            raise ConfigError(
                "peft.ranks: split learning trains one LoRA rank (peft.rank) on "
                "both sides of the cut; per-client ranks are for FLoRA and FedIT"
            )
        lora_layout(model, peft)
    if not is_hf(model):
        return
    cfg = experiment.model
    if cfg.dtype != "float32":
        raise ConfigError(
            f"model.dtype: split learning sends float32 activations and "
            f"gradients across the cut; {cfg.dtype!r} is not supported there"
        )
    hf: Any = model.hf  # type: ignore[union-attr]
    if peft.method == "none" and getattr(hf.config, "tie_word_embeddings", False):
        raise ConfigError(
            f"peft.method: {type(hf).__name__} ties its output layer to the "
            "input embeddings, which the sides of a cut would train apart; use "
            "peft.method = 'lora' (the base stays frozen)"
        )
    if experiment.audit.enabled and cfg.task != "image-classification":
        raise ConfigError(
            "audit.attack: the split audit reconstructs image inputs from the "
            "cut activations; a Hugging Face text model's inputs are tokens"
        )
