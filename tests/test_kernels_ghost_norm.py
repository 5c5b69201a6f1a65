"""Per-example norm kernels (dpfa.kernels.ghost_norm, direct_norm) against float64 references.

Fresh random inputs, odd shapes (T not a multiple of the tile, odd in/out features, T = 1),
every input dtype, tied terms (one-hot embedding + dense head), and the engine's dispatch
(contributions.squared_norms with kernels on equals the torch rules). Under the interpreter.
"""

import pytest
import torch

from dpfa.errors import ShapeError
from dpfa.kernels.direct_norm import direct_sq_norms, direct_sq_norms_reference
from dpfa.kernels.ghost_norm import ghost_sq_norms, ghost_sq_norms_reference
from dpfa.training import contributions
from dpfa.training.contributions import Factored, squared_norms

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, T, out, in, tile): ragged tiles, odd features, T = 1, a tile larger than T
SHAPES = [(3, 37, 13, 21, 16), (2, 1, 5, 7, 16), (2, 50, 17, 9, 32), (1, 20, 33, 3, None)]


def rel(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


def factors(gen, B, T, O, I, dtype):
    left = torch.randn(B, T, O, generator=gen).to(dtype)
    right = torch.randn(B, T, I, generator=gen).to(dtype)
    return left, right


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_ghost_norm_matches_float64(shape, dtype, gen):
    B, T, O, I, tile = shape
    left, right = factors(gen, B, T, O, I, dtype)
    got = ghost_sq_norms([(left, right)], block_t=tile, block_k=tile)
    assert got.dtype == torch.float32 and got.shape == (B,)
    # the operands are exactly representable, products accumulate in fp32: only fp32 rounding remains
    assert rel(got, ghost_sq_norms_reference([(left, right)])) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_direct_norm_matches_float64(shape, dtype, gen):
    B, T, O, I, tile = shape
    left, right = factors(gen, B, T, O, I, dtype)
    got = direct_sq_norms(left, right, block_o=tile, block_i=tile, block_t=tile)
    assert rel(got, direct_sq_norms_reference(left, right)) < 1e-5


def test_mixed_dtypes_multiply_in_16_bit(gen):
    """Under autocast the input is fp32 and the output gradient bf16: the fp32 factor is rounded to bf16."""
    left = torch.randn(2, 19, 11, generator=gen, dtype=torch.bfloat16)
    right = torch.randn(2, 19, 7, generator=gen)
    expected = ghost_sq_norms_reference([(left, right.bfloat16())])
    assert rel(ghost_sq_norms([(left, right)], block_t=16, block_k=16), expected) < 1e-5
    assert rel(direct_sq_norms(left, right, block_o=16, block_i=16, block_t=16), expected) < 1e-5


def test_tied_embedding_and_head(gen):
    """||onehot(rows)^T G_emb + L_head^T R_head||^2: one-hot Grams and the one-hot/dense gather cross term."""
    B, T_emb, T_head, V, d = 3, 23, 18, 13, 10
    rows = torch.randint(0, V, (B, T_emb), generator=gen)
    g_emb = torch.randn(B, T_emb, d, generator=gen)
    head_left, head_right = torch.randn(B, T_head, V, generator=gen), torch.randn(B, T_head, d, generator=gen)
    for terms in ([(rows, g_emb)], [(rows, g_emb), (head_left, head_right)], [(head_left, head_right), (rows, g_emb)],
                  [(rows, g_emb), (rows[:, :7], g_emb[:, :7])]):
        assert rel(ghost_sq_norms(terms, block_t=16, block_k=16), ghost_sq_norms_reference(terms)) < 1e-5


def test_empty_batch_and_empty_sequence(gen):
    left, right = factors(gen, 0, 5, 3, 4, torch.float32)
    assert ghost_sq_norms([(left, right)]).shape == (0,)
    assert direct_sq_norms(left, right).shape == (0,)
    left, right = factors(gen, 2, 0, 3, 4, torch.float32)
    assert torch.equal(ghost_sq_norms([(left, right)]), torch.zeros(2))


def test_bad_inputs_raise_clear_errors(gen):
    left, right = factors(gen, 2, 5, 3, 4, torch.float32)
    with pytest.raises(ShapeError, match="left factor"):
        ghost_sq_norms([(left[:, :4], right)])
    with pytest.raises(ShapeError, match="float16, bfloat16 or float32"):
        ghost_sq_norms([(left.double(), right.double())])
    with pytest.raises(ShapeError, match="same B and T"):
        direct_sq_norms(left, right[:1])


@pytest.mark.parametrize("method", ["auto", "ghost", "direct"])
def test_squared_norms_dispatch_equals_torch_rules(method, gen):
    """contributions.squared_norms with kernels on equals the torch rules, for every contribution kind."""
    B, T, V, d = 3, 11, 9, 6
    rows = torch.randint(0, V, (B, T), generator=gen)
    cases = [
        [Factored(torch.randn(B, T, 5, generator=gen), torch.randn(B, T, 7, generator=gen))],
        [Factored(torch.randn(B, T, 5, generator=gen), torch.randn(B, T, 7, generator=gen), transpose=True)],
        [Factored(rows, torch.randn(B, T, d, generator=gen), num_rows=V)],
        [Factored(rows, torch.randn(B, T, d, generator=gen), num_rows=V),
         Factored(torch.randn(B, T + 2, V, generator=gen), torch.randn(B, T + 2, d, generator=gen))],
    ]
    for cs in cases:
        with contributions.use_kernels("off"):
            expected = squared_norms(cs, method).double()
        with contributions.use_kernels("on"):
            got = squared_norms(cs, method)
        assert rel(got, expected) < 1e-5


def test_kernel_flop_rule():
    # T (out + in) < 2 out in: ghost; GPT-2 small's MLP at T 512 takes ghost, a 16 x 16 layer at T 64 direct
    assert contributions.kernel_prefers_ghost(512, 3072, 768)
    assert not contributions.kernel_prefers_ghost(64, 16, 16)
    with pytest.raises(Exception, match="expected one of"):
        with contributions.use_kernels("sometimes"):
            pass
