"""A 2.3 MB excerpt of English Wikipedia that the gensim wheel carries as test data.

Provenance: ``gensim/test/test_data/head500.noblanks.cor`` in the gensim wheel (gensim
is LGPL-2.1; the text is from Wikipedia, CC BY-SA). It holds the first 500 articles of
an English Wikipedia dump, one article per line, lower-cased, with stop words removed
and words stemmed by gensim's preprocessing. It is not fluent prose, but it is real
English text of a realistic size, and it is on disk wherever gensim is installed.

The corpus is cut into non-overlapping character windows of ``block_size + 1``; one
window is one training example (the unit of privacy). :func:`load_wikipedia_excerpt`
(the demo) gives the first 90% of the text for training and the last 10% for validation;
:func:`load_wikipedia_splits` (the ``language_model`` experiment) cuts it 80/10/10 into
train, validation and test, in the order of the text (whole articles stay together
except at the two cuts). The character vocabulary is that of the whole excerpt; it is
public (the set of characters of lower-cased English), not learned from the private
split.

Offline: nothing is downloaded. Without gensim, or with a gensim that lacks its test
data, the loaders raise :class:`~dpfa.errors.DPFAError` at once with the fix.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch.utils.data import Dataset

from dpfa.errors import DPFAError

FILE = "head500.noblanks.cor"


def _path() -> str:
    try:
        from gensim.test.utils import datapath
    except ImportError as e:  # pragma: no cover - exercised only without gensim
        raise DPFAError("The Wikipedia excerpt ships with gensim: pip install 'dp-flash-attention[demo]'.") from e
    path = datapath(FILE)
    if not os.path.isfile(path):
        raise DPFAError(f"gensim is installed but its test data lacks {FILE} (looked at {path}); reinstall gensim "
                        "from its wheel: pip install --force-reinstall gensim.")
    return path


def _read_text(max_chars: Optional[int]) -> str:
    with open(_path(), encoding="utf-8") as f:
        text = f.read()
    return text if max_chars is None else text[:max_chars]


def _encode(text: str):
    vocab = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([lookup[c] for c in text], dtype=torch.long), vocab


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
    ids, vocab = _encode(_read_text(max_chars))
    cut = int(0.9 * len(ids))
    return CharCorpus(ids[:cut], block_size), CharCorpus(ids[cut:], block_size), vocab


def load_wikipedia_splits(block_size: int = 64, max_chars: Optional[int] = None,
                          fractions: Tuple[float, float, float] = (0.8, 0.1, 0.1)):
    """(train, val, test, vocab): the excerpt cut in text order by ``fractions`` (they must sum to 1).

    ``max_chars`` keeps only the start of the text (quick runs); the vocabulary is still
    that of the kept text, so every id is in range.
    """
    if len(fractions) != 3 or any(not (0 < f < 1) for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise DPFAError(f"Expected fractions=(train, val, test), each in (0, 1), summing to 1; got {fractions!r}.")
    ids, vocab = _encode(_read_text(max_chars))
    a = int(fractions[0] * len(ids))
    b = a + int(fractions[1] * len(ids))
    return (CharCorpus(ids[:a], block_size), CharCorpus(ids[a:b], block_size), CharCorpus(ids[b:], block_size),
            vocab)
