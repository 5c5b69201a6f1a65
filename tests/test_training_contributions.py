"""Ghost norm = direct norm = the norm of the materialised per-example gradient; clipped sums likewise."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dpfa.training import contributions as C


def materialise(c: C.Factored) -> torch.Tensor:
    g = torch.einsum("bto,bti->boi", c.dense_left().double(), c.right.double())
    return g.transpose(1, 2) if c.transpose else g


@settings(max_examples=25, deadline=None)
@given(B=st.integers(0, 4), T=st.integers(1, 9), n_out=st.integers(1, 7), n_in=st.integers(1, 7),
       seed=st.integers(0, 2**31 - 1))
def test_ghost_direct_and_materialised_agree(B, T, n_out, n_in, seed):
    g = torch.Generator().manual_seed(seed)
    c = C.Factored(left=torch.randn(B, T, n_out, generator=g, dtype=torch.float64),
                   right=torch.randn(B, T, n_in, generator=g, dtype=torch.float64))
    truth = materialise(c).flatten(1).pow(2).sum(1)
    torch.testing.assert_close(C.squared_norms([c], "ghost"), truth)
    torch.testing.assert_close(C.squared_norms([c], "direct"), truth)
    factors = torch.rand(B, generator=g, dtype=torch.float64)
    torch.testing.assert_close(C.clipped_sum([c], factors, torch.Size([n_out, n_in])),
                               torch.einsum("b,boi->oi", factors, materialise(c)))


def test_tiles_cover_long_sequences(monkeypatch):
    monkeypatch.setattr(C, "GHOST_TILE", 3)
    monkeypatch.setattr(C, "DIRECT_TILE", 2)
    g = torch.Generator().manual_seed(0)
    c = C.Factored(left=torch.randn(2, 10, 5, generator=g, dtype=torch.float64),
                   right=torch.randn(2, 10, 4, generator=g, dtype=torch.float64))
    truth = materialise(c).flatten(1).pow(2).sum(1)
    torch.testing.assert_close(C.squared_norms([c], "ghost"), truth)
    torch.testing.assert_close(C.squared_norms([c], "direct"), truth)


def test_tied_index_and_dense_factors_norm_of_the_sum():
    """An embedding (one-hot left factor) tied to a head (dense): the norm of the SUM of both uses."""
    g = torch.Generator().manual_seed(1)
    V, d, B, T = 6, 3, 3, 5
    rows = torch.randint(0, V, (B, T), generator=g)
    emb = C.Factored(left=rows, right=torch.randn(B, T, d, generator=g, dtype=torch.float64), num_rows=V)
    head = C.Factored(left=torch.randn(B, T, V, generator=g, dtype=torch.float64),
                      right=torch.randn(B, T, d, generator=g, dtype=torch.float64))
    total = materialise(emb) + materialise(head)
    torch.testing.assert_close(C.squared_norms([emb, head]), total.flatten(1).pow(2).sum(1))
    torch.testing.assert_close(C.squared_norms([emb]), materialise(emb).flatten(1).pow(2).sum(1))
    f = torch.rand(B, generator=g, dtype=torch.float64)
    torch.testing.assert_close(C.clipped_sum([emb, head], f, torch.Size([V, d])), torch.einsum("b,boi->oi", f, total))


def test_cost_rule():
    assert C.prefers_ghost(T=16, n_out=768, n_in=768)
    assert not C.prefers_ghost(T=4096, n_out=64, n_in=64)


def test_mixing_kinds_is_an_error():
    with pytest.raises(TypeError):
        C.squared_norms([C.PerExample(torch.zeros(2, 3)), C.Factored(torch.zeros(2, 1, 3), torch.zeros(2, 1, 1))])


@pytest.mark.parametrize("n_out,n_in", [(7, 3), (3, 7), (5, 5)])
def test_scaled_matmul_sum_scales_the_narrower_factor_exactly(n_out, n_in):
    """The cuBLAS form of the clipped sum (float32 factors on CUDA, where it measures faster than the kernel)."""
    g = torch.Generator().manual_seed(n_out * 10 + n_in)
    left = torch.randn(4, 6, n_out, generator=g)
    right = torch.randn(4, 6, n_in, generator=g)
    factors = torch.rand(4, generator=g, dtype=torch.float64)
    got = C._scaled_matmul_sum(left, right, factors)
    assert got.dtype == torch.float32 and got.shape == (n_out, n_in)
    truth = torch.einsum("b,bto,bti->oi", factors, left.double(), right.double())
    torch.testing.assert_close(got.double(), truth, rtol=1e-5, atol=1e-5)
    wrong = torch.einsum("bto,bti->oi", left.double(), right.double())  # unclipped: must not match
    assert not torch.allclose(got.double(), wrong, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="float32"):  # 16-bit: c_b L_b rounded would exceed C
        C._scaled_matmul_sum(left.bfloat16(), right, factors)


@pytest.mark.parametrize("kind", ["dense", "one_hot", "per_example"])
def test_torch_path_clips_bf16_factors_in_float32(kind):
    """Norm and clipped sum of 16-bit contributions are computed in float32: the clipped per-example
    gradient has norm C to float32 accuracy (16-bit products and factors would be off by ~2^-9)."""
    g = torch.Generator().manual_seed(5)
    B, T = 3, 9
    if kind == "dense":
        c = C.Factored(left=torch.randn(B, T, 6, generator=g).bfloat16(), right=torch.randn(B, T, 5, generator=g))
        shape = (6, 5)
    elif kind == "one_hot":
        c = C.Factored(left=torch.randint(0, 4, (B, T), generator=g), right=torch.randn(B, T, 5, generator=g).bfloat16(),
                       num_rows=4)
        shape = (4, 5)
    else:
        c = C.PerExample(torch.randn(B, 7, generator=g).bfloat16())
        shape = (7,)
    norms = C.squared_norms([c]).sqrt().double()
    assert norms.dtype == torch.float64
    for b in range(B):
        factors = torch.zeros(B, dtype=torch.float64)
        factors[b] = 0.3 / norms[b]  # clip example b alone to norm 0.3
        clipped = C.clipped_sum([c], factors, torch.Size(shape))
        assert clipped.dtype == torch.float32
        assert abs(clipped.double().norm().item() - 0.3) < 0.3 * 1e-6
