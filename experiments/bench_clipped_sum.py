"""The clipped-sum kernel against the non-private weight-gradient matmul it replaces (issue 6).

    python experiments/bench_clipped_sum.py --out-dir experiments/results      # GPU

For the GPT layers of bench_dpsgd_step.py (d 768: qkv 768->2304, proj 768->768, fc 768->3072,
out 3072->768, head 768->8192) at (B 16, T 512), (B 8, T 2048), (B 64, T 128), bf16 factors:
the GPU time of ``torch.mm(G^T, X)`` (autocast's weight gradient, no clipping), of
``dpfa.kernels.clipped_sum`` (per-example factors on the float32 accumulator; its block
configuration measured once per shape) and of the earlier, unsound form ``mm((c G)^T, X)``
(the factor rounded into a bf16 operand). Writes ``clipped_sum.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dpfa.kernels import clipped_sum as cs  # noqa: E402

LAYERS = {"qkv": (2304, 768), "proj": (768, 768), "fc": (3072, 768), "out": (768, 3072), "head": (8192, 768)}
SHAPES = [(16, 512), (8, 2048), (64, 128)]


def _ms(fn, reps=20):
    """GPU milliseconds per call, queued behind a GPU sleep (the host's launch cost is not timed)."""
    fn()
    torch.cuda.synchronize()
    return cs.gpu_time_ms(fn, reps)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default=str(ROOT / "experiments" / "results"))
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for B, T in SHAPES:
        for name, (O, I) in LAYERS.items():
            G = torch.randn(B, T, O, device=dev, generator=g, dtype=torch.bfloat16)
            X = torch.randn(B, T, I, device=dev, generator=g, dtype=torch.bfloat16)
            c = torch.rand(B, device=dev, generator=g, dtype=torch.float64)
            mm = _ms(lambda: torch.mm(G.reshape(-1, O).t(), X.reshape(-1, I)))
            kernel = _ms(lambda: cs.clipped_sum(G, X, c))
            old = _ms(lambda: torch.mm((G * c.float()[:, None, None]).to(torch.bfloat16).reshape(-1, O).t(),
                                       X.reshape(-1, I)))
            key = next(k for k in cs._CHOSEN if k[1:4] == (T, O, I))
            rows.append({"B": B, "T": T, "layer": name, "out": O, "in": I, "mm_ms": mm, "kernel_ms": kernel,
                         "scaled_operand_mm_ms": old, "kernel_vs_mm": kernel / mm, "config": cs._CHOSEN[key]})
            r = rows[-1]
            print(f"B {B:3d} T {T:5d} {name:5s} mm {mm:7.3f} ms  kernel {kernel:7.3f} ms (x{kernel / mm:.2f}, "
                  f"config {r['config']})  scaled-operand mm {old:7.3f} ms", flush=True)
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "clipped_sum.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
