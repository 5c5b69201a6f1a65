"""scikit-learn's handwritten digits as images: 1797 grey-scale 8x8 pictures of 0..9.

Provenance: ``sklearn/datasets/data/digits.csv.gz`` inside the scikit-learn wheel
(``sklearn.datasets.load_digits``; scikit-learn is BSD-3-Clause). It is the test set of
the UCI "Optical Recognition of Handwritten Digits" data (Alpaydin and Kaynak, 1998;
CC BY 4.0): 32x32 bitmaps by 43 writers, reduced to 8x8 counts of set pixels in 4x4
blocks (values 0..16). Nothing is downloaded.

One image is one training example (the unit of privacy). The split into train and test
is a fixed permutation (``split_seed``), stratified by class so that every class has the
same share of test images; pixels are scaled to [0, 1].
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

from dpfa.errors import DPFAError

N_CLASSES = 10
IMAGE_SIZE = 8


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DPFAError("The digits images ship with scikit-learn: pip install scikit-learn.") from None
    try:
        return load_digits(return_X_y=True)
    except (OSError, ValueError) as e:  # a wheel without its data files
        raise DPFAError(f"scikit-learn is installed but its digits data cannot be read ({e}); reinstall "
                        "scikit-learn: pip install --force-reinstall scikit-learn.") from None


def load_digits_images(test_fraction: float = 0.2, split_seed: int = 0) -> Tuple[TensorDataset, TensorDataset]:
    """(train, test) datasets of (image float32 (1, 8, 8) in [0, 1], label int64)."""
    if not 0.0 < test_fraction < 1.0:
        raise DPFAError(f"Expected test_fraction={test_fraction!r} in (0, 1).")
    x, y = _load_digits()
    rng = np.random.default_rng(split_seed)
    test = np.zeros(len(y), dtype=bool)
    for c in range(N_CLASSES):  # stratified: the same share of every class goes to the test set
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[:round(test_fraction * len(idx))]] = True
    images = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    labels = torch.tensor(y, dtype=torch.int64)
    train_idx = torch.from_numpy(rng.permutation(np.flatnonzero(~test)))
    test_idx = torch.from_numpy(np.flatnonzero(test))
    return (TensorDataset(images[train_idx], labels[train_idx]), TensorDataset(images[test_idx], labels[test_idx]))
