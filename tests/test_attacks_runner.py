"""The audit runner (dpfa.attacks.runner, `dpfa audit`): the quick config end to end, resuming, bad configs."""

import dataclasses
import json
import math
from pathlib import Path

import pytest

from dpfa.attacks import one_run as one_run_module
from dpfa.attacks import runner
from dpfa.attacks.runner import (QUICK, AuditConfig, LiraConfig, config_from_dict, load_config, parse_epsilons,
                                 run_audit)
from dpfa.errors import ConfigError, DPFAError

TOML = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "audit.toml"
HEADER = ("| epsilon claimed | one-run lower bound | LiRA AUC | TPR@0.1% | TPR@1% | LiRA eps estimate | "
          "loss-attack AUC |")


def quick_config(**changes):
    return dataclasses.replace(load_config(TOML, quick=True, jobs=1), **changes)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit")
    return run_audit(quick_config(), out, "audit_quick", progress=False, command="dpfa audit --quick")


# ------------------------------------------------------------------ end to end
def test_quick_run_writes_every_field(quick_run):
    run = quick_run
    assert run.computed == ("inf", "2") and run.cached == () and run.dropped == ()
    res = json.loads(run.json_path.read_text())
    assert res == run.results
    assert res["name"] == "audit_quick" and res["command"] == "dpfa audit --quick"
    assert res["config"]["epsilons"] == ["inf", 2.0] and res["config"]["lira"]["num_shadow_models"] == 4
    env = res["environment"]
    assert env["device"] == "cpu" and env["cpu"] and env["cpu_count"] >= 1
    for k in ("python", "torch", "numpy", "scipy", "scikit-learn", "dpfa"):
        assert env[k]
    assert "commit" in res["git"] and "modified_files" in res["git"]
    assert res["seeds"]["seed"] == 0 and "canary_coins" in res["seeds"]
    assert len(res["runs"]) == 1 and res["runs"][0]["wall_seconds"] > 0
    assert res["wall_seconds_cells"] == pytest.approx(sum(c["seconds"] for c in res["cells"].values()))
    assert set(res["cells"]) == {"inf", "2"}
    for key, cell in res["cells"].items():
        assert cell["epsilon"] == key and cell["config"] == quick_config().cell_key()
        lira = cell["lira"]
        assert lira["n_models"] == 4 and lira["n_examples"] == 160 and sum(lira["train_set_sizes"]) == 2 * 160
        for result in (lira["online"], lira["offline"], cell["loss_attack"]):
            assert 0.0 <= result["auc"] <= 1.0
            assert set(result["tpr_at_fpr"]) == {"0.001", "0.01"}
            assert result["epsilon_lower_bound"] >= 0.0 and result["confidence"] == 0.95
            assert result["n_members"] + result["n_nonmembers"] == 4 * 160
            assert len(result["roc"]["fpr"]) == len(result["roc"]["tpr"]) == len(runner.ROC_FPR_GRID)
            assert result["roc"]["tpr"] == sorted(result["roc"]["tpr"])  # a ROC curve rises
        one = cell["one_run"]
        assert one["m"] == 100 and 0 < one["n_included"] < 100 and one["train_set_size"] == 100 + one["n_included"]
        assert one["epsilon_lower_bound"] >= 0.0 and one["confidence"] == 0.95
        assert cell["seconds"] > 0 and cell["git"] == res["git"] and cell["environment"] == env
    inf, two = res["cells"]["inf"], res["cells"]["2"]
    # inf: no noise and no clipping; 2: DP-SGD whose runs each spend at most 2
    assert inf["private"] is False and inf["clipping"] is False and inf["max_grad_norm"] is None
    assert inf["noise_multiplier"] == {"lira": None, "one_run": None} and inf["epsilon_spent"]["one_run"] == "inf"
    assert inf["one_run"]["claimed_epsilon"] is None
    assert two["private"] is True and two["clipping"] is True and two["max_grad_norm"] == 1.0
    assert two["noise_multiplier"]["lira"] > two["noise_multiplier"]["one_run"] > 0  # LiRA's sets are smaller
    for spent in (two["epsilon_spent"]["lira_max"], two["epsilon_spent"]["one_run"]):
        assert 1.9 < spent <= 2.0
    assert two["one_run"]["claimed_epsilon"] == 2.0 and two["one_run"]["passed"] is True
    assert [r["epsilon"] for r in res["table"]] == ["inf", "2"]
    assert res["table"][1]["lira_auc"] == {"online": two["lira"]["online"]["auc"],
                                           "offline": two["lira"]["offline"]["auc"]}


def test_markdown_is_one_table(quick_run):
    text = quick_run.markdown_path.read_text()
    lines = text.splitlines()
    assert lines[0] == HEADER and lines[1] == "|---|---|---|---|---|---|---|"
    assert lines[2].startswith("| inf (no noise, no clipping) | ") and lines[3].startswith("| 2 | ")
    two = quick_run.results["cells"]["2"]
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert len(cells) == 7
    assert cells[1] == f"{two['one_run']['epsilon_lower_bound']:.2f}"
    assert cells[2] == f"{two['lira']['online']['auc']:.3f} / {two['lira']['offline']['auc']:.3f}"
    assert cells[6] == f"{two['loss_attack']['auc']:.3f}"
    assert "Command: `dpfa audit --quick`" in text and "4 models" in text


# ------------------------------------------------------------------ resuming
def _copy(run, tmp_path):
    for p in (run.json_path, run.markdown_path):
        (tmp_path / p.name).write_text(p.read_text())
    return json.loads(run.json_path.read_text())


def _no_training(*args, **kwargs):
    raise AssertionError("run_cell was called: a cached cell was recomputed")


def test_second_run_recomputes_nothing(quick_run, tmp_path, monkeypatch):
    before = _copy(quick_run, tmp_path)
    monkeypatch.setattr(runner, "run_cell", _no_training)
    # jobs does not change any number, so it is not part of a cell's key
    again = run_audit(quick_config(jobs=2), tmp_path, "audit_quick", progress=False, command="dpfa audit --quick")
    assert again.computed == () and again.cached == ("inf", "2")
    assert again.results["cells"] == before["cells"] and again.results["command"] == "dpfa audit --quick"
    assert [(r["computed"], r["cached"]) for r in again.results["runs"]] == [(["inf", "2"], []), ([], ["inf", "2"])]
    assert (tmp_path / "audit_quick.md").read_text() == quick_run.markdown_path.read_text()


def test_only_missing_or_changed_cells_are_computed(quick_run, tmp_path, monkeypatch):
    _copy(quick_run, tmp_path)
    calls = []
    real = runner.run_cell

    def counting(config, epsilon, **kw):
        calls.append(epsilon)
        return real(config, epsilon, **kw)

    monkeypatch.setattr(runner, "run_cell", counting)
    run = run_audit(quick_config(epsilons=(math.inf, 2.0, 4.0)), tmp_path, "audit_quick", progress=False)
    assert calls == [4.0] and run.computed == ("4",) and run.cached == ("inf", "2")
    assert [r["epsilon"] for r in run.results["table"]] == ["inf", "4", "2"]
    # a cell computed with another configuration is dropped and recomputed
    calls.clear()
    changed = quick_config(epsilons=(2.0,), seed=1)
    run = run_audit(changed, tmp_path, "audit_quick", progress=False)
    assert calls == [2.0] and run.dropped == ("inf", "4", "2") and set(run.results["cells"]) == {"2"}
    assert run.results["cells"]["2"]["seeds"]["canary_coins"] == 3


def test_an_interrupted_run_keeps_its_finished_cells(tmp_path, monkeypatch):
    real = runner.run_cell

    def dies_on_the_second(config, epsilon, **kw):
        if epsilon == 2.0:
            raise KeyboardInterrupt
        return real(config, epsilon, **kw)

    monkeypatch.setattr(runner, "run_cell", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        run_audit(quick_config(), tmp_path, "audit_quick", progress=False)
    saved = json.loads((tmp_path / "audit_quick.json").read_text())
    assert set(saved["cells"]) == {"inf"}
    monkeypatch.setattr(runner, "run_cell", real)
    run = run_audit(quick_config(), tmp_path, "audit_quick", progress=False)
    assert run.computed == ("2",) and run.cached == ("inf",)
    assert run.results["cells"]["inf"] == saved["cells"]["inf"]


def test_a_foreign_results_file_is_not_overwritten(tmp_path):
    (tmp_path / "audit_quick.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="audit_quick.json exists but is not an audit results file"):
        run_audit(quick_config(), tmp_path, "audit_quick", progress=False)
    assert (tmp_path / "audit_quick.json").read_text() == "[1, 2]"


# ------------------------------------------------------------------ configs
def test_the_toml_file_is_the_defaults():
    data = runner.read_toml(TOML)
    assert config_from_dict(data) == AuditConfig()
    assert data["quick"] == QUICK  # `dpfa audit --quick` without the file does the same
    assert config_from_dict(data, quick=True) == config_from_dict({}, quick=True)
    assert AuditConfig().epsilons == (math.inf, 8.0, 3.0, 1.0)


def test_epsilons_and_overrides():
    assert parse_epsilons("inf,8,3,1") == (math.inf, 8.0, 3.0, 1.0)
    assert parse_epsilons([" inf", 0.5]) == (math.inf, 0.5) == parse_epsilons("Infinity, 0.5")
    assert parse_epsilons([math.inf, 8]) == (math.inf, 8.0)
    cfg = load_config(TOML, epsilons="1,inf", num_shadow_models=8, jobs=3)
    assert cfg.epsilons == (1.0, math.inf) and cfg.lira == LiraConfig(num_shadow_models=8) and cfg.jobs == 3
    assert load_config(None) == AuditConfig() and AuditConfig(jobs=0).n_jobs >= 1
    assert AuditConfig(epsilons=("inf", 8)).cell_key() == AuditConfig(jobs=5).cell_key()
    assert AuditConfig().cell_key() != AuditConfig(seed=1).cell_key()


BAD = [
    ("epsilons = [8, -1]", "every epsilon in epsilons to be a number > 0 or inf, got -1"),
    ("epsilons = [8, 0]", "got 0"),
    ("epsilons = [nan]", "got nan"),
    ("epsilons = [true]", "got True"),
    ('epsilons = ["eight"]', "'eight'"),
    ("epsilons = [8, 8.0]", "epsilon=8 twice"),
    ("epsilons = []", "non-empty list"),
    ("epsilons = 8", "got 8"),
    ("confidence = 1.5", "confidence=1.5"),
    ("seed = -1", "seed=-1"),
    ("jobs = 1.5", "jobs to be an integer >= 0, got 1.5"),
    ("foo = 1", "Unknown key 'foo'"),
    ("[modle]\nhidden = [8]", "Unknown key 'modle'"),
    ("[model]\nhidden = []", "model.hidden"),
    ("[model]\nhidden = [0]", "a width in model.hidden=0"),
    ("[train]\nsteps = 0", "train.steps=0"),
    ("[train]\nsteps = 2.5", "train.steps to be an integer >= 1, got 2.5"),
    ("[train]\nstpes = 10", "Unknown key train.stpes"),
    ('[train]\noptimizer = "rmsprop"', "train.optimizer='rmsprop'"),
    ("[train]\nlr = -0.1", "train.lr=-0.1"),
    ("[train]\nmax_grad_norm = 0", "train.max_grad_norm=0"),
    ("[train]\ndelta = 2.0", "train.delta=2.0"),
    ('[train]\naccountant = "moments"', "train.accountant='moments'"),
    ("[train]\nbatch_size = 1000", "train.batch_size=1000"),
    ("[lira]\nnum_shadow_models = 3", "lira.num_shadow_models=3"),
    ("[lira]\nn_examples = 5000", "lira.n_examples=5000"),
    ("[one_run]\ncanaries = 1500", "1500 + 797 = 2297 exceeds"),
    ("train = 3", "[train] to be a table"),
    ("[quick]\nlira = { num_shadow_models = 2 }", "lira.num_shadow_models=2"),
    ("[quick.tarin]\nsteps = 3", "Unknown table [quick.tarin]"),
    ("epsilons = [", "is not valid TOML"),
]


@pytest.mark.parametrize("text, needle", BAD, ids=[b[0].replace("\n", " ") for b in BAD])
def test_bad_config_values_name_the_value(tmp_path, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert needle in str(e.value) and str(path) in str(e.value)
    assert isinstance(e.value, DPFAError) and isinstance(e.value, ValueError)


def test_bad_overrides_name_the_option(tmp_path):
    with pytest.raises(ConfigError, match="Config file .*missing.toml does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="--num-shadow-models=2"):
        load_config(None, num_shadow_models=2)
    with pytest.raises(ConfigError, match="--jobs=-1"):
        load_config(None, jobs=-1)
    with pytest.raises(ConfigError, match="every epsilon in --epsilons to be a number > 0 or inf, got '-3'"):
        load_config(None, epsilons="inf,-3")
    with pytest.raises(ConfigError, match="--epsilons .* got 'x'"):
        load_config(None, epsilons="8,x")


def test_a_planted_one_run_failure_is_reported(tmp_path, monkeypatch):
    """A bound above the claim (planted: the audit's result replaced) fails the row and the command."""
    real = one_run_module.one_run_audit

    def inflated(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), epsilon_lower_bound=50.0)

    monkeypatch.setattr(one_run_module, "one_run_audit", inflated)
    run = run_audit(quick_config(epsilons=(2.0,)), tmp_path, "audit_quick", progress=False)
    row = run.results["table"][0]
    assert row["one_run_lower_bound"] == 50.0 and row["one_run_passed"] is False
    assert run.results["cells"]["2"]["one_run"]["passed"] is False
