"""Offline datasets that ship inside installed packages (no downloads at run time)."""

from dpfa.data.wikipedia_excerpt import CharCorpus, load_wikipedia_excerpt

__all__ = ["CharCorpus", "load_wikipedia_excerpt"]
