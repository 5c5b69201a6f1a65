"""Small reference models for the demo, the experiments and the benchmarks."""

from dpfa.models.gpt import GPT, GPTConfig
from dpfa.models.vit import ViT, ViTConfig

__all__ = ["GPT", "GPTConfig", "ViT", "ViTConfig"]
