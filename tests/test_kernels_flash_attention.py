"""Flash attention kernels against a float64 torch reference (issue 4).

Without a GPU the Triton kernels run under the interpreter (tests/conftest.py), so the
shapes are small; on a GPU the same tests run the compiled kernels with one fixed
block config (DPFA_FLASH_AUTOTUNE=0: no autotuning inside tests). Every check draws
fresh random inputs.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("DPFA_FLASH_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from dpfa.errors import ShapeError  # noqa: E402
from dpfa.kernels import EpilogueNoise, attention_reference, flash_attn_func, flash_attn_with_hooks  # noqa: E402
from dpfa.mechanisms.device_samplers import gaussian_sampler  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# relative error bounds of the issue: fp32 < 1e-4, fp16/bf16 < 1e-2
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _rand(*shape, dtype, grad=True):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(grad)


def _rel(out, ref):
    """||out - ref|| / ||ref||, with a floor on ||ref|| for gradients that are ~0.

    With one visible key the softmax is constant, so dk is 0 in exact arithmetic and the
    kernel's is fp32 round-off of dP - rowsum(dO * O) (about 1e-7 per entry): relative to
    an exact 0 that is no error. The floor (1e-2 per entry, against gradients of order 1
    for unit inputs) only matters for such gradients.
    """
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out).all(), "non-finite values in the kernel's result"
    floor = 1e-2 * math.sqrt(ref.numel())
    return ((out - ref).norm() / max(ref.norm().item(), floor)).item()


def _check(B, Nq, Nk, H, Hk, D, dtype, causal=False, mask=False, scale=None,
           score_cap=None, score_cap_mode="clamp", value_clip=None, backward=True):
    """Run the kernel forward (and backward) and compare everything with float64."""
    q = _rand(B, Nq, H, D, dtype=dtype)
    k = _rand(B, Nk, Hk, D, dtype=dtype)
    v = _rand(B, Nk, Hk, D, dtype=dtype)
    kpm = None
    if mask:
        kpm = torch.rand(B, Nk, device=DEVICE) > 0.3
        kpm[0] = False  # a batch element whose every key is padding: zero output, lse -inf
        if B > 1:
            kpm[1, 0] = True
    opts = dict(causal=causal, softmax_scale=scale, key_padding_mask=kpm, score_cap=score_cap,
                score_cap_mode=score_cap_mode, value_clip=value_clip)
    out, lse = flash_attn_with_hooks(q, k, v, return_lse=True, **opts)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (B, H, Nq)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_reference(q64, k64, v64, return_lse=True, **opts)
    tol = TOL[dtype]
    assert _rel(out, ref) < tol, f"output: rel err {_rel(out, ref):.2e}"
    empty = torch.isinf(ref_lse.cpu())
    assert torch.equal(torch.isinf(lse.cpu()), empty)
    if (~empty).any():
        assert (lse.cpu()[~empty].double() - ref_lse.cpu()[~empty]).abs().max() < 1e-3
    assert (lse.cpu()[empty] == -math.inf).all()
    if not backward:
        return
    do = torch.randn_like(out)
    out.backward(do)
    ref.backward(do.double())
    for name, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        err = _rel(got, want)
        assert err < tol, f"{name}: rel err {err:.2e}"


# Every dtype x every head dim, each with a different mix of the other features, so that
# each feature meets each dtype somewhere without the full product.
_HEAD_DIM_CASES = [
    # (B, Nq, Nk, H, Hk, D, causal, mask)
    (2, 37, 53, 4, 2, 32, True, False),    # causal, Nq < Nk (bottom-right), GQA
    (1, 49, 31, 2, 1, 64, True, True),     # causal, Nq > Nk: the first rows see no key; MQA; mask
    (2, 33, 33, 2, 2, 80, False, True),    # head dim padded to 128, mask
    (1, 21, 45, 3, 3, 96, False, False),   # odd lengths, padded head dim
    (1, 40, 24, 4, 2, 128, True, False),
    (1, 17, 35, 2, 1, 256, False, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=_NAMES.get)
@pytest.mark.parametrize("case", _HEAD_DIM_CASES, ids=lambda c: f"d{c[5]}")
def test_matches_reference_every_dtype_and_head_dim(case, dtype):
    B, Nq, Nk, H, Hk, D, causal, mask = case
    _check(B, Nq, Nk, H, Hk, D, dtype, causal=causal, mask=mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=_NAMES.get)
@pytest.mark.parametrize("shape", [
    (1, 1, 1, 1, 1, 64, False),      # one query, one key
    (2, 1, 19, 2, 1, 64, True),      # decoding: one query sees every key (bottom-right)
    (1, 19, 1, 2, 2, 32, True),      # one key: only the last query row sees it
    (1, 257, 257, 1, 1, 32, True),   # not a multiple of any block
    (1, 257, 70, 1, 1, 32, False),
], ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}{'c' if s[6] else ''}")
def test_odd_lengths(shape, dtype):
    B, Nq, Nk, H, Hk, D, causal = shape
    _check(B, Nq, Nk, H, Hk, D, dtype, causal=causal)


def test_softmax_scale_and_non_causal_gqa():
    _check(2, 29, 40, 6, 2, 64, torch.float32, scale=0.37)
    _check(1, 29, 40, 4, 1, 64, torch.float16, causal=False, mask=True, scale=1.3)


def test_flash_attn_func_is_a_drop_in():
    q, k, v = (_rand(2, 24, 4, 64, dtype=torch.float16) for _ in range(3))
    out = flash_attn_func(q, k, v, 0.0, None, True)
    ref = attention_reference(*(t.double() for t in (q, k, v)), causal=True)
    assert _rel(out, ref) < 1e-2
    out, lse = flash_attn_func(q, k, v, causal=False, softcap=3.0, return_lse=True)
    ref, ref_lse = attention_reference(*(t.double() for t in (q, k, v)), score_cap=3.0,
                                       score_cap_mode="tanh", return_lse=True)
    assert _rel(out, ref) < 1e-2 and (lse.cpu().double() - ref_lse.cpu()).abs().max() < 1e-3


def test_lse_is_the_log_sum_exp_of_the_scores():
    q, k, v = (_rand(1, 20, 2, 32, dtype=torch.float32, grad=False) for _ in range(3))
    _, lse = flash_attn_with_hooks(q, k, v, return_lse=True)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(32)
    assert torch.allclose(lse.double().cpu(), torch.logsumexp(s, -1).cpu(), atol=1e-5)


def test_reference_gradcheck():
    """The reference is differentiable and its gradients are right (float64, every feature on)."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 5, 4, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 7, 2, 8, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(1, 7, 2, 8, dtype=torch.float64, generator=g, requires_grad=True)
    kpm = torch.tensor([[True, False, True, True, True, True, False]])
    for opts in (dict(causal=True), dict(causal=True, key_padding_mask=kpm, score_cap=0.8, score_cap_mode="tanh",
                                         value_clip=1.5),
                 dict(causal=False, score_cap=5.0, score_cap_mode="clamp")):
        assert torch.autograd.gradcheck(lambda a, b, c: attention_reference(a, b, c, **opts), (q, k, v))


# ------------------------------------------------------------------ DP release hooks


@pytest.mark.parametrize("mode", ["clamp", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_NAMES.get)
def test_score_cap_and_value_clip(mode, dtype):
    # scale 2 makes many scores exceed the cap of 1.5, and ||v|| ~ 8 > C = 2
    _check(2, 27, 35, 4, 2, 64, dtype, causal=True, mask=True, scale=2.0 / 8, score_cap=1.5,
           score_cap_mode=mode, value_clip=2.0)


def test_value_clip_bounds_every_output_row():
    q, k = (_rand(1, 33, 2, 64, dtype=torch.float32, grad=False) for _ in range(2))
    v = 10 * _rand(1, 33, 2, 64, dtype=torch.float32, grad=False)
    out = flash_attn_with_hooks(q, k, v, value_clip=0.5, score_cap=2.0)
    # a convex combination of rows of norm <= C has norm <= C
    assert out.norm(dim=-1).max() <= 0.5 * (1 + 1e-5)


def _noise_inputs(B=2, N=40, H=4, D=64, dtype=torch.float32):
    q, k, v = (_rand(B, N, H, D, dtype=dtype) for _ in range(3))
    sigma = torch.rand(B, H, N, device=DEVICE) + 0.5
    return q, k, v, sigma


def test_epilogue_noise_sampler_law_and_reproducibility():
    q, k, v, sigma = _noise_inputs()
    noise = EpilogueNoise(sigma=sigma, sampler=gaussian_sampler, seed=1234)
    clean = flash_attn_with_hooks(q, k, v, causal=True)
    noisy = flash_attn_with_hooks(q, k, v, causal=True, noise=noise)
    again = flash_attn_with_hooks(q, k, v, causal=True, noise=noise)
    other = flash_attn_with_hooks(q, k, v, causal=True, noise=EpilogueNoise(sigma=sigma, sampler=gaussian_sampler, seed=1235))
    assert torch.equal(noisy, again), "same seed must give the same noise"
    assert not torch.equal(noisy, other)
    z = ((noisy - clean).double() / sigma.transpose(1, 2)[..., None].double()).flatten()
    n = z.numel()  # 20480 standard normals: mean within 5 sigma of 0, std within 3%
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1.0) < 0.03


def test_epilogue_noise_tensor_and_backward_ignores_noise():
    q, k, v, sigma = _noise_inputs(B=1, N=24, H=2, D=32)
    z = torch.randn(q.shape, device=DEVICE)
    noisy = flash_attn_with_hooks(q, k, v, noise=EpilogueNoise(sigma=sigma[:, :1], tensor=z))  # sigma broadcast over heads
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    clean = flash_attn_with_hooks(q2, k2, v2)
    expect = clean.detach() + sigma[:, :1].transpose(1, 2)[..., None] * z
    assert torch.allclose(noisy.detach(), expect, atol=1e-5)
    do = torch.randn_like(noisy)
    noisy.backward(do)
    clean.backward(do)
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


# --------------------------------------------------------------------------- bad input


def _t(*shape, dtype=torch.float16, device=DEVICE):
    return torch.zeros(*shape, dtype=dtype, device=device)


_Q, _K = (2, 8, 4, 64), (2, 8, 2, 64)


@pytest.mark.parametrize("args, kwargs, match", [
    ((_t(8, 4, 64), _t(*_K), _t(*_K)), {}, r"rank 4.*q\.shape=\(8, 4, 64\)"),
    ((_t(*_Q), _t(1, *_K), _t(1, *_K)), {}, r"rank 4.*k\.shape"),
    (([[1.0]], _t(*_K), _t(*_K)), {}, r"q to be a torch\.Tensor"),
    ((_t(*_Q, dtype=torch.float64), _t(*_K, dtype=torch.float64), _t(*_K, dtype=torch.float64)), {},
     r"q\.dtype=torch\.float64"),
    ((_t(*_Q, dtype=torch.int32), _t(*_K), _t(*_K)), {}, r"q\.dtype=torch\.int32"),
    ((_t(*_Q), _t(*_K, dtype=torch.bfloat16), _t(*_K, dtype=torch.bfloat16)), {}, r"one dtype"),
    ((_t(*_Q), _t(3, 8, 2, 64), _t(3, 8, 2, 64)), {}, r"k\.shape\[0\]=3"),
    ((_t(*_Q), _t(2, 8, 2, 32), _t(2, 8, 2, 32)), {}, r"k\.shape\[3\]=32"),
    ((_t(*_Q), _t(*_K), _t(2, 9, 2, 64)), {}, r"v\.shape=\(2, 9, 2, 64\)"),
    ((_t(2, 8, 3, 64), _t(*_K), _t(*_K)), {}, r"q\.shape\[2\]=3, k\.shape\[2\]=2"),
    ((_t(2, 4, 8, 64), _t(2, 8, 3, 64), _t(2, 8, 3, 64)), {}, r"multiple of heads"),
    ((_t(2, 8, 4, 20), _t(2, 8, 2, 20), _t(2, 8, 2, 20)), {}, r"head_dim=20"),
    ((_t(2, 8, 4, 512), _t(2, 8, 2, 512), _t(2, 8, 2, 512)), {}, r"head_dim=512"),
    ((_t(2, 0, 4, 64), _t(*_K), _t(*_K)), {}, r"seqlen_q.*got 0"),
    ((_t(*_Q), _t(*_K, device="meta"), _t(*_K, device="meta")), {}, r"one device"),
    ((_t(*_Q), _t(*_K), _t(*_K)), {"key_padding_mask": torch.ones(2, 9, dtype=torch.bool, device=DEVICE)},
     r"\(2, 8\), got \(2, 9\)"),
    ((_t(*_Q), _t(*_K), _t(*_K)), {"key_padding_mask": torch.ones(2, 8, device=DEVICE)}, r"torch\.float32"),
    ((_t(*_Q), _t(*_K), _t(*_K)), {"key_padding_mask": torch.ones(2, 8, dtype=torch.bool, device="meta")},
     r"key_padding_mask on"),
    ((_t(*_Q), _t(*_K), _t(*_K)), {"softmax_scale": float("nan")}, r"softmax_scale=nan"),
    ((_t(*_Q), _t(*_K), _t(*_K)), {"softcap": -1.0}, r"softcap=-1\.0"),
])
def test_bad_input_raises_a_clear_error(args, kwargs, match):
    with pytest.raises(ShapeError, match=match):
        flash_attn_func(*args, **kwargs)


def test_dropout_is_refused():
    with pytest.raises(NotImplementedError, match=r"dropout_p=0\.1"):
        flash_attn_func(_t(*_Q), _t(*_K), _t(*_K), dropout_p=0.1)


@pytest.mark.parametrize("kwargs, match", [
    ({"score_cap": 0.0}, r"score_cap=0\.0"),
    ({"value_clip": -1.0}, r"value_clip=-1\.0"),
    ({"score_cap": 1.0, "score_cap_mode": "soft"}, r"score_cap_mode='soft'"),
    ({"noise": EpilogueNoise(sigma=torch.ones(3))}, r"exactly one of sampler"),
    ({"noise": EpilogueNoise(sigma=torch.ones(5, 4), sampler=gaussian_sampler)}, r"noise\.sigma"),
    ({"noise": EpilogueNoise(sigma=torch.ones(1), tensor=torch.zeros(2, 8, 4, 32))}, r"noise\.tensor"),
])
def test_bad_hook_arguments(kwargs, match):
    with pytest.raises(ShapeError, match=match):
        flash_attn_with_hooks(_t(*_Q), _t(*_K), _t(*_K), **kwargs)


# ------------------------------------------------------------ torch.func transforms


def test_torch_func_grad_and_vmap_give_per_example_gradients():
    """vmap(grad(loss)) through dpfa's kernels equals the same through the float64 reference:
    per-example gradients through dpfa's own attention (the vmapped dim folds into the batch)."""
    n_ex, Nq, Nk, H, Hk, D = 3, 11, 13, 4, 2, 32
    q = _rand(n_ex, 1, Nq, H, D, dtype=torch.float32, grad=False)
    k = _rand(n_ex, 1, Nk, Hk, D, dtype=torch.float32, grad=False)
    v = _rand(n_ex, 1, Nk, Hk, D, dtype=torch.float32, grad=False)
    w = _rand(1, Nq, H, D, dtype=torch.float32, grad=False)
    kpm = torch.rand(n_ex, 1, Nk, device=DEVICE) > 0.3

    def loss(attn, q1, k1, v1, m1):
        return (attn(q1, k1, v1, causal=True, key_padding_mask=m1, value_clip=2.0) * w).sum()

    def dpfa_attn(*a, **kw):
        return flash_attn_with_hooks(*a, **kw)

    def ref_attn(*a, **kw):
        return attention_reference(*a, **kw).to(a[0].dtype)

    got = torch.func.vmap(torch.func.grad(lambda *a: loss(dpfa_attn, *a), argnums=(0, 1, 2)))(q, k, v, kpm)
    want = torch.func.vmap(torch.func.grad(lambda *a: loss(ref_attn, *a), argnums=(0, 1, 2)))(
        q.double(), k.double(), v.double(), kpm)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert a.shape == b.shape
        assert _rel(a, b) < 1e-4, name
    # a per-example gradient is that example's own gradient (no mixing across the vmapped batch)
    i = 1
    q1, k1, v1 = (t[i].clone().requires_grad_() for t in (q, k, v))
    loss(dpfa_attn, q1, k1, v1, kpm[i]).backward()
    for a, t in zip(got, (q1, k1, v1)):
        assert _rel(a[i], t.grad) < 1e-5


def test_vmap_over_queries_only_broadcasts_the_store():
    q = _rand(5, 2, 7, 2, 32, dtype=torch.float32, grad=False)
    k = _rand(2, 9, 2, 32, dtype=torch.float32, grad=False)
    out = torch.func.vmap(lambda q1: flash_attn_with_hooks(q1, k, k), in_dims=0)(q)
    ref = torch.stack([attention_reference(q[i].double(), k.double(), k.double()) for i in range(5)])
    assert _rel(out, ref) < 1e-4


def test_noise_under_vmap_is_refused():
    q = _rand(2, 1, 4, 2, 32, dtype=torch.float32, grad=False)
    noise = EpilogueNoise(sigma=torch.ones(1, 2, 4, device=DEVICE), sampler=gaussian_sampler, seed=1)
    with pytest.raises(ShapeError, match="vmap"):
        torch.func.vmap(lambda q1: flash_attn_with_hooks(q1, q1, q1, noise=noise))(q)


@pytest.mark.parametrize("D", [32, 80])
def test_epilogue_pair_noise_equals_the_elementwise_sampler(D):
    """The epilogue makes the Gaussian two at a time (device_samplers.pair_form); element
    (b, i, h, d) must still be the element-wise sampler's value at its offset, as fill_noise
    gives it (also for a head dim that is not a power of two: padded lanes are not stored)."""
    from dpfa.kernels.noise import fill_noise
    q, k, v, sigma = _noise_inputs(B=2, N=19, H=3, D=D)
    with torch.no_grad():
        clean = flash_attn_with_hooks(q, k, v)
        noisy = flash_attn_with_hooks(q, k, v, noise=EpilogueNoise(sigma=sigma, sampler=gaussian_sampler, seed=77))
    z = fill_noise(gaussian_sampler, 77, q.numel(), 1.0, device=DEVICE).view(q.shape)
    expect = clean.double() + sigma.transpose(1, 2)[..., None].double() * z.double()
    assert torch.allclose(noisy.double(), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal,mask", [(False, False), (True, False), (False, True)])
def test_value_preclip_and_fixed_max_match_the_online_kernel(monkeypatch, causal, mask):
    """The fast DP forward (V clipped in one pass; the cap as a fixed softmax shift) and the
    in-kernel hooks (per-tile clip, online max) compute the same capped, clipped attention."""
    import dpfa.kernels.flash_attention as fa
    q, k, v = (_rand(2, 37, 2, 32, dtype=torch.float32, grad=False) * 3 for _ in range(3))
    kpm = (torch.rand(2, 37, device=DEVICE) > 0.3) if mask else None
    opts = dict(causal=causal, key_padding_mask=kpm, score_cap=2.0, value_clip=0.5)
    fast = flash_attn_with_hooks(q, k, v, return_lse=True, **opts)
    monkeypatch.setattr(fa, "PRECLIP_VALUES", False)
    monkeypatch.setattr(fa, "FIXED_MAX_CAP_LIMIT", 0.0)
    slow = flash_attn_with_hooks(q, k, v, return_lse=True, **opts)
    ref = attention_reference(q.double(), k.double(), v.double(), return_lse=True, **opts)
    for a, b, r in zip(fast, slow, ref):
        assert _rel(a, r) < 1e-5 and _rel(b, r) < 1e-5
