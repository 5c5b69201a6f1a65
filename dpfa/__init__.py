"""dpfa: differentially private transformers with the privacy machinery inside Triton kernels.

Subpackages: ``dpfa.mechanisms`` (noise), ``dpfa.accountants`` (composition),
``dpfa.training`` (DP-SGD), ``dpfa.kernels`` (Triton), ``dpfa.data``, ``dpfa.models``.
See DESIGN.md for the two privacy modes (DP-SGD training, DP release of attention outputs).
"""

__version__ = "0.1.0"

from dpfa import errors, mechanisms, accountants  # noqa: E402
from dpfa.mechanisms import DPMechanism  # noqa: E402
from dpfa.accountants import noise_multiplier_for  # noqa: E402
from dpfa import training  # noqa: E402
from dpfa.training import PrivacyEngine, make_model_differentially_private  # noqa: E402
from dpfa.kernels import flash_attn_func  # noqa: E402
from dpfa.attention import DPFlashAttention, dp_flash_attn_func  # noqa: E402

__all__ = ["errors", "mechanisms", "accountants", "training", "DPMechanism", "noise_multiplier_for",
           "PrivacyEngine", "make_model_differentially_private", "flash_attn_func", "dp_flash_attn_func",
           "DPFlashAttention", "__version__"]
