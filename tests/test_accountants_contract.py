"""The contract every accountant honours ('rdp', 'prv', 'pld'), one parametrised suite.

Configurations are small (tens of steps) so that the whole suite stays fast; the
accuracy against independent references lives in test_accountants_{rdp,prv,pld}.py.
"""

import json
import math

import pytest

import dpfa.accountants as accountants
import dpfa.mechanisms as mechanisms
from dpfa.accountants import SampledMechanismEvent
from dpfa.errors import (
    MissingPrivacyCurveError,
    PrivacyParameterError,
    StateMismatchError,
    UnknownNameError,
    UnsupportedEventError,
)

NAMES = ["rdp", "prv", "pld"]
DELTA = 1e-5
# a small configuration: noise multiplier, sampling rate, steps
Z, Q, T = 1.0, 0.1, 20


class RdpOnlyMechanism(mechanisms.DPMechanism):
    """A user mechanism with a torch sampler and an RDP curve only (a Gaussian in disguise)."""

    name = "test_contract_rdp_only"
    sensitivity_norm = "l2"

    def sample(self, shape, scale, generator=None, device="cpu", dtype=None):
        import torch

        return torch.randn(tuple(shape), generator=generator, device=device) * scale

    def rdp(self, alpha, scale, sensitivity=1.0):
        return alpha * sensitivity**2 / (2.0 * scale**2)


@pytest.fixture(scope="module", autouse=True)
def _rdp_only_registered():
    """Register the user mechanism for this module only (privacy_check audits every registered one)."""
    from dpfa.mechanisms import registry

    saved = dict(registry._REGISTRY._classes)
    mechanisms.register(RdpOnlyMechanism, overwrite=True)
    yield
    registry._REGISTRY._classes.clear()
    registry._REGISTRY._classes.update(saved)


@pytest.fixture(params=NAMES)
def name(request):
    return request.param


def make(name):
    return accountants.get(name)()


def eps(name, z=Z, q=Q, steps=T, mechanism="gaussian", delta=DELTA):
    return make(name).compose(mechanism, z, q, steps).get_epsilon(delta)


# ------------------------------------------------------------------- registry
def test_registry_names():
    assert set(NAMES) <= set(accountants.names())
    for n in NAMES:
        assert accountants.get(n).name == n
        assert isinstance(accountants.create(n), accountants.Accountant)
    with pytest.raises(UnknownNameError, match="known: .*pld.*prv.*rdp"):
        accountants.get("moments")


# ---------------------------------------------------------------- basic values
def test_empty_history_is_free(name):
    acc = make(name)
    assert acc.get_epsilon(DELTA) == 0.0
    assert acc.get_delta(1.0) == 0.0
    assert acc.steps == 0


def test_zero_noise_is_not_private(name):
    acc = make(name).compose("gaussian", 0.0, Q, T)
    assert acc.get_epsilon(DELTA) == math.inf
    assert acc.get_delta(1.0) == 1.0
    # one noiseless event spoils a noisy history too
    acc = make(name).compose("gaussian", Z, Q, T).compose("laplace", 0.0, 1.0, 1)
    assert acc.get_epsilon(DELTA) == math.inf


def test_monotone_in_steps_noise_and_rate(name):
    base = eps(name)
    assert eps(name, steps=2 * T) > base
    assert eps(name, z=2 * Z) < base
    assert eps(name, q=Q / 2) < base
    assert 0 < base < math.inf


def test_delta_of_epsilon_round_trip(name):
    acc = make(name).compose("gaussian", Z, Q, T)
    e = acc.get_epsilon(DELTA)
    d = acc.get_delta(e)
    # get_epsilon errs up, so the delta back is at most DELTA up to each method's stated error
    assert d == pytest.approx(DELTA, rel=0.05)
    assert acc.get_delta(2 * e) < d < acc.get_delta(e / 2)


# ---------------------------------------------------------------------- ledger
def test_compose_is_chainable_and_merges_identical_consecutive_events(name):
    acc = make(name)
    assert acc.compose("gaussian", Z, Q, T // 2) is acc
    acc.compose("gaussian", Z, Q, T // 2)
    assert len(acc.history) == 1 and acc.history[0].count == T and acc.steps == T
    assert acc.get_epsilon(DELTA) == pytest.approx(eps(name), rel=1e-9)
    acc.compose("gaussian", 2 * Z, Q, 1)  # a different release is a new entry
    assert len(acc.history) == 2


def test_state_dict_round_trip(name):
    acc = make(name).compose("gaussian", Z, Q, T).compose("laplace", 2.0, 0.05, 7)
    state = acc.state_dict()
    restored = make(name)
    restored.load_state_dict(json.loads(json.dumps(state)))
    assert restored.history == acc.history
    assert restored.get_epsilon(DELTA) == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
    # a resumed run may load a state that extends its history ...
    longer = make(name).compose("gaussian", Z, Q, T).compose("laplace", 2.0, 0.05, 10)
    restored.load_state_dict(longer.state_dict())
    assert restored.steps == T + 10


def test_state_that_drops_spent_privacy_is_refused(name):
    acc = make(name).compose("gaussian", Z, Q, T)
    shorter = make(name).compose("gaussian", Z, Q, T - 1).state_dict()
    with pytest.raises(StateMismatchError, match="drop privacy already spent"):
        acc.load_state_dict(shorter)
    other = make(name).compose("laplace", Z, Q, T).state_dict()
    with pytest.raises(StateMismatchError):
        acc.load_state_dict(other)
    assert acc.steps == T  # unchanged
    with pytest.raises(StateMismatchError, match="version"):
        acc.load_state_dict({"history": [], "version": 99})


def test_heterogeneous_composition(name):
    parts = [("gaussian", 1.0, 0.1, 10), ("laplace", 2.0, 0.05, 10), ("gaussian", 2.0, 1.0, 3)]
    acc = make(name)
    for p in parts:
        acc.compose(*p)
    total = acc.get_epsilon(DELTA)
    singles = [make(name).compose(*p).get_epsilon(DELTA / 3) for p in parts]
    assert max(make(name).compose(*p).get_epsilon(DELTA) for p in parts) < total
    # composition theorem: eps(d1 + d2 + d3) <= eps1(d1) + eps2(d2) + eps3(d3)
    assert total <= sum(singles) * (1 + 5e-3)
    # the order of the releases does not matter
    rev = make(name)
    for p in reversed(parts):
        rev.compose(*p)
    assert rev.get_epsilon(DELTA) == pytest.approx(total, rel=5e-3)


def test_accountants_agree_on_a_heterogeneous_history():
    values = {}
    for n in NAMES:
        acc = make(n).compose("gaussian", 1.2, 0.05, 40).compose("laplace", 3.0, 0.1, 20)
        values[n] = acc.get_epsilon(DELTA)
    assert values["rdp"] >= values["pld"]
    assert values["prv"] == pytest.approx(values["pld"], rel=0.01)


# ----------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("delta", [0.0, 1.0, 1.5, -1e-5, float("nan")])
def test_bad_delta(name, delta):
    acc = make(name).compose("gaussian", Z, Q, T)
    with pytest.raises(PrivacyParameterError, match="delta"):
        acc.get_epsilon(delta)


@pytest.mark.parametrize("epsilon", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_epsilon(name, epsilon):
    with pytest.raises(PrivacyParameterError, match="epsilon"):
        make(name).compose("gaussian", Z, Q, T).get_delta(epsilon)


@pytest.mark.parametrize("kwargs, word", [
    (dict(noise_multiplier=-1.0), "noise_multiplier=-1.0"),
    (dict(sample_rate=0.0), "sample_rate=0.0"),
    (dict(sample_rate=1.5), "sample_rate=1.5"),
    (dict(steps=0), "steps=0"),
    (dict(steps=2.5), "steps"),
    (dict(sampling="bernoulli"), "bernoulli"),
    (dict(neighboring="swap"), "swap"),
])
def test_bad_event_parameters(name, kwargs, word):
    args = dict(mechanism="gaussian", noise_multiplier=Z, sample_rate=Q, steps=T)
    args.update(kwargs)
    acc = make(name)
    with pytest.raises(PrivacyParameterError, match=word):
        acc.compose(**args)
    assert acc.history == []


def test_unknown_mechanism(name):
    with pytest.raises(UnknownNameError, match="gaussian"):
        make(name).compose("cauchy", Z, Q, T)


def test_mechanism_without_the_curve(name):
    acc = make(name)
    if name == "rdp":
        acc.compose(RdpOnlyMechanism.name, Z, Q, T)
        acc.compose("discrete_gaussian", Z, Q, T)
        assert 0 < acc.get_epsilon(DELTA) < math.inf
        return
    for mech in ("discrete_gaussian", RdpOnlyMechanism.name):
        with pytest.raises(MissingPrivacyCurveError, match=mech):
            acc.compose(mech, Z, Q, T)
        assert not acc.supports(SampledMechanismEvent(mech, Z, Q, T))
    assert acc.history == []  # refused at compose time, before any step


def test_unsupported_sampling_and_relations_are_explicit(name):
    acc = make(name)
    # Poisson + replace-one: refused where there is no sound bound (never treated as add/remove)
    poisson_replace = SampledMechanismEvent("laplace", Z, Q, T, sampling="poisson", neighboring="replace_one")
    with pytest.raises(UnsupportedEventError, match="replace_one"):
        acc.compose_event(poisson_replace)
    if name == "rdp":
        acc.compose("gaussian", Z, Q, T, sampling="without_replacement")
        with pytest.raises(UnsupportedEventError, match="add_remove"):
            acc.compose("gaussian", Z, Q, T, sampling="without_replacement", neighboring="add_remove")
    else:
        with pytest.raises(UnsupportedEventError, match="'rdp'"):
            acc.compose("gaussian", Z, Q, T, sampling="without_replacement")
        assert acc.history == []


def test_full_batch_under_replace_one_doubles_the_sensitivity(name):
    """q = 1 and replace-one: noise z on a sum that moves by 2C is noise z/2 on sensitivity 1."""
    for sampling in ("poisson", "without_replacement"):
        doubled = make(name).compose("gaussian", 2.0, 1.0, 5, sampling=sampling, neighboring="replace_one")
        halved = make(name).compose("gaussian", 1.0, 1.0, 5, neighboring="add_remove")
        assert doubled.get_epsilon(DELTA) == pytest.approx(halved.get_epsilon(DELTA), rel=1e-3)
        assert doubled.get_epsilon(DELTA) > 1.5 * make(name).compose("gaussian", 2.0, 1.0, 5).get_epsilon(DELTA)
