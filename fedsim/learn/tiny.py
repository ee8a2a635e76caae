"""Small Hugging Face model folders made offline, for tests, examples and
benchmarks: a byte-level BPE tokenizer trained here with ``tokenizers`` on
given text, and a model of a named architecture built from a config (random
init), both saved with ``save_pretrained`` into one folder that
``model.name = "hf"`` / ``model.path`` loads.

``python -m fedsim.learn.tiny FOLDER --arch llama`` writes one (trained on the
text of the files given with ``--text``, else on fedsim's own docstrings).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: Architectures this module can build, with their model sizes by name.
ARCHITECTURES = ("llama", "gpt2", "bert", "vit")

SPECIAL = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``; it
    adds ``<s>`` before every sequence (as LLaMA's does) and pads with
    ``<pad>`` on the right."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos = SPECIAL["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, tok.token_to_id(bos))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"],
        padding_side="right",
    )


def model_config(arch: str, tokenizer: Any, *, size: str = "tiny") -> Any:
    """A ``transformers`` config of ``arch``: ``tiny`` (tests; hidden 32, 2
    layers), ``mini`` (hidden 64, 2 layers), ``small`` (hidden 128, 4 layers)
    or ``base`` (hidden 768, 12 layers: ~100M parameters LLaMA-shaped with a
    32k vocabulary)."""
    import transformers as tf

    dims = {
        "tiny": (32, 2, 4),
        "mini": (64, 2, 4),
        "small": (128, 4, 4),
        "base": (768, 12, 12),
    }[size]
    hidden, layers, heads = dims
    ids = {
        "pad_token_id": tokenizer.pad_token_id if tokenizer else 0,
        "bos_token_id": tokenizer.bos_token_id if tokenizer else 1,
        "eos_token_id": tokenizer.eos_token_id if tokenizer else 2,
    }
    vocab = len(tokenizer) if tokenizer else 8
    if arch == "llama":
        return tf.LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=hidden * 2 if size == "tiny" else hidden * 8 // 3,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(heads // 2, 1),
            max_position_embeddings=512,
            tie_word_embeddings=False,
            **ids,
        )
    if arch == "gpt2":
        return tf.GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=512,
            **ids,
        )
    if arch == "bert":
        return tf.BertConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=2 * hidden,
            max_position_embeddings=512,
            **ids,
        )
    if arch == "vit":
        return tf.ViTConfig(
            image_size=8,
            patch_size=2,
            num_channels=1,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=2 * hidden,
        )
    raise ValueError(f"arch: {arch!r} is not one of {', '.join(ARCHITECTURES)}")


def make_folder(
    folder: Path,
    arch: str,
    texts: Iterable[str] = (),
    *,
    size: str = "tiny",
    seed: int = 0,
    vocab_size: int = 512,
) -> Path:
    """Write a random-init ``arch`` model and its tokenizer (not for ``vit``)
    into ``folder``; returns it."""
    import torch
    import transformers as tf

    tokenizer = None if arch == "vit" else train_tokenizer(texts, vocab_size)
    config = model_config(arch, tokenizer, size=size)
    auto = (
        tf.AutoModelForImageClassification
        if arch == "vit"
        else (
            tf.AutoModelForSequenceClassification
            if arch == "bert"
            else tf.AutoModelForCausalLM
        )
    )
    torch.manual_seed(seed)
    model = auto.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def default_texts() -> list[str]:
    """Text found on any machine with fedsim: the docstrings of its modules."""
    import fedsim

    root = Path(fedsim.__file__).parent
    return [p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.py"))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--arch", choices=ARCHITECTURES, default="llama")
    parser.add_argument("--size", choices=("tiny", "mini", "small", "base"), default="small")
    parser.add_argument("--text", nargs="*", type=Path, default=[])
    parser.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args(argv)
    texts = [p.read_text(encoding="utf-8") for p in args.text] or default_texts()
    make_folder(
        args.folder, args.arch, texts, size=args.size, vocab_size=args.vocab_size
    )
    print(args.folder)


if __name__ == "__main__":
    main()
