"""DP-SGD training (DESIGN.md 1.1): per-example clipping in one backward pass, noise once per logical batch."""

from dpfa.training.engine import PrivacyEngine, PrivateTraining, make_model_differentially_private
from dpfa.training.optimizer import DPOptimizer
from dpfa.training.data_loader import DPDataLoader, PoissonBatchSampler, WithoutReplacementBatchSampler
from dpfa.training.layer_rules import UnsupportedLayerError, register_rule
from dpfa.training.losses import token_cross_entropy
from dpfa.training.multihead_attention import DPMultiheadAttention

__all__ = [
    "PrivacyEngine", "PrivateTraining", "make_model_differentially_private", "DPOptimizer", "DPDataLoader",
    "PoissonBatchSampler", "WithoutReplacementBatchSampler", "UnsupportedLayerError", "register_rule",
    "DPMultiheadAttention", "token_cross_entropy",
]
