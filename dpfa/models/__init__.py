"""Small reference models for the demo, the experiments and the benchmarks."""

from dpfa.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
