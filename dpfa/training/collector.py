"""Hooks that collect per-example gradient contributions during the one backward pass.

A forward hook on every module that owns trainable parameters keeps the module's input;
a tensor hook on the module's output receives the output gradient in backward, and the
module's rule (layer_rules.py) turns the pair into factored contributions. Nothing is
stored on the parameters: the collector, owned by the engine, holds the state.

Examples are indexed by (backward pass, position in the batch). Several forward/backward
passes before one optimizer step (gradient accumulation) hold different examples: a
forward pass that starts after a backward pass has delivered contributions seals them
as a group of their own, so that example i of one micro-batch is never merged with
example i of another. Forward passes before their common backward pass (a siamese loss)
share the group: their example i is one example.

Activation checkpointing (``torch.utils.checkpoint``) runs forwards again DURING backward to
recompute what it did not keep. Such a forward (recognised by the autograd engine running a
graph task, ``_in_backward``) is part of the backward pass that is under way: it never seals
a group nor starts new examples. Non-reentrant checkpointing recomputes tensors for the
original graph, so the hooks that a recomputed output gets never fire and every layer's
contribution arrives once, through the original forward's hook; reentrant checkpointing ran
the original forward without grad (no hook) and backpropagates through the recomputation,
whose hooks deliver each contribution once.

With ``defer_weight_grads`` (the engine's choice outside DDP/FSDP wrappers) the hooked
Linear, Conv1D, Embedding and LayerNorm modules run a forward whose backward skips their parameter
gradients (deferred_weight_grad.py): the optimizer computes them once, clipped.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from dpfa.errors import DPFAError
from dpfa.training.contributions import Contribution
from dpfa.training.deferred_weight_grad import defer_weight_gradients
from dpfa.training.layer_rules import UNUSED_PARAMETERS, UnsupportedLayerError, rule_for

LOSS_REDUCTIONS = ("mean", "sum")
#: Whether engines skip autograd's (non-private, unused) weight gradients of the layers that allow it
#: (deferred_weight_grad.py). Read by PrivacyEngine.make_private; False keeps autograd's own backward.
DEFER_WEIGHT_GRADIENTS = True


class GradSampleCollector:
    """Collects, per trainable parameter, the contributions of the current physical batch(es).

    ``loss_reduction="mean"``: the loss is a mean over the batch, so output gradients are
    1/B times those of the per-example losses (B of the backward pass that delivers them).
    They are kept as they are; :meth:`group_scales` gives each group's B, which clipping
    applies to the B norms and B clip factors (not to every output gradient). ``batch_info`` (the loader's BatchInfo) tags each group with
    the logical batch it came from, so that the optimizer can refuse to mix logical batches.
    """

    def __init__(self, module: nn.Module, loss_reduction: str = "mean", batch_info: Optional[object] = None,
                 defer_weight_grads: bool = False):
        if loss_reduction not in LOSS_REDUCTIONS:
            raise DPFAError(f"Unknown loss_reduction={loss_reduction!r}; expected 'mean' or 'sum'.")
        self.module = module
        self.loss_reduction = loss_reduction
        self.contributions: Dict[nn.Parameter, List[Contribution]] = {}
        self.batch_size: Optional[int] = None
        #: earlier backward passes since the last clear(), each {parameter: contributions} of its own examples
        self.sealed: List[Dict[nn.Parameter, List[Contribution]]] = []
        #: the logical batch (BatchInfo.logical_batch) of each group: sealed ones, then the current one
        self.sealed_logical: List[Optional[int]] = []
        #: the batch size of each sealed group (its contributions are 1/B of the per-example gradients'
        #: under loss_reduction="mean")
        self.sealed_batch: List[Optional[int]] = []
        self.logical: Optional[int] = None
        self.batch_info = batch_info
        self._handles: list = []
        self._forward_batch: Optional[int] = None
        #: id(module) -> {name: trainable parameter} as registered now (FSDP swaps in unsharded copies while a
        #: layer runs; contributions are keyed by the registered parameter, the one the optimizer holds)
        self._owned: Dict[int, Dict[str, nn.Parameter]] = {}
        self.parameters: List[nn.Parameter] = [p for p in module.parameters() if p.requires_grad]
        self._undo_deferral = None
        self._attach(defer_weight_grads)

    # --------------------------------------------------------------- set-up
    def _attach(self, defer_weight_grads: bool) -> None:
        self._handles.append(self.module.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True))
        covered: set[int] = set()
        for name, sub in self.module.named_modules():
            own = {n: p for n, p in sub.named_parameters(recurse=False) if p.requires_grad}
            if not own:
                continue
            rule = rule_for(sub)
            if rule is None:
                raise UnsupportedLayerError(
                    f"Module {name or '<root>'!r} ({type(sub).__qualname__}) has trainable parameters "
                    f"{sorted(own)} but dpfa has no per-example gradient rule for it. Supported: nn.Linear, "
                    "nn.Embedding, nn.LayerNorm, nn.RMSNorm, nn.Conv2d, nn.MultiheadAttention (converted), "
                    "transformers Conv1D/ViTEmbeddings/LlamaRMSNorm-style norms. Freeze it with "
                    "requires_grad_(False) or register a rule with dpfa.training.layer_rules.register_rule."
                )
            covered.update(id(p) for n, p in own.items())
            self._owned[id(sub)] = own
            self._handles.append(sub.register_forward_hook(self._forward_hook, with_kwargs=True))
        missing = [n for n, p in self.module.named_parameters() if p.requires_grad and id(p) not in covered]
        if missing:
            raise UnsupportedLayerError(f"Trainable parameters {missing} belong to no supported module.")
        if defer_weight_grads:
            hooked = [sub for sub in self.module.modules() if id(sub) in self._owned]
            self._undo_deferral = defer_weight_gradients(hooked)

    def detach(self) -> None:
        """Remove the hooks (the module becomes an ordinary module again)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._undo_deferral is not None:
            self._undo_deferral()
            self._undo_deferral = None

    # ---------------------------------------------------------------- hooks
    def _root_pre_hook(self, module: nn.Module, args, kwargs):
        """A new forward pass: its batch size is the root input's first dimension (if a tensor).

        Contributions already delivered by a backward pass are sealed: this pass's examples are new ones.
        A forward that a checkpoint recomputes inside backward is none of that (see the module docstring).
        """
        if _in_backward():
            return None
        if self.contributions:
            self.sealed.append(self.contributions)
            self.sealed_logical.append(self.logical)
            self.sealed_batch.append(self.batch_size)
            self.contributions, self.batch_size, self.logical = {}, None, None
        x = args[0] if args else next(iter(kwargs.values()), None)
        self._forward_batch = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() > 0 else None
        return None

    def _forward_hook(self, module: nn.Module, args, kwargs, output):
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        x = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(x, torch.Tensor):
            x = x.detach()
        if self._forward_batch is None:
            self._forward_batch = output.shape[0]
        replaced = None
        B = self._forward_batch
        if output.dim() > 0 and output.shape[0] == 1 and B > 1 and isinstance(x, torch.Tensor) and x.shape[0] == 1:
            # a batch-1 output broadcast against the batch (GPT-2's position embedding of shape (1, T)):
            # expand it so that the output gradient arrives per example; the forward value is unchanged.
            output = replaced = output.expand(B, *output.shape[1:])
            x = x.expand(B, *x.shape[1:])
        rule = rule_for(module)

        def on_grad(g: torch.Tensor) -> None:
            self._collect(module, rule, x, g)

        output.register_hook(on_grad)
        return replaced

    def _collect(self, module: nn.Module, rule, x, g: torch.Tensor) -> None:
        g = g.detach()
        batch = g.shape[0]
        if self.batch_size is None:
            self.batch_size = batch
        elif self.batch_size != batch:
            raise DPFAError(
                f"Module {type(module).__qualname__} saw batch size {batch} but an earlier module saw "
                f"{self.batch_size}: dpfa needs the batch dimension first in every layer."
            )
        if not self.contributions:
            self.logical = getattr(self.batch_info, "logical_batch", None)
        for pname, contribution in rule(module, x, g).items():
            p = self._owned.get(id(module), {}).get(pname)
            p = getattr(module, pname) if p is None else p
            self.contributions.setdefault(p, []).append(contribution)

    # ---------------------------------------------------------------- state
    def clear(self) -> None:
        self.contributions = {}
        self.batch_size = None
        self.sealed, self.sealed_logical, self.sealed_batch, self.logical = [], [], [], None

    def groups(self) -> List[Dict[nn.Parameter, List[Contribution]]]:
        """One {parameter: contributions} per backward pass since the last clear(); examples never span two."""
        return [g for g in self.sealed + [self.contributions] if g]

    def group_scales(self) -> List[float]:
        """For each of :meth:`groups`, the factor from its contributions to the per-example gradients:
        the group's batch size under loss_reduction="mean", else 1."""
        pairs = zip(self.sealed + [self.contributions], self.sealed_batch + [self.batch_size])
        return [float(b or 1) if self.loss_reduction == "mean" else 1.0 for g, b in pairs if g]

    def logical_batches(self) -> set:
        """The logical batches (BatchInfo.logical_batch) that the pending groups came from."""
        tags = self.sealed_logical + ([self.logical] if self.contributions else [])
        return {t for t in tags if t is not None}

    def has_contributions(self) -> bool:
        return any(self.groups())

    def unused(self) -> List[nn.Parameter]:
        """Trainable parameters with no contribution in this batch (no gradient reached them)."""
        return [p for p in self.parameters if all(p not in g for g in self.groups())]


def _in_backward() -> bool:
    """Whether the autograd engine is executing a backward pass on this thread (a checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


def known_unused(module: nn.Module) -> set[str]:
    return UNUSED_PARAMETERS.get(type(module).__name__, set())
