"""Offline datasets that ship inside installed packages (no downloads at run time).

- :func:`load_wikipedia_excerpt`, :func:`load_wikipedia_splits`: a 2.3 MB excerpt of English
  Wikipedia (CC BY-SA) carried by the gensim wheel (LGPL-2.1) as test data; character level.
- :func:`load_digits_images`: scikit-learn's 1797 8x8 handwritten digits (UCI, CC BY 4.0;
  scikit-learn is BSD-3-Clause).

A missing package (or a wheel without its data) raises :class:`dpfa.errors.DPFAError`
naming the package to install; nothing waits on the network.
"""

from dpfa.data.digits import load_digits_images
from dpfa.data.wikipedia_excerpt import CharCorpus, load_wikipedia_excerpt, load_wikipedia_splits

__all__ = ["CharCorpus", "load_wikipedia_excerpt", "load_wikipedia_splits", "load_digits_images"]
