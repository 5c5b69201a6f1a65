"""Activation checkpointing under the DP-SGD engine, and DPCheckpointedAttention (issue 8, item 4).

A checkpoint recomputes forwards during backward; the collector must neither start a new group
of examples nor record a layer's contribution twice. The private step must equal the textbook
one (per-example gradients by vmap(grad), clipped, summed) with checkpointing on, in both
torch.utils.checkpoint modes, for blocks and for the whole model.
"""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dp_reference import clipped_mean, per_example_grads, private_grads
from dpfa.checkpointing import DPCheckpointedAttention
from dpfa.errors import PrivacyParameterError
from dpfa.kernels.flash_attention import reference_path


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, h):
        return h + self.fc2(torch.tanh(self.fc1(self.ln(h))))


class Net(nn.Module):
    """Embedding -> 3 blocks (optionally checkpointed) -> head, on token sequences."""

    def __init__(self, mode="none", vocab=11, d=8):
        super().__init__()
        self.mode = mode
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(3)])
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        h = self.emb(idx)
        for b in self.blocks:
            if self.mode == "none" or not torch.is_grad_enabled():
                h = b(h)
            else:
                h = checkpoint(b, h, use_reentrant=self.mode == "reentrant")
        return self.head(h)


def lm_loss(logits, targets):
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _data(gen, n=5):
    return torch.randint(0, 11, (n, 7), generator=gen), torch.randint(0, 11, (n, 7), generator=gen)


@pytest.mark.parametrize("mode", ["nonreentrant", "reentrant"])
@pytest.mark.parametrize("C", [0.05, 1e3])
def test_checkpointed_blocks_equal_textbook(mode, C, gen):
    torch.manual_seed(0)
    ref = Net("none")
    model = Net(mode)
    model.load_state_dict(ref.state_dict())
    x, y = _data(gen)
    got, _, _ = private_grads(model, lm_loss, x, y, C)
    expected = clipped_mean(per_example_grads(ref, lm_loss, x, y), C, expected_batch_size=len(x))
    for n, g in expected.items():
        assert torch.allclose(got[n], g, rtol=1e-5, atol=1e-7), n


@pytest.mark.parametrize("reentrant", [False])  # reentrant needs an input that requires grad (torch)
def test_checkpointing_the_whole_model_equals_textbook(reentrant, gen):
    """The root module itself recomputed in backward (its forward pre-hook runs again mid-backward)."""
    torch.manual_seed(1)
    ref = Net("none")
    model = Net("none")
    model.load_state_dict(ref.state_dict())
    x, y = _data(gen)
    got = _whole(model, x, y, 0.1, reentrant)
    expected = clipped_mean(per_example_grads(ref, lm_loss, x, y), 0.1, expected_batch_size=len(x))
    for n, g in expected.items():
        assert torch.allclose(got[n], g, rtol=1e-5, atol=1e-7), n


def _whole(model, x, y, C, reentrant):
    import warnings

    from torch.utils.data import DataLoader, TensorDataset

    from dpfa.training import PrivacyEngine

    engine = PrivacyEngine(accountant="rdp", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="noise_multiplier=0")
        model, opt, _ = engine.make_private(model, opt, DataLoader(TensorDataset(x, y), batch_size=len(x)),
                                            noise_multiplier=0.0, target_delta=1e-5, max_grad_norm=C,
                                            poisson_sampling=False)
    opt.zero_grad()
    out = checkpoint(model, x, use_reentrant=reentrant)
    lm_loss(out, y).backward()
    assert len(opt.collector.groups()) == 1  # one backward pass: one group of examples
    assert opt.pre_step()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _saved_bytes(fn):
    """Bytes of the tensors that autograd keeps for backward while ``fn()`` runs (the activation memory)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def test_dp_checkpointed_attention_keeps_less_and_releases_the_same(gen):
    torch.manual_seed(0)
    kw = dict(epsilon=1.0, delta=1e-5, batch_first=True)
    plain = DPCheckpointedAttention(64, 4, checkpoint_gradients=False, **kw)
    ckpt = DPCheckpointedAttention(64, 4, checkpoint_gradients=True, segments=4, **kw)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(8, 32, 64, generator=gen, requires_grad=True)
    mem = torch.randn(8, 48, 64, generator=gen)
    with reference_path():
        b_plain, (o_plain, s_plain) = _saved_bytes(lambda: plain(x, mem, mem, return_privacy_stats=True))
        b_ckpt, (o_ckpt, s_ckpt) = _saved_bytes(lambda: ckpt(x, mem, mem, return_privacy_stats=True))
        print(f"saved for backward: {b_plain} bytes plain, {b_ckpt} checkpointed")
        assert b_ckpt < b_plain / 4, (b_ckpt, b_plain)
        # the same budget and one accounted call each; recomputation in backward is not accounted
        assert s_ckpt.epsilon_spent == s_plain.epsilon_spent == 1.0
        (o_ckpt.square().sum()).backward()
        assert ckpt._accountant.steps == sum(e.count for e in s_ckpt.events)  # once, not again in backward
        assert ckpt.get_privacy_spent() == plain.get_privacy_spent()
        # the gradient through the checkpointed release equals that of an un-checkpointed call with the same noise
        g_ckpt = {n: p.grad.clone() for n, p in ckpt.named_parameters()}
        seg = [torch.tensor_split(t, 4) for t in (x.detach(), mem, mem)]
        outs = []
        for i in range(4):
            o, _ = plain._attend(seg[0][i], seg[1][i], seg[2][i], None, False, s_ckpt.seed + i)
            outs.append(o)
        torch.cat(outs).square().sum().backward()
    for n, p in plain.named_parameters():
        assert torch.allclose(p.grad, g_ckpt[n], rtol=1e-5, atol=1e-6), n


def test_checkpointing_refuses_secure_mode():
    with pytest.raises(PrivacyParameterError, match="cannot be replayed"):
        DPCheckpointedAttention(32, 2, epsilon=1.0, delta=1e-5, secure_mode=True)


def test_without_the_backward_check_the_whole_model_checkpoint_splits_examples(gen, monkeypatch):
    """Regression: before the collector recognised recomputation, the root's pre-hook sealed mid-backward."""
    from dpfa.training import collector

    monkeypatch.setattr(collector, "_in_backward", lambda: False)
    torch.manual_seed(1)
    x, y = _data(gen)
    with pytest.raises(AssertionError):
        _whole(Net("none"), x, y, 0.1, False)
