"""A 2.3 MB excerpt of English Wikipedia that the gensim wheel carries as test data.

Provenance: ``gensim/test/test_data/head500.noblanks.cor`` in the gensim wheel (gensim
is LGPL-2.1; the text is from Wikipedia, CC BY-SA). It holds the first 500 articles of
an English Wikipedia dump, one article per line, lower-cased, with stop words removed
and words stemmed by gensim's preprocessing. It is not fluent prose, but it is real
English text of a realistic size, and it is on disk wherever gensim is installed.

The corpus is cut into non-overlapping character windows of ``block_size + 1``; one
window is one training example (the unit of privacy), the first 90% of the text is for
training and the last 10% for validation.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch.utils.data import Dataset

from dpfa.errors import DPFAError

FILE = "head500.noblanks.cor"


def _path() -> str:
    try:
        from gensim.test.utils import datapath
    except ImportError as e:  # pragma: no cover - exercised only without gensim
        raise DPFAError("The Wikipedia excerpt ships with gensim: pip install 'dp-flash-attention[demo]'.") from e
    return datapath(FILE)


class CharCorpus(Dataset):
    """Examples are (input, target) pairs of ``block_size`` character ids, target shifted by one."""

    def __init__(self, ids: torch.Tensor, block_size: int):
        n = (len(ids) - 1) // block_size
        if n < 1:
            raise DPFAError(f"Text of {len(ids)} characters is too short for block_size={block_size}.")
        self.block_size = block_size
        self.windows = ids[: n * block_size + 1]
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        s = i * self.block_size
        chunk = self.windows[s: s + self.block_size + 1]
        return chunk[:-1], chunk[1:]


def load_wikipedia_excerpt(block_size: int = 64, max_chars: int | None = None):
    """(train, val, vocab): character-level datasets of the excerpt and the sorted character list."""
    with open(_path(), encoding="utf-8") as f:
        text = f.read()
    if max_chars is not None:
        text = text[:max_chars]
    vocab = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    cut = int(0.9 * len(ids))
    return CharCorpus(ids[:cut], block_size), CharCorpus(ids[cut:], block_size), vocab
