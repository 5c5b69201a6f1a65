"""Every code block of the seed README (reconstructed: tests/seed_readme_examples.py) runs in dpfa,
as written or with the migration table's change, and its numbers match an independent accountant."""

import math
import shlex

import pytest
import torch

import seed_readme_examples as seed
from dpfa import accountants
from dpfa.errors import DPFAError
from dpfa.kernels.flash_attention import reference_path


def run_block(code):
    ns = {}
    torch.manual_seed(0)
    with reference_path():
        exec(compile(code, "<seed README>", "exec"), ns)
    return ns


@pytest.mark.parametrize("name", sorted(seed.BLOCKS))
def test_block_as_written(name):
    code, migrated, expected = seed.BLOCKS[name]
    if expected == "works":
        run_block(code)
        return
    with pytest.raises((DPFAError, TypeError)) as err:
        run_block(code)
    assert expected.removeprefix("error: ") in str(err.value)
    run_block(migrated)


def _pld_epsilon(events, delta):
    acc = accountants.get("pld")()
    for e in events:
        acc.compose_event(e)
    return acc.get_epsilon(delta)


def test_quickstart_results():
    ns = run_block(seed.QUICKSTART)
    assert ns["output"].shape == (2, 16, 64)
    stats = ns["privacy_stats"]
    assert stats.epsilon_spent == 1.0
    assert _pld_epsilon(stats.events, 1e-5) == pytest.approx(1.0, rel=0.02)
    attn = ns["attn"]
    assert attn.privacy["value_clip"] == 1.0  # the seed's max_grad_norm is the value clip
    assert attn.get_privacy_spent()[0] == pytest.approx(1.0, rel=0.02)


def test_positional_equals_keywords():
    ns = run_block(seed.POSITIONAL)
    a = ns["attn"]
    assert a.privacy["epsilon"] == 1.0 and a.privacy["delta"] == 1e-5 and a.privacy["value_clip"] == 1.0
    assert ns["output"].shape == (2, 16, 64)


def test_functional_shape():
    assert run_block(seed.FUNCTIONAL)["out"].shape == (2, 32, 4, 16)


def test_head_epsilons_compose():
    stats = run_block(seed.HEAD_EPSILONS)["privacy_stats"]
    assert 0.4 < stats.epsilon_spent < 1.0  # composed (tighter than 0.1 + 0.2 + 0.3 + 0.4)
    assert stats.epsilon_spent == pytest.approx(_pld_epsilon(stats.events, 1e-5), rel=1e-6)


def test_custom_mechanism_is_accounted_by_its_calls_and_audited():
    from dpfa.attacks import audit_mechanism

    ns = run_block(seed.CUSTOM_MECHANISM_MIGRATED)
    stats = ns["privacy_stats"]
    assert ns["output"].shape == (2, 16, 64)
    assert stats.accounting == "basic_composition" and stats.events == ()
    assert (stats.epsilon_spent, stats.delta_spent) == (1.0, 0.0)  # add_noise takes no delta: pure claim
    x = torch.randn(2, 16, 64)
    with reference_path():
        ns["attn"](x, x, x)
    assert ns["attn"].get_privacy_spent() == (2.0, 0.0)  # basic composition over the calls
    res = audit_mechanism(ns["LaplacianAttention"](), 1.0, n_samples=40_000, seed=0)
    assert res.passed and res.details["path"] == "add_noise" and res.epsilon_lower_bound > 0.5


def test_custom_mechanism_noise_is_at_the_row_sensitivity():
    """Per-head budgets: one add_noise call per head with sensitivity R (L1), epsilon_h; the noise on a row
    is the mechanism's at scale R / epsilon_h times the row's bound Delta_i."""
    ns = run_block(seed.CUSTOM_MECHANISM_MIGRATED)
    calls = []

    class Spy(ns["LaplacianAttention"]):
        def add_noise(self, tensor, sensitivity, epsilon):
            calls.append((tuple(tensor.shape), sensitivity, epsilon))
            return tensor

    import dp_flash_attention as dfa

    attn = dfa.DPFlashAttention(64, 4, 1.0, 1e-5, 1.0, noise_mechanism=Spy(), head_epsilons=[0.5, 1, 1, 2])
    x = torch.randn(2, 16, 64)
    with reference_path():
        _, stats = attn(x, x, x, return_privacy_stats=True)
    assert calls == [((2, 16, 16), 16.0, e) for e in (0.5, 1.0, 1.0, 2.0)]
    assert stats.epsilon_spent == 4.5


def test_make_private_epsilon_matches_an_independent_accountant():
    ns = run_block(seed.MAKE_PRIVATE_MIGRATED)
    model, opt, loader, engine = ns["private"]
    for x, y in loader:
        opt.zero_grad()
        if len(x):
            torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    ref = accountants.get("prv")().compose("gaussian", engine.noise_multiplier, 32 / 256, engine.steps)
    assert engine.get_epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
    assert engine.get_epsilon(1e-5) <= 3.0


def test_cuda_version_is_none_without_cuda():
    version = run_block(seed.UTILITIES)["version"]
    assert version == (torch.version.cuda if torch.cuda.is_available() else None)


def test_renyi_accountant_raw_steps_are_composed_tightly():
    from dp_accounting.pld import privacy_loss_distribution as pld_lib
    from dp_accounting.pld.common import DifferentialPrivacyParameters

    eps = run_block(seed.RENYI)["total_epsilon"]
    # an upper bound that holds by BBG18 (each step (eps', q delta0)-DP) + advanced composition (Dwork et al.)
    e1 = math.log1p(0.01 * math.expm1(0.1))
    slack = 1e-5 - 100 * 0.01 * 1e-6
    advanced = math.sqrt(2 * 100 * math.log(1 / (slack / 2))) * e1 + 100 * e1 * math.expm1(e1)
    assert 0 < eps < min(advanced, 100 * e1) < 100 * 0.1
    # at rate 1 the composition must equal dp-accounting's PLD of the (epsilon, delta) pair
    from dp_flash_attention.privacy import RenyiAccountant

    acc = RenyiAccountant().add_step(0.5, 1e-7, steps=20)
    ref = pld_lib.from_privacy_parameters(DifferentialPrivacyParameters(0.5, 1e-7), value_discretization_interval=1e-4)
    assert acc.get_epsilon(1e-5) == pytest.approx(ref.self_compose(20).get_epsilon_for_delta(1e-5), rel=2e-3)


def test_renyi_accountant_composes_layer_events_exactly():
    from dp_flash_attention.privacy import RenyiAccountant

    stats = run_block(seed.QUICKSTART)["privacy_stats"]
    acc = RenyiAccountant()
    acc.add_step(stats, steps=3)
    ref = accountants.get("rdp")()
    for _ in range(3):
        for e in stats.events:
            ref.compose_event(e)
    assert acc.get_epsilon(1e-5) == ref.get_epsilon(1e-5)
    with pytest.raises(DPFAError, match="Account them apart"):
        acc.add_step(0.1, 1e-6, sampling_rate=0.01).get_epsilon(1e-5)
    dpsgd = RenyiAccountant().add_step(noise_multiplier=1.0, sampling_rate=0.01, steps=50)
    assert dpsgd.get_epsilon(1e-5) == accountants.get("rdp")().compose("gaussian", 1.0, 0.01, 50).get_epsilon(1e-5)


def test_amplification_and_lora():
    from dpfa.accountants import SubsamplingAmplification

    eps = run_block(seed.AMPLIFICATION)["epsilon"]
    assert eps == SubsamplingAmplification(1.0, 0.01, 1000).compute_epsilon(1e-5)
    model = run_block(seed.LORA)["model"]
    assert len(model.lora_parameters()) == 4


def test_calibration_block():
    ns = run_block(seed.CALIBRATION)
    cal = ns["calibrator"]
    assert ns["max_grad_norm"] > 0 and ns["noise_multiplier"] > 0
    assert cal.accountant.get_epsilon(1e-5) > 0  # the rounds are charged


def test_checkpointed_block():
    ns = run_block(seed.CHECKPOINTED)
    assert ns["output"].shape == (8, 16, 64) and ns["x"].grad is not None
    assert ns["privacy_stats"].epsilon_spent == 1.0


def test_privacy_check_is_there():
    import dp_flash_attention

    report = dp_flash_attention.privacy_check(n_samples=2000, mechanisms=["gaussian"], dpsgd=[], release=[])
    assert report.passed


def _cli(line, capsys):
    from dpfa.cli import main

    argv = shlex.split(line)[1:]
    rc = main(argv)
    return rc, capsys.readouterr()


def test_seed_command_lines(capsys, tmp_path, monkeypatch):
    rc, out = _cli(seed.COMMANDS["bench_memory"], capsys)
    assert rc == 0 and "ANALYTIC ESTIMATE" in out.out and "opacus" in out.out
    rc, out = _cli(seed.COMMANDS["bench_speed"], capsys)
    if torch.cuda.is_available():
        assert rc == 0
    else:
        assert rc == 2 and "needs a CUDA device" in out.err
    rc, out = _cli(seed.COMMANDS["verify"] + " --samples 20000 --steps 100", capsys)
    assert rc == 0 and "(agree)" in out.out
    rc, out = _cli("dpfa verify --composition parallel", capsys)
    assert rc == 2 and "only 'sequential'" in out.err


def test_seed_audit_command_maps_onto_the_runner(monkeypatch, capsys, tmp_path):
    from dpfa.attacks import runner

    seen = {}

    def fake_load_config(path, **kw):
        seen.update(kw)
        raise DPFAError("stop here")

    monkeypatch.setattr(runner, "load_config", fake_load_config)
    rc, out = _cli(seed.COMMANDS["audit"], capsys)
    assert rc == 2 and seen["epsilons"] == "1.0" and seen["num_shadow_models"] == 100
