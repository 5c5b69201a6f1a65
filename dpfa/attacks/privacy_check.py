"""``dpfa.privacy_check()``: every quick audit in one report (``dpfa check`` on the command line).

Items, each an empirical lower bound on epsilon from outputs on two neighbouring inputs
(:mod:`dpfa.attacks.mechanism_audit`, after Jagielski, Ullman & Oprea 2020 and Nasr et
al. 2021):

- ``mechanism[NAME]`` for every registered mechanism (the user's included):
  :func:`~dpfa.attacks.mechanism_audit.audit_mechanism` at (epsilon, delta), sensitivity 1;
- ``dpsgd[NAME]`` for every mechanism of the DP-SGD engine: one step of the engine on a
  one-example dataset against the empty one, through the optimizer's own clipping and
  noise (:func:`~dpfa.attacks.dpsgd_audit.audit_dpsgd_noise`);
- ``release[NAME]`` for the built-in mechanisms of the DP attention release: the worst-case
  pair of stores through ``dp_flash_attn_func``
  (:func:`~dpfa.attacks.release_audit.audit_attention_release`).

An item FAILS when its lower bound exceeds the epsilon claimed for it: with the item's
confidence, the code is then not as private as it says. The items share the report's
``confidence`` by a union bound: each is run at 1 - (1 - confidence) / k for k items,
so that a correct implementation passes the whole report with probability >= confidence
(with a fixed ``seed`` the report is repeatable, and dpfa's own tests pin it).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional, Sequence, Tuple

from dpfa import _validate
from dpfa.attacks.bounds import _confidence
from dpfa.attacks.mechanism_audit import AuditResult, audit_mechanism
from dpfa.errors import PrivacyParameterError

__all__ = ["PrivacyCheckReport", "CheckItem", "privacy_check", "DEFAULT_SAMPLES"]

DEFAULT_SAMPLES = 400_000
#: mechanisms of the attention release that the report audits by default
RELEASE_MECHANISMS = ("gaussian", "laplace", "discrete_gaussian")


@dataclasses.dataclass(frozen=True)
class CheckItem:
    """One line of the report: an audit's result, or the error that stopped it (``result`` None)."""

    name: str
    kind: str
    result: Optional[AuditResult] = None
    error: Optional[str] = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.error is None and self.result is not None and self.result.passed

    @property
    def verdict(self) -> str:
        return "ERROR" if self.error is not None else ("PASS" if self.passed else "FAIL")

    def to_dict(self) -> dict:
        out = {"name": self.name, "kind": self.kind, "verdict": self.verdict, "passed": self.passed,
               "seconds": self.seconds}
        if self.error is not None:
            out["error"] = self.error
        if self.result is not None:
            r = self.result
            out.update({"claimed_epsilon": r.claimed_epsilon, "delta": r.delta,
                        "epsilon_lower_bound": r.epsilon_lower_bound, "confidence": r.confidence,
                        "epsilon_estimate": r.epsilon_estimate, "tightness": r.tightness,
                        "n_samples": r.n_samples, "scale": r.scale, "details": r.details})
        return out


@dataclasses.dataclass(frozen=True)
class PrivacyCheckReport:
    """The items of :func:`privacy_check`; ``passed`` iff every item passed. ``str()`` is a table."""

    items: Tuple[CheckItem, ...]
    epsilon: float
    delta: float
    confidence: float
    n_samples: int
    seed: Optional[int]
    seconds: float

    @property
    def passed(self) -> bool:
        return all(i.passed for i in self.items)

    @property
    def failures(self) -> Tuple[str, ...]:
        return tuple(i.name for i in self.items if not i.passed)

    def __getitem__(self, name: str) -> CheckItem:
        for i in self.items:
            if i.name == name:
                return i
        raise KeyError(f"No item {name!r} in the report; items: {', '.join(i.name for i in self.items)}.")

    def to_dict(self) -> dict:
        return {"passed": self.passed, "failures": list(self.failures), "epsilon": self.epsilon, "delta": self.delta,
                "confidence": self.confidence, "n_samples": self.n_samples, "seed": self.seed,
                "seconds": self.seconds, "items": [i.to_dict() for i in self.items]}

    def __str__(self) -> str:
        head = (f"{'check':<28} {'claimed eps':>11} {'delta':>7} {'lower bound':>11} {'confidence':>10} "
                f"{'estimate':>8} {'bound/claim':>11} {'verdict':>7}")
        lines = [f"dpfa privacy check: empirical epsilon lower bounds on neighbouring inputs, {self.n_samples} "
                 f"samples per input, seed {self.seed} (lower bound: true epsilon >= it with that confidence; "
                 "estimate: the point estimate, no confidence)", head, "-" * len(head)]
        for i in self.items:
            if i.result is None:
                lines.append(f"{i.name:<28} {'-':>11} {'-':>7} {'-':>11} {'-':>10} {'-':>8} {'-':>11} "
                             f"{i.verdict:>7}  {i.error}")
                continue
            r = i.result
            lines.append(f"{i.name:<28} {_fmt(r.claimed_epsilon):>11} {r.delta:>7.0e} "
                         f"{_fmt(r.epsilon_lower_bound):>11} {_pct(r.confidence):>10} {_fmt(r.epsilon_estimate):>8} "
                         f"{r.tightness:>11.3f} {i.verdict:>7}")
        verdict = ("PASSED: no lower bound exceeds its claim" if self.passed
                   else f"FAILED: {', '.join(self.failures)}")
        lines.append(f"{verdict} (report confidence {self.confidence:.0%}, {self.seconds:.1f} s)")
        return "\n".join(lines)


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.4f}"


def _pct(x: float) -> str:
    return f"{100.0 * x:.4g}%"


def _run(name: str, kind: str, fn) -> CheckItem:
    t0 = time.perf_counter()
    try:
        res = fn()
    except Exception as e:  # an item that cannot run fails the check and says why; the others still run
        return CheckItem(name, kind, error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t0)
    return CheckItem(name, kind, result=res, seconds=time.perf_counter() - t0)


def privacy_check(*, epsilon: float = 1.0, delta: float = 1e-5, n_samples: int = DEFAULT_SAMPLES,
                  seed: Optional[int] = 0, confidence: float = 0.95, mechanisms: Optional[Sequence[str]] = None,
                  dpsgd: Optional[Sequence[str]] = None, release: Optional[Sequence[str]] = None,
                  accountant: str = "prv") -> PrivacyCheckReport:
    """Run the quick audits (module docstring) and return a :class:`PrivacyCheckReport`.

    ``mechanisms``: names to audit (default: every registered one); ``dpsgd``: engine
    mechanisms whose DP-SGD noise step to audit (default: all, i.e. gaussian and
    laplace), with the engine's ``accountant``; ``release``: mechanisms of the attention
    release to audit (default: the built-ins). ``n_samples`` outputs per input and item
    (half choose the region, half give the bound); ``seed`` makes the report repeatable
    (None: fresh randomness). ``confidence`` is the report's (see the module docstring).
    A few seconds on a laptop CPU at the defaults.
    """
    from dpfa import accountants as acc_registry
    from dpfa import mechanisms as mech_registry
    from dpfa.attacks.dpsgd_audit import audit_dpsgd_noise
    from dpfa.attacks.release_audit import audit_attention_release
    from dpfa.training.engine import ENGINE_MECHANISMS

    t0 = time.perf_counter()
    epsilon = _validate.epsilon(epsilon)
    delta = _validate.delta(delta)
    n = _validate.count(n_samples, "n_samples", minimum=4)
    conf = _confidence(confidence)
    if seed is not None:
        seed = _validate.count(seed, "seed", minimum=0)
    mech_names = list(mech_registry.names() if mechanisms is None else mechanisms)
    dpsgd_names = list(ENGINE_MECHANISMS if dpsgd is None else dpsgd)
    release_names = list(RELEASE_MECHANISMS if release is None else release)
    for m in mech_names + dpsgd_names + release_names:
        mech_registry.get(m)  # an unknown name is a usage error, not a failed check
    for m in dpsgd_names:
        if m not in ENGINE_MECHANISMS:
            raise PrivacyParameterError(f"dpsgd={m!r}: the DP-SGD engine supports {', '.join(ENGINE_MECHANISMS)}.")
    acc_registry.get(accountant)
    k = max(1, len(mech_names) + len(dpsgd_names) + len(release_names))
    item_conf = 1.0 - (1.0 - conf) / k

    items = []
    for m in mech_names:
        items.append(_run(f"mechanism[{m}]", "mechanism", lambda m=m: audit_mechanism(
            m, epsilon, delta, 1.0, n_samples=n, seed=seed, confidence=item_conf, name=f"mechanism[{m}]")))
    for m in dpsgd_names:
        items.append(_run(f"dpsgd[{m}]", "dpsgd-noise", lambda m=m: audit_dpsgd_noise(
            m, epsilon, delta, 1.0, accountant=accountant, n_samples=n, seed=seed, confidence=item_conf,
            name=f"dpsgd[{m}]")))
    for m in release_names:
        items.append(_run(f"release[{m}]", "attention-release", lambda m=m: audit_attention_release(
            m, epsilon, delta, n_samples=n, seed=seed, confidence=item_conf, name=f"release[{m}]")))
    return PrivacyCheckReport(items=tuple(items), epsilon=epsilon, delta=delta, confidence=conf, n_samples=n,
                              seed=seed, seconds=time.perf_counter() - t0)
