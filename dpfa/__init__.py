"""dpfa: differentially private transformers with the privacy machinery inside Triton kernels.

Subpackages: ``dpfa.mechanisms`` (noise), ``dpfa.accountants`` (composition).
See DESIGN.md for the two privacy modes (DP-SGD training, DP release of attention outputs).
"""

__version__ = "0.1.0"

from dpfa import errors, mechanisms, accountants  # noqa: E402
from dpfa.mechanisms import DPMechanism  # noqa: E402
from dpfa.accountants import noise_multiplier_for  # noqa: E402

__all__ = ["errors", "mechanisms", "accountants", "DPMechanism", "noise_multiplier_for", "__version__"]
