"""Data loaders whose batches are drawn the way the accountant assumes.

- Poisson sampling (the default, add/remove neighbours): each example is in a batch
  independently with probability q, so batch sizes vary and may be 0. An epoch is
  round(1/q) batches (as in Opacus).
- Sampling without replacement (replace-one neighbours): every batch is a fresh uniform
  subset of exactly B examples.

Shuffling and cutting the data into consecutive batches is neither, and is not offered.
A logical batch larger than ``max_physical_batch_size`` is split into physical batches
(virtual steps); the loader tells the optimizer, through ``info``, which one ends it. In a
distributed run ``sync_chunks`` maps this rank's number of physical batches to the largest
over ranks, and the loader pads with empty batches so that every rank yields as many.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from typing import Callable, Iterator, List, Optional

import torch
from torch.utils.data import Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from dpfa import _validate
from dpfa.errors import PrivacyParameterError


@dataclasses.dataclass
class BatchInfo:
    """What the loader last yielded: read by the optimizer."""

    end_of_logical_batch: bool = True
    last_batch_size: Optional[int] = None
    #: how many logical batches the loader has started (the current one's number)
    logical_batch: int = 0


def _fresh(generator: Optional[torch.Generator], secure: bool) -> Optional[torch.Generator]:
    """The generator, re-keyed from the OS CSPRNG when ``secure`` (one key per batch)."""
    if secure:
        generator = generator if generator is not None else torch.Generator()
        generator.manual_seed(secrets.randbits(63))
    return generator


class PoissonBatchSampler(Sampler[List[int]]):
    """Each of ``n`` indices independently with probability ``sample_rate``; round(1/q) batches an epoch."""

    def __init__(self, num_samples: int, sample_rate: float, generator: Optional[torch.Generator] = None,
                 steps: Optional[int] = None, secure: bool = False):
        self.num_samples = _validate.count(num_samples, "dataset size")
        self.sample_rate = _validate.sample_rate(sample_rate)
        self.generator = generator
        self.secure = secure
        self.steps = steps if steps is not None else max(1, round(1.0 / self.sample_rate))

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[List[int]]:
        for _ in range(self.steps):
            mask = torch.rand(self.num_samples, generator=_fresh(self.generator, self.secure)) < self.sample_rate
            yield mask.nonzero(as_tuple=True)[0].tolist()


class WithoutReplacementBatchSampler(Sampler[List[int]]):
    """Each batch a uniform random subset of exactly ``batch_size`` of ``n`` indices, independent across steps."""

    def __init__(self, num_samples: int, batch_size: int, generator: Optional[torch.Generator] = None,
                 steps: Optional[int] = None, secure: bool = False):
        self.secure = secure
        self.num_samples = _validate.count(num_samples, "dataset size")
        self.batch_size = _validate.count(batch_size, "batch_size")
        if self.batch_size > self.num_samples:
            raise PrivacyParameterError(f"batch_size={batch_size} is larger than the dataset ({num_samples}).")
        self.generator = generator
        self.steps = steps if steps is not None else max(1, self.num_samples // self.batch_size)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[List[int]]:
        for _ in range(self.steps):
            perm = torch.randperm(self.num_samples, generator=_fresh(self.generator, self.secure))
            yield perm[: self.batch_size].tolist()


def _empty_like_batch(dataset: Dataset, collate_fn):
    """A batch of size 0 with the structure of a real one (for empty Poisson batches)."""
    one = collate_fn([dataset[0]])

    def shrink(x):
        if isinstance(x, torch.Tensor):
            return x[:0]
        if isinstance(x, (list, tuple)):
            return type(x)(shrink(v) for v in x)
        if isinstance(x, dict):
            return {k: shrink(v) for k, v in x.items()}
        return x

    return shrink(one)


class DPDataLoader:
    """Iterates physical batches of logically sampled batches and reports to ``info``."""

    def __init__(self, dataset: Dataset, batch_sampler: Sampler[List[int]], collate_fn=None,
                 max_physical_batch_size: Optional[int] = None, num_workers: int = 0, info: Optional[BatchInfo] = None,
                 sync_chunks: Optional[Callable[[int], int]] = None):
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.collate_fn = collate_fn or default_collate
        if max_physical_batch_size is not None:
            max_physical_batch_size = _validate.count(max_physical_batch_size, "max_physical_batch_size")
        self.max_physical_batch_size = max_physical_batch_size
        self.num_workers = num_workers
        self.info = info if info is not None else BatchInfo()
        self.sync_chunks = sync_chunks

    def __len__(self) -> int:
        """Number of logical batches per epoch."""
        return len(self.batch_sampler)

    def _chunks(self, indices: List[int]) -> List[List[int]]:
        if not indices:
            chunks: List[List[int]] = [[]]
        else:
            m = self.max_physical_batch_size or len(indices)
            chunks = [indices[i:i + m] for i in range(0, len(indices), m)]
        if self.sync_chunks is not None and self.max_physical_batch_size is not None:
            chunks += [[] for _ in range(self.sync_chunks(len(chunks)) - len(chunks))]
        return chunks

    def __iter__(self):
        for indices in self.batch_sampler:
            self.info.logical_batch += 1
            chunks = self._chunks(indices)
            for j, chunk in enumerate(chunks):
                self.info.end_of_logical_batch = j == len(chunks) - 1
                self.info.last_batch_size = len(chunk)
                if chunk:
                    yield self.collate_fn([self.dataset[i] for i in chunk])
                else:
                    yield _empty_like_batch(self.dataset, self.collate_fn)

    @property
    def sample_rate(self) -> Optional[float]:
        return getattr(self.batch_sampler, "sample_rate", None)


def steps_per_epoch(dataset_size: int, batch_size: int) -> int:
    return max(1, math.floor(dataset_size / batch_size))
