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


def privacy_check(**kwargs):
    """Empirical privacy audits of every mechanism and of the DP-SGD noise; see :func:`dpfa.attacks.privacy_check`.

    Returns a report whose ``str()`` is a table, with ``passed`` and ``to_dict()``.
    (A thin wrapper, so that ``import dpfa`` does not load the attacks and scikit-learn.)
    """
    from dpfa.attacks.privacy_check import privacy_check as _privacy_check

    return _privacy_check(**kwargs)


__all__.append("privacy_check")


def cuda_version():
    """The CUDA version torch was built with (e.g. "12.4") when a CUDA device is usable, else None."""
    import torch

    return torch.version.cuda if torch.cuda.is_available() else None


__all__.append("cuda_version")
