"""The 'prv' accountant against dp-accounting, prv-accountant and the analytic Gaussian.

The references are computed here, independently of the library: dp-accounting's own
PLDAccountant on dp_events (interval 1e-4, connect-the-dots), prv-accountant's own
PRVAccountant on its PoissonSubsampledGaussianMechanism, and for q = 1 the closed form
delta(eps) of the mu-GDP Gaussian (Balle & Wang 2018). The two numerical references agree
with each other to ~1e-5; the accountant reports the upper end of its error interval
(eps_error = 0.25% of epsilon), so it must sit at or above them, and within 0.5%.
"""

import functools
import math

import prv_accountant
import pytest

from accounting_references import (CONFIGS, LAPLACE_CONFIGS, dp_accounting, gdp_delta, gdp_epsilon,
                                   prv_reference_delta, prv_reference_epsilon, single)
import dpfa.mechanisms as mechanisms
from dpfa.accountants import PRVAccountant, SampledMechanismEvent
from dpfa.accountants.prv import (
    PoissonSubsampledGaussianAddPRV,
    PoissonSubsampledGaussianPRV,
    PoissonSubsampledLaplacePRV,
    compose_prvs,
)
from dpfa.errors import UnsupportedEventError
from dpfa.mechanisms import GaussianMechanism

# (noise multiplier, sampling rate, steps, delta)
#: documented: epsilon is the upper end of [eps - e, eps + e], e = 0.25% of epsilon
MAX_EXCESS = 5e-3
#: the references' own error, far below the accountant's
REF_TOL = 1e-4


# ------------------------------------------------------------------ helpers
def ours(events):
    acc = PRVAccountant()
    for e in events:
        acc.compose(*e)
    return acc


@functools.lru_cache(maxsize=None)
def our_epsilon(events, delta):
    return ours(events).get_epsilon(delta)


# --------------------------------------------------------------- Gaussian
def test_reference_configuration():
    events = single("gaussian", 1.0, 0.01, 1000)
    assert dp_accounting(events).get_epsilon(1e-5) == pytest.approx(1.828, abs=1e-3)  # pinned, next to the live
    assert ours(events).get_epsilon(1e-5) == pytest.approx(dp_accounting(events).get_epsilon(1e-5), rel=0.01)


@pytest.mark.parametrize("z, q, steps, delta", CONFIGS)
def test_gaussian_epsilon_against_dp_accounting_and_prv_accountant(z, q, steps, delta):
    events = single("gaussian", z, q, steps)
    ref_pld = dp_accounting(events).get_epsilon(delta)
    low, ref_prv, _ = prv_reference_epsilon(events, delta)
    assert ref_pld == pytest.approx(ref_prv, rel=REF_TOL)  # the references agree
    eps = our_epsilon(events, delta)
    assert eps == pytest.approx(ref_pld, rel=0.01) and eps == pytest.approx(ref_prv, rel=0.01)
    # an upper bound: at or above the true value, which both references pin down
    assert eps >= min(ref_pld, ref_prv) * (1 - REF_TOL) and eps >= low
    assert eps <= max(ref_pld, ref_prv) * (1 + MAX_EXCESS)


@pytest.mark.parametrize("z, q, steps, delta", CONFIGS)
def test_gaussian_delta_against_dp_accounting_and_prv_accountant(z, q, steps, delta):
    """get_delta(eps) <= delta(eps - eps_error) + delta_error (module docstring), and delta is
    steep in eps (2-7% per 0.25% of eps here): so within 0.5% *in epsilon* of the references."""
    events = single("gaussian", z, q, steps)
    ref = dp_accounting(events)
    eps = ref.get_epsilon(delta)
    _, ref_prv, _ = prv_reference_delta(events, delta, eps)
    assert ref.get_delta(eps) == pytest.approx(ref_prv, rel=1e-3)
    d = ours(events).get_delta(eps)
    assert d >= max(ref.get_delta(eps), ref_prv) * (1 - 1e-3)
    assert d <= ref.get_delta(eps * (1 - MAX_EXCESS))


@pytest.mark.parametrize("z, steps, delta", [(2.0, 50, 1e-5), (5.0, 10, 1e-3), (0.5, 1, 1e-6)])
def test_full_batch_is_an_upper_bound_of_the_analytic_gaussian(z, steps, delta):
    """q = 1: T releases are mu-GDP with mu = sqrt(T)/z, whose delta(eps) is known exactly."""
    mu = math.sqrt(steps) / z
    exact = gdp_epsilon(mu, delta)
    events = single("gaussian", z, 1.0, steps)
    assert dp_accounting(events).get_epsilon(delta) == pytest.approx(exact, rel=1e-4)  # the formula is right
    acc = ours(events)
    eps = acc.get_epsilon(delta)
    assert exact * (1 - 1e-9) <= eps <= exact * (1 + MAX_EXCESS)
    d = acc.get_delta(exact)
    assert delta * (1 - 1e-9) <= d <= gdp_delta(mu, exact * (1 - MAX_EXCESS))


# ----------------------------------------------------------------- Laplace
@pytest.mark.parametrize("z, q, steps, delta", LAPLACE_CONFIGS)
def test_poisson_laplace_against_dp_accounting(z, q, steps, delta):
    """prv-accountant has no subsampled Laplace: the library's PRV (closed-form cdf) against
    dp-accounting's LaplaceDpEvent PLD."""
    events = single("laplace", z, q, steps)
    ref = dp_accounting(events)
    acc = ours(events)
    eps = acc.get_epsilon(delta)
    assert ref.get_epsilon(delta) * (1 - REF_TOL) <= eps <= ref.get_epsilon(delta) * (1 + MAX_EXCESS)
    e = ref.get_epsilon(delta)
    assert ref.get_delta(e) * (1 - 1e-3) <= acc.get_delta(e) <= ref.get_delta(e * (1 - MAX_EXCESS))


def test_full_batch_laplace_against_both_references():
    events = single("laplace", 1.5, 1.0, 20)
    ref_pld = dp_accounting(events).get_epsilon(1e-5)
    _, ref_prv, _ = prv_reference_epsilon(events, 1e-5)
    assert ref_pld == pytest.approx(ref_prv, rel=REF_TOL)
    assert ref_pld * (1 - REF_TOL) <= ours(events).get_epsilon(1e-5) <= ref_pld * (1 + MAX_EXCESS)


# ------------------------------------------------------------ heterogeneous
def test_two_gaussian_releases_against_both_references():
    events = (("gaussian", 1.0, 0.01, 600), ("gaussian", 2.0, 0.05, 300))
    delta = 1e-5
    ref_pld = dp_accounting(events).get_epsilon(delta)
    _, ref_prv, _ = prv_reference_epsilon(events, delta)
    assert ref_pld == pytest.approx(ref_prv, rel=REF_TOL)
    eps = our_epsilon(events, delta)
    assert min(ref_pld, ref_prv) * (1 - REF_TOL) <= eps <= max(ref_pld, ref_prv) * (1 + MAX_EXCESS)
    ref = dp_accounting(events)
    d = ours(events).get_delta(ref_pld)
    assert ref.get_delta(ref_pld) * (1 - 1e-3) <= d <= ref.get_delta(ref_pld * (1 - MAX_EXCESS))


def test_gaussian_and_laplace_releases_against_dp_accounting():
    events = (("gaussian", 1.2, 0.05, 200), ("laplace", 3.0, 0.1, 100), ("gaussian", 4.0, 1.0, 5))
    delta = 1e-6
    ref = dp_accounting(events).get_epsilon(delta)
    assert ref * (1 - REF_TOL) <= our_epsilon(events, delta) <= ref * (1 + MAX_EXCESS)


# ---------------------------------------------------- both directions (add / remove)
def dp_accounting_directions(mechanism, z, q, steps):
    """dp-accounting keeps the remove and the add pair apart (its PLD's ``_pmf_remove``, ``_pmf_add``)."""
    pld = dp_accounting(single(mechanism, z, q, steps))._pld
    return {"remove": pld._pmf_remove, "add": pld._pmf_add}


@pytest.mark.parametrize("mechanism, z, q, steps, delta", [
    ("gaussian", 1.0, 0.01, 1000, 1e-5),
    ("gaussian", 1.0, 0.9, 10, 1e-5),
    ("laplace", 1.0, 0.01, 1000, 1e-5),
    ("laplace", 0.5, 0.05, 50, 1e-6),
])
def test_each_direction_against_dp_accounting(mechanism, z, q, steps, delta):
    """The PRV of each direction, composed alone, against dp-accounting's matching pair."""
    if mechanism == "gaussian":
        prvs = {"remove": PoissonSubsampledGaussianPRV(q, z), "add": PoissonSubsampledGaussianAddPRV(q, z)}
    else:
        prvs = {d: PoissonSubsampledLaplacePRV(q, z, d) for d in ("remove", "add")}
    refs = dp_accounting_directions(mechanism, z, q, steps)
    values = {}
    for direction, prv in prvs.items():
        ref = refs[direction].get_epsilon_for_delta(delta)
        eps_error, delta_error = 2.5e-3 * ref, 1e-3 * delta
        _, est, up = compose_prvs([prv], [steps], eps_error, delta_error).compute_epsilon(delta, delta_error, eps_error)
        assert est == pytest.approx(ref, rel=1e-3), direction
        assert up >= ref * (1 - REF_TOL), direction
        values[direction] = ref
    assert values["add"] < 0.97 * values["remove"]  # they differ: each is checked on its own


class SwappedDirectionsGaussian(GaussianMechanism):
    """The subsampled Gaussian with its two directions' PRVs exchanged: the same set of pairs
    (so the same privacy), but here the *add* pair is the worse one."""

    name = "test_prv_swapped_directions"

    def prv(self, noise_multiplier, sampling_prob=1.0, neighboring="add_remove", direction="remove"):
        other = {"remove": "add", "add": "remove"}[direction]
        return super().prv(noise_multiplier, sampling_prob, neighboring=neighboring, direction=other)




@pytest.mark.parametrize("z, q, steps, delta", CONFIGS[:2])
def test_the_add_direction_is_composed_and_counts(z, q, steps, delta):
    """prv-accountant ships only the remove direction; composing only the one that the
    mechanism calls "remove" would report the add pair's epsilon here, 22-50% too low."""
    refs = dp_accounting_directions("gaussian", z, q, steps)
    add_only = refs["add"].get_epsilon_for_delta(delta)
    truth = dp_accounting(single("gaussian", z, q, steps)).get_epsilon(delta)
    assert add_only < 0.8 * truth
    swapped = PRVAccountant().compose(SwappedDirectionsGaussian.name, z, q, steps)
    eps = swapped.get_epsilon(delta)
    assert truth * (1 - REF_TOL) <= eps <= truth * (1 + MAX_EXCESS)
    assert eps == pytest.approx(our_epsilon(single("gaussian", z, q, steps), delta), rel=1e-3)
    ref = dp_accounting(single("gaussian", z, q, steps))
    assert swapped.get_delta(truth) >= ref.get_delta(truth) * (1 - 1e-3)
    assert refs["add"].get_delta_for_epsilon(truth) < 0.5 * delta


# ------------------------------------------------------------------ refusals
def test_poisson_replace_one_gaussian_is_refused_and_points_to_pld():
    acc = PRVAccountant()
    with pytest.raises(UnsupportedEventError, match="'pld'"):
        acc.compose("gaussian", 1.0, 0.01, 10, neighboring="replace_one")
    assert not acc.supports(SampledMechanismEvent("gaussian", 1.0, 0.01, 10, neighboring="replace_one"))
    assert acc.history == []
    # at rate 1 there is no subsampling, and replace-one is the Gaussian of sensitivity 2
    acc.compose("gaussian", 2.0, 1.0, 10, neighboring="replace_one")
    mu = math.sqrt(10) * 2.0 / 2.0  # sqrt(T) x sensitivity / noise
    assert gdp_epsilon(mu, 1e-5) * (1 - 1e-9) <= acc.get_epsilon(1e-5) <= gdp_epsilon(mu, 1e-5) * (1 + MAX_EXCESS)


class PrvWithoutRelation(GaussianMechanism):
    """A user mechanism whose prv() takes neither ``neighboring`` nor ``direction``."""

    name = "test_prv_without_relation"

    def prv(self, noise_multiplier, sampling_prob=1.0):
        return prv_accountant.GaussianMechanism(noise_multiplier=noise_multiplier)


@pytest.fixture(scope="module", autouse=True)
def _user_mechanisms_registered():
    """Register this module's user mechanisms for its tests only (privacy_check audits every
    registered mechanism, so they must not leak into other modules)."""
    from dpfa.mechanisms import registry

    saved = dict(registry._REGISTRY._classes)
    mechanisms.register(SwappedDirectionsGaussian, overwrite=True)
    mechanisms.register(PrvWithoutRelation, overwrite=True)
    yield
    registry._REGISTRY._classes.clear()
    registry._REGISTRY._classes.update(saved)


def test_a_prv_without_a_relation_is_refused_under_replace_one():
    """Such a PRV is taken to hold in both directions under add/remove, but nothing says what it
    is under replace-one (where the sensitivity doubles): refused, even at rate 1."""
    acc = PRVAccountant()
    with pytest.raises(UnsupportedEventError, match="neighboring"):
        acc.compose(PrvWithoutRelation.name, 2.0, 1.0, 10, neighboring="replace_one")
    acc.compose(PrvWithoutRelation.name, 2.0, 1.0, 10)
    assert acc.get_epsilon(1e-5) == pytest.approx(gdp_epsilon(math.sqrt(10) / 2.0, 1e-5), rel=MAX_EXCESS)
