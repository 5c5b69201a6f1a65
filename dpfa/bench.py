"""``dpfa bench`` (the seed's benchmark commands): attention shapes of known models, a speed timing
on a GPU and an analytic activation-memory estimate.

Shapes come from the models' published configurations (no weights): hidden size, heads, layers.
"""

from __future__ import annotations

import dataclasses
import time

from dpfa.errors import DPFAError


@dataclasses.dataclass(frozen=True)
class ModelShape:
    hidden: int
    heads: int
    layers: int
    source: str

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


#: from the transformers configs of each model (BertConfig, GPT2Config, ViTConfig, ...)
MODELS = {
    "bert-base": ModelShape(768, 12, 12, "bert-base-uncased config"),
    "bert-large": ModelShape(1024, 16, 24, "bert-large-uncased config"),
    "gpt2": ModelShape(768, 12, 12, "gpt2 config"),
    "gpt2-medium": ModelShape(1024, 16, 24, "gpt2-medium config"),
    "gpt2-large": ModelShape(1280, 20, 36, "gpt2-large config"),
    "gpt2-xl": ModelShape(1600, 25, 48, "gpt2-xl config"),
    "vit-huge": ModelShape(1280, 16, 32, "google/vit-huge-patch14-224-in21k config"),
}
METHODS = ("flash", "standard", "opacus")


def model_shape(name: str) -> ModelShape:
    if name not in MODELS:
        raise DPFAError(f"Unknown --model {name!r}; known: {', '.join(sorted(MODELS))}.")
    return MODELS[name]


def attention_memory(name: str, batch_size: int, seq_length: int, methods, bytes_per_value: int = 2) -> list[dict]:
    """Analytic estimate (not a measurement) of the attention activations kept for backward, all layers.

    flash: Q, K, V, O and the row log-sum-exp (B H N (4 d + 1)); standard: those plus the
    softmax probabilities (B H N^2) that eager attention keeps; opacus: standard, plus per-example
    gradients of the four attention projections (B x 4 hidden^2 per layer) that Opacus materialises
    (its default hooks mode). In ``bytes_per_value`` (2: fp16/bf16).
    """
    s = model_shape(name)
    B, N, H, d, L = batch_size, seq_length, s.heads, s.head_dim, s.layers
    flash = B * H * N * (4 * d + 1)
    out = []
    for m in methods:
        if m not in METHODS:
            raise DPFAError(f"Unknown method {m!r} in --compare-with; known: {', '.join(METHODS)}.")
        values = flash + (B * H * N * N if m in ("standard", "opacus") else 0)
        values += B * 4 * s.hidden * s.hidden if m == "opacus" else 0
        out.append({"method": m, "bytes": values * L * bytes_per_value, "estimate": "analytic"})
    return out


def attention_speed(name: str, batch_size: int, seq_length: int, epsilon: float, delta: float = 1e-5,
                    repeats: int = 20) -> dict:
    """Median ms of one layer's attention on the GPU: dpfa.flash_attn_func, dpfa.dp_flash_attn_func, torch SDPA."""
    import torch

    if not torch.cuda.is_available():
        raise DPFAError("dpfa bench speed times GPU kernels and needs a CUDA device; on a CPU dpfa runs the plain-"
                        "torch reference, whose time says nothing about the kernels.")
    import dpfa

    s = model_shape(name)
    q, k, v = (torch.randn(batch_size, seq_length, s.heads, s.head_dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ts.append((time.perf_counter() - t) * 1e3)
        return sorted(ts)[len(ts) // 2]

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    return {"model": name, "device": torch.cuda.get_device_name(), "shape": [batch_size, seq_length, s.heads,
                                                                             s.head_dim],
            "sdpa_ms": timed(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)),
            "flash_ms": timed(lambda: dpfa.flash_attn_func(q, k, v)),
            "dp_ms": timed(lambda: dpfa.dp_flash_attn_func(q, k, v, epsilon=epsilon, delta=delta))}
