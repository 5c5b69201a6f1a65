"""DPLoRA: low-rank adapters (Hu et al. 2022, "LoRA") trained with DP-SGD on a frozen base model.

For a target linear map y = W x (+ b), LoRA adds (alpha / r) B A x with A (r x in)
Gaussian-initialised and B (out x r) zero-initialised, so training starts from the base
model. Only A and B are trainable, so per-example clipping and noise touch only them
(Yu et al. 2022, "Differentially private fine-tuning of language models"). A and B are
nn.Linear layers, whose per-example gradient rule is exact.
"""

from __future__ import annotations

import math
from typing import Iterable, List, Optional

import torch
from torch import nn

from dpfa.errors import DPFAError


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * lora_B(lora_A(dropout(x)))`` with ``base`` frozen."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if isinstance(base, nn.Linear):
            n_in, n_out = base.in_features, base.out_features
        elif type(base).__name__ == "Conv1D":  # transformers' GPT-2 projection, weight stored (in, out)
            n_in, n_out = base.weight.shape
        else:
            raise DPFAError(f"LoRA targets nn.Linear or transformers Conv1D, got {type(base).__qualname__}.")
        if not (isinstance(rank, int) and 0 < rank <= min(n_in, n_out)):
            raise DPFAError(f"Expected rank in [1, {min(n_in, n_out)}], got {rank!r}.")
        self.base = base.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Linear(n_in, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, n_out, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


class DPLoRA(nn.Module):
    """Wrap ``base_model``: LoRA adapters on the modules named in ``target_modules``, the rest frozen.

    A module matches when its qualified name equals a target or ends with ``"." + target``
    (``target_modules=["q_proj", "v_proj"]`` matches every attention block's). Pass the
    wrapper to ``PrivacyEngine.make_private`` like any model; only the adapters train.
    """

    def __init__(self, base_model: nn.Module, rank: int = 16, target_modules: Iterable[str] = ("q_proj", "v_proj"),
                 alpha: Optional[float] = None, dropout: float = 0.0):
        super().__init__()
        targets = list(target_modules)
        if not targets:
            raise DPFAError("DPLoRA needs at least one target module name.")
        base_model.requires_grad_(False)
        self.model = base_model
        self.adapted: List[str] = []
        for name, module in list(base_model.named_modules()):
            if any(name == t or name.endswith("." + t) for t in targets):
                parent_name, _, child = name.rpartition(".")
                parent = base_model.get_submodule(parent_name) if parent_name else base_model
                setattr(parent, child, LoRALinear(module, rank, alpha if alpha is not None else 2 * rank, dropout))
                self.adapted.append(name)
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in self.adapted)]
        if unmatched:
            raise DPFAError(f"target_modules {unmatched} match no module of the model.")

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def lora_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
