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
