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
    """The float64 sum_b c_b L_b^T R_b of the operands rounded to the compute dtype, as the norm kernels
    round them: the factor c_b is not rounded into an operand."""
    return clipped_sum_reference(left.to(dtype), right.to(dtype), c.float())


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_factor_scales_the_float32_product_not_a_rounded_operand(dtype, gen):
    """Each example's clipped contribution is c_b times the product whose norm was measured, to float32
    accuracy. Rounding c_b L_b to 16 bits instead (an earlier form) is off by ~2^-9 relative per entry and
    fails this; factors spanning 2^-40..1, zeros and tiny ones exercise the accumulator's rescaling."""
    B, T, O, I = 6, 40, 24, 20
    left = torch.randn(B, T, O, generator=gen).to(dtype)
    right = torch.randn(B, T, I, generator=gen)
    c = torch.tensor([1.0, 0.37, 0.0, 2.0**-40, 2.0**-110, 0.9], dtype=torch.float64)
    for splits in (1, 2, 4):
        for block_k in (16, 64):  # several chunks per example, and one (T <= BLOCK_K)
            got = clipped_sum(left, right, c, block_o=16, block_i=16, block_k=block_k, splits=splits).double()
            truth = expected_sum(left, right, c, dtype)
            assert ((got - truth).norm() / truth.norm()).item() < 2e-6, (splits, block_k)
    # each example alone: c_b M_b to float32 accuracy (a tiny factor does not vanish into the others' error)
    for b in (1, 3):
        only = torch.zeros(B, dtype=torch.float64)
        only[b] = c[b]
        got = clipped_sum(left, right, only, block_o=16, block_i=16, block_k=16, splits=2).double()
        truth = expected_sum(left, right, only, dtype)
        assert ((got - truth).norm() / truth.norm()).item() < 2e-6
    old_form = clipped_sum_reference((left.float() * c.float()[:, None, None]).to(dtype), right.to(dtype),
                                     torch.ones(B))
    truth = expected_sum(left, right, c, dtype)
    assert ((old_form - truth).norm() / truth.norm()).item() > 1e-4  # the test tells the two forms apart


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


@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_kernel_norm_then_kernel_sum_clip_bf16_to_c(method, gen):
    """The chain the engine runs on a GPU, under the interpreter: the norm kernel's per-example norm of
    bf16 factors, then the clipped-sum kernel with c_b = C / n_b for one example at a time, gives a
    clipped gradient of norm C to float32 accuracy (the tied embedding + head form included)."""
    B, T, V, d = 3, 12, 10, 6
    head = contributions.Factored(left=torch.randn(B, T, V, generator=gen).bfloat16(),
                                  right=torch.randn(B, T, d, generator=gen))  # fp32 input, bf16 gradient
    emb = contributions.Factored(left=torch.randint(0, V, (B, T), generator=gen),
                                 right=torch.randn(B, T, d, generator=gen).bfloat16(), num_rows=V)
    for cs in ([head], [emb, head]):
        with contributions.use_kernels("on"):
            norms = contributions.squared_norms(cs, method if len(cs) == 1 else "auto").double().sqrt()
            for b in range(B):
                factors = torch.zeros(B, dtype=torch.float64)
                factors[b] = 0.3 / norms[b]
                clipped = contributions.clipped_sum(cs, factors, torch.Size((V, d)))
                assert abs(clipped.double().norm().item() / 0.3 - 1) < 2e-6, (len(cs), b)
