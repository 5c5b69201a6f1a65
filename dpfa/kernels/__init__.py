"""Triton kernels of dpfa, each with a plain-torch reference beside it (DESIGN.md 4).

``flash_attn_func`` is the drop-in for flash-attn's function; ``flash_attn_with_hooks`` is the
full entry point with the hooks of the DP release (score cap, value-row clipping,
epilogue noise).
"""

from dpfa.kernels.flash_attention import EpilogueNoise, flash_attn_func, flash_attn_with_hooks
from dpfa.kernels.flash_attention_reference import attention_reference

__all__ = ["flash_attn_func", "flash_attn_with_hooks", "EpilogueNoise", "attention_reference"]
