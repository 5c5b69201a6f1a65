"""The ``dpfa`` command: reference values, JSON output, and every bad input of issue 3 item 5."""

import json
import math
import subprocess
import sys

import pytest

from dpfa.cli import main

BASE = ["--noise-multiplier", "1.0", "--sample-rate", "0.01", "--steps", "1000", "--delta", "1e-5"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("accountant, expected", [("prv", 1.828), ("pld", 1.828), ("rdp", 2.101)])
def test_epsilon_reference_values(capsys, accountant, expected):
    # dp-accounting gives 1.828 (PLD) and 2.101 (RDP) for this configuration.
    code, out, _ = run(capsys, "epsilon", *BASE, "--accountant", accountant, "--json")
    assert code == 0
    res = json.loads(out)
    assert res["epsilon"] == pytest.approx(expected, rel=0.01)
    assert res["noise_multiplier"] == 1.0 and res["sample_rate"] == 0.01 and res["steps"] == 1000
    assert res["accountant"] == accountant


def test_epsilon_text(capsys):
    code, out, _ = run(capsys, "epsilon", *BASE, "--accountant", "rdp")
    assert code == 0 and out.startswith("epsilon = 2.1")


def test_noise_round_trip(capsys):
    code, out, _ = run(capsys, "noise", "--target-epsilon", "3", "--delta", "1e-5", "--sample-rate", "0.01",
                       "--steps", "2000", "--accountant", "rdp", "--json")
    assert code == 0
    res = json.loads(out)
    z = res["noise_multiplier"]
    assert 0.5 < z < 2.0
    code, out, _ = run(capsys, "epsilon", "--noise-multiplier", repr(z), "--sample-rate", "0.01", "--steps", "2000",
                       "--delta", "1e-5", "--accountant", "rdp", "--json")
    eps = json.loads(out)["epsilon"]
    assert eps <= 3.0 and eps == pytest.approx(3.0, rel=0.01)


def test_accountants_table(capsys):
    code, out, _ = run(capsys, "accountants", *BASE, "--json")
    assert code == 0
    res = {r["accountant"]: r["epsilon"] for r in json.loads(out)["results"]}
    assert set(res) == {"rdp", "prv", "pld"}
    assert res["rdp"] >= res["pld"] and res["rdp"] >= res["prv"]
    assert res["prv"] == pytest.approx(res["pld"], rel=0.01)
    code, out, _ = run(capsys, "accountants", *BASE)
    assert code == 0 and "rdp" in out and "prv" in out and "pld" in out


def test_batch_size_gives_rate(capsys):
    code, out, _ = run(capsys, "epsilon", "--noise-multiplier", "1.0", "--batch-size", "100", "--dataset-size",
                       "10000", "--steps", "1000", "--delta", "1e-5", "--accountant", "rdp", "--json")
    assert code == 0 and json.loads(out)["sample_rate"] == 0.01


def test_zero_noise_is_infinite_epsilon(capsys):
    code, out, _ = run(capsys, "epsilon", "--noise-multiplier", "0", "--sample-rate", "0.01", "--steps", "10",
                       "--delta", "1e-5", "--json")
    assert code == 0 and math.isinf(json.loads(out)["epsilon"])


BAD = [
    (["noise", "--target-epsilon", "0", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "10"], "0"),
    (["noise", "--target-epsilon", "-1", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "10"], "-1"),
    (["noise", "--target-epsilon", "nan", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "10"], "NaN"),
    (["epsilon", "--noise-multiplier", "1", "--delta", "0", "--sample-rate", "0.01", "--steps", "10"], "(0, 1)"),
    (["epsilon", "--noise-multiplier", "1", "--delta", "1.5", "--sample-rate", "0.01", "--steps", "10"], "1.5"),
    (["epsilon", "--noise-multiplier", "1", "--delta", "1e-5", "--sample-rate", "0", "--steps", "10"], "(0, 1]"),
    (["epsilon", "--noise-multiplier", "1", "--delta", "1e-5", "--sample-rate", "1.2", "--steps", "10"], "1.2"),
    (["epsilon", "--noise-multiplier", "-0.5", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "10"], "-0.5"),
    (["epsilon", "--noise-multiplier", "1", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "0"], "--steps=0"),
    (["epsilon", "--noise-multiplier", "1", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "10",
      "--mechanism", "nope"], "known: discrete_gaussian, gaussian, laplace"),
    (["epsilon", "--noise-multiplier", "1", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "10",
      "--accountant", "nope"], "known: pld, prv, rdp"),
    (["epsilon", "--noise-multiplier", "1", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "10",
      "--sampling", "shuffle"], "'shuffle'"),
    (["epsilon", "--noise-multiplier", "1", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "10",
      "--mechanism", "discrete_gaussian", "--accountant", "prv"], "discrete_gaussian"),
    (["epsilon", "--noise-multiplier", "1", "--delta", "1e-5", "--steps", "10"], "--sample-rate"),
    (["epsilon", "--noise-multiplier", "1", "--delta", "1e-5", "--batch-size", "10", "--steps", "10"],
     "--dataset-size"),
]


@pytest.mark.parametrize("argv, needle", BAD, ids=[" ".join(a[-2:]) for a, _ in BAD])
def test_bad_input_is_a_clear_error(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith("dpfa: error:") and needle in err
    assert "Traceback" not in err


def test_delta_above_one_over_n_warns(capsys):
    code, out, err = run(capsys, "epsilon", "--noise-multiplier", "1", "--delta", "1e-3", "--sample-rate", "0.01",
                         "--steps", "10", "--dataset-size", "5000", "--accountant", "rdp")
    assert code == 0 and "warning" in err and "1/dataset-size" in err


def test_help_explains_every_option(capsys):
    for cmd, options in [("epsilon", ["--noise-multiplier", "--sample-rate", "--steps", "--delta", "--accountant",
                                      "--sampling", "--dataset-size", "--json"]),
                         ("noise", ["--target-epsilon", "--accountant", "--json"]),
                         ("accountants", ["--noise-multiplier"]),
                         ("audit", ["--config", "--quick", "--num-shadow-models", "--epsilons", "--jobs", "--out-dir",
                                    "--json"])]:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        for o in options:
            assert o in out


def test_command_runs_as_a_process_without_traceback():
    ok = subprocess.run([sys.executable, "-m", "dpfa", "epsilon", *BASE, "--accountant", "rdp", "--json"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and json.loads(ok.stdout)["epsilon"] == pytest.approx(2.101, rel=0.01)
    bad = subprocess.run([sys.executable, "-m", "dpfa", "epsilon", "--noise-multiplier", "1", "--delta", "2",
                          "--sample-rate", "0.01", "--steps", "10"], capture_output=True, text=True)
    assert bad.returncode == 2 and "delta" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------------ dpfa audit
AUDIT = ["audit", "--quick", "--jobs", "1", "--epsilons", "inf,2"]


def test_audit_quick_writes_and_then_resumes(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no experiments/configs/audit.toml here: the built-in defaults (the same)
    code, out, err = run(capsys, *AUDIT, "--out-dir", "res", "--json")
    assert code == 0 and "Traceback" not in err
    res = json.loads(out)
    assert res["computed"] == ["inf", "2"] and res["cached"] == [] and res["passed"] is True
    assert res["json"] == "res/audit_quick.json" and res["markdown"] == "res/audit_quick.md"
    saved = json.loads((tmp_path / "res/audit_quick.json").read_text())
    assert saved["command"] == "dpfa " + " ".join(AUDIT) + " --out-dir res --json"
    assert [r["epsilon"] for r in res["table"]] == ["inf", "2"] and res["table"] == saved["table"]
    assert (tmp_path / "res/audit_quick.md").read_text().startswith("| epsilon claimed | one-run lower bound |")

    from dpfa.attacks import runner

    monkeypatch.setattr(runner, "run_cell", lambda *a, **k: pytest.fail("a cached cell was recomputed"))
    code, out, err = run(capsys, *AUDIT, "--out-dir", "res")
    assert code == 0
    assert out.startswith("| epsilon claimed |") and "computed: none; cached: inf, 2" in out
    assert "epsilon inf: cached" in err


def test_audit_exit_status_is_1_when_a_one_run_bound_exceeds_its_claim(capsys, tmp_path, monkeypatch):
    import dataclasses

    from dpfa.attacks import one_run

    real = one_run.one_run_audit
    monkeypatch.setattr(one_run, "one_run_audit",
                        lambda *a, **k: dataclasses.replace(real(*a, **k), epsilon_lower_bound=9.0))
    code, out, _ = run(capsys, "audit", "--quick", "--jobs", "1", "--epsilons", "2", "--out-dir", str(tmp_path))
    assert code == 1 and "FAILED: the one-run lower bound exceeds the claimed epsilon at epsilon 2" in out


@pytest.mark.parametrize("argv, needle", [
    (["--epsilons", "8,-1"], "every epsilon in --epsilons to be a number > 0 or inf, got '-1'"),
    (["--epsilons", "8,eight"], "'eight'"),
    (["--num-shadow-models", "2"], "--num-shadow-models=2"),
    (["--jobs", "-1"], "--jobs=-1"),
    (["--config", "missing.toml"], "missing.toml does not exist"),
    (["--config", "bad.toml"], "train.optimizer='rmsprop'"),
])
def test_audit_bad_input_is_a_clear_error(capsys, tmp_path, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.toml").write_text("[train]\noptimizer = \"rmsprop\"\n")
    code, out, err = run(capsys, "audit", "--quick", "--jobs", "1", *argv, "--out-dir", "res")
    assert code == 2 and out == ""
    assert err.startswith("dpfa: error:") and needle in err and "Traceback" not in err
    assert not (tmp_path / "res").exists()
