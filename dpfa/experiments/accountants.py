"""``accountants``: epsilon versus steps for the RDP, PRV and PLD accountants on standard DP-SGD
settings, and the noise per attention head of a DP release under an importance allocation.

One cell per (setting, accountant): epsilon at ``delta`` after each step count of
``steps`` for the subsampled Gaussian with that noise multiplier and Poisson sampling
rate, with the seconds each answer took. RDP is an upper bound; PRV and PLD are
numerically tight and must agree with each other (and stay below RDP).

The ``attention_heads`` cell: :func:`dpfa.dp_flash_attn_func` on a zero store of the given
shape (accounting only: the noise scales depend on the shapes and parameters, never on
the data) with a uniform split of the budget and with ``strategy="importance"``; its
``noise_scale_per_head`` for each.
"""

from __future__ import annotations

import dataclasses
import time
from typing import List, Mapping, Tuple

from dpfa.errors import ConfigError
from dpfa.experiments.common import from_mapping, progress_bar


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str = "CIFAR-10, batch 256"
    noise_multiplier: float = 1.1
    sample_rate: float = 256 / 50000
    delta: float = 1e-5

    def __post_init__(self):
        if not self.noise_multiplier > 0:
            raise ConfigError(f"Expected setting.noise_multiplier={self.noise_multiplier!r} > 0.")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"Expected setting.sample_rate={self.sample_rate!r} in (0, 1].")
        if not 0 < self.delta < 1:
            raise ConfigError(f"Expected setting.delta={self.delta!r} in (0, 1).")


@dataclasses.dataclass(frozen=True)
class HeadsSpec:
    enabled: bool = True
    seqlen: int = 128
    head_dim: int = 64
    causal: bool = False
    epsilon: float = 1.0
    delta: float = 1e-5
    value_clip: float = 1.0
    score_cap: float = 4.0
    weights: Tuple = (8.0, 4.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0)  # one per head; the number of heads is its length

    def __post_init__(self):
        if not self.weights or any(not (isinstance(w, (int, float)) and w > 0) for w in self.weights):
            raise ConfigError(f"Expected attention_heads.weights to be positive numbers, got {list(self.weights)!r}.")


@dataclasses.dataclass(frozen=True)
class Config:
    accountants: Tuple = ("rdp", "prv", "pld")
    steps: Tuple = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
    settings: Tuple = (Setting(),)
    attention_heads: HeadsSpec = HeadsSpec()

    def __post_init__(self):
        from dpfa import accountants

        for a in self.accountants:
            if a not in accountants.names():
                raise ConfigError(f"Unknown accountant {a!r} in accountants; expected "
                                  f"{', '.join(accountants.names())}.")
        if not self.steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.steps):
            raise ConfigError(f"Expected steps to be a list of integers >= 1, got {list(self.steps)!r}.")
        object.__setattr__(self, "steps", tuple(sorted(set(self.steps))))


def config_from_dict(data: Mapping) -> Config:
    """The config from TOML: ``[[setting]]`` tables (name, noise_multiplier, sample_rate, delta), the rest flat."""
    data = dict(data)
    settings = data.pop("setting", None)
    cfg = from_mapping(Config, data)
    if settings is not None:
        if not isinstance(settings, list) or not settings:
            raise ConfigError("Expected [[setting]] tables (at least one).")
        parsed = tuple(from_mapping(Setting, s, "setting") for s in settings)
        if len({s.name for s in parsed}) != len(parsed):
            raise ConfigError("Two [[setting]] tables have the same name.")
        cfg = dataclasses.replace(cfg, settings=parsed)
    return cfg


def _heads(spec: HeadsSpec) -> dict:
    import torch

    import dpfa

    H = len(spec.weights)
    q = torch.zeros(1, spec.seqlen, H, spec.head_dim)
    kw = dict(causal=spec.causal, epsilon=spec.epsilon, delta=spec.delta, value_clip=spec.value_clip,
              score_cap=spec.score_cap, seed=0, return_privacy_stats=True)
    _, uniform = dpfa.dp_flash_attn_func(q, q, q, **kw)
    _, importance = dpfa.dp_flash_attn_func(q, q, q, strategy="importance", head_weights=list(spec.weights), **kw)
    return {"heads": H, "weights": list(spec.weights), "uniform": list(uniform.noise_scale_per_head),
            "importance": list(importance.noise_scale_per_head), "epsilon_spent": {
                "uniform": uniform.epsilon_spent, "importance": importance.epsilon_spent},
            "max_sensitivity": importance.max_sensitivity, "records_visible_rows": importance.records_visible_rows}


def run(cfg: Config, store, *, device: str, progress: bool, log) -> None:
    from dpfa.accountants import epsilon_for

    cells: List[tuple] = [(f"{s.name}/{a}", s, a) for s in cfg.settings for a in cfg.accountants]
    store.plan = [k for k, *_ in cells] + (["attention_heads"] if cfg.attention_heads.enabled else [])
    bar = progress_bar(len(store.plan), "accountants cells", enabled=progress)
    for key, s, a in cells:
        cell_cfg = {"setting": dataclasses.asdict(s), "accountant": a, "steps": list(cfg.steps)}
        if store.load(key, cell_cfg) is None:
            eps, secs = [], []
            for k in cfg.steps:
                t0 = time.perf_counter()
                eps.append(epsilon_for(s.noise_multiplier, s.delta, s.sample_rate, k, a))
                secs.append(time.perf_counter() - t0)
            store.put(key, cell_cfg, {"setting": s.name, "accountant": a, "steps": list(cfg.steps), "epsilon": eps,
                                      "seconds": secs})
            log(f"{key}: epsilon {eps[0]:.3g} .. {eps[-1]:.3g} in {sum(secs):.1f} s")
        bar.update(1)
    if cfg.attention_heads.enabled:
        cell_cfg = dataclasses.asdict(cfg.attention_heads)
        if store.load("attention_heads", cell_cfg) is None:
            store.put("attention_heads", cell_cfg, _heads(cfg.attention_heads))
        bar.update(1)
    bar.close()


def render(results: dict, keys) -> Tuple[dict, str]:
    cells = results["cells"]
    curves = [cells[k] for k in keys if k != "attention_heads"]
    lines: List[str] = []
    checks = {"prv_pld_agree": True, "tight_below_rdp": True, "notes": []}
    for name in dict.fromkeys(c["setting"] for c in curves):
        cs = {c["accountant"]: c for c in curves if c["setting"] == name}
        s = next(iter(cs.values()))["config"]["setting"]
        steps = next(iter(cs.values()))["steps"]
        lines += [f"**{name}**: noise multiplier {s['noise_multiplier']:g}, Poisson sampling rate "
                  f"{s['sample_rate']:.4g}, delta = {s['delta']:g}", "",
                  "| steps | " + " | ".join(f"epsilon ({a.upper()})" for a in cs) + " |",
                  "|---|" + "---|" * len(cs)]
        for i, k in enumerate(steps):
            lines.append(f"| {k} | " + " | ".join(f"{c['epsilon'][i]:.4g}" for c in cs.values()) + " |")
        lines.append("")
        lines.append("Seconds per answer (mean): " + ", ".join(
            f"{a.upper()} {sum(c['seconds']) / len(c['seconds']):.3f}" for a, c in cs.items()))
        lines.append("")
        if "prv" in cs and "pld" in cs:
            gap = max(abs(x - y) / max(y, 1e-12) for x, y in zip(cs["prv"]["epsilon"], cs["pld"]["epsilon"]))
            if gap > 0.05:
                checks["prv_pld_agree"] = False
                checks["notes"].append(f"{name}: PRV and PLD differ by up to {gap:.1%}")
        for a in ("prv", "pld"):
            if a in cs and "rdp" in cs and any(x > y * 1.001 for x, y in zip(cs[a]["epsilon"], cs["rdp"]["epsilon"])):
                checks["tight_below_rdp"] = False
                checks["notes"].append(f"{name}: {a.upper()} exceeds the RDP bound somewhere")
    if "attention_heads" in keys:
        h = cells["attention_heads"]
        c = h["config"]
        lines += [f"**Noise per head of one DP attention release** (dpfa.dp_flash_attn_func, "
                  f"epsilon = {c['epsilon']:g}, "
                  f"delta = {c['delta']:g}, {h['heads']} heads, {c['seqlen']} rows, value clip {c['value_clip']:g}, "
                  f"score cap {c['score_cap']:g}; largest per-row noise scale of each head)", "",
                  "| head | importance weight | sigma (uniform split) | sigma (importance split) |",
                  "|---|---|---|---|"]
        for i in range(h["heads"]):
            lines.append(f"| {i} | {h['weights'][i]:g} | {h['uniform'][i]:.4g} | {h['importance'][i]:.4g} |")
        lines.append("")
    lines.append(f"Checks: PRV and PLD agree within 5%: {checks['prv_pld_agree']}; PRV and PLD at or below RDP: "
                 f"{checks['tight_below_rdp']}.")
    lines += [f"- {n}" for n in checks["notes"]]
    return {"checks": checks}, "\n".join(lines) + "\n"
