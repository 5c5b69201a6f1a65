"""transformers models built from configs (no downloads) train under the engine without code changes,
and one step equals the textbook algorithm (DESIGN.md 1.1)."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dp_reference import clipped_mean, per_example_grads
from dpfa.training import PrivacyEngine

transformers = pytest.importorskip("transformers")


class Logits(nn.Module):
    """Adapts a transformers model to x -> logits (what the loss and vmap need)."""

    def __init__(self, model, key):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x):
        return self.model(**{self.key: x}).logits


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=37, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return Logits(transformers.GPT2LMHeadModel(cfg), "input_ids"), "tokens"


def bert():
    cfg = transformers.BertConfig(vocab_size=37, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=3, pad_token_id=0)
    return Logits(transformers.BertForSequenceClassification(cfg), "input_ids"), "class"


def vit():
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=24, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0, num_labels=3)
    return Logits(transformers.ViTForImageClassification(cfg), "pixel_values"), "image"


def llama():
    """RMSNorm scale vectors (LlamaRMSNorm), rotary positions, grouped-query attention, untied head."""
    cfg = transformers.LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                   attention_dropout=0.0)
    return Logits(transformers.LlamaForCausalLM(cfg), "input_ids"), "tokens"


def batch(kind, n, gen):
    if kind == "tokens":
        x = torch.randint(0, 37, (n, 7), generator=gen)
        return x, torch.randint(0, 37, (n, 7), generator=gen)
    if kind == "class":
        return torch.randint(1, 37, (n, 7), generator=gen), torch.randint(0, 3, (n,), generator=gen)
    return torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def loss_fn(logits, y):
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@pytest.mark.parametrize("build", [gpt2, bert, vit, llama], ids=["gpt2", "bert", "vit", "llama"])
@pytest.mark.parametrize("C, clipping", [(0.01, "flat"), (1e4, "flat"), (0.01, "per_layer")])
def test_transformers_step_equals_textbook(build, C, clipping, gen):
    torch.manual_seed(0)
    model, kind = build()
    model.eval()  # dropout is 0 anyway; eval keeps vmap and the engine on the same function
    x, y = batch(kind, 5, gen)
    grads = per_example_grads(copy.deepcopy(model), loss_fn, x, y)
    thresholds = {n: C / len(grads) ** 0.5 for n in grads}  # the engine's default equal split
    expected = clipped_mean(grads, C, expected_batch_size=5, clipping=clipping, thresholds=thresholds)

    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, _ = engine.make_private(model, opt, DataLoader(TensorDataset(x, y), batch_size=5),
                                            noise_multiplier=0.0, target_delta=1e-5, max_grad_norm=C,
                                            clipping=clipping, poisson_sampling=False)
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    assert opt.pre_step()
    total = torch.cat([u.flatten() for u in expected.values()]).norm().item()
    # a gradient that is 0 in theory is fp32 round-off; per-layer clipping leaves it unscaled: floor relative to C
    floor = 1e-7 * total if clipping == "flat" else 1e-6 * C
    params = dict(model.named_parameters())
    assert set(expected) == {n for n, p in params.items() if p.requires_grad}
    for n, upd in expected.items():
        got = params[n].grad
        err = (got.double() - upd.double()).norm().item()
        assert err <= 1e-5 * upd.double().norm().item() + floor, f"{n}: error {err:.3g}"
