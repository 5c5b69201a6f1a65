"""DPLoRA: only the adapters train, and a private step on them equals the textbook algorithm."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dp_reference import clipped_mean, per_example_grads
from dpfa.errors import DPFAError
from dpfa.finetune import DPLoRA
from dpfa.models import GPT, GPTConfig
from dpfa.training import PrivacyEngine


def lm_loss(logits, y):
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def test_lora_private_step_equals_textbook(gen):
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16))
    model = DPLoRA(base, rank=4, target_modules=["qkv", "fc"])
    assert sorted(model.adapted) == ["blocks.0.attn.qkv", "blocks.0.fc", "blocks.1.attn.qkv", "blocks.1.fc"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # B starts at zero (then A gets no gradient): move it so both are exercised
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    x = torch.randint(0, 13, (5, 8), generator=gen)
    y = torch.randint(0, 13, (5, 8), generator=gen)
    expected = clipped_mean(per_example_grads(copy.deepcopy(model), lm_loss, x, y), 0.05, 5)
    assert set(expected) == trainable

    opt = torch.optim.SGD(model.lora_parameters(), lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, _ = PrivacyEngine(accountant="rdp").make_private(
            model, opt, DataLoader(TensorDataset(x, y), batch_size=5), noise_multiplier=0.0, target_delta=1e-5,
            max_grad_norm=0.05, poisson_sampling=False)
    opt.zero_grad()
    lm_loss(model(x), y).backward()
    opt.step()
    params = dict(model.named_parameters())
    for n, upd in expected.items():
        err = (params[n].grad - upd).norm() / upd.norm()
        assert err < 1e-5, n
    for n, p in frozen_before.items():
        assert torch.equal(params[n], p), n


def test_lora_bad_targets():
    base = GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(DPFAError, match="nope"):
        DPLoRA(base, rank=4, target_modules=["nope"])
    with pytest.raises(DPFAError, match="rank"):
        DPLoRA(GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=16)), rank=0,
               target_modules=["fc"])
