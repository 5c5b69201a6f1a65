"""Book-keeping clipped sum kernel (dpfa.kernels.clipped_sum) and the engine with kernels forced on.

The kernel against a float64 reference (odd shapes, split-K, every dtype); then the core
exactness test of DESIGN.md 1.1 with contributions.KERNELS = "on" under the interpreter: one
optimizer step with noise 0 equals textbook vmap(grad) clipping, and the kernels really ran.
"""

import copy

import pytest
import torch

import dpfa.kernels.clipped_sum as cs_mod
import dpfa.kernels.direct_norm as dn_mod
import dpfa.kernels.dpsgd_noise as noise_mod
import dpfa.kernels.ghost_norm as gn_mod
from dp_reference import clipped_mean, per_example_grads, private_grads
from dpfa.errors import ShapeError
from dpfa.kernels.clipped_sum import clipped_sum, clipped_sum_reference
from dpfa.training import contributions
from test_training_engine import CASES, assert_rel_close, data_for, mlp_model, model_with_params, mse_loss

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, T, out, in, tile, splits)
SHAPES = [(5, 37, 13, 21, 16, 3), (7, 1, 5, 3, 16, 1), (3, 20, 33, 17, 32, 2), (2, 9, 40, 6, None, None)]


def expected_sum(left, right, c, dtype):
    """The float64 sum of the operands the kernel multiplies: c_b L rounded to the compute dtype."""
    scaled = (left.float() * c.float()[:, None, None]).to(dtype)
    return clipped_sum_reference(scaled, right.to(dtype), torch.ones(len(c)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_clipped_sum_matches_float64(shape, dtype, gen):
    B, T, O, I, tile, splits = shape
    left = torch.randn(B, T, O, generator=gen).to(dtype)
    right = torch.randn(B, T, I, generator=gen).to(dtype)
    c = torch.rand(B, generator=gen, dtype=torch.float64)
    c[0] = 1.0
    got = clipped_sum(left, right, c, block_o=tile, block_i=tile, block_k=tile, splits=splits)
    assert got.dtype == torch.float32 and got.shape == (O, I)
    expected = expected_sum(left, right, c, dtype)
    assert ((got.double() - expected).norm() / expected.norm()).item() < 1e-5
    if dtype == torch.float32:  # and against the exact sum of the unrounded factors
        exact = clipped_sum_reference(left, right, c)
        assert ((got.double() - exact).norm() / exact.norm()).item() < 1e-5


def test_mixed_dtypes_and_noncontiguous_factors(gen):
    """An fp32 input with a bf16 output gradient (autocast); transposed/strided views need no copy."""
    left = torch.randn(4, 21, 9, generator=gen, dtype=torch.bfloat16)
    right = torch.randn(4, 11, 21, generator=gen).transpose(1, 2)  # (4, 21, 11), non-contiguous
    c = torch.rand(4, generator=gen)
    got = clipped_sum(left, right, c, block_o=16, block_i=16, block_k=16, splits=2)
    expected = expected_sum(left, right, c, torch.bfloat16)
    assert ((got.double() - expected).norm() / expected.norm()).item() < 1e-5


def test_zero_factors_and_empty_batch(gen):
    left, right = torch.randn(3, 5, 4, generator=gen), torch.randn(3, 5, 6, generator=gen)
    assert torch.equal(clipped_sum(left, right, torch.zeros(3)), torch.zeros(4, 6))
    assert torch.equal(clipped_sum(left[:0], right[:0], torch.zeros(0)), torch.zeros(4, 6))
    with pytest.raises(ShapeError, match="one clip factor per example"):
        clipped_sum(left, right, torch.ones(2))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count the kernel entry points the engine calls (they must run when kernels are on)."""
    calls = {"ghost": 0, "direct": 0, "clipped_sum": 0, "noise": 0}

    def counted(mod, name, key):
        fn = getattr(mod, name)

        def wrapper(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        monkeypatch.setattr(mod, name, wrapper)

    counted(gn_mod, "ghost_sq_norms", "ghost")
    counted(dn_mod, "direct_sq_norms", "direct")
    counted(cs_mod, "clipped_sum", "clipped_sum")
    counted(noise_mod, "noisy_average", "noise")
    return calls


@pytest.mark.parametrize("case", ["mlp", "tokens_tied", "conv", "tokens_untied_seqfirst"])
@pytest.mark.parametrize("C", [0.05, 1e3])  # every example clipped / none clipped
def test_one_step_equals_textbook_dp_sgd_with_kernels(case, C, gen, kernel_calls):
    build, kind, loss_fn = CASES[case]
    torch.manual_seed(0)
    model = build()
    x, y = data_for(kind, 6, gen)
    reference_model = copy.deepcopy(model)
    with contributions.use_kernels("on"):
        got, _, model = private_grads(model, loss_fn, x, y, C)
    grads = per_example_grads(model_with_params(model, reference_model), loss_fn, x, y)
    expected = clipped_mean(grads, C, expected_batch_size=6)
    total = torch.cat([u.flatten() for u in expected.values()]).norm().item()
    for n, upd in expected.items():
        assert_rel_close(got[n], upd, floor=1e-7 * total, msg=f"{case}: {n}")
    assert kernel_calls["ghost"] + kernel_calls["direct"] > 0
    assert kernel_calls["clipped_sum"] > 0 and kernel_calls["noise"] == 1


def test_per_layer_clipping_with_kernels(gen, kernel_calls):
    torch.manual_seed(1)
    model = mlp_model()
    x, y = data_for("mlp", 5, gen)
    ref = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    norms = [0.3 / len(names) ** 0.5] * len(names)
    with contributions.use_kernels("on"):
        got, _, _ = private_grads(model, mse_loss, x, y, 0.3, clipping="per_layer", per_layer_norms=norms)
    expected = clipped_mean(per_example_grads(ref, mse_loss, x, y), 0.3, 5, clipping="per_layer",
                            thresholds=dict(zip(names, norms)))
    for n, upd in expected.items():
        assert_rel_close(got[n], upd, msg=n)
    assert kernel_calls["clipped_sum"] > 0


def test_kernels_off_uses_torch_path(gen, kernel_calls):
    torch.manual_seed(2)
    x, y = data_for("mlp", 4, gen)
    with contributions.use_kernels("off"):
        private_grads(mlp_model(), mse_loss, x, y, 1.0)
    assert sum(kernel_calls.values()) == 0
