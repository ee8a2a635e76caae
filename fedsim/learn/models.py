"""Models by name. None uses BatchNorm, so every model works under DP-SGD.

Every model ends in a linear layer called ``head`` (the module that LoRA setups
usually train in full). The ViT-style encoder names its attention projections
``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` so that LoRA can target them, and
keeps positional and class embeddings in ``nn.Embedding`` layers, which Opacus can
compute per-sample gradients for.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.core import registry
from fedsim.core.errors import ConfigError
from fedsim.core.experiment import ModelConfig
from fedsim.learn.data import DatasetInfo
from fedsim.learn.prompts import insert_prompts


class MLP(nn.Module):
    """Flatten, two hidden layers, linear head."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class CNN(nn.Module):
    """Two 3x3 convolutions, one 2x2 max-pool, a hidden layer and a head."""

    def __init__(
        self, shape: tuple[int, int, int], hidden: int, num_classes: int, dropout: float
    ):
        super().__init__()
        channels, height, width = shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        flat = 32 * (height // 2) * (width // 2)
        self.fc = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.features(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate, named q/k/v/out projections."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, h, d // h).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        attn = (q @ k.transpose(-2, -1)) / math.sqrt(d // h)
        attn = F.dropout(attn.softmax(dim=-1), self.dropout, self.training)
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return self.out_proj(out)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class ViT(nn.Module):
    """ViT-style classifier; tabular inputs become one token per feature."""

    positions: torch.Tensor
    prompts: nn.Parameter | None

    def __init__(
        self,
        shape: tuple[int, ...],
        num_classes: int,
        *,
        dim: int,
        depth: int,
        heads: int,
        patch_size: int,
        dropout: float,
    ):
        super().__init__()
        if len(shape) == 3:
            channels, height, width = shape
            if height % patch_size or width % patch_size:
                raise ConfigError(
                    f"model.patch-size: {patch_size} must divide the image size "
                    f"{height}x{width}"
                )
            self.patch_size = patch_size
            tokens = (height // patch_size) * (width // patch_size)
            token_dim = channels * patch_size * patch_size
        else:
            self.patch_size = 0
            tokens, token_dim = math.prod(shape), 1
        self.patch_embed = nn.Linear(token_dim, dim)
        self.cls_token = nn.Embedding(1, dim)
        self.pos_embed = nn.Embedding(tokens + 1, dim)
        self.blocks = nn.ModuleList(
            EncoderBlock(dim, heads, dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.register_buffer("positions", torch.arange(tokens + 1), persistent=False)
        # Soft prompt tokens (SFPrompt), set by fedsim.learn.prompts.add_prompts.
        self.register_parameter("prompts", None)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch_size:
            p = self.patch_size
            patches = F.unfold(x, kernel_size=p, stride=p)  # (b, c*p*p, tokens)
            return patches.transpose(1, 2)
        return x.flatten(1).unsqueeze(-1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Token, class and positional embeddings: the blocks' input."""
        tokens = self.patch_embed(self.tokens(x))
        # Embeddings are looked up per example (not once for the batch) so that
        # Opacus sees a per-example input and can compute per-example gradients.
        positions = self.positions.expand(x.shape[0], -1)
        cls = self.cls_token(positions[:, :1] * 0)
        h = torch.cat([cls, tokens], dim=1) + self.pos_embed(positions)
        if self.prompts is None:
            return h
        return insert_prompts(h, self.prompts)

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        """The normalised class token of the last block's output."""
        return self.norm(h[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.pool(h))


def build_mlp(cfg: ModelConfig, info: DatasetInfo) -> nn.Module:
    return MLP(math.prod(info.input_shape), cfg.hidden, info.num_classes, cfg.dropout)


def build_cnn(cfg: ModelConfig, info: DatasetInfo) -> nn.Module:
    if len(info.input_shape) != 3:
        raise ConfigError(
            f"model.name: 'cnn' needs image data (channels, height, width); the "
            f"dataset has input shape {info.input_shape}; use 'mlp' or 'vit'"
        )
    c, h, w = info.input_shape
    return CNN((c, h, w), cfg.hidden, info.num_classes, cfg.dropout)


def build_vit(cfg: ModelConfig, info: DatasetInfo) -> nn.Module:
    return ViT(
        info.input_shape,
        info.num_classes,
        dim=cfg.hidden,
        depth=cfg.depth,
        heads=cfg.heads,
        patch_size=cfg.patch_size,
        dropout=cfg.dropout,
    )


class TokenBert(nn.Module):
    """A Hugging Face ``transformers`` BERT encoder over quantized inputs.

    Every input value (scaled to [0, 1]) becomes one token, its level among
    ``levels`` equal steps; a class token leads the sequence and its final hidden
    state feeds the linear ``head``. The encoder is built from a ``BertConfig``
    with random initialisation, so nothing is downloaded; its attention
    projections are named ``query``, ``key`` and ``value``.
    """

    def __init__(
        self,
        tokens: int,
        num_classes: int,
        *,
        dim: int,
        depth: int,
        heads: int,
        dropout: float,
        levels: int = 16,
    ):
        from transformers import BertConfig, BertModel

        super().__init__()
        config = BertConfig(
            vocab_size=levels + 2,  # the class token, then levels 0..levels
            hidden_size=dim,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            intermediate_size=2 * dim,
            max_position_embeddings=tokens + 1,
            type_vocab_size=1,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
        self.levels = levels
        self.encoder = BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x.flatten(1).clamp(0, 1) * self.levels).round().long() + 1
        cls = torch.zeros(len(x), 1, dtype=torch.long, device=x.device)
        hidden = self.encoder(input_ids=torch.cat([cls, ids], dim=1)).last_hidden_state
        return self.head(hidden[:, 0])


def build_tiny_bert(cfg: ModelConfig, info: DatasetInfo) -> nn.Module:
    if cfg.hidden % cfg.heads:
        raise ConfigError(
            f"model.heads: {cfg.heads} must divide model.hidden ({cfg.hidden})"
        )
    return TokenBert(
        math.prod(info.input_shape),
        info.num_classes,
        dim=cfg.hidden,
        depth=cfg.depth,
        heads=cfg.heads,
        dropout=cfg.dropout,
    )


def build_architecture(cfg: ModelConfig, info: DatasetInfo, seed: int) -> nn.Module:
    """The configured architecture with its seeded initialisation (no
    pre-trained weights: :func:`fedsim.learn.base.build_model` adds those)."""
    try:
        builder = registry.model_entry(cfg.name).load()
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"model.name: cannot import {cfg.name!r}: {err}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: nn.Module = builder(cfg, info)
    return model
