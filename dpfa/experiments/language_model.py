"""``language_model``: a small character-level GPT (:class:`dpfa.models.GPT`) on the Wikipedia
excerpt (:func:`dpfa.data.load_wikipedia_splits`, 80/10/10 in text order), trained with
dpfa's DP-SGD; test perplexity at each epsilon over several seeds, next to the textbook
baseline at the same wall clock (:mod:`dpfa.experiments.privacy_utility`).

One training example = one window of ``block_size`` characters (the unit of privacy).
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
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 64  # characters per example

    def __post_init__(self):
        for k, v in dataclasses.asdict(self).items():
            if v < 1:
                raise ConfigError(f"Expected model.{k}={v!r} >= 1.")
        if self.n_embd % self.n_head:
            raise ConfigError(f"Expected model.n_head={self.n_head} to divide model.n_embd={self.n_embd}.")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    max_chars: int = 0        # keep only the first max_chars characters of the excerpt (0: all 2.3 M)
    eval_sequences: int = 0   # test sequences to evaluate (0: the whole test split)

    def __post_init__(self):
        if self.max_chars < 0 or self.eval_sequences < 0:
            raise ConfigError(f"Expected data.max_chars and data.eval_sequences >= 0, got {self!r}.")


@dataclasses.dataclass(frozen=True)
class Config:
    seeds: Tuple = (0, 1, 2)
    epsilons: Tuple = (math.inf, 8.0, 3.0, 1.0)  # inf: the non-private run (and clip_only's)
    clip_only: bool = True                       # also "inf with clipping": dpfa's clipping without noise
    threads: int = 1                             # torch threads (0: torch's default); small models: 1 is steadiest
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    train: TrainSpec = TrainSpec()
    baseline: BaselineConfig = BaselineConfig()

    def __post_init__(self):
        check_common(self)


def _load(cfg: Config):
    from dpfa.data import load_wikipedia_splits

    train, _val, test, vocab = load_wikipedia_splits(cfg.model.block_size, cfg.data.max_chars or None)
    return train, test, {"vocab_size": len(vocab), "train_size": len(train), "test_size": len(test)}


def _model(cfg: Config, meta):
    from dpfa.models import GPT, GPTConfig

    m = cfg.model
    return GPT(GPTConfig(vocab_size=meta["vocab_size"], block_size=m.block_size, n_layer=m.n_layer, n_head=m.n_head,
                         n_embd=m.n_embd))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-character cross-entropy of the batch (each example: the mean over its positions)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def perplexity(model, data, device: str, cfg: Config, batch: int = 256) -> float:
    """exp(mean cross-entropy per character) over the test split (or its first data.eval_sequences)."""
    model.eval()
    n = len(data) if not cfg.data.eval_sequences else min(cfg.data.eval_sequences, len(data))
    total, count = 0.0, 0
    for s in range(0, n, batch):
        xs, ys = zip(*(data[i] for i in range(s, min(s + batch, n))))
        x, y = torch.stack(xs).to(device), torch.stack(ys).to(device)
        logits = model(x)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    model.train()
    return math.exp(total / count)


def _synthetic(cfg: Config, meta):
    def batch(n: int):
        g = torch.Generator().manual_seed(0)
        shape = (n, cfg.model.block_size)
        return (torch.randint(meta["vocab_size"], shape, generator=g), torch.randint(meta["vocab_size"], shape,
                                                                                     generator=g))
    return batch


def _describe(cfg: Config) -> str:
    m, d = cfg.model, cfg.data
    text = "the first {:,} characters of".format(d.max_chars) if d.max_chars else "all 2.3 M characters of"
    return (f"Model: character-level GPT, {m.n_layer} layers, {m.n_head} heads, width {m.n_embd}, {m.block_size} "
            f"characters per example (the unit of privacy); data: {text} the Wikipedia excerpt that gensim ships "
            f"(dpfa.data.load_wikipedia_splits: 80% train / 10% val / 10% test, in text order); perplexity per "
            f"character on {'the whole test split' if not d.eval_sequences else f'{d.eval_sequences} test sequences'}.")


TASK = Task(name="language_model", metric="test_perplexity", metric_label="test perplexity", higher_is_better=False,
            load=_load, build_model=_model, loss_fn=lm_loss, evaluate=perplexity, synthetic_batch=_synthetic,
            describe=_describe, fmt="{:.2f}")
