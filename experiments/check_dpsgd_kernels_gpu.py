"""GPU check of the DP-SGD kernels (issue 6): the CI tests run them under the interpreter only.

    python experiments/check_dpsgd_kernels_gpu.py

On CUDA, for fp32 / bf16 / fp16 and GPT-sized and odd shapes: ghost norm, direct norm and
clipped sum against float64 references; the fused noise against fill_noise element for
element and its std; and the engine's exactness (one step, noise 0, kernels on, fp32)
against textbook vmap(grad) clipping. Prints one line per check and exits 1 on a failure.
"""

from __future__ import annotations

import copy
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from dpfa.kernels.clipped_sum import clipped_sum, clipped_sum_reference  # noqa: E402
from dpfa.kernels.direct_norm import direct_sq_norms, direct_sq_norms_reference  # noqa: E402
from dpfa.kernels.dpsgd_noise import noisy_average, noisy_average_reference  # noqa: E402
from dpfa.kernels.ghost_norm import ghost_sq_norms, ghost_sq_norms_reference  # noqa: E402
from dpfa.mechanisms.device_samplers import gaussian_sampler  # noqa: E402

FAILED = []


def check(name, err, tol):
    ok = err <= tol
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {err:.3g} (tol {tol:g})", flush=True)
    if not ok:
        FAILED.append(name)


def rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-300)).item()


def _deferral_under_autocast(dev) -> float:
    """Largest relative difference between the gradients one noiseless bf16-autocast step releases with and
    without dpfa.training.deferred_weight_grad (Linear, Embedding and LayerNorm in their deferred forms)."""
    import warnings

    from torch.utils.data import DataLoader, TensorDataset

    from dpfa.models.gpt import GPT, GPTConfig
    from dpfa.training import PrivacyEngine, collector

    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 97, (8, 40), generator=g)
    y = torch.randint(0, 97, (8, 40), generator=g)
    released = []
    for defer in (False, True):
        collector.DEFER_WEIGHT_GRADIENTS = defer
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=97, block_size=40, n_layer=2, n_head=4, n_embd=64)).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, opt, _ = PrivacyEngine(accountant="rdp", seed=0).make_private(
                model, opt, DataLoader(TensorDataset(x, y), batch_size=8), noise_multiplier=0.0, target_delta=1e-5,
                max_grad_norm=0.5, poisson_sampling=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x.to(dev))
        torch.nn.functional.cross_entropy(logits.float().reshape(-1, 97), y.to(dev).reshape(-1)).backward()
        opt.step()
        released.append({n: p.grad.double() for n, p in model.named_parameters()})
    collector.DEFER_WEIGHT_GRADIENTS = True
    return max(rel(released[1][n], released[0][n]) for n in released[0])


def main():
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for B, T, O, I in ((4, 512, 2304, 768), (3, 257, 100, 77), (2, 2048, 768, 768), (5, 1, 33, 17)):
            L = torch.randn(B, T, O, device=dev, generator=g).to(dtype)
            R = torch.randn(B, T, I, device=dev, generator=g).to(dtype)
            c = torch.rand(B, device=dev, generator=g, dtype=torch.float64)
            ref = direct_sq_norms_reference(L, R)
            check(f"ghost {dtype} {B, T, O, I}", rel(ghost_sq_norms([(L, R)]), ref), 1e-4)
            check(f"direct {dtype} {B, T, O, I}", rel(direct_sq_norms(L, R), ref), 1e-4)
            # c_b scales the float32 product of the rounded operands (the kernel's accumulator), to fp32 accuracy
            check(f"clipped_sum {dtype} {B, T, O, I}", rel(clipped_sum(L, R, c), clipped_sum_reference(L, R, c.float())),
                  1e-5)
            only = torch.zeros_like(c)
            only[-1] = 0.3 / ref[-1].sqrt()  # one example clipped to 0.3 by the norm kernels' own norm
            n = clipped_sum(L, R, only).double().norm().item()
            check(f"clipped norm / C - 1 {dtype} {B, T, O, I}", abs(n / 0.3 - 1), 1e-5)
    rows = torch.randint(0, 500, (4, 300), device=dev, generator=g)
    ge = torch.randn(4, 300, 64, device=dev, generator=g, dtype=torch.bfloat16)
    hl = torch.randn(4, 300, 500, device=dev, generator=g, dtype=torch.bfloat16)
    terms = [(rows, ge), (hl, ge.flip(1))]
    check("ghost tied one-hot + dense bf16", rel(ghost_sq_norms(terms), ghost_sq_norms_reference(terms)), 1e-4)
    shapes = [torch.Size((1000, 77)), torch.Size((33,)), torch.Size((5, 5))]
    sums = [torch.randn(s, device=dev, generator=g) for s in shapes]
    got = noisy_average(sums, shapes, gaussian_sampler, 12345, 0.9, 16.0)
    ref = noisy_average_reference(sums, shapes, gaussian_sampler, 12345, 0.9, 16.0)
    check("noise == fill_noise offsets", max((a - b).abs().max().item() for a, b in zip(got, ref)), 1e-6)
    z = noisy_average([torch.zeros(4_000_000, device=dev)], [torch.Size((4_000_000,))], gaussian_sampler, 7, 1.6,
                      16.0)[0]
    check("noise std / (sigma C / E[B]) - 1", abs(z.double().std().item() / 0.1 - 1), 5 / (2 * 4e6) ** 0.5)

    from dp_reference import clipped_mean, per_example_grads, private_grads, rel_err
    from dpfa.training import contributions
    from test_training_engine import CASES, data_for, model_with_params
    gen = torch.Generator().manual_seed(1)
    for case in ("mlp", "tokens_tied", "conv"):
        for C in (0.05, 1e3):
            build, kind, loss_fn = CASES[case]
            torch.manual_seed(0)
            model = build().to(dev)
            x, y = (t.to(dev) for t in data_for(kind, 6, gen))
            reference = copy.deepcopy(model)
            with contributions.use_kernels("on"):
                grads, _, model = private_grads(model, loss_fn, x, y, C)
            expected = clipped_mean(per_example_grads(model_with_params(model, reference), loss_fn, x, y), C, 6)
            check(f"engine exactness {case} C={C}", rel_err(grads, expected), 1e-5)
    check("deferred weight gradients, GPT under bf16 autocast", _deferral_under_autocast(dev), 1e-4)
    print("FAILED:", FAILED if FAILED else "none")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
