"""``image_classification``: a small ViT (:class:`dpfa.models.ViT`) on scikit-learn's 8x8
digits (:func:`dpfa.data.load_digits_images`, a fixed stratified 80/20 split), trained
with dpfa's DP-SGD; test accuracy at each epsilon over several seeds, next to the
textbook baseline at the same wall clock (:mod:`dpfa.experiments.privacy_utility`).

One training example = one image (the unit of privacy).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Tuple

import torch
import torch.nn.functional as F

from dpfa.errors import ConfigError
from dpfa.experiments.dpsgd import TrainSpec
from dpfa.experiments.privacy_utility import BaselineConfig, Task, check_common


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    patch_size: int = 2   # 2x2 patches of an 8x8 digit: 16 tokens
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 32
    mlp_ratio: int = 2

    def __post_init__(self):
        for k, v in dataclasses.asdict(self).items():
            if v < 1:
                raise ConfigError(f"Expected model.{k}={v!r} >= 1.")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    test_fraction: float = 0.2
    split_seed: int = 0   # the train/test split is the same for every seed and epsilon


@dataclasses.dataclass(frozen=True)
class Config:
    seeds: Tuple = (0, 1, 2)
    epsilons: Tuple = (math.inf, 8.0, 4.0, 2.0)
    clip_only: bool = True
    threads: int = 1                             # torch threads (0: torch's default); small models: 1 is steadiest
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    train: TrainSpec = TrainSpec(steps=400, batch_size=256, lr=1e-2, max_grad_norm=1.0, delta=1e-5)
    baseline: BaselineConfig = BaselineConfig()

    def __post_init__(self):
        check_common(self)


def _load(cfg: Config):
    from dpfa.data import load_digits_images

    train, test = load_digits_images(cfg.data.test_fraction, cfg.data.split_seed)
    if cfg.train.delta >= 1.0 / len(train):
        raise ConfigError(f"train.delta={cfg.train.delta:g} is not below 1 / (training-set size {len(train)}).")
    return train, test, {"train_size": len(train), "test_size": len(test)}


def _model(cfg: Config, meta):
    from dpfa.models import ViT, ViTConfig

    m = cfg.model
    try:
        return ViT(ViTConfig(patch_size=m.patch_size, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd,
                             mlp_ratio=m.mlp_ratio))
    except ValueError as e:
        raise ConfigError(f"[model]: {e}") from None


@torch.no_grad()
def accuracy(model, data, device: str, cfg: Config) -> float:
    model.eval()
    x, y = (t.to(device) for t in data.tensors)
    acc = float((model(x).argmax(-1) == y).float().mean())
    model.train()
    return acc


def _synthetic(cfg: Config, meta):
    def batch(n: int):
        g = torch.Generator().manual_seed(0)
        return torch.rand(n, 1, 8, 8, generator=g), torch.randint(10, (n,), generator=g)
    return batch


def _describe(cfg: Config) -> str:
    m = cfg.model
    return (f"Model: ViT (dpfa.models.ViT), {m.patch_size}x{m.patch_size} patches, {m.n_layer} layers, {m.n_head} "
            f"heads, width {m.n_embd}, mean-pooled; data: scikit-learn's 1797 8x8 digits "
            f"(dpfa.data.load_digits_images), a fixed stratified split, {1 - cfg.data.test_fraction:.0%} train / "
            f"{cfg.data.test_fraction:.0%} test; one image = the unit of privacy.")


TASK = Task(name="image_classification", metric="test_accuracy", metric_label="test accuracy", higher_is_better=True,
            load=_load, build_model=_model, loss_fn=F.cross_entropy, evaluate=accuracy, synthetic_batch=_synthetic,
            describe=_describe, fmt="{:.3f}")
