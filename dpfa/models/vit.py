"""A small Vision Transformer (Dosovitskiy et al. 2021) built only from layers dpfa's DP-SGD
engine has exact per-example rules for: Conv2d (the patch embedding), Embedding (learned
positions), LayerNorm, nn.MultiheadAttention (swapped for DPMultiheadAttention by the
engine) and Linear.

Two departures from the paper, both to stay inside those layers: positions are an
``nn.Embedding`` looked up per example (not a raw parameter), and the classifier reads
the mean of the patch tokens instead of a [CLS] token (no raw parameter either; Zhai et
al. 2022 find mean pooling as good). Dropout is absent: DP-SGD's noise regularises.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from dpfa.errors import DPFAError


@dataclasses.dataclass
class ViTConfig:
    image_size: int = 8       # sklearn's digits are 8x8
    patch_size: int = 2       # 2x2 patches: 16 tokens per digit
    in_channels: int = 1
    n_classes: int = 10
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 32
    mlp_ratio: int = 2        # hidden width of each block's MLP = mlp_ratio * n_embd

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise DPFAError(f"Expected patch_size={self.patch_size} to divide image_size={self.image_size}.")
        if self.n_embd % self.n_head:
            raise DPFAError(f"Expected n_head={self.n_head} to divide n_embd={self.n_embd}.")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class Block(nn.Module):
    """Pre-norm transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = nn.MultiheadAttention(cfg.n_embd, cfg.n_head, batch_first=True)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.fc = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd)
        self.out = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class ViT(nn.Module):
    """images (B, C, H, W) -> logits (B, n_classes)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch = nn.Conv2d(cfg.in_channels, cfg.n_embd, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos = nn.Embedding(cfg.n_patches, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2)  # (B, L, C): one token per patch
        B, L, _ = x.shape
        x = x + self.pos(torch.arange(L, device=x.device).expand(B, L))  # per example, so its gradient is too
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x).mean(1))
