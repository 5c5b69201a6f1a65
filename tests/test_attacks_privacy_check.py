"""dpfa.privacy_check() and `dpfa check`: pass on dpfa, fail on a planted wrong sigma or clipping."""

import json

import pytest
import torch

import dpfa
from dpfa import mechanisms
from dpfa.attacks import PrivacyCheckReport
from dpfa.attacks.dpsgd_audit import audit_dpsgd_noise
from dpfa.cli import main
from dpfa.errors import PrivacyParameterError, UnknownNameError
from dpfa.mechanisms import DPMechanism, GaussianMechanism
from dpfa.training import optimizer as optimizer_module
from dpfa.training.optimizer import DPOptimizer

ITEMS = ["mechanism[discrete_gaussian]", "mechanism[gaussian]", "mechanism[laplace]", "dpsgd[gaussian]",
         "dpsgd[laplace]", "release[gaussian]", "release[laplace]", "release[discrete_gaussian]"]


@pytest.fixture(scope="module")
def report():
    return dpfa.privacy_check()


def test_privacy_check_passes_on_dpfa(report):
    assert isinstance(report, PrivacyCheckReport)
    assert report.passed and report.failures == ()
    assert [i.name for i in report.items] == ITEMS
    for item in report.items:
        r = item.result
        assert item.verdict == "PASS" and r.epsilon_lower_bound <= r.claimed_epsilon <= 1.0
        assert r.claimed_epsilon > 0.99  # the engine's accountant spends (almost) all of epsilon 1 in one step
        assert r.confidence == pytest.approx(1 - 0.05 / len(ITEMS))  # the report's 95% shared by union bound
        assert r.epsilon_lower_bound > 0.5  # not vacuous: each audit tests its claim
    assert report["dpsgd[gaussian]"].result.details["clipped_value"] == pytest.approx(1.0, abs=1e-5)
    assert report.seconds < 60


def test_report_prints_a_table_and_serialises(report):
    text = str(report)
    lines = text.splitlines()
    assert "claimed eps" in lines[1] and "lower bound" in lines[1] and "verdict" in lines[1]
    for name in ITEMS:
        assert any(line.startswith(name) and line.rstrip().endswith("PASS") for line in lines)
    assert lines[-1].startswith("PASSED")
    d = json.loads(json.dumps(report.to_dict()))
    assert d["passed"] is True and d["failures"] == [] and d["n_samples"] == report.n_samples
    assert [i["name"] for i in d["items"]] == ITEMS
    assert all(i["verdict"] == "PASS" and i["epsilon_lower_bound"] <= i["claimed_epsilon"] for i in d["items"])
    with pytest.raises(KeyError, match="mechanism\\[nope\\]"):
        report["mechanism[nope]"]


def test_privacy_check_fails_on_a_planted_wrong_sigma_in_the_mechanism(monkeypatch):
    right = GaussianMechanism.calibrate
    monkeypatch.setattr(GaussianMechanism, "calibrate", lambda self, s, e, d: right(self, s, e, d) / 2.0)
    report = dpfa.privacy_check(release=("gaussian",))
    # the release calibrates through the same mechanism, so its audit catches it too
    assert not report.passed and report.failures == ("mechanism[gaussian]", "release[gaussian]")
    assert report["mechanism[gaussian]"].result.epsilon_lower_bound > 1.2
    assert "FAILED: mechanism[gaussian]" in str(report)


def _half_sigma(original):
    def add_noise(self):
        z = self.noise_multiplier
        self.noise_multiplier = z / 2.0  # the optimizer adds half the noise the accountant was told about
        try:
            original(self)
        finally:
            self.noise_multiplier = z

    return add_noise


def test_privacy_check_fails_on_half_sigma_in_the_optimizer(monkeypatch):
    monkeypatch.setattr(DPOptimizer, "_add_noise", _half_sigma(DPOptimizer._add_noise))
    report = dpfa.privacy_check(release=())
    assert report.failures == ("dpsgd[gaussian]", "dpsgd[laplace]")
    assert report["dpsgd[gaussian]"].result.epsilon_lower_bound > 1.2


def test_dpsgd_audit_sees_a_clipping_that_lets_twice_c_through(monkeypatch):
    right = optimizer_module.clipped_grads
    monkeypatch.setattr(optimizer_module, "clipped_grads",
                        lambda contributions, c, *a, **k: right(contributions, 2.0 * c, *a, **k))
    res = audit_dpsgd_noise("gaussian", n_samples=200_000)
    assert res.details["clipped_value"] == pytest.approx(2.0, abs=1e-5) and not res.passed


def test_dpsgd_audit_scales_with_the_clipping_norm():
    res = audit_dpsgd_noise("laplace", epsilon=2.0, max_grad_norm=0.25, n_samples=200_000, seed=1)
    assert res.passed and res.claimed_epsilon <= 2.0 and res.epsilon_lower_bound > 1.5
    assert res.details["clipped_value"] == pytest.approx(0.25, abs=1e-6)
    assert res.scale == pytest.approx(res.details["noise_multiplier"] * 0.25)


def test_an_item_that_cannot_run_fails_the_check_and_the_others_still_run(monkeypatch):
    from dpfa.mechanisms import registry

    class Exploding(DPMechanism):
        name = "exploding_for_tests"

        def sample(self, shape, scale, generator=None, device="cpu", dtype=torch.float32):
            raise RuntimeError("sampler is broken")

        def calibrate(self, sensitivity, epsilon, delta):
            return 1.0

    fresh = registry.Registry("mechanism", DPMechanism)
    for name in registry.names():
        fresh.register(registry.get(name))
    fresh.register(Exploding)
    monkeypatch.setattr(registry, "_REGISTRY", fresh)
    report = dpfa.privacy_check(n_samples=20_000, dpsgd=(), release=())
    item = report["mechanism[exploding_for_tests]"]
    assert item.verdict == "ERROR" and "RuntimeError: sampler is broken" in item.error
    assert report.failures == ("mechanism[exploding_for_tests]",)
    assert [i.verdict for i in report.items].count("PASS") == 3  # the built-ins still ran
    assert "sampler is broken" in str(report)
    d = {i["name"]: i for i in report.to_dict()["items"]}["mechanism[exploding_for_tests]"]
    assert d["verdict"] == "ERROR" and "broken" in d["error"]


@pytest.mark.parametrize("kwargs, error, needle", [
    ({"mechanisms": ["nope"]}, UnknownNameError, "'nope'"),
    ({"dpsgd": ["discrete_gaussian"]}, PrivacyParameterError, "dpsgd='discrete_gaussian'"),
    ({"accountant": "nope"}, UnknownNameError, "'nope'"),
    ({"n_samples": 0}, PrivacyParameterError, "n_samples=0"),
    ({"confidence": 1.0}, PrivacyParameterError, "confidence=1.0"),
    ({"epsilon": -1}, PrivacyParameterError, "epsilon=-1"),
])
def test_privacy_check_bad_input(kwargs, error, needle):
    with pytest.raises(error) as e:
        dpfa.privacy_check(**kwargs)
    assert needle in str(e.value)


# ---------------------------------------------------------------------------- dpfa check
def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_check_json_passes(capsys):
    code, out, err = run(capsys, "check", "--json", "--samples", "200000", "--seed", "3", "--accountant", "pld")
    assert code == 0, err
    d = json.loads(out)
    assert d["passed"] is True and d["n_samples"] == 200000 and d["seed"] == 3
    assert {i["details"]["accountant"] for i in d["items"] if i["kind"] == "dpsgd-noise"} == {"pld"}
    assert [i["name"] for i in d["items"]] == ITEMS


def test_cli_check_exits_non_zero_when_a_check_fails(capsys, monkeypatch):
    right = GaussianMechanism.calibrate
    monkeypatch.setattr(GaussianMechanism, "calibrate", lambda self, s, e, d: right(self, s, e, d) / 2.0)
    code, out, err = run(capsys, "check", "--samples", "200000", "--accountant", "rdp")
    assert code == 1
    assert "FAILED: mechanism[gaussian]" in out and "claimed eps" in out and "Traceback" not in err


@pytest.mark.parametrize("argv, needle", [
    (["check", "--samples", "0"], "--samples=0"),
    (["check", "--epsilon", "-1"], "--epsilon=-1.0"),
    (["check", "--delta", "0"], "--delta=0.0"),
    (["check", "--confidence", "2"], "confidence=2.0"),
    (["check", "--seed", "-4"], "--seed=-4"),
    (["check", "--accountant", "nope"], "known: pld, prv, rdp"),
])
def test_cli_check_bad_input_is_a_clear_error(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("dpfa: error:") and needle in err and "Traceback" not in err


def test_cli_check_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["check", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--json", "--samples", "--seed", "--epsilon", "--delta", "--confidence", "--accountant"):
        assert option in out
    assert "exit status" in out.lower()


def test_registered_mechanisms_are_all_checked():
    assert sorted(mechanisms.names()) == sorted(n[len("mechanism["):-1] for n in ITEMS if n.startswith("mech"))
